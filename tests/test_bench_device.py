"""`mobiflower bench device` on tiny random models: every method in its own capped process, 12 wire rows,
the billion-sized mode (weight precisions, training configurations, out-of-memory results)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mobiflower.simulations.bench.device import ACCEPTANCE, METHODS, WIRE_BITS, WIRE_POLICIES
from mobiflower.simulations.bench.device_report import format_table

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def bench(tmp_path_factory, real_assets):
    """ONE `mobiflower bench device --precisions fp32,int8` through the CLI for every default-mode test: each
    run costs a fresh process per method. The precision part skips its start-only processes (warm, cold:
    `bench precision`'s own test in test_weights.py measures those); what it was called with is kept."""
    from mobiflower.platform.tiny import make_tiny_model
    from mobiflower.simulations.bench import precision
    from mobiflower.simulations.cli import main

    root = tmp_path_factory.mktemp("bench")
    model = make_tiny_model("llama", root / "llama", hidden=64, layers=2)  # width = one codec group
    out = root / "out" / "bench.json"
    calls = []
    run_precision_bench = precision.run_precision_bench

    def measure_only(**kwargs):
        calls.append(kwargs)
        return run_precision_bench(**{**kwargs, "starts": 0, "cold": False})

    argv = ["bench", "device", "--model", str(model), "--batches", "2", "--batch-size", "4", "--num-taps", "2"]
    argv += ["--threads", "1", "--precisions", "fp32,int8", "--out", str(out), "--no-progress"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(precision, "run_precision_bench", measure_only)
        assert main(argv) == 0
    return json.loads(out.read_text()), out, calls


def test_every_method_measured(bench):
    result, _, _ = bench
    assert set(result["methods"]) == set(METHODS)
    for name, m in result["methods"].items():
        assert m["peak_rss_mb"] > 0 and m["s_per_sample"] > 0, name
        assert 0 < m["baseline_rss_mb"] <= m["peak_rss_mb"], name
        assert m["model_load_s"] > 0 and m["samples"] == 4, name  # 2 batches of 4, one is the warm-up
    assert result["config"]["samples"] == 8
    assert result["machine"]["threads"] == 1 and result["machine"]["cpu_count"] >= 1


def test_wire_rows_shrink_with_bits(bench):
    result, _, _ = bench
    rows = {(w["bits"], w["token_policy"]): w["bytes_per_sample"] for w in result["wire"]}
    assert set(rows) == {(b, p) for b in WIRE_BITS for p in WIRE_POLICIES}
    for policy in WIRE_POLICIES:
        sizes = [rows[(b, policy)] for b in WIRE_BITS]  # 16, 8, 4, 2 bits
        assert all(a > b > 0 for a, b in zip(sizes, sizes[1:])), (policy, sizes)
    for bits in WIRE_BITS:
        assert rows[(bits, "all")] >= rows[(bits, "nonpad")] > rows[(bits, "last")]
    fp32 = result["fp32_all_token_bytes_per_sample"]
    assert fp32 > rows[(16, "all")]
    assert result["ratios"]["fp32_all_vs_4bit_last_bytes"] == pytest.approx(fp32 / rows[(4, "last")])


def test_tail_device_stops_at_the_cut_and_sends_every_real_token(bench):
    result, _, _ = bench
    assert result["methods"]["tail_device"]["tail_cut"] == 1  # the default cut: half of the 2 blocks
    tail = result["tail_wire"]
    assert [w["bits"] for w in tail] == [8, 4, 2]
    assert tail[0]["bytes_per_sample"] > tail[1]["bytes_per_sample"] > tail[2]["bytes_per_sample"] > 0
    last8 = next(w["bytes_per_sample"] for w in result["wire"] if w["bits"] == 8 and w["token_policy"] == "last")
    assert tail[0]["tokens_per_sample"] > 1 and tail[0]["bytes_per_sample"] > last8 / 2  # one layer, every token


def test_ratios_acceptance_and_outputs(bench):
    result, out, _ = bench
    assert all(v is not None and v > 0 for v in result["ratios"].values())
    assert set(result["acceptance"]) == set(ACCEPTANCE)
    assert all(isinstance(v, bool) for v in result["acceptance"].values())  # reported, never asserted
    assert result["acceptance_set"] == "default"
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == PNG
    table = format_table(result)  # from the JSON as written: what a reader of the file gets
    for name in (*METHODS, "fp32", "lora_vs_device_s"):
        assert name in table


def test_bench_device_with_weight_precisions(bench):
    """`--precisions` adds each precision's model memory, speed and start-up to the same JSON, and a PNG."""
    result, out, calls = bench
    assert len(calls) == 1 and calls[0]["precisions"] == ["fp32", "int8"]
    settings = [calls[0][k] for k in ("batches", "batch_size", "num_taps", "threads")]
    assert settings == [2, 4, 2, 1]  # the device bench's own settings, passed on
    assert set(result["methods"]) == set(METHODS)  # merged into the device result, not written over it
    weights = result["weight_precisions"]
    assert list(weights["precisions"]) == ["fp32", "int8"]
    for precision in ("fp32", "int8"):
        e = weights["precisions"][precision]
        assert e["model_memory_mb"] > 0 and e["s_per_sample"] > 0 and e["warm_start_s"] > 0
    assert weights["ratios"]["int8_vs_fp32_model_memory"] > 0
    assert (out.parent / "bench_precisions.png").read_bytes()[:8] == PNG


# ---- billion-sized runs (issue 16): weight precisions, training configurations, a memory cap ----------


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
    from mobiflower.simulations.bench.device import BILLION_ACCEPTANCE

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
    from mobiflower.simulations.bench.device import BILLION_ACCEPTANCE, _acceptance

    over = {"device_vs_full_rss": 0.35, "tail_vs_full_rss": 0.2}
    assert (
        _acceptance({**over, "full_step_oom_under_20gb": False}, BILLION_ACCEPTANCE)["device_rss_le_0.3x_full"] is False
    )
    verdict = _acceptance({**over, "full_step_oom_under_20gb": True}, BILLION_ACCEPTANCE)
    assert verdict["device_rss_le_0.3x_full"] is True and verdict["tail_rss_le_0.3x_full"] is True
    from mobiflower.simulations.bench.common import acceptance_lines

    result = {"ratios": {**over, "full_step_oom_under_20gb": True}, "acceptance": verdict}
    shown = [line for line in acceptance_lines(result, BILLION_ACCEPTANCE) if "device_vs_full_rss" in line]
    assert shown and shown[0].endswith("PASS (full_step_oom_under_20gb)")
