"""The device's lean llama forward and tokenizer give transformers' results (tiny random models, the real one)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mobiflower.platform.backbone import Backbone, BackboneError
from mobiflower.platform.device_forward import forward_implementation, lean_problem
from mobiflower.platform.lean_llama import LeanLlamaForCausalLM, LeanTokenizer, tokenizer_problem
from mobiflower.platform.prepared_weights import ensure_prepared, load_prepared_backbone
from mobiflower.platform.quantized_layers import Int4Linear, Int8Linear

TEXTS = [
    "a gripping, beautiful film",
    "two hours I will never get back",
    "fine",
    "an odd, long, winding story about nothing at all, told twice - déjà vu 🎬",
]
SAME_LENGTH = ["abcd", "efgh"]  # no padding: the causal-flag path of SDPA


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    """A tiny llama with grouped-query attention, biases, untied head and a non-default rope theta."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from mobiflower.platform.tiny import _byte_tokenizer

    path = tmp_path_factory.mktemp("gqa-llama")
    config = LlamaConfig(
        vocab_size=260,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_theta=5000.0,
        attention_bias=True,
        mlp_bias=True,
        rms_norm_eps=1e-5,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
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


def _states(backbone: Backbone, texts) -> dict:
    enc = backbone.tokenize(texts)
    seen: dict = {}
    final = backbone.forward_taps(
        enc["input_ids"], enc["attention_mask"], lambda i, h: seen.__setitem__(i, h.float().clone()), need_final=True
    )
    seen["final"] = final.float()
    return {k: v[enc["attention_mask"].bool()] for k, v in seen.items()}  # real tokens only


def _both(ref: str, precision: str, weights_dir: str, monkeypatch, num_taps: int = 3):
    out = {}
    for forward in ("transformers", "lean"):
        monkeypatch.setenv("MOBIFLOWER_DEVICE_FORWARD", forward)
        out[forward] = Backbone.load(ref, num_taps=num_taps, weights=precision, weights_dir=weights_dir)
    assert type(out["lean"].model) is LeanLlamaForCausalLM and isinstance(out["lean"].tokenizer, LeanTokenizer)
    assert type(out["transformers"].model).__name__ == "LlamaForCausalLM"
    return out["transformers"], out["lean"]


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8", "int4"])
def test_lean_forward_matches_transformers(gqa_llama, tiny_llama, precision, tmp_path, monkeypatch):
    for ref in (gqa_llama, tiny_llama):
        hf, lean = _both(ref, precision, str(tmp_path), monkeypatch)
        assert lean.fingerprint == hf.fingerprint and lean.layers == hf.layers
        for texts in (TEXTS, SAME_LENGTH):
            a, b = _states(hf, texts), _states(lean, texts)
            assert a.keys() == b.keys()
            for k in a:
                tol = 2e-2 if precision == "bf16" else 1e-5
                err = float((a[k] - b[k]).abs().max() / a[k].abs().max())
                assert err <= tol, (ref, precision, k, err)
        if precision in ("int8", "int4"):
            kind = Int8Linear if precision == "int8" else Int4Linear
            assert isinstance(lean.model.model.layers[0].mlp.down_proj, kind)


def test_lean_tokenizer_gives_transformers_ids(gqa_llama, tmp_path):
    from transformers import AutoTokenizer

    folder = ensure_prepared(gqa_llama, "int8", tmp_path)
    assert tokenizer_problem(folder) is None
    ref, lean = AutoTokenizer.from_pretrained(folder), LeanTokenizer.from_folder(folder)
    for tok in (ref, lean):
        tok.padding_side, tok.truncation_side = "right", "left"
    long = " ".join(TEXTS * 5)
    for texts, max_length in ((TEXTS, 256), ([long, "short"], 40), (["x"], 8)):
        a = ref(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        b = lean(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    for word in ("positive", " negative", "é"):
        assert ref(word, add_special_tokens=False)["input_ids"] == lean(word, add_special_tokens=False)["input_ids"]
    assert lean.pad_token == ref.pad_token and lean.eos_token == ref.eos_token


def test_other_families_fall_back_to_transformers(tiny_models, tmp_path):
    for family in ("gpt2", "qwen2"):  # (OPT has its own lean forward: tests/test_billion_shapes.py)
        folder = ensure_prepared(tiny_models[family], "int8", tmp_path)
        assert forward_implementation(folder) == "transformers"
        with pytest.raises(BackboneError, match="lean"):
            forward_implementation(folder, "lean")
        model, tokenizer, manifest = load_prepared_backbone(folder)
        assert manifest["forward"] == "transformers" and not isinstance(model, LeanLlamaForCausalLM)
    assert "rope" in lean_problem(
        {"model_type": "llama", "num_attention_heads": 4, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    )
    assert lean_problem({"model_type": "llama", "num_attention_heads": 4, "hidden_act": "gelu"})
    with pytest.raises(BackboneError, match="unknown"):
        forward_implementation(folder, "onnx")


def test_quantized_layers_reuse_a_workspace_and_still_allow_autograd():
    w, b = torch.randn(48, 32), torch.randn(48)
    x = torch.randn(2, 5, 32)
    for layer in (Int8Linear.from_float(w, b), Int4Linear.from_float(w, b, group_size=16)):
        ref = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
        with torch.inference_mode():
            assert torch.equal(layer(x), ref)
        with torch.no_grad():
            assert torch.equal(layer(x), ref)
        xg = x.clone().requires_grad_(True)  # with a graph, each call gets its own weight
        layer(xg).sum().backward()
        assert xg.grad is not None and torch.allclose(layer(x), ref)


def test_device_start_imports_no_transformers(tiny_llama, tmp_path):
    """A fresh process loading a prepared llama copy and making a frame never imports transformers."""
    folder = ensure_prepared(tiny_llama, "int8", tmp_path)
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
    env = {k: v for k, v in __import__("os").environ.items() if k != "MOBIFLOWER_DEVICE_FORWARD"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["transformers"] is False
    assert "-int8-" in result["fingerprint"]


def test_real_model_lean_matches_transformers(real_assets, monkeypatch):
    """SmolLM2-135M (the bundled model, int8 copy): the lean forward's taps equal transformers'."""
    from mobiflower.platform.assets import BUNDLED_MODEL

    hf, lean = _both(BUNDLED_MODEL, "int8", None, monkeypatch, num_taps=4)
    a, b = _states(hf, TEXTS), _states(lean, TEXTS)
    for k in a:
        assert float((a[k] - b[k]).abs().max() / a[k].abs().max()) <= 1e-5, k
