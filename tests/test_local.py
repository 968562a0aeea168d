"""`mobiflower local` and `mobiflower infer` end to end: two real OS processes, frames over a pipe."""

import json
import subprocess
import sys

import pytest

from mobiflower.simulations.local import LocalRunConfig, run_local


def test_local_run_on_tiny_model(tiny_llama, tmp_path):
    out = tmp_path / "run.json"
    config = LocalRunConfig(
        model=tiny_llama,
        family="ladder",
        train_samples=64,
        validation_samples=32,
        test_samples=32,
        epochs=2,
        bits=4,
        num_taps=2,
        chunk_size=32,
        device_threads=1,
        workdir=str(tmp_path / "work"),
    )
    result = run_local(config, out=str(out), progress=False)
    written = json.loads(out.read_text())
    for key in ("test_accuracy", "zero_shot_accuracy", "bits", "token_policy", "train_samples", "bytes_sent"):
        assert key in written, key
    assert written["bits"] == 4 and written["token_policy"] == "last" and written["train_samples"] == 64
    assert 0 <= result["test_accuracy"] <= 1
    # 96 samples sent (train + validation) as 4-bit last-token frames of 2 layers x 64 wide
    assert 96 * 2 * 64 * 4 / 8 < result["bytes_sent"] < 96 * 2 * 64 * 2
    assert (tmp_path / "work" / "side_network.safetensors").is_file()
    assert (tmp_path / "work" / "checkpoint" / "optimizer.safetensors").is_file()


def test_local_tail_run_delivers_a_peft_adapter(tiny_llama, tmp_path):
    """The default family: the device forwards blocks 0..cut-1, the server trains the rest with LoRA and
    delivers a PEFT adapter folder, which the device then runs on its own upper blocks."""
    config = LocalRunConfig(
        model=tiny_llama,
        tail_cut=2,
        train_samples=64,
        validation_samples=32,
        test_samples=32,
        epochs=2,
        chunk_size=32,
        device_threads=1,
        workdir=str(tmp_path / "work"),
    )
    assert config.family == "tail" and config.token_policy == "nonpad"
    result = run_local(config, progress=False)
    assert result["family"] == "tail" and result["layers"] == [1] and 0 <= result["test_accuracy"] <= 1
    adapter = tmp_path / "work" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert result["delivery_bytes"] < 100_000  # LoRA + head in fp16, no backbone weights
    with pytest.raises(ValueError, match="nonpad"):
        LocalRunConfig(model=tiny_llama, token_policy="last")


def test_device_failure_is_reported(tmp_path):
    from mobiflower.simulations.local import DeviceFailed

    config = LocalRunConfig(
        model=str(tmp_path / "missing-model"),
        train_samples=8,
        validation_samples=4,
        test_samples=4,
        workdir=str(tmp_path / "w"),
        device_threads=1,
    )
    with pytest.raises(DeviceFailed, match="cannot load model"):
        run_local(config, progress=False)


@pytest.mark.real_model
def test_side_tuning_learns_on_the_bundled_model(real_assets, tmp_path):
    """A short real run: 4-bit last-token frames of SmolLM2 beat the zero-shot prompt clearly."""
    out = tmp_path / "real.json"
    cmd = [
        sys.executable,
        "-m",
        "mobiflower.simulations.cli",
        "local",
        "--family",
        "ladder",
        "--train-samples",
        "160",
        "--validation-samples",
        "48",
        "--test-samples",
        "128",
        "--epochs",
        "10",
        "--lr",
        "1e-3",
        "--bits",
        "4",
        "--device-threads",
        "1",  # the suite runs two test files at once on CI's two cores
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test accuracy" in proc.stdout
    result = json.loads(out.read_text())
    assert result["test_accuracy"] >= 0.66, result
    assert result["test_accuracy"] > result["zero_shot_accuracy"] + 0.05, result
    assert result["bytes_per_sample"] < 8 * 370  # 8 layers x (288 B codes + 18 groups x 4 B scales) + header share

    side = tmp_path / "work" / "side_network.safetensors"
    infer = subprocess.run(
        [
            sys.executable,
            "-m",
            "mobiflower.simulations.cli",
            "infer",
            "--side-network",
            str(side),
            "An absolute masterpiece, moving and funny.",
            "Dull, lifeless and far too long.",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert infer.returncode == 0, infer.stderr[-3000:]
    lines = infer.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.split()[0] in ("positive", "negative") for line in lines)


def test_cli_errors_say_what_to_do(tmp_path, capsys):
    from mobiflower.simulations.cli import main

    assert main(["infer", "--side-network", str(tmp_path / "none.safetensors"), "text"]) == 2
    assert "run `mobiflower local` first" in capsys.readouterr().err
    assert main(["local", "--bits", "3"]) == 2
    assert "'--bits': '3' is not one of" in capsys.readouterr().err
