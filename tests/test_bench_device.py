"""`mobiflower bench device` on a tiny random Llama: every method in its own process, 12 wire rows."""

from __future__ import annotations

import json

import pytest

from mobiflower.simulations.bench_device import ACCEPTANCE, METHODS, WIRE_BITS, WIRE_POLICIES, format_table, \
    run_device_bench


@pytest.fixture(scope="module")
def bench(tmp_path_factory, real_assets):
    from mobiflower.platform.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("bench")
    model = make_tiny_model("llama", root / "llama", hidden=64, layers=2)  # width = one codec group
    out = root / "out" / "bench.json"
    result = run_device_bench(model=str(model), batches=2, batch_size=4, num_taps=2, threads=1, out=str(out),
                              progress=False, tail_cut=1)
    return result, out


def test_every_method_measured(bench):
    result, _ = bench
    assert set(result["methods"]) == set(METHODS)
    for name, m in result["methods"].items():
        assert m["peak_rss_mb"] > 0 and m["s_per_sample"] > 0, name
        assert 0 < m["baseline_rss_mb"] <= m["peak_rss_mb"], name
        assert m["model_load_s"] > 0 and m["samples"] == 4, name  # 2 batches of 4, one is the warm-up
    assert result["config"]["samples"] == 8
    assert result["machine"]["threads"] == 1 and result["machine"]["cpu_count"] >= 1


def test_wire_rows_shrink_with_bits(bench):
    result, _ = bench
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
    result, _ = bench
    tail = result["tail_wire"]
    assert [w["bits"] for w in tail] == [8, 4, 2]
    assert tail[0]["bytes_per_sample"] > tail[1]["bytes_per_sample"] > tail[2]["bytes_per_sample"] > 0
    last8 = next(w["bytes_per_sample"] for w in result["wire"] if w["bits"] == 8 and w["token_policy"] == "last")
    assert tail[0]["tokens_per_sample"] > 1 and tail[0]["bytes_per_sample"] > last8 / 2  # one layer, every token


def test_ratios_acceptance_and_outputs(bench):
    result, out = bench
    assert all(v is not None and v > 0 for v in result["ratios"].values())
    assert set(result["acceptance"]) == set(ACCEPTANCE)
    assert all(isinstance(v, bool) for v in result["acceptance"].values())  # reported, never asserted
    assert json.loads(out.read_text())["methods"].keys() == result["methods"].keys()
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(result)
    for name in (*METHODS, "fp32", "lora_vs_device_s"):
        assert name in table


def test_bench_device_with_weight_precisions(tmp_path, real_assets):
    """`mobiflower bench device --precisions ...` adds each precision's model memory, speed and start-up."""
    import json

    from mobiflower.platform.tiny import make_tiny_model
    from mobiflower.simulations.cli import main

    model = make_tiny_model("llama", tmp_path / "llama", hidden=64, layers=2)
    out = tmp_path / "out" / "bench.json"
    assert main(["bench", "device", "--model", str(model), "--batches", "2", "--batch-size", "4", "--num-taps", "2",
                 "--threads", "1", "--precisions", "fp32,int8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["methods"]) == set(METHODS)
    weights = result["weight_precisions"]
    for precision in ("fp32", "int8"):
        e = weights["precisions"][precision]
        assert e["model_memory_mb"] > 0 and e["s_per_sample"] > 0 and e["warm_start_s"] > 0
    assert weights["ratios"]["int8_vs_fp32_model_memory"] > 0
    assert (tmp_path / "out" / "bench_precisions.png").is_file()
