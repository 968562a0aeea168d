"""Fleets, link models, experiments, benchmarks and the ``mobiflower`` command line."""
