"""The server killed mid-run and restarted with resume continues from its last checkpoint, losing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from mobiflower.simulations.flower_config import app_dir_for_run
from mobiflower.simulations.flower_run import run_simulation
from mobiflower.simulations.simulate import SimulateConfig, default_app_config, run_simulate


def _config(tiny_llama: str, run_dir: Path, **extra) -> dict:
    # One device: frames land in one order, so an uninterrupted run is exactly reproducible.
    return {"model": tiny_llama, "num-taps": 2, "train-samples": 48, "validation-samples": 8, "test-samples": 8,
            "rounds": 6, "chunk-size": 8, "eval-every": 0, "reduction": 4, "run-dir": str(run_dir), **extra}


def test_killed_server_resumes_to_the_same_weights(real_assets, tiny_llama, tmp_path):
    whole = run_simulate(SimulateConfig(devices=1, client_cpus=2, workdir=str(tmp_path / "a"),
                                        run_config=_config(tiny_llama, tmp_path / "a" / "run")), quiet=True)

    run_dir = tmp_path / "b" / "run"
    crashed = run_simulation(app_dir_for_run(tmp_path / "b", default_app_config()),
                             _config(tiny_llama, run_dir, **{"crash-after-round": 3}), num_supernodes=1,
                             client_cpus=2, scratch=tmp_path / "b", timeout_s=600, check=False)
    assert not crashed.ok and not (run_dir / "summary.json").exists()
    state = json.loads((run_dir / "checkpoint" / "strategy.json").read_text())
    assert state["round"] == 3 and state["cached_frames"] == {"shared": 6}
    # every accepted frame's digest is in the checkpoint: a replay stays refused after the resume
    assert (run_dir / "checkpoint" / "accepted_frames.sha256").stat().st_size == 32 * 6

    resumed = run_simulate(SimulateConfig(devices=1, client_cpus=2, workdir=str(tmp_path / "c"),
                                          run_config=_config(tiny_llama, run_dir, resume=True)), quiet=True)
    assert resumed["events"] == ["resumed after round 3"]
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3, 4, 5, 6]  # the history survived
    assert resumed["devices"]["device-0"]["samples_forwarded"] == 48  # nothing forwarded twice
    assert resumed["devices"]["device-0"]["frames"] == 6
    # the default family's delivery: a PEFT adapter folder per device
    a = load_file(str(Path(whole["simulation"]["run_dir"]) / "side_networks" / "device-0" / "adapter_model.safetensors"))
    b = load_file(str(run_dir / "side_networks" / "device-0" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["test_accuracy"] == whole["test_accuracy"]
