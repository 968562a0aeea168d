"""`mobiflower bench device` on tiny random models: every method in its own capped process, 12 wire rows,
weight precisions (the billion-sized mode is in tests/test_bench_device_billion.py)."""

from __future__ import annotations

import json

import pytest

from mobiflower.simulations.bench.device_report import format_table
from mobiflower.simulations.bench.device_spec import ACCEPTANCE, METHODS, WIRE_BITS, WIRE_POLICIES

pytestmark = pytest.mark.slow  # each method is measured in its own process

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


def test_causal_lm_mode_measures_every_method_at_the_sequence_length(tmp_path, real_assets):
    """`run_device_bench(task="causal-lm")` on a tiny llama at 32 tokens a sample: the tail device, inference
    only, the LoRA and full fine-tuning steps, each forwarding exactly `seq_len` tokens of every sample; every
    ratio reported, the acceptance as booleans, the table and the figure written."""
    from mobiflower.platform.tiny import make_tiny_model
    from mobiflower.simulations.bench.device import run_device_bench
    from mobiflower.simulations.bench.device_spec import CAUSAL_LM_ACCEPTANCE, CAUSAL_LM_METHODS, CAUSAL_LM_REPORTED

    model = make_tiny_model("llama", tmp_path / "llama", hidden=64, layers=2)
    out = tmp_path / "out" / "bench_lm.json"
    run_device_bench(
        str(model), batches=2, batch_size=2, threads=1, out=str(out), progress=False, task="causal-lm", seq_len=32
    )
    result = json.loads(out.read_text())
    assert list(result["methods"]) == list(CAUSAL_LM_METHODS)
    assert result["config"]["batch_size"] == 2 and result["config"]["seq_len"] == 32
    for name, m in result["methods"].items():
        assert m["peak_rss_mb"] > 0 and m["s_per_sample"] > 0 and m["samples"] == 2, name
        assert m["tokens_per_sample"] == m["min_tokens_per_sample"] == 32, name  # truncated to exactly seq_len
    assert result["methods"]["tail_device"]["tail_cut"] == 1
    wire = result["tail_wire"]  # every real token of the cut layer, with its next-token target
    assert [w["bits"] for w in wire] == [8, 4, 2] and all(w["tokens_per_sample"] == 32 for w in wire)
    assert wire[0]["bytes_per_sample"] > wire[1]["bytes_per_sample"] > wire[2]["bytes_per_sample"] > 0
    assert set(CAUSAL_LM_REPORTED) | {k for k, *_ in CAUSAL_LM_ACCEPTANCE.values()} <= set(result["ratios"])
    assert all(v is not None and v > 0 for v in result["ratios"].values())
    assert result["acceptance_set"] == "causal-lm" and set(result["acceptance"]) == set(CAUSAL_LM_ACCEPTANCE)
    assert all(isinstance(v, bool) for v in result["acceptance"].values())  # reported, never asserted
    assert out.with_suffix(".png").read_bytes()[:8] == PNG
    table = format_table(result)
    for name in (*CAUSAL_LM_METHODS, *result["ratios"], "32 tokens"):
        assert name in table, name
