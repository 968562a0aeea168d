"""Fleet simulations end to end (tiny random Llama, bundled data, 4 devices, real Flower simulation).

On ``mixed-phones`` the slow devices adapt (logged with reasons) and the run reports accuracy against
virtual time; on ``flaky`` every frame that arrived is trained or counted and no sample is lost; a
device that opts out of the activation cache is forwarded again every round and none of its
activations are kept.
"""

from __future__ import annotations

import pytest


def _fleet_run(tiny_llama, tmp_path, **overrides):
    from mobiflower.simulations.simulate import SimulateConfig, run_simulate

    run_config = {"model": tiny_llama, "num-taps": 4, "train-samples": 128, "validation-samples": 32,
                  "test-samples": 32, "rounds": 3, "chunk-size": 8, "eval-every": 1, "eval-split": "test",
                  "eval-samples": 0, "reduction": 4, **overrides}
    return run_simulate(SimulateConfig(devices=4, workdir=str(tmp_path / "sim"), timeout_s=600,
                                       run_config=run_config), quiet=True)


def test_mixed_phones_adapt_and_report_accuracy_against_virtual_time(real_assets, tiny_llama, tmp_path):
    summary = _fleet_run(tiny_llama, tmp_path, fleet="mixed-phones", adapt=True)
    virtual = summary["virtual"]
    assert virtual["clock"] == "virtual" and virtual["fleet"] == "mixed-phones" and virtual["adapt"]
    devices = virtual["devices"]
    assert [devices[f"device-{i}"]["tier"] for i in range(4)] == ["flagship", "mid-range", "mid-range", "budget"]
    assert virtual["deadline_s"] > 0 and "median" in virtual["deadline_reason"]
    # the budget phone cannot stream everything at full fidelity by the median device's time: it adapts
    budget, flagship = devices["device-3"], devices["device-0"]
    assert budget["decisions"] and all(d["reason"] for d in budget["decisions"])
    assert (budget["final_choice"]["taps"], budget["final_choice"]["bits"]) < (4, 8)
    assert summary["devices"]["device-3"]["frame_bytes"] < summary["devices"]["device-0"]["frame_bytes"]
    assert flagship["compute_s"] > 0 and budget["upload_s"] > flagship["upload_s"] / 4
    # nothing was refused: prefix-tapped, lower-bit frames train the one shared network
    assert summary["frames"] == summary["frames_accepted"] == 16 and summary["frames_refused"] == 0
    curve = virtual["curve"]
    assert [p["round"] for p in curve] == [1, 2, "final"]
    assert all(a["virtual_s"] <= b["virtual_s"] for a, b in zip(curve, curve[1:]))
    assert curve[-1]["accuracy"] == summary["test_accuracy"] and virtual["total_s"] == curve[-1]["virtual_s"]
    assert virtual["device_compute_s"] == pytest.approx(sum(d["compute_s"] for d in devices.values()))


def test_a_flaky_fleet_completes_and_no_frame_that_arrived_is_lost(real_assets, tiny_llama, tmp_path):
    summary = _fleet_run(tiny_llama, tmp_path, fleet="flaky", **{"max-retries": 8})
    assert summary["simulation"]["status"] == "finished:completed"
    unanswered = {d: e["unanswered"] for d, e in summary["virtual"]["devices"].items()}
    assert sum(unanswered.values()) > 0  # the fleet did miss requests (availability 0.8 and 0.5)
    assert summary["frames"] == summary["frames_accepted"] + summary["frames_refused"]
    for device, account in summary["devices"].items():
        assert account["samples_forwarded"] == account["samples_trained"] == 32 and account["samples_lost"] == 0
        assert not account["dropped"] and len(account["failures"]) == unanswered[device]


def test_a_device_outside_the_activation_cache_forwards_every_round(real_assets, tiny_llama, tmp_path):
    fleet = tmp_path / "private.toml"
    fleet.write_text('name = "private"\n'
                     '[[tier]]\nname = "kept"\ncount = 3\nuplink-mbps = 20.0\ndownlink-mbps = 100.0\n'
                     '[[tier]]\nname = "private"\ncount = 1\nuplink-mbps = 20.0\ndownlink-mbps = 100.0\n'
                     'activation-cache = false\n')
    summary = _fleet_run(tiny_llama, tmp_path, fleet=str(fleet), **{"eval-every": 0})
    devices = summary["devices"]
    assert [devices[f"device-{i}"]["activation_cache"] for i in range(4)] == [True, True, True, False]
    for i in range(3):  # cached: forwarded once, trained on for every round from the cache
        assert devices[f"device-{i}"]["forward_passes_per_sample"] == 1.0
    private = devices["device-3"]
    assert private["forward_passes_per_sample"] == 3.0 and private["samples_trained"] == 3 * 32
    assert private["frames"] == 12 and not private["failures"]
    assert [r["phase"] for r in summary["rounds"]] == ["stream", "cache+stream", "cache+stream"]
    assert all(r["devices"]["device-3"]["bytes_up"] > 0 and r["devices"]["device-0"]["bytes_up"] == 0
               for r in summary["rounds"][1:])
    # the server kept nothing of the private device: its cache folder holds only the others' frames
    cache = list((tmp_path / "sim").rglob("cache/*/*.frame"))
    assert cache and not [p for p in cache if ".device-3." in p.name]
    assert summary["frames"] == summary["frames_accepted"]
