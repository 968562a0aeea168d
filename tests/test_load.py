"""Load: a 32-device fleet (in-process, tests/inprocess_grid.py) with per-device side networks paged to
disk under a budget. Slow tier: the fleet is large, not the logic (tests/test_side_pager.py); `mobiflower
bench load` measures 8 to 64 devices."""

from __future__ import annotations

import pytest
from inprocess_grid import run_fleet

from mobiflower.simulations.bench.load import CONSTANT_MB, load_run_config, measure

DEVICES = 32
BUDGET_MB = 1.0


@pytest.mark.slow
def test_a_32_device_fleet_runs_with_side_networks_paged_under_the_budget(real_assets, tiny_llama, tmp_path):
    run_config = load_run_config(tiny_llama, DEVICES, samples_per_device=8, rounds=2, reduction=4, budget_mb=BUDGET_MB)
    run_config.update({"chunk-size": 8, "test-samples": 4 * DEVICES})
    summary, _ = run_fleet(tmp_path / "sim", DEVICES, run_config)
    assert len(summary["devices"]) == DEVICES
    for device in summary["devices"].values():
        assert not device["failures"] and device["samples_trained"] == 8 and device["test_samples"] > 0
    row = measure(summary, DEVICES, BUDGET_MB)
    paging = summary["server_memory"]["paging"]
    # the budget held: most networks lived on disk, and each came back in to train every round
    assert paging["paged_out"] >= DEVICES // 2 and row["page_ins"] >= DEVICES
    assert row["side_peak_mb"] <= BUDGET_MB
    # the server process as a whole: the budget plus the stated constant (see bench_load.CONSTANT_MB)
    assert row["rss_growth_mb"] <= BUDGET_MB + CONSTANT_MB, row
