"""Fleets, link models and experiments (``simulate``, ``local``), the baselines (``baselines/``), the
benchmarks (``bench/``), the Flower process plumbing they run on, and the ``mobiflower`` command line."""
