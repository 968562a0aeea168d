"""`mobiflower local`: one device in its own OS process, driven by the same ServerApp strategy `simulate`
runs (over :class:`DeviceProcessGrid`), for both tasks; and the README's `local` and `infer` on the real model."""

import json
import os
import subprocess
import sys

import pytest

from mobiflower.simulations.device_grid import DeviceProcessGrid
from mobiflower.simulations.simulate import SimulateConfig, run_simulate
from mobiflower.strategies.side_tuning import SideTuningStrategy

SMALL = {"train-samples": 48, "validation-samples": 16, "test-samples": 16, "chunk-size": 16, "tail-cut": 2}


def _local(tmp_path, model: str, **run_config) -> dict:
    config = SimulateConfig(
        devices=1,
        workdir=str(tmp_path / "work"),
        run_config={"model": model, "delivery-dir": str(tmp_path / "delivered"), **SMALL, **run_config},
    )
    return run_simulate(config, quiet=True, engine="processes")


def test_local_is_the_strategy_over_one_device_process(tiny_llama, tmp_path, monkeypatch):
    """The run goes through SideTuningStrategy.start on a DeviceProcessGrid, and the device is its own process
    (its peak memory is its own, not the server's)."""
    started = []
    original = SideTuningStrategy.start
    monkeypatch.setattr(SideTuningStrategy, "start", lambda self, grid: started.append(grid) or original(self, grid))
    summary = _local(tmp_path, tiny_llama, **{"num-server-rounds": 2})
    assert len(started) == 1 and isinstance(started[0], DeviceProcessGrid)
    assert summary["simulation"]["engine"] == "processes" and list(summary["devices"]) == ["device-0"]
    device = summary["devices"]["device-0"]
    assert device["data"]["train"] == 48 and device["data"]["test"] == 16 and device["test_samples"] == 16
    assert device["data"]["empty"] == device["data"]["refused"] == 0
    # the fleet's figure is its one device's, a count of right answers over its 16 test samples
    assert summary["test_accuracy"] == pytest.approx(device["test_accuracy"]) and "test_macro_f1" in summary
    assert 16 * device["test_accuracy"] == pytest.approx(round(16 * device["test_accuracy"]))
    adapter = tmp_path / "delivered" / "device-0"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert summary["frames"] >= 3 and summary["bytes_up"] > 0


def test_local_causal_lm_delivers_an_adapter_that_generates(tiny_llama, tmp_path):
    summary = _local(tmp_path, tiny_llama, task="causal-lm", **{"num-server-rounds": 1})
    assert summary["task"] == "causal-lm" and summary["metrics"]["primary"] == "perplexity"
    assert summary["test_perplexity"] > 1 and summary["test_count"] > summary["test_samples"]
    adapter = tmp_path / "delivered" / "device-0"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    from mobiflower.clients.generation import LocalGenerator

    with LocalGenerator.load(adapter) as generator:
        out = generator.generate("the cat", max_new_tokens=4)
    assert len(out.token_ids) == 4


def test_a_device_that_dies_is_answered_at_once(tiny_llama, tmp_path):
    """A device process that cannot start its model fails its profile with the reason, no waiting."""
    with pytest.raises(Exception, match="none of the 1 devices could be profiled"):
        _local(tmp_path, str(tmp_path / "missing-model"), **{"request-timeout": 600.0})


@pytest.mark.real_model
def test_the_readmes_local_and_infer_run_on_the_bundled_model(real_assets, tmp_path):
    """The README's `mobiflower local` then `mobiflower infer`, each in its own OS process, on the bundled model
    with the defaults (pretrained tail, 4-bit frames): one round on a few samples completes, reports its figures
    and delivers an adapter the device classifies with. Whether the tail learns is tests/test_learning.py's."""
    cli = [sys.executable, "-m", "mobiflower.simulations.cli"]
    sizes = ["-c", "train-samples=32", "-c", "validation-samples=8", "-c", "test-samples=16"]
    out = tmp_path / "local.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    local = subprocess.run(
        [*cli, "local", "--quiet", *sizes, "--workdir", str(tmp_path / "w"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,  # ~20 s on 2 cores; a failure, not a hang, is what this bounds
        env=env,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert f"test accuracy {summary['test_accuracy']:.4f}" in local.stdout
    network, device = summary["side_network"], summary["devices"]["device-0"]
    assert network["family"] == "tail" and network["bits"] == 4 and network["fingerprint"].startswith("llama-d576-L30-")
    assert summary["test_samples"] == device["test_samples"] == 16 and device["samples_trained"] == 32
    assert 16 * device["test_accuracy"] == pytest.approx(round(16 * device["test_accuracy"]))
    assert device["delivered"] == 1 and summary["frames"] >= 1 and summary["bytes_up"] > 0
    text = "a gripping, beautiful film"
    infer = subprocess.run(
        [*cli, "infer", "--adapter", device["delivered_path"], text],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    label, _probability, said = infer.stdout.strip().split(maxsplit=2)  # "negative 0.517  a gripping, ..."
    assert label in ("negative", "positive") and said == text


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    from mobiflower.simulations.cli import main

    assert main(["infer", "--adapter", str(tmp_path / "none.safetensors"), "text"]) == 2
    assert "run `mobiflower local` first" in capsys.readouterr().err
    assert main(["local", "--bits", "3"]) == 2
    assert "'--bits': '3' is not one of" in capsys.readouterr().err
    assert main(["local", "-c", "task=translation"]) == 2
    assert "task='translation' is unknown" in capsys.readouterr().err
