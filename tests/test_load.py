"""Load: a 64-device Flower simulation with per-device side networks paged to disk under a budget."""

from __future__ import annotations

from mobiflower.simulations.bench.load import CONSTANT_MB, load_run_config, measure
from mobiflower.simulations.simulate import SimulateConfig, run_simulate

DEVICES = 64
BUDGET_MB = 1.0


def test_64_devices_run_with_side_networks_paged_under_the_budget(real_assets, tiny_llama, tmp_path):
    run_config = load_run_config(tiny_llama, DEVICES, samples_per_device=8, rounds=2, reduction=4,
                                 budget_mb=BUDGET_MB)
    run_config.update({"chunk-size": 8, "test-samples": 4 * DEVICES})
    summary = run_simulate(SimulateConfig(devices=DEVICES, workdir=str(tmp_path / "sim"), timeout_s=900,
                                          run_config=run_config), quiet=True)
    assert summary["simulation"]["status"] == "finished:completed"
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
