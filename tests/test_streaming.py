"""The strategy's streaming round, retries and drops, driven in-process (tests/inprocess_grid.py).

Each test runs the real ServerApp and the real device ClientApp on a tiny random Llama and the
bundled data, with Flower's wire in between but no SuperLink or Ray, and injects the fault it is
about on purpose: a reply dropped or failed, a device killed. Seconds each.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from families import LADDER
from inprocess_grid import of_type, run_fleet

from mobiflower.platform.run_summary import plot_data


def _config(tiny_llama: str, **overrides) -> dict:
    # 2 devices x 16 training samples in chunks of 4: four forward requests per device and round
    return {
        **LADDER,
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 32,
        "validation-samples": 8,
        "test-samples": 16,
        "num-server-rounds": 2,
        "chunk-size": 4,
        "eval-every": 0,
        "reduction": 4,
        **overrides,
    }


def test_a_round_streams_in_flight_requests_and_accounts_for_every_frame(real_assets, tiny_llama, tmp_path):
    summary, grid = run_fleet(
        tmp_path,
        2,
        _config(
            tiny_llama,
            **{"mode": "per-device", "aggregate-every": 2, "num-server-rounds": 3, "eval-every": 2, "in-flight": 3},
        ),
    )
    # streaming: the strategy kept in-flight forward requests per device queued, never more
    assert set(grid.peak_in_flight.values()) == {3}
    devices = summary["devices"]
    for device in devices.values():
        assert device["frames"] == 4 and device["samples_forwarded"] == device["samples_trained"] == 16
        assert device["bytes_up"] >= device["frame_bytes"] > 0 and device["bytes_down"] > 0
        assert device["delivered"] == 1 and device["test_samples"] == 8 and not device["failures"]
    rounds = summary["rounds"]
    assert [r["phase"] for r in rounds] == ["stream", "cache", "cache"]
    # a cached round forwards nothing for training: round 2's bytes up are the validation frames alone
    assert rounds[1]["bytes_up"] == sum(d["eval_bytes_up"] for d in devices.values()) > 0
    assert rounds[1].get("aggregated") and "validation_accuracy" in rounds[1] and "validation_macro_f1" in rounds[1]
    assert sum(d["frame_bytes"] for d in rounds[0]["devices"].values()) == summary["frame_bytes"]
    # the task's figures, by name: the bundled job is classification, scored by accuracy and macro-F1
    assert summary["task"] == "classification"
    assert summary["metrics"] == {"primary": "accuracy", "names": ["accuracy", "macro-f1"], "higher_is_better": True}
    for device in devices.values():
        right = device["test_accuracy"] * device["test_samples"]  # a count of right answers over its samples
        assert right == pytest.approx(round(right)) and "test_macro_f1" in device
        assert device["test_count"] == device["test_samples"]  # a classifier scores samples
        assert len(device["label_shares"]) == 2 and sum(device["label_shares"]) == pytest.approx(1.0)
    assert summary["test_samples"] == summary["test_count"] == 16
    assert summary["test_accuracy"] == pytest.approx(
        sum(d["test_accuracy"] * d["test_samples"] for d in devices.values()) / 16
    )
    assert summary["frames"] == summary["frames_accepted"] == 8
    # what summary.png draws: round 1's loss per frame (4 samples each, in training order), a mean per round,
    # validation after round 2, the test after all three epochs of 32 samples
    log = rounds[0]["frame_log"]
    assert [n for n, *_ in log] == [4] * 8 and sum(b for _, _, b, _ in log) == summary["frame_bytes"]
    data = plot_data(summary)
    assert [x for x, _ in data["loss"]["frames"]] == list(range(4, 33, 4))
    assert [x for x, _ in data["loss"]["rounds"]] == [32, 64, 96] and all(y > 0 for _, y in data["loss"]["rounds"])
    assert [x for x, _ in data["validation"]] == [64] and data["test"] == (96, summary["test_accuracy"])
    assert data["up_mb"][-1] == (96, summary["bytes_up"] / 1e6) and data["down_mb"][-1][0] == 96
    assert {p.name for p in (tmp_path / "run" / "checkpoint").iterdir()} >= {"device-0", "device-1", "store.json"}
    # every device handled its requests in the order of the protocol
    for node in grid.nodes.values():
        assert node.handled[0] == "query.profile" and node.handled[-2:] == ["train.deliver", "evaluate"]


def test_a_failed_or_lost_forward_reply_is_retried_and_nothing_is_lost(real_assets, tiny_llama, tmp_path):
    def faults(grid):
        grid.fail_replies(of_type("train.forward", grid.node_id(0)), times=1)  # an error reply
        grid.drop_replies(of_type("train.forward", grid.node_id(1)), times=1)  # no reply: the timeout notices

    summary, grid = run_fleet(
        tmp_path, 2, _config(tiny_llama, **{"request-timeout": 1.0, "max-retries": 1}), faults=faults
    )
    assert len(grid.dropped) == 1
    for name, why in (("device-0", "injected failure"), ("device-1", "no reply within 1 s")):
        device = summary["devices"][name]
        assert not device["dropped"] and device["samples_lost"] == 0
        assert device["samples_trained"] == 16 and device["frames"] == 4  # the retry delivered the chunk
        assert len(device["failures"]) == 1 and why in device["failures"][0], device["failures"]
    assert summary["frames"] == summary["frames_accepted"] == 8


def test_a_device_that_keeps_failing_is_dropped_and_its_samples_counted_lost(real_assets, tiny_llama, tmp_path):
    def faults(grid):
        grid.fail_replies(of_type("train.forward", grid.node_id(1)), times=2)  # the first try and its retry

    summary, _ = run_fleet(tmp_path, 2, _config(tiny_llama, **{"max-retries": 1, "in-flight": 1}), faults=faults)
    dead, alive = summary["devices"]["device-1"], summary["devices"]["device-0"]
    assert dead["dropped"] and len(dead["failures"]) == 2
    # every sample it was asked for is forwarded or counted lost, never silently gone
    assert dead["samples_forwarded"] + dead["samples_lost"] == 16 and dead["samples_lost"] >= 4
    assert "delivered" not in dead and "test_accuracy" not in dead
    assert alive["samples_trained"] == 16 and alive["delivered"] == 1 and not alive["failures"]


def test_a_device_killed_mid_round_is_dropped_and_the_run_goes_on(real_assets, tiny_llama, tmp_path):
    """The logic of tests/test_deployment.py's killed SuperNode, without the deployment: after its profile
    and two frames the device is gone, and Flower answers for it that the node is unavailable."""
    summary, grid = run_fleet(
        tmp_path, 2, _config(tiny_llama, **{"in-flight": 1}), faults=lambda grid: grid.kill(1, after=3)
    )
    dead, alive = summary["devices"]["device-1"], summary["devices"]["device-0"]
    assert dead["dropped"] and dead["frames"] == 2
    assert dead["samples_forwarded"] == 8 and dead["samples_lost"] == 8
    assert all("node unavailable" in why for why in dead["failures"]), dead["failures"]
    assert alive["frames"] == 4 and alive["delivered"] == 1 and alive["test_samples"] == 8
    assert summary["frames"] == alive["frames"] + dead["frames"]
    assert grid.nodes[grid.node_id(1)].handled == ["query.profile", "train.forward", "train.forward"]


def test_without_overlap_the_serial_baseline_trains_the_same_frames(real_assets, tiny_llama, tmp_path):
    overlapped, _ = run_fleet(tmp_path / "a", 1, _config(tiny_llama, **{"num-server-rounds": 1}))
    serial, _ = run_fleet(tmp_path / "b", 1, _config(tiny_llama, **{"num-server-rounds": 1}, overlap=False))
    assert serial["frames_accepted"] == overlapped["frames_accepted"] == 8
    assert serial["rounds"][0]["loss"] == overlapped["rounds"][0]["loss"]
    assert Path(tmp_path / "b" / "run" / "summary.json").exists()


def test_a_causal_lm_fleet_is_scored_by_its_own_metrics(real_assets, tiny_llama, tmp_path):
    """Task ``causal-lm`` on the pretrained tail: validation on the server and the final test on the devices
    report perplexity, loss and token accuracy by name, the fleet's perplexity is exp of its token-weighted
    loss, and nothing in the summary speaks of accuracy or labels."""
    import math

    from mobiflower.simulations.simulate import format_summary

    config = {
        "model": tiny_llama,
        "task": "causal-lm",
        "num-taps": 2,
        "train-samples": 16,
        "validation-samples": 8,
        "test-samples": 8,
        "num-server-rounds": 2,
        "chunk-size": 8,
        "eval-every": 1,
        "max-length": 32,
    }
    summary, _ = run_fleet(tmp_path, 2, config)
    assert summary["task"] == "causal-lm" and summary["metrics"]["primary"] == "perplexity"
    assert not [k for k in summary if "accuracy" in k and "token_accuracy" not in k]
    devices = summary["devices"].values()
    for device in devices:
        assert device["label_shares"] == [] and not device["failures"] and device["delivered"] == 1
        assert device["test_perplexity"] == pytest.approx(math.exp(device["test_loss"]))
        assert device["test_count"] > device["test_samples"] == 4  # scored tokens, not samples
        right = device["test_token_accuracy"] * device["test_count"]  # right next tokens over the scored ones
        assert math.isfinite(device["zero_shot_perplexity"]) and right == pytest.approx(round(right))
    tokens = sum(d["test_count"] for d in devices)
    assert summary["test_count"] == tokens and summary["test_samples"] == 8
    loss = sum(d["test_loss"] * d["test_count"] for d in devices) / tokens  # the fleet: weighted by tokens
    assert summary["test_loss"] == pytest.approx(loss)
    assert summary["test_perplexity"] == pytest.approx(math.exp(loss)) and summary["zero_shot_perplexity"] >= 1
    first = summary["rounds"][0]  # validation on the server, from kept frames
    assert first["validation_perplexity"] == pytest.approx(math.exp(first["validation_loss"]))
    curve = summary["virtual"]["curve"]
    assert [p["metric"] for p in curve] == ["perplexity"] * 2 and curve[-1]["perplexity"] == summary["test_perplexity"]
    assert "test perplexity" in format_summary(summary)
