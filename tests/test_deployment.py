"""A real Flower deployment on 127.0.0.1: one SuperLink, two SuperNodes, the bundled model and data.

Each SuperNode gets its own partition through ``--node-config`` and starts a fresh ClientApp
process per message, as on a real fleet. The run side-tunes, delivers, and each device scores
its test split with the side network it installed. Every process is stopped by pid when the
deployment's context exits, also when an assertion fails.
"""

from __future__ import annotations

import json

import psutil
import pytest

from mobiflower.platform.pretrained_tail import read_peft_adapter
from mobiflower.simulations.simulate import SimulateConfig, run_simulate


def _marked(scratch_root) -> list[psutil.Process]:
    """Processes still carrying this test's scratch marker (what simulations.flower_processes uses to stop them)."""
    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            marker = proc.environ().get("MOBIFLOWER_FLOWER_SCRATCH", "")
        except (psutil.Error, OSError):
            continue
        if marker.startswith(str(scratch_root)) and proc.status() != psutil.STATUS_ZOMBIE:
            left.append(proc)
    return left


@pytest.mark.slow
@pytest.mark.real_model
def test_loopback_deployment_side_tunes_and_delivers(real_assets, tmp_path):
    workdir = (tmp_path / "deploy").resolve()
    config = SimulateConfig(
        devices=2,
        workdir=str(workdir),
        timeout_s=1200,
        run_config={
            "train-samples": 256,
            "validation-samples": 32,
            "test-samples": 128,
            "rounds": 4,  # the default family: the tail
            "chunk-size": 64,
            "eval-every": 0,
            "eval-initial": True,
            "bits": 8,
        },
    )
    try:
        summary = run_simulate(config, out=str(tmp_path / "deploy.json"), quiet=True, loopback=True)
    finally:
        left = _marked(workdir)
        for proc in left:
            proc.kill()
    assert not left, f"processes left running after the deployment: {[p.pid for p in left]}"

    assert summary["simulation"]["status"] == "finished:completed"
    devices = summary["devices"]
    assert len(devices) == 2
    # Every device installed the network the server sent (same digest), and wrote it to its folder.
    for name, device in devices.items():
        assert device["delivered"] == 1, device
        config, _ = read_peft_adapter(device["delivered_path"])  # a PEFT adapter folder for the stock model
        assert config.family == "tail" and config.fingerprint.startswith("llama-d576-L30")
        assert device["test_samples"] == 64 and device["frames"] == 2 and not device["failures"]
    # Accuracy improved over the untrained side network on the same test samples.
    assert summary["test_accuracy"] >= summary["initial_test_accuracy"] + 0.1, summary
    assert summary["test_accuracy"] >= 0.62, summary
    # Flower's own traffic: the replies it moved (training frames, the test frames the server-side
    # initial evaluation asked for, small profile/evaluate replies) cost at most 5% more than what the
    # devices sent.
    traffic = summary["flower_traffic"]
    assert traffic["inbound-bytes"] >= summary["bytes_up"] > summary["frame_bytes"]
    assert traffic["inbound_per_up_byte"] <= 1.05, traffic
    assert json.loads((tmp_path / "deploy.json").read_text())["flower_traffic"] == traffic
