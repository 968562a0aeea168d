"""Faults on a real deployment: a SuperNode killed mid-run costs its own work, reported, and nothing else."""

from __future__ import annotations

import json
import os
import signal
import threading

import pytest
from families import LADDER

from mobiflower.simulations.flower_config import app_dir_for_run
from mobiflower.simulations.loopback import LoopbackDeployment
from mobiflower.simulations.simulate import default_app_config


@pytest.mark.slow
@pytest.mark.real_model
def test_a_supernode_killed_mid_run_is_dropped_and_reported(real_assets, tiny_llama, tmp_path):
    scratch = (tmp_path / "faults").resolve()
    run_dir = scratch / "run"
    run_config = {
        **LADDER,
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 64,
        "validation-samples": 8,
        "test-samples": 16,
        "rounds": 2,
        "chunk-size": 8,
        "eval-every": 0,
        "reduction": 4,
        "request-timeout": 240.0,
        "run-dir": str(run_dir),
    }
    env = {"MOBIFLOWER_HOME": os.environ["MOBIFLOWER_HOME"]} if "MOBIFLOWER_HOME" in os.environ else {}
    killed = threading.Event()
    with LoopbackDeployment(scratch, 2, extra_env=env) as deployment:
        victim = deployment.supernodes[1]

        def on_line(line: str) -> None:  # once the fleet is profiled, the second device dies
            if "side network(s), mode" in line and not killed.is_set():
                os.kill(victim.pid, signal.SIGKILL)
                killed.set()

        result = deployment.run(
            app_dir_for_run(scratch, default_app_config()), run_config, on_line=on_line, timeout_s=600
        )
    assert killed.is_set()
    assert result.ok, result.details
    summary = json.loads((run_dir / "summary.json").read_text())
    devices = {d["node_id"]: (name, d) for name, d in summary["devices"].items()}
    assert len(devices) == 2
    lost = [d for _, d in devices.values() if d["dropped"]]
    kept = [d for _, d in devices.values() if not d["dropped"]]
    assert len(lost) == 1 and len(kept) == 1
    dead = lost[0]
    # its work is reported, never silently gone: every sample it was asked for is forwarded or counted lost
    assert dead["samples_forwarded"] + dead["samples_lost"] == 32
    assert dead["samples_lost"] > 0 and dead["failures"]
    assert "delivered" not in dead or dead["delivered"] == 0
    # the other device finished everything: all its frames trained, its network delivered and tested
    alive = kept[0]
    assert alive["samples_forwarded"] == 32 and alive["frames"] == 4 and not alive["frames_refused"]
    assert alive["delivered"] == 1 and alive["test_samples"] == 8
    assert summary["frames"] == alive["frames"] + dead["frames"]
