"""The server killed mid-run and restarted with resume continues from its last checkpoint, losing nothing.

In-process (tests/inprocess_grid.py), the kill is the strategy's own ``crash-after-round`` fault with
the SIGKILL turned into an exception, so the resumed run can be compared weight by weight with an
uninterrupted one; the slow test kills a real ``flwr run`` ServerApp process and resumes it.
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
        "rounds": 4,
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


def test_resume_refuses_changed_settings_and_a_missing_checkpoint(real_assets, tiny_llama, tmp_path, sigkill_raises):
    from mobiflower.strategies.side_tuning import FleetError

    run_dir = tmp_path / "run"
    with pytest.raises(FleetError, match="holds no checkpoint"):
        run_fleet(tmp_path, 1, _config(tiny_llama, run_dir, resume=True))
    with pytest.raises(ServerKilled):
        run_fleet(tmp_path, 1, _config(tiny_llama, run_dir, **{"crash-after-round": 1, "rounds": 2}))
    with pytest.raises(FleetError, match="lr 0.001 -> 0.002"):
        run_fleet(tmp_path, 1, _config(tiny_llama, run_dir, resume=True, rounds=2, lr=0.002))


@pytest.mark.slow
def test_a_killed_flwr_run_server_resumes_from_its_checkpoint(real_assets, tiny_llama, tmp_path):
    """A real ServerApp process SIGKILLed after round 2, then a fresh ``flwr run`` with resume.

    Flower marks a run whose ServerApp died as failed only when its heartbeat lapses (30 s, twice), and
    the dying process's last log lines never reach the stream; an operator who saw the server die stops
    the run, and so does this test once the round-2 checkpoint is on disk (the kill follows it at once)."""
    import re
    import threading
    import time

    from mobiflower.simulations.flower_config import LOCAL_CONNECTION, app_dir_for_run
    from mobiflower.simulations.flower_processes import flower_env, free_ports
    from mobiflower.simulations.flower_run import flwr_json, run_simulation
    from mobiflower.simulations.simulate import SimulateConfig, default_app_config, run_simulate

    scratch = (tmp_path / "b").resolve()
    run_dir = scratch / "run"
    ports = dict(zip(("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"), map(str, free_ports(2))))
    started: list[str] = []
    finished = threading.Event()

    def stop_after_the_kill() -> None:
        state = run_dir / "checkpoint" / "strategy.json"
        while not finished.wait(0.2):
            if started and state.exists() and json.loads(state.read_text() or "{}").get("round") == 2:
                time.sleep(2.0)
                flwr_json(["stop", started[-1], LOCAL_CONNECTION], {**flower_env(scratch), **ports})
                return

    watcher = threading.Thread(target=stop_after_the_kill, daemon=True)
    watcher.start()
    try:
        crashed = run_simulation(
            app_dir_for_run(scratch, default_app_config()),
            _config(tiny_llama, run_dir, **{"crash-after-round": 2}),
            num_supernodes=1,
            client_cpus=2,
            scratch=scratch,
            on_line=lambda line: started.extend(re.findall(r"Successfully started run (\d+)", line)),
            extra_env=ports,  # the same local SuperLink for `flwr stop`
            timeout_s=600,
            check=False,
        )
    finally:
        finished.set()
    assert started and not crashed.ok, crashed.status
    _check_checkpoint_after_round_2(run_dir)
    resumed = run_simulate(
        SimulateConfig(
            devices=1, client_cpus=2, workdir=str(tmp_path / "c"), run_config=_config(tiny_llama, run_dir, resume=True)
        ),
        quiet=True,
    )
    _check_resumed(resumed)
    assert _adapter(run_dir)  # delivered
