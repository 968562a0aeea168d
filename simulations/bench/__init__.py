"""The benchmarks behind RESULTS.md, one module per question (``mobiflower bench ...``): device cost
(:mod:`.device`, :mod:`.precision`), pipeline overlap (:mod:`.pipeline`), side-network modes
(:mod:`.modes`), server load (:mod:`.load`), time-to-target on fleets (:mod:`.fleet`) and the cost
of refusing hostile frames (:mod:`.hostile`); :mod:`.common` and :mod:`.memory_cap` are shared."""
