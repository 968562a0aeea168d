"""Fleet simulations end to end (tiny random Llama, bundled data, 4 devices), in-process
(tests/inprocess_grid.py: the real ServerApp and device ClientApp over Flower's serialization; the
fleet model's virtual clock makes the times and availability what a real simulation would see).

On ``mixed-phones`` the slow devices adapt (logged with reasons) and the run reports accuracy against
virtual time; on ``flaky`` every frame that arrived is trained or counted and no sample is lost; a
device that opts out of the activation cache is forwarded again every round and none of its
activations are kept.
"""

from __future__ import annotations

import pytest
import torch
from families import LADDER
from inprocess_grid import run_fleet


def _fleet_run(tiny_llama, tmp_path, **overrides):
    run_config = {
        **LADDER,
        "model": tiny_llama,
        "num-taps": 4,
        "train-samples": 128,
        "validation-samples": 32,
        "test-samples": 32,
        "num-server-rounds": 3,
        "chunk-size": 8,
        "eval-every": 1,
        "eval-split": "test",
        "eval-samples": 0,
        "reduction": 4,
        **overrides,
    }
    return run_fleet(tmp_path / "sim", 4, run_config)[0]


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
    assert all(p["metric"] == "accuracy" and "macro_f1" in p for p in curve)  # every task metric, by name
    assert curve[-1]["macro_f1"] == summary["test_macro_f1"]
    assert virtual["device_compute_s"] == pytest.approx(sum(d["compute_s"] for d in devices.values()))


def test_a_flaky_fleet_completes_and_no_frame_that_arrived_is_lost(real_assets, tiny_llama, tmp_path):
    summary = _fleet_run(tiny_llama, tmp_path, fleet="flaky", **{"max-retries": 8})
    unanswered = {d: e["unanswered"] for d, e in summary["virtual"]["devices"].items()}
    assert sum(unanswered.values()) > 0  # the fleet did miss requests (availability 0.8 and 0.5)
    assert summary["frames"] == summary["frames_accepted"] + summary["frames_refused"]
    for device, account in summary["devices"].items():
        assert account["samples_forwarded"] == account["samples_trained"] == 32 and account["samples_lost"] == 0
        assert not account["dropped"] and len(account["failures"]) == unanswered[device]


def test_a_device_outside_the_activation_cache_forwards_every_round(real_assets, tiny_llama, tmp_path):
    fleet = tmp_path / "private.toml"
    fleet.write_text(
        'name = "private"\n'
        '[[tier]]\nname = "kept"\ncount = 3\nuplink-mbps = 20.0\ndownlink-mbps = 100.0\n'
        '[[tier]]\nname = "private"\ncount = 1\nuplink-mbps = 20.0\ndownlink-mbps = 100.0\n'
        "activation-cache = false\n"
    )
    summary = _fleet_run(tiny_llama, tmp_path, fleet=str(fleet), **{"eval-every": 0})
    devices = summary["devices"]
    assert [devices[f"device-{i}"]["activation_cache"] for i in range(4)] == [True, True, True, False]
    for i in range(3):  # cached: forwarded once, trained on for every round from the cache
        assert devices[f"device-{i}"]["forward_passes_per_sample"] == 1.0
    private = devices["device-3"]
    assert private["forward_passes_per_sample"] == 3.0 and private["samples_trained"] == 3 * 32
    assert private["frames"] == 12 and not private["failures"]
    assert [r["phase"] for r in summary["rounds"]] == ["stream", "cache+stream", "cache+stream"]
    assert all(
        r["devices"]["device-3"]["bytes_up"] > 0 and r["devices"]["device-0"]["bytes_up"] == 0
        for r in summary["rounds"][1:]
    )
    # the server kept nothing of the private device: its cache folder holds only the others' frames
    cache = list((tmp_path / "sim").rglob("cache/*/*.frame"))
    assert cache and not [p for p in cache if ".device-3." in p.name]
    assert summary["frames"] == summary["frames_accepted"]


def test_a_heterogeneous_fleet_trains_one_side_network_on_two_backbones(real_assets, tiny_llama, tmp_path):
    """Half the fleet runs the first 2 of the tiny model's 4 blocks: their taps are spread evenly over
    their own depth, their frames get their own input norms and projections, the rest is shared."""
    fleet = tmp_path / "mixed-models.toml"
    fleet.write_text(
        'name = "mixed-models"\n'
        '[[tier]]\nname = "full"\ncount = 2\nuplink-mbps = 20.0\ndownlink-mbps = 100.0\n'
        '[[tier]]\nname = "small"\ncount = 2\nuplink-mbps = 5.0\ndownlink-mbps = 50.0\nspeed = 0.5\n'
        "backbone-layers = 2\n"
    )
    summary = _fleet_run(tiny_llama, tmp_path, fleet=str(fleet), adapt=True, **{"num-taps": 2, "eval-every": 0})
    devices = summary["devices"]
    full, small = devices["device-0"]["fingerprint"], devices["device-2"]["fingerprint"]
    assert "-L4-" in full and "-L2-" in small and devices["device-1"]["fingerprint"] == full
    side = summary["side_network"]
    assert side["fingerprint"] == full and side["layers"] == [1, 3] and side["backbones"] == {small: [0, 1]}
    assert summary["frames"] == summary["frames_accepted"] == 16 and summary["frames_refused"] == 0
    for account in devices.values():  # every device fed the one network and scored it with its own backbone
        assert account["samples_trained"] == 32 and account["delivered"] == 1 and account["test_samples"] == 8
    # the delivered network carries the small backbone's own projections, and they were trained
    from safetensors.torch import load_file

    from mobiflower.platform.side_factory import build_side_network
    from mobiflower.platform.side_networks import read_side_network_config

    path = next((tmp_path / "sim").rglob("side_networks/device-2.safetensors"))
    trained = load_file(str(path))
    fresh = build_side_network(read_side_network_config(path)).state_dict()
    assert "extra_downs.b0.0.weight" in trained and "extra_norms.b0.1.weight" in trained
    assert not torch.equal(trained["extra_downs.b0.0.weight"], fresh["extra_downs.b0.0.weight"])
    assert not torch.equal(trained["downs.0.weight"], fresh["downs.0.weight"])


def test_a_fleet_mixing_weight_precisions_trains_one_side_network(real_assets, tiny_llama, tmp_path):
    """Half the fleet keeps its backbone in int8 (tier key ``weights``): those frames carry the int8
    fingerprint, get their own input norms and projections, and are all trained on."""
    fleet = tmp_path / "mixed-precision.toml"
    fleet.write_text(
        'name = "mixed-precision"\n'
        '[[tier]]\nname = "fp32"\ncount = 2\nuplink-mbps = 20.0\ndownlink-mbps = 100.0\n'
        '[[tier]]\nname = "int8"\ncount = 2\nuplink-mbps = 20.0\ndownlink-mbps = 100.0\n'
        'weight-precision = "int8"\n'
    )
    summary = _fleet_run(
        tiny_llama, tmp_path, fleet=str(fleet), **{"num-taps": 2, "eval-every": 0, "num-server-rounds": 2}
    )
    devices = summary["devices"]
    full, small = devices["device-0"]["fingerprint"], devices["device-2"]["fingerprint"]
    assert "-float32-" in full and "-int8-" in small and devices["device-3"]["fingerprint"] == small
    assert summary["side_network"]["backbones"] == {small: [1, 3]}
    assert summary["frames"] == summary["frames_accepted"] == 16 and summary["frames_refused"] == 0
    for account in devices.values():
        assert account["samples_trained"] == 32 and account["delivered"] == 1
