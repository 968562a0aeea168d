"""The server killed mid-run and restarted with resume continues from its last checkpoint, losing nothing.

In-process (tests/inprocess_grid.py), the kill is the strategy's own ``crash-after-round`` fault with
the SIGKILL turned into an exception, so the resumed run can be compared weight by weight with an
uninterrupted one; tests/test_simulation.py's slow test kills a real ``flwr run`` ServerApp process and
resumes it.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from inprocess_grid import run_fleet
from safetensors.torch import load_file


class ServerKilled(Exception):
    """The in-process stand-in for the SIGKILL ``crash-after-round`` sends the server."""


def _config(tiny_llama: str, run_dir: Path, **extra) -> dict:
    # One device: frames land in one order, so an uninterrupted run is exactly reproducible.
    return {
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 32,
        "validation-samples": 8,
        "test-samples": 8,
        "num-server-rounds": 4,
        "chunk-size": 8,
        "eval-every": 0,
        "reduction": 4,
        "run-dir": str(run_dir),
        **extra,
    }


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    # the default family's delivery: a PEFT adapter folder per device
    return load_file(str(run_dir / "side_networks" / "device-0" / "adapter_model.safetensors"))


@pytest.fixture
def sigkill_raises(monkeypatch):
    """``os.kill(own pid, SIGKILL)`` raises :class:`ServerKilled` instead: the run stops where it would die."""
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid == os.getpid() and sig == signal.SIGKILL:
            raise ServerKilled()
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)


def _check_checkpoint_after_round_2(run_dir: Path) -> None:
    assert not (run_dir / "summary.json").exists()
    state = json.loads((run_dir / "checkpoint" / "strategy.json").read_text())
    assert state["round"] == 2 and state["cached_frames"] == {"shared": 4}
    # every accepted frame's digest is in the checkpoint: a replay stays refused after the resume
    assert (run_dir / "checkpoint" / "accepted_frames.sha256").stat().st_size == 32 * 4


def _check_resumed(resumed: dict) -> None:
    assert resumed["events"] == ["resumed after round 2"]
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4]  # the history survived
    assert resumed["devices"]["device-0"]["samples_forwarded"] == 32  # nothing forwarded twice
    assert resumed["devices"]["device-0"]["frames"] == 4


def test_a_killed_server_resumes_to_the_same_weights(real_assets, tiny_llama, tmp_path, sigkill_raises):
    whole, _ = run_fleet(tmp_path / "a", 1, _config(tiny_llama, tmp_path / "a" / "run"))
    run_dir = tmp_path / "b" / "run"
    with pytest.raises(ServerKilled):
        run_fleet(tmp_path / "b", 1, _config(tiny_llama, run_dir, **{"crash-after-round": 2}))
    _check_checkpoint_after_round_2(run_dir)

    resumed, grid = run_fleet(tmp_path / "c", 1, _config(tiny_llama, run_dir, resume=True))
    _check_resumed(resumed)
    assert grid.nodes[grid.node_id(0)].handled.count("train.forward") == 0  # rounds 3-4 train from the cache
    a, b = _adapter(tmp_path / "a" / "run"), _adapter(run_dir)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["test_macro_f1"] == whole["test_macro_f1"]


def _accounting(summary: dict) -> dict:
    """What a run counted, without what it timed or weighed (seconds, megabytes) or where it ran."""

    def kept(record: dict) -> dict:
        # frame_log: when each frame landed, in the order the trainer took them (the plot's, not a count)
        skipped = ("node_id", "devices", "frame_log")
        return {k: v for k, v in record.items() if not k.endswith(("_s", "_mb")) and k not in skipped}

    return {
        "devices": {d: kept(v) for d, v in summary["devices"].items()},
        "rounds": [kept(r) for r in summary["rounds"]],
        **{
            k: summary[k]
            for k in ("test_accuracy", "test_macro_f1", "test_count", "frames", "frame_bytes", "bytes_up", "bytes_down")
        },
    }


def test_a_resumed_per_device_run_counts_what_the_uninterrupted_one_does(
    real_assets, tiny_llama, tmp_path, sigkill_raises
):
    """Per-device side networks averaged every 2 rounds, validated on the devices: killed after the averaging
    round, the resumed run ends with the same accuracy and the same per-device and per-round accounting
    (evaluation bytes and the other counters a device accrues included)."""
    per_device = {
        "mode": "per-device",
        "aggregate-every": 2,
        "num-server-rounds": 3,
        "eval-every": 2,
        "train-samples": 48,
    }
    whole, _ = run_fleet(tmp_path / "a", 2, _config(tiny_llama, tmp_path / "a" / "run", **per_device))
    run_dir = tmp_path / "b" / "run"
    with pytest.raises(ServerKilled):
        run_fleet(tmp_path / "b", 2, _config(tiny_llama, run_dir, **per_device, **{"crash-after-round": 2}))
    resumed, _ = run_fleet(tmp_path / "c", 2, _config(tiny_llama, run_dir, **per_device, resume=True))
    assert resumed["events"] == ["resumed after round 2"] and not whole["events"]
    assert all(d["eval_bytes_up"] > 0 for d in whole["devices"].values())
    assert _accounting(resumed) == _accounting(whole)


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(real_assets, tiny_llama, tmp_path, sigkill_raises):
    from mobiflower.strategies.side_tuning import FleetError

    run_dir = tmp_path / "run"
    with pytest.raises(FleetError, match="holds no checkpoint"):
        run_fleet(tmp_path, 1, _config(tiny_llama, run_dir, resume=True))
    with pytest.raises(ServerKilled):
        run_fleet(tmp_path, 1, _config(tiny_llama, run_dir, **{"crash-after-round": 1, "num-server-rounds": 2}))
    with pytest.raises(FleetError, match="lr 0.001 -> 0.002"):
        run_fleet(tmp_path, 1, _config(tiny_llama, run_dir, resume=True, **{"num-server-rounds": 2}, lr=0.002))
    with pytest.raises(FleetError, match="labels 'negative,positive' -> 'rotten,fresh'"):  # the task is the run's too
        run_fleet(
            tmp_path, 1, _config(tiny_llama, run_dir, resume=True, **{"num-server-rounds": 2}, labels="rotten,fresh")
        )
