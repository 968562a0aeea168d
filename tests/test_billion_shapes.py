"""Billion-sized backbones (issue 16): the device's lean OPT forward gives transformers' states at every
precision, and a device process running it never imports transformers (tiny random models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mobiflower.platform.backbone import Backbone
from mobiflower.platform.lean_opt import LeanOPTForCausalLM, opt_problem
from mobiflower.platform.weights import ensure_prepared

TEXTS = ["a gripping, beautiful film", "two hours I will never get back", "fine",
         "an odd, long, winding story about nothing at all, told twice"]
SAME_LENGTH = ["abcd", "efgh"]  # no padding: the causal-flag path of SDPA


def _states(backbone: Backbone, texts) -> dict:
    enc = backbone.tokenize(texts)
    seen: dict = {}
    final = backbone.forward_taps(enc["input_ids"], enc["attention_mask"],
                                  lambda i, h: seen.__setitem__(i, h.float().clone()), need_final=True)
    seen["final"] = final.float()
    return {k: v[enc["attention_mask"].bool()] for k, v in seen.items()}  # real tokens only


# ---- the lean OPT forward ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def post_ln_opt(tmp_path_factory):
    """OPT-350M's layout in small: LayerNorm after the blocks, a narrower embedding with project_in/out."""
    from transformers import AutoModelForCausalLM, OPTConfig

    from mobiflower.platform.tiny import _byte_tokenizer

    path = tmp_path_factory.mktemp("post-ln-opt")
    config = OPTConfig(vocab_size=260, hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4,
                       word_embed_proj_dim=32, do_layer_norm_before=False, max_position_embeddings=256,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
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
