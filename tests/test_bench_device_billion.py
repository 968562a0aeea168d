"""`mobiflower bench device` in its billion-sized mode (issue 16) on a tiny OPT: weight precisions,
training configurations, a memory cap and out-of-memory results. Its own file so that the test runner
can run it beside tests/test_bench_device.py: each runs every method in its own process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mobiflower.simulations.bench.device_report import format_table

pytestmark = pytest.mark.slow  # each method is measured in its own process

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def billion(tmp_path_factory, real_assets):
    """The issue-16 mode on a tiny OPT through the CLI: the device from its int4 copy, two training
    configurations, a memory cap."""
    from mobiflower.platform.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("billion")
    model = make_tiny_model("opt", root / "opt", hidden=64, layers=2)
    out = root / "out" / "bench.json"
    argv = ["-m", "mobiflower.simulations.cli", "bench", "device", "--model", str(model), "--batches", "2"]
    argv += ["--batch-size", "4", "--num-taps", "2", "--threads", "1", "--weights", "int4"]
    argv += ["--train-configs", "4", "2,24,16", "--memory-cap-gb", "8", "--out", str(out), "--no-progress"]
    run = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return json.loads(out.read_text()), out, run.stdout


def test_billion_mode_measures_each_precision_and_configuration(billion):
    from mobiflower.simulations.bench.device_spec import BILLION_ACCEPTANCE

    result, out, printed = billion
    assert list(result["methods"]) == [
        "mobiflower_device_int4",
        "tail_device_int4",
        "inference_forward",
        "lora_step",
        "full_step",
    ]
    assert result["prepared"]["int4"]["weights_file_mb"] > 0
    for name in ("mobiflower_device_int4", "tail_device_int4"):
        m = result["methods"][name]
        assert m["precision"] == "int4" and m["forward"] == "lean" and m["startup_s"] > m["model_load_s"] > 0
        assert m["cap_mb"] == 8 * 1024 and m["tokens_per_sample"] > 0
    rows = result["train_configs"]["rows"]
    assert [r["base"] for r in rows] == [True, False]  # the base configuration is reused, not run twice
    assert rows[0]["methods"]["lora_step"] == result["methods"]["lora_step"]
    assert rows[1]["methods"]["lora_step"]["lora_rank"] == 16
    assert (
        rows[1]["methods"]["lora_step"]["trainable_parameters"]
        > rows[0]["methods"]["lora_step"]["trainable_parameters"]
    )
    assert rows[1]["methods"]["tail_device_int4"]["tokens_per_sample"] == 24  # lengthened, then truncated
    spread = result["train_configs"]["spread"]
    assert all(spread[n]["spread"] is not None and spread[n]["spread"] >= 0 for n in spread)
    assert result["acceptance_set"] == "billion" and set(result["acceptance"]) == set(BILLION_ACCEPTANCE)
    assert result["ratios"]["int4_device_peak_rss_gb"] == pytest.approx(
        result["methods"]["mobiflower_device_int4"]["peak_rss_mb"] / 1024
    )
    table = format_table(result)
    assert "per training configuration" in table and "int4_device_peak_rss_gb" in table
    assert "per training configuration" in printed  # what the command printed
    assert out.with_suffix(".png").read_bytes()[:8] == PNG


def test_out_of_memory_methods_are_reported_and_bound_the_ratios(billion, tmp_path):
    """A full fine-tuning step over the cap is a result: shown as such, its ratio taken against the cap."""
    import copy

    from mobiflower.simulations.bench.device import _billion_ratios
    from mobiflower.simulations.bench.device_report import plot_result

    result = copy.deepcopy(billion[0])
    cap = result["config"]["memory_cap_mb"]
    result["methods"]["full_step"] = {
        "out_of_memory": True,
        "stage": "step",
        "cap_mb": cap,
        "reason": "RuntimeError: DefaultCPUAllocator: can't allocate memory",
    }
    ratios = _billion_ratios(result, cap)
    assert ratios["full_step_out_of_memory"] is True
    device = result["methods"]["mobiflower_device_int4"]["peak_rss_mb"]
    assert ratios["device_vs_full_rss"] is None  # the fp32 device was not measured in this run
    result["methods"]["mobiflower_device_fp32"] = result["methods"]["mobiflower_device_int4"]
    assert _billion_ratios(result, cap)["device_vs_full_rss"] == pytest.approx(device / cap)
    assert "OUT OF MEMORY" in format_table(result)
    assert plot_result(result, str(tmp_path / "oom.png")).is_file()


def test_training_configs_parse_and_shapes_get_billion_defaults():
    from mobiflower.simulations.bench.device import BILLION_DEFAULTS, TrainingConfig, bench_settings

    assert TrainingConfig.parse("8,256,64") == TrainingConfig(8, 256, 64)
    assert TrainingConfig.parse("32") == TrainingConfig(32, 0, 8)
    with pytest.raises(ValueError, match="BATCH"):
        TrainingConfig.parse("eight")
    big = bench_settings("opt-1.3b-shape")
    assert big["weights"] == ["fp32", "bf16", "int8", "int4"] and big["batches"] == BILLION_DEFAULTS["batches"]
    assert len(big["train_configs"]) == 3
    small = bench_settings("smollm2-135m")
    assert small == {"batches": 6, "batch_size": 16, "weights": None, "train_configs": None}
    assert bench_settings("opt-1.3b-shape", batch_size=2, weights=["int4"])["weights"] == ["int4"]


def test_a_process_over_the_cap_is_reported_out_of_memory_not_crashed():
    from mobiflower.simulations.bench.memory_cap import is_out_of_memory, run_capped

    grow = "import time\nblocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n    time.sleep(0.005)\n"
    run = run_capped([sys.executable, "-c", grow], cap_mb=200, address_cap=False)
    assert run.out_of_memory and "cap" in run.reason and run.returncode == -9
    assert 150 < run.peak_rss_mb < 400
    # with the address-space limit the child's own allocation fails first, as a MemoryError it can report
    probe = (
        "from mobiflower.simulations.bench.memory_cap import apply_address_space_cap, is_out_of_memory\n"
        "apply_address_space_cap()\n"
        "try:\n    bytearray(3 << 30)\nexcept MemoryError as e:\n    print('caught', is_out_of_memory(e))\n"
    )
    run = run_capped([sys.executable, "-c", probe], cap_mb=300)
    assert not run.out_of_memory and run.returncode == 0 and "caught True" in run.stdout
    ok = run_capped([sys.executable, "-c", "print('fine')"], cap_mb=300)
    assert not ok.out_of_memory and ok.returncode == 0 and ok.reason == ""
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_full_step_out_of_memory_at_20gb_passes_the_full_memory_lines():
    """Issue 16: "<= 0.3x a full fine-tuning step (or full fine-tuning out of memory under a 20 GB cap)"."""
    from mobiflower.simulations.bench.common import judge_acceptance
    from mobiflower.simulations.bench.device_spec import BILLION_ACCEPTANCE

    over = {"device_vs_full_rss": 0.35, "tail_vs_full_rss": 0.2}
    assert (
        judge_acceptance({**over, "full_step_oom_under_20gb": False}, BILLION_ACCEPTANCE)["device_rss_le_0.3x_full"]
        is False
    )
    verdict = judge_acceptance({**over, "full_step_oom_under_20gb": True}, BILLION_ACCEPTANCE)
    assert verdict["device_rss_le_0.3x_full"] is True and verdict["tail_rss_le_0.3x_full"] is True
    from mobiflower.simulations.bench.common import acceptance_lines

    result = {"ratios": {**over, "full_step_oom_under_20gb": True}, "acceptance": verdict}
    shown = [line for line in acceptance_lines(result, BILLION_ACCEPTANCE) if "device_vs_full_rss" in line]
    assert shown and shown[0].endswith("PASS (full_step_oom_under_20gb)")
