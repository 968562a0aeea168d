"""Billion-sized backbones without a hub (issue 16): shipped shapes, random checkpoints built once, the
lean OPT forward and low-precision OPT, all on tiny configurations of the same code path (the
1B-class measurements themselves are in RESULTS.md)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mobiflower.platform.backbone import Backbone
from mobiflower.platform.device_forward import forward_implementation
from mobiflower.platform.lean_opt import LeanOPTForCausalLM, opt_problem
from mobiflower.platform.prepared_weights import ensure_prepared
from mobiflower.platform.quantized_layers import Int4Linear, Int8Linear
from mobiflower.platform.shapes import (
    MARKER,
    OPT_1_3B,
    SHAPES,
    SMOLLM2_1_7B,
    ModelShape,
    ShapeError,
    materialize_shape,
    shape_problem,
)

TEXTS = [
    "a gripping, beautiful film",
    "two hours I will never get back",
    "fine",
    "an odd, long, winding story about nothing at all, told twice",
]
SAME_LENGTH = ["abcd", "efgh"]  # no padding: the causal-flag path of SDPA
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "vocab_size": 300,
    "max_position_embeddings": 256,
}


def _tiny_shape(base: ModelShape, tokenizer_from: str, name: str | None = None) -> ModelShape:
    """The shipped configuration with tiny sizes: every other key (and the build path) as shipped."""
    extra = (
        {"ffn_dim": 128, "word_embed_proj_dim": 64}
        if base.model_type == "opt"
        else {"intermediate_size": 128, "num_key_value_heads": 4}
    )
    return ModelShape(
        name or f"tiny-{base.name}",
        base.hub_id,
        {**base.config, **TINY, **extra},
        base.checkpoint_dtype,
        tokenizer_from=tokenizer_from,
    )


def _states(backbone: Backbone, texts) -> dict:
    enc = backbone.tokenize(texts)
    seen: dict = {}
    final = backbone.forward_taps(
        enc["input_ids"], enc["attention_mask"], lambda i, h: seen.__setitem__(i, h.float().clone()), need_final=True
    )
    seen["final"] = final.float()
    return {k: v[enc["attention_mask"].bool()] for k, v in seen.items()}  # real tokens only


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---- the shipped shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape,params", [(OPT_1_3B, 1.316e9), (SMOLLM2_1_7B, 1.711e9)])
def test_shipped_shapes_have_the_published_sizes(shape, params):
    from transformers import LlamaConfig, OPTConfig

    config = shape.transformers_config()
    assert isinstance(config, OPTConfig if shape.model_type == "opt" else LlamaConfig)
    assert (config.hidden_size, config.num_hidden_layers) == (2048, 24)
    assert (config.ffn_dim if shape.model_type == "opt" else config.intermediate_size) == 8192
    assert config.vocab_size == (50272 if shape.model_type == "opt" else 49152)
    assert config.num_attention_heads == 32
    if shape.model_type == "llama":
        assert config.num_key_value_heads == 32 and config.tie_word_embeddings
    assert shape.num_parameters() == pytest.approx(params, rel=1e-3)  # tied head counted once
    assert shape.hub_id in ("facebook/opt-1.3b", "HuggingFaceTB/SmolLM2-1.7B") and SHAPES[shape.name] is shape


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_shape_builds_once_seeded_and_loads_like_any_checkpoint(family, tiny_models, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    shape = _tiny_shape(OPT_1_3B if family == "opt" else SMOLLM2_1_7B, tiny_models[family])
    folder = materialize_shape(shape, tmp_path / "a")
    assert shape_problem(shape, folder) is None
    marker = json.loads((folder / MARKER).read_text())
    assert marker["random_weights"] is True and marker["hub_id"] == shape.hub_id
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert materialize_shape(shape, folder) == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp
    again = materialize_shape(shape, tmp_path / "b")  # the same seed: the same bytes
    assert (folder / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16" if family == "opt" else "BF16"}  # as the hub ships them
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)  # no missing or random-init weights
    weights = {k: v.detach() for k, v in model.named_parameters()}
    matrix = next(v for k, v in weights.items() if k.endswith("q_proj.weight"))
    assert 0.015 < float(matrix.std()) < 0.025  # normal(0, 0.02), as transformers initialises them
    assert all(float(v.abs().max()) == 0 for k, v in weights.items() if k.endswith(".bias"))
    other = ModelShape(
        shape.name,
        shape.hub_id,
        {**shape.config, "num_hidden_layers": 3},
        shape.checkpoint_dtype,
        tokenizer_from=shape.tokenizer_from,
    )
    assert shape_problem(other, folder) == "built from another configuration"


def test_a_build_killed_mid_write_is_cleaned_up_by_the_next(tiny_models, tmp_path, monkeypatch):
    """A builder killed while writing leaves its private folder; the next build (under the lock) removes
    it, and so does the next prepare of a weight copy (gigabytes each at 1B scale)."""
    from mobiflower.platform import prepared_weights

    shape = _tiny_shape(OPT_1_3B, tiny_models["opt"])
    stale = tmp_path / f".{shape.name}.99999.part"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    folder = materialize_shape(shape, tmp_path / shape.name)
    assert not stale.exists() and shape_problem(shape, folder) is None
    copy = tmp_path / "models" / "x-int4"
    stale_copy = copy.with_name(f".{copy.name}.4242.part")
    stale_copy.mkdir(parents=True)
    monkeypatch.setattr(prepared_weights, "prepared_dir", lambda *a, **k: copy)
    monkeypatch.setattr(prepared_weights, "prepare_quantized_backbone", lambda *a, **k: copy)
    assert prepared_weights.ensure_prepared("x", "int4") == copy
    assert not stale_copy.exists()


def test_a_shape_without_its_tokenizer_says_what_to_run(tmp_path):
    shape = _tiny_shape(OPT_1_3B, str(tmp_path / "nowhere"))
    with pytest.raises(ShapeError, match="tokenizer"):
        materialize_shape(shape, tmp_path / "x")
    with pytest.raises(ShapeError, match="shipped ones are"):
        materialize_shape("opt-7b-shape", tmp_path / "y")


def test_a_shape_name_goes_wherever_a_model_name_goes(tiny_models, tmp_path, monkeypatch):
    """resolve_model builds the shape on first use; prepared copies, the lean device and its
    fingerprint follow; a device holding only its prepared copy never rebuilds the source."""
    from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
    from mobiflower.platform import shapes
    from mobiflower.platform.data import Example
    from mobiflower.platform.hf_model import resolve_model
    from mobiflower.platform.prepared_weights import manifest_problem, prepared_dir

    monkeypatch.setenv("MOBIFLOWER_HOME", str(tmp_path / "home"))
    shape = _tiny_shape(OPT_1_3B, tiny_models["opt"], name="tiny-opt-shape")
    monkeypatch.setitem(shapes.SHAPES, shape.name, shape)
    assert resolve_model(shape.name, materialize=False) == str(tmp_path / "home" / "shapes" / shape.name)
    assert not (tmp_path / "home" / "shapes" / shape.name).exists()
    backbone = Backbone.load(shape.name, num_taps=2, weights="int4")  # builds the shape, then the int4 copy
    folder = prepared_dir(shape.name, "int4")
    assert folder == tmp_path / "home" / "models" / "tiny-opt-shape-int4" and backbone.weights_path == str(folder)
    assert type(backbone.model) is LeanOPTForCausalLM and "-int4-" in backbone.fingerprint
    frame, _ = DeviceRuntime(backbone, ForwardConfig(batch_size=2)).make_frame(
        [Example(0, "good", 1), Example(1, "bad", 0)]
    )
    assert frame.fingerprint == backbone.fingerprint
    import shutil

    shutil.rmtree(tmp_path / "home" / "shapes")  # a device shipped only the prepared copy
    assert manifest_problem(folder, shape.name, "int4") is None
    assert not (tmp_path / "home" / "shapes").exists()


# ---- the same code path for a hub-like folder of each family ----------------------------------------


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_hub_like_folders_of_both_families_prepare_load_and_tap(family, tiny_models, tmp_path):
    """A tiny checkpoint folder (what a hub id downloads to): every precision goes through the same
    prepare / memory-mapped load / lean forward, and the low-precision taps stay close to fp32's."""
    ref = tiny_models[family]
    reference = _states(Backbone.load(ref, num_taps=2), TEXTS)  # transformers, from the checkpoint
    for precision, tol in (("fp32", 1e-6), ("bf16", 0.02), ("int8", 0.03), ("int4", 0.2)):
        backbone = Backbone.load(ref, num_taps=2, weights=precision, weights_dir=str(tmp_path))
        assert backbone.precision == precision and forward_implementation(backbone.weights_path) == "lean"
        got = _states(backbone, TEXTS)
        errors = {k: _rel(got[k], reference[k]) for k in reference}
        assert max(errors.values()) <= tol, (family, precision, errors)
        if precision in ("int8", "int4"):
            kind = Int8Linear if precision == "int8" else Int4Linear
            linears = [m for n, m in backbone.model.named_modules() if n.endswith(("fc1", "down_proj"))]
            assert linears and all(isinstance(m, kind) for m in linears)
            assert max(errors.values()) > 0  # really quantized


# ---- the lean OPT forward ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def post_ln_opt(tmp_path_factory):
    """OPT-350M's layout in small: LayerNorm after the blocks, a narrower embedding with project_in/out."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from mobiflower.platform.tiny import _byte_tokenizer

    path = tmp_path_factory.mktemp("post-ln-opt")
    config = OPTConfig(
        vocab_size=260,
        hidden_size=64,
        ffn_dim=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        do_layer_norm_before=False,
        max_position_embeddings=256,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # non-trivial norms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    _byte_tokenizer(decoder=True).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_lean_opt_matches_transformers(post_ln_opt, tiny_models, precision, tmp_path, monkeypatch):
    for ref in (tiny_models["opt"], post_ln_opt):
        out = {}
        for forward in ("transformers", "lean"):
            monkeypatch.setenv("MOBIFLOWER_DEVICE_FORWARD", forward)
            out[forward] = Backbone.load(ref, num_taps=3, weights=precision, weights_dir=str(tmp_path))
        hf, lean = out["transformers"], out["lean"]
        assert type(lean.model) is LeanOPTForCausalLM and type(hf.model).__name__ == "OPTForCausalLM"
        assert lean.fingerprint == hf.fingerprint and lean.layers == hf.layers
        for texts in (TEXTS, SAME_LENGTH):
            a, b = _states(hf, texts), _states(lean, texts)
            for k in a:
                err = float((a[k] - b[k]).abs().max() / a[k].abs().max())
                assert err <= (2e-2 if precision == "bf16" else 1e-5), (ref, precision, k, err)


def test_lean_opt_refuses_what_it_does_not_run():
    base = {"model_type": "opt", "hidden_size": 64, "num_attention_heads": 4}
    assert opt_problem(base) is None
    assert "activation" in opt_problem({**base, "activation_function": "gelu"})
    assert "LayerNorm" in opt_problem({**base, "layer_norm_elementwise_affine": False})


def test_opt_device_start_imports_no_transformers(tiny_models, tmp_path):
    """A fresh process loading a prepared OPT copy and making a frame never imports transformers."""
    folder = ensure_prepared(tiny_models["opt"], "int4", tmp_path)
    code = f"""
import sys, json
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.data import Example
backbone = Backbone.load({str(folder)!r}, num_taps=2)
frame, _ = DeviceRuntime(backbone, ForwardConfig(batch_size=2)).make_frame([Example(0, "good", 1), Example(1, "bad", 0)])
print(json.dumps({{"transformers": any(m == "transformers" or m.startswith("transformers.") for m in sys.modules),
                  "fingerprint": frame.fingerprint}}))
"""
    env = {k: v for k, v in os.environ.items() if k != "MOBIFLOWER_DEVICE_FORWARD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["transformers"] is False and result["fingerprint"].startswith("opt-d64-L4-int4-")


def test_the_simulation_summary_shows_each_devices_peak_memory():
    """`mobiflower simulate` prints the peak resident memory each device reported (its final test reply)."""
    from mobiflower.simulations.simulate import format_summary

    device = {
        "bytes_up": 1e6,
        "bytes_down": 2e5,
        "device_forward_s": 3.0,
        "test_samples": 4,
        "test_accuracy": 0.5,
        "zero_shot_accuracy": 0.5,
    }
    summary = {
        "devices": {"device-0": {**device, "device_peak_rss_mb": 1187.4}, "device-1": device},
        "test_accuracy": 0.5,
        "bytes_up": 1e6,
        "bytes_down": 2e5,
        "frames": 2,
        "frame_bytes": 9e5,
        "device_forward_s": 6.0,
        "server_train_s": 1.0,
        "train_wall_s": 2.0,
        "pipeline_efficiency": 0.8,
        "run_wall_s": 60.0,
        "config": {"mode": "shared", "num-server-rounds": 1, "bits": 8},
    }
    table = format_summary(summary).splitlines()
    assert "peak MB" in table[0]
    assert table[1].split()[0] == "device-0" and table[1].split()[-1] == "1187"
    assert table[2].split()[-1] == "n/a"  # a device that reported none (it failed its final test)
