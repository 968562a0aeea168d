"""Low-precision device backbones and their prepared, memory-mapped copies (tiny random models)."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone, BackboneError
from mobiflower.platform.data import Example
from mobiflower.platform.frames import decode_frame
from mobiflower.platform.hf_model import weights_digest
from mobiflower.platform.precision import (
    WEIGHT_PRECISIONS,
    WeightPrecisionError,
    normalize_precision,
    precision_from_fingerprint,
)
from mobiflower.platform.prepared_weights import (
    MANIFEST,
    WEIGHTS_FILE,
    ensure_prepared,
    load_prepared_backbone,
    manifest_problem,
)
from mobiflower.platform.quantized_layers import Int4Linear, Int8Embedding, Int8Linear
from mobiflower.platform.weight_conversion import block_linears, quantize_backbone_weights, weight_bytes

TEXTS = ["a gripping, beautiful film", "two hours I will never get back", "fine", "an odd, long, winding story"]


def _taps(backbone: Backbone) -> dict[int, torch.Tensor]:
    enc = backbone.tokenize(TEXTS)
    seen: dict[int, torch.Tensor] = {}
    backbone.forward_taps(enc["input_ids"], enc["attention_mask"], lambda i, h: seen.__setitem__(i, h.float().clone()))
    return seen


def _rel_error(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


@pytest.fixture(scope="module")
def fp32(tiny_llama):
    return Backbone.load(tiny_llama, num_taps=2)


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("prepared"))


def test_int8_quantization_keeps_tapped_states_close(tiny_llama, fp32):
    backbone = Backbone.load(tiny_llama, num_taps=2)
    before = weight_bytes(backbone.model)["total"]
    quantize_backbone_weights(backbone.model, "int8")
    linears = block_linears(backbone.model)
    assert linears and all(isinstance(m, Int8Linear) for _, m in linears)
    emb, head = backbone.model.get_input_embeddings(), backbone.model.get_output_embeddings()
    assert isinstance(emb, Int8Embedding) and isinstance(head, Int8Linear)
    assert head.qweight is emb.qweight and head.scale is emb.scale  # the tied head stays tied, stored once
    assert not any(isinstance(m, torch.nn.Linear) for _, m in linears)
    assert weight_bytes(backbone.model)["total"] < 0.3 * before
    err = _rel_error(_taps(backbone), _taps(fp32))
    assert 0 < err < 0.05, err


@pytest.mark.parametrize("family", ["gpt2", "opt", "bert"])
def test_int8_other_families(tiny_models, family, weights_dir):
    ref = Backbone.load(tiny_models[family], num_taps=2)
    backbone = Backbone.load(tiny_models[family], num_taps=2)
    quantize_backbone_weights(backbone.model, "int8")
    assert all(isinstance(m, Int8Linear) for _, m in block_linears(backbone.model))  # GPT-2's Conv1D included
    taps = _taps(backbone)
    assert _rel_error(taps, _taps(ref)) < 0.05
    prepared = Backbone.load(tiny_models[family], num_taps=2, weights="int8", weights_dir=weights_dir)
    assert prepared.identity.digest == weights_digest(backbone.model)
    loaded = _taps(prepared)
    assert all(torch.equal(loaded[k], taps[k]) for k in taps)


def test_fingerprint_carries_the_precision(tiny_llama, fp32, weights_dir):
    fps = {}
    for precision in WEIGHT_PRECISIONS:
        backbone = Backbone.load(tiny_llama, num_taps=2, weights=precision, weights_dir=weights_dir)
        assert backbone.precision == precision
        assert precision_from_fingerprint(backbone.fingerprint) == precision
        fps[precision] = backbone.fingerprint
        err = _rel_error(_taps(backbone), _taps(fp32))
        assert err < {"fp32": 1e-6, "bf16": 0.03, "int8": 0.05, "int4": 0.5}[precision], (precision, err)
    assert len(set(fps.values())) == 4
    assert fps["int8"].startswith("llama-d64-L4-int8-") and fps["int4"].startswith("llama-d64-L4-int4-")
    assert fps["bf16"].startswith("llama-d64-L4-bfloat16-")
    assert fps["fp32"] == fp32.fingerprint  # the prepared fp32 copy is the same backbone as the checkpoint

    # A frame from an int8 device names the int8 backbone; a side network of the fp32 one refuses it.
    int8 = Backbone.load(tiny_llama, num_taps=2, weights="int8", weights_dir=weights_dir)
    runtime = DeviceRuntime(int8, ForwardConfig(batch_size=2))
    frame, _ = runtime.make_frame([Example(i, t, i % 2) for i, t in enumerate(TEXTS)])
    assert decode_frame(runtime.encode(frame), expected_fingerprint=fps["int8"]).fingerprint == fps["int8"]
    with pytest.raises(Exception, match="fingerprint"):
        decode_frame(runtime.encode(frame), expected_fingerprint=fps["fp32"])


def test_prepared_copy_reloads_identically(tiny_llama, weights_dir):
    a = Backbone.load(tiny_llama, num_taps=2, weights="int8", weights_dir=weights_dir)
    b = Backbone.load(tiny_llama, num_taps=2, weights="int8", weights_dir=weights_dir)
    assert a.fingerprint == b.fingerprint and a.weights_path == b.weights_path
    ta, tb = _taps(a), _taps(b)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # the recorded digest is the digest of what was loaded
    assert weights_digest(b.model) == b.identity.digest
    # a prepared folder loads by itself (what a device that ships only the copy does)
    assert Backbone.load(b.weights_path, num_taps=2).fingerprint == b.fingerprint
    with pytest.raises(BackboneError, match="precision int8"):
        Backbone.load(b.weights_path, weights="int4")
    # and quantizing the checkpoint in this process gives the very same backbone
    c = Backbone.load(tiny_llama, num_taps=2)
    quantize_backbone_weights(c.model, "int8")
    assert weights_digest(c.model) == b.identity.digest
    tc = _taps(c)
    assert all(torch.equal(ta[k], tc[k]) for k in ta)
    # the weights are memory-mapped from the prepared file, not copied
    if os.path.exists("/proc/self/maps"):
        mapped = [
            tuple(int(x, 16) for x in line.split()[0].split("-"))
            for line in open("/proc/self/maps")
            if line.rstrip().endswith(os.path.join(b.weights_path, WEIGHTS_FILE))
        ]
        for _, layer in block_linears(b.model)[:3]:
            assert any(lo <= layer.qweight.data_ptr() < hi for lo, hi in mapped)
    # zero-shot reads two rows of the (int8, tied) head; the server's head state comes back as float32
    final = b.forward_taps(*b.tokenize(TEXTS[:2]).values(), lambda i, h: None, need_final=True)
    logits = b.zero_shot_logits(final[:, -1], [5, 9])
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    state = b.frozen_head_state()
    assert state["lm_head.weight"].dtype == torch.float32 and state["lm_head.weight"].shape == (260, 64)
    assert "lm_head.weight" not in b.frozen_head_state(lm_head=False)


def test_stale_or_damaged_copies(tmp_path):
    from mobiflower.platform.tiny import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "src", layers=2, seed=3)
    folder = ensure_prepared(str(model), "int4", tmp_path / "w")
    assert manifest_problem(folder, str(model), "int4") is None
    assert sum(isinstance(m, Int4Linear) for m in load_prepared_backbone(folder)[0].modules()) == 14
    first = json.loads((folder / MANIFEST).read_text())["digest"]
    # the source checkpoint changes: the copy is stale and is rebuilt
    make_tiny_model("llama", tmp_path / "src", layers=2, seed=4)
    stamp = os.stat(model / "config.json")
    os.utime(model / "config.json", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert "source model changed" in manifest_problem(folder, str(model), "int4")
    assert json.loads((ensure_prepared(str(model), "int4", tmp_path / "w") / MANIFEST).read_text())["digest"] != first
    # a damaged weights file is refused with a clear error
    with open(folder / WEIGHTS_FILE, "ab") as fh:
        fh.write(b"\0" * 8)
    with pytest.raises(BackboneError, match="changed since it was prepared"):
        load_prepared_backbone(folder)
    rebuilt = ensure_prepared(str(model), "int4", tmp_path / "w")
    assert manifest_problem(rebuilt) is None
    with pytest.raises(BackboneError, match="precision int4"):
        load_prepared_backbone(rebuilt, precision="int8")
    # the source checkpoint is gone: the copy is still used (there is nothing to compare it with)
    import shutil

    shutil.rmtree(model)
    assert manifest_problem(rebuilt, str(model), "int4") is None


def test_rebuilds_of_a_stale_copy_take_turns(tmp_path):
    """Devices that find the same copy stale rebuild it one at a time: the one that waited finds the
    copy current and uses it, instead of deleting it under whoever is loading it (a fleet run's
    int8 devices once failed on a vanished config.json that way)."""
    import threading

    from mobiflower.platform.atomic import exclusive_lock
    from mobiflower.platform.prepared_weights import prepare_quantized_backbone
    from mobiflower.platform.tiny import make_tiny_model

    model = make_tiny_model("llama", tmp_path / "src", layers=2, seed=3)
    folder = ensure_prepared(str(model), "int8", tmp_path / "w")
    stamp = os.stat(model / "config.json")
    os.utime(model / "config.json", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))
    assert "source model changed" in manifest_problem(folder, str(model), "int8")
    got = []
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")):  # another device is rebuilding
        waiter = threading.Thread(target=lambda: got.append(ensure_prepared(str(model), "int8", tmp_path / "w")))
        waiter.start()
        waiter.join(timeout=2.0)
        assert waiter.is_alive() and not got  # it waits for the lock
        prepare_quantized_backbone(str(model), "int8", folder, force=True)
        built = (folder / MANIFEST).stat().st_mtime_ns
    waiter.join(timeout=120)
    assert got == [folder] and (folder / MANIFEST).stat().st_mtime_ns == built  # used, not rebuilt again
    assert manifest_problem(folder, str(model), "int8") is None


def test_unsupported_precisions_raise_clearly(tiny_llama):
    assert [normalize_precision(p) for p in ("float32", "BF16", "int8", "4bit")] == ["fp32", "bf16", "int8", "int4"]
    for bad, words in (("fp16", "bf16"), ("int2", "4-bit"), ("int3", "fp32, bf16, int8, int4")):
        with pytest.raises(WeightPrecisionError, match="not supported") as err:
            normalize_precision(bad)
        assert words in str(err.value)
    with pytest.raises(WeightPrecisionError):
        Backbone.load(tiny_llama, weights="nf4")
    backbone = Backbone.load(tiny_llama)
    with pytest.raises(WeightPrecisionError, match="group_size"):
        quantize_backbone_weights(backbone.model, "int4", group_size=48)


def test_weights_digest_opens_packed_params(fp32):
    """torch.ao's dynamic int8 Linear keeps a packed-params object in its state dict."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = torch.ao.quantization.quantize_dynamic(fp32.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    assert any(not isinstance(v, torch.Tensor) for v in packed.state_dict().values())
    digest = weights_digest(packed)
    assert digest == weights_digest(packed) and digest != fp32.identity.digest


def test_bench_precision_end_to_end(tmp_path, real_assets):
    from mobiflower.platform.tiny import make_tiny_model
    from mobiflower.simulations.bench.precision import ACCEPTANCE, format_table, run_precision_bench

    model = make_tiny_model("llama", tmp_path / "llama", hidden=64, layers=2)
    out = tmp_path / "out" / "bench.json"
    result = run_precision_bench(
        model=str(model),
        precisions=("int8", "fp32"),
        batches=2,
        batch_size=4,
        threads=1,
        out=str(out),
        progress=False,
        num_taps=2,
        starts=0,
        cold=True,
        weights_dir=str(tmp_path / "w"),
    )
    assert list(result["precisions"]) == ["fp32", "int8"]  # fp32 first: the reference
    for name, e in result["precisions"].items():
        assert e["precision"] == name and e["samples"] == 4
        assert 0 < e["baseline_rss_mb"] <= e["peak_rss_mb"] and e["model_memory_mb"] >= 0
        assert e["s_per_sample"] > 0 and e["warm_start_s"] > 0 and e["cold_start_s"] > 0
        assert e["start_to_first_frame_s"] > e["model_load_s"] > 0
    assert result["precisions"]["fp32"]["state_rel_error_mean"] == 0
    assert 0 < result["precisions"]["int8"]["state_rel_error_max"] < 0.05
    assert set(result["acceptance"]) == set(ACCEPTANCE)
    assert all(v is None or isinstance(v, bool) for v in result["acceptance"].values())  # reported, never asserted
    assert result["acceptance"]["int4_model_memory_le_0.25x_fp32"] is None  # int4 was not run
    assert json.loads(out.read_text())["precisions"].keys() == result["precisions"].keys()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_table(result)
    assert "int8_vs_fp32_model_memory" in table and "fp32" in table


def test_bench_precision_ratios_and_verdicts():
    from mobiflower.simulations.bench.common import judge_acceptance
    from mobiflower.simulations.bench.precision import ACCEPTANCE, _ratios

    entries = {
        "fp32": {
            "model_memory_mb": 600.0,
            "s_per_sample": 0.10,
            "test_accuracy": 0.836,
            "warm_start_s": 2.5,
            "weights_resident_mb": 500.0,
        },
        "int8": {
            "model_memory_mb": 200.0,
            "s_per_sample": 0.12,
            "test_accuracy": 0.829,
            "warm_start_s": 3.2,
            "weights_resident_mb": 130.0,
        },
        "int4": {"model_memory_mb": 160.0, "s_per_sample": 0.13},
    }
    ratios = _ratios(entries)
    assert ratios["int8_vs_fp32_model_memory"] == pytest.approx(1 / 3)
    assert ratios["int8_vs_fp32_accuracy_points"] == pytest.approx(-0.7)
    assert ratios["int8_vs_fp32_weights_resident"] == pytest.approx(0.26)
    assert ratios["bf16_vs_fp32_model_memory"] is None
    verdicts = judge_acceptance(ratios, ACCEPTANCE)
    assert verdicts["int8_model_memory_le_0.35x_fp32"] is True and verdicts["int8_s_le_1.3x_fp32"] is True
    assert verdicts["int8_accuracy_within_1pt_fp32"] is True
    assert verdicts["int4_model_memory_le_0.25x_fp32"] is False
    assert verdicts["fp32_warm_start_le_3s"] is True and verdicts["int8_warm_start_le_3s"] is False


def test_bench_precision_accuracy_runs_take_the_current_keys():
    """`bench precision --accuracy`'s one-device runs are set up with keys the app reads (not retired ones)."""
    from mobiflower.simulations.bench.precision import _accuracy_run_config
    from mobiflower.simulations.simulate import SimulateConfig

    run_config = _accuracy_run_config("smollm2-135m", "int8", 1, {"train_samples": 8, "epochs": 1})
    assert run_config["weight-precision"] == "int8" and run_config["num-server-rounds"] == 1
    SimulateConfig(devices=1, run_config=run_config)  # refuses a retired or unknown key
