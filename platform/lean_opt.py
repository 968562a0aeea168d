"""A plain OPT forward for the device: the lean llama forward's counterpart for the OPT family.

Why: OPT-1.3B is the method's headline backbone, and on a device every message may start a fresh
process. Importing transformers' model code costs seconds and resident memory before a single
weight is read (torch + transformers + ``modeling_opt`` against torch + this module), a
noticeable share of a phone-sized int4 device's memory. So,
as :mod:`mobiflower.platform.lean_llama` does for llama, this module re-states OPT's decoder in
plain torch: learned positions (offset 2, counted over real tokens), pre- or post-LayerNorm blocks,
multi-head attention through ``scaled_dot_product_attention`` with the query pre-scaled, a ReLU
MLP, and the optional ``project_in`` / ``project_out`` of the models whose embedding width differs.

Module tree and parameter names are transformers' (``model.decoder.layers.3.self_attn.q_proj``,
``model.decoder.embed_positions``, ``lm_head``), so a prepared ``model.safetensors`` (quantized
layers included) loads unchanged, forward hooks on ``model.decoder.layers[i]`` tap the same
tensors and the digest sees the same state. The arithmetic follows
``transformers.models.opt.modeling_opt`` (5.x); ``tests/test_billion_shapes.py`` checks the tapped
states against transformers' own forward on random OPT models (pre- and post-LN, projections,
fp32, bf16, int8, int4). Anything else is refused by :func:`opt_problem` and runs on transformers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mobiflower.platform.lean_llama import Embedding, LeanConfig, LeanOutput, Linear

# OPTConfig's defaults, for a config.json that leaves a key out
_DEFAULTS = {
    "enable_bias": True,
    "do_layer_norm_before": True,
    "layer_norm_elementwise_affine": True,
    "_remove_final_layer_norm": False,
    "activation_function": "relu",
    "tie_word_embeddings": True,
    "word_embed_proj_dim": None,
    "pad_token_id": 1,
}
_POSITION_OFFSET = 2  # OPT's learned positions start at row 2 (fairseq's padding convention)


def _get(config: Any, key: str):
    value = config.get(key, None) if isinstance(config, dict) else getattr(config, key, None)
    return _DEFAULTS.get(key) if value is None else value


def opt_problem(config: dict) -> str | None:
    """Why this OPT ``config.json`` cannot run on the lean forward (None when it can)."""
    if _get(config, "activation_function") != "relu":
        return f"activation {config.get('activation_function')!r}"
    if not _get(config, "layer_norm_elementwise_affine"):
        return "LayerNorm without weights (layer_norm_elementwise_affine false)"
    if int(config["hidden_size"]) % int(config["num_attention_heads"]):
        return f"hidden size {config['hidden_size']} is not a multiple of {config['num_attention_heads']} heads"
    return None


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` without the initialisation: its weights always come from a checkpoint (see
    :class:`mobiflower.platform.lean_llama.Linear`)."""

    def reset_parameters(self) -> None:
        pass


class PositionEmbedding(Embedding):
    """OPT's learned positions: row ``position + 2``, position counted over the real tokens (0, 1, ...)
    and -1 on padding, as transformers computes them from the attention mask."""

    def forward(self, attention_mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        mask = attention_mask.long()
        positions = torch.cumsum(mask, dim=1).mul_(mask).sub_(1)
        return F.embedding(positions + _POSITION_OFFSET, self.weight)


class Attention(nn.Module):
    """Causal multi-head self-attention, the query scaled by ``head_dim ** -0.5`` before the product."""

    def __init__(self, config: LeanConfig):
        super().__init__()
        d, heads = int(config.hidden_size), int(config.num_attention_heads)
        self.heads, self.head_dim = heads, d // heads
        self.scaling = self.head_dim**-0.5
        bias = bool(_get(config, "enable_bias"))
        self.k_proj = Linear(d, d, bias=bias)
        self.v_proj = Linear(d, d, bias=bias)
        self.q_proj = Linear(d, d, bias=bias)
        self.out_proj = Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).mul_(self.scaling).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=1.0)
        del q, k, v
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class DecoderLayer(nn.Module):
    """Attention then a ReLU MLP, each around a residual; LayerNorm before (OPT >= 1.3B) or after (350M)."""

    def __init__(self, config: LeanConfig):
        super().__init__()
        d, bias = int(config.hidden_size), bool(_get(config, "enable_bias"))
        self.pre_norm = bool(_get(config, "do_layer_norm_before"))
        self.self_attn = Attention(config)
        self.self_attn_layer_norm = LayerNorm(d)
        self.fc1 = Linear(d, int(config.ffn_dim), bias=bias)
        self.fc2 = Linear(int(config.ffn_dim), d, bias=bias)
        self.final_layer_norm = LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # residual + f(x) written as f(x) += residual: the same sum, one temporary fewer
        h = self.self_attn(self.self_attn_layer_norm(x) if self.pre_norm else x, mask).add_(x)
        if not self.pre_norm:
            h = self.self_attn_layer_norm(h)
        y = F.relu(self.fc1(self.final_layer_norm(h) if self.pre_norm else h), inplace=True)
        y = self.fc2(y).add_(h)
        return y if self.pre_norm else self.final_layer_norm(y)


class LeanOPTDecoder(nn.Module):
    """transformers' ``OPTDecoder``: token and position embeddings, blocks, final LayerNorm."""

    def __init__(self, config: LeanConfig):
        super().__init__()
        d = int(config.hidden_size)
        width = int(_get(config, "word_embed_proj_dim") or d)
        self.padding_idx = _get(config, "pad_token_id")
        self.embed_tokens = Embedding(int(config.vocab_size), width, self.padding_idx)
        self.embed_positions = PositionEmbedding(int(config.max_position_embeddings) + _POSITION_OFFSET, d)
        self.project_out = Linear(d, width, bias=False) if width != d else None
        self.project_in = Linear(width, d, bias=False) if width != d else None
        keep_final = bool(_get(config, "do_layer_norm_before")) and not bool(_get(config, "_remove_final_layer_norm"))
        self.final_layer_norm = LayerNorm(d) if keep_final else None
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(int(config.num_hidden_layers)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t = input_ids.shape
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long)
        h = h + self.embed_positions(attention_mask).to(h.dtype)
        mask = None
        if not bool(attention_mask.all()):
            causal = torch.ones(t, t, dtype=torch.bool).tril_()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            h = layer(h, mask)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return h


class LeanOPTModel(nn.Module):
    """transformers' ``OPTModel``: a wrapper whose ``decoder`` holds everything."""

    def __init__(self, config: LeanConfig):
        super().__init__()
        self.config = config
        self.decoder = LeanOPTDecoder(config)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False, **_: Any
    ) -> LeanOutput:
        return LeanOutput(last_hidden_state=self.decoder(input_ids, attention_mask))


class LeanOPTForCausalLM(nn.Module):
    """``LeanOPTModel`` plus the LM head (tied to the token embeddings unless the config says not)."""

    base_model_prefix = "model"

    def __init__(self, config: LeanConfig):
        super().__init__()
        self.config = config
        self.model = LeanOPTModel(config)
        width = int(_get(config, "word_embed_proj_dim") or config.hidden_size)
        self.lm_head = Linear(width, int(config.vocab_size), bias=False)
        if _get(config, "tie_word_embeddings"):
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    @property
    def base_model(self) -> LeanOPTModel:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.decoder.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Logits (for checks; the device taps blocks and never needs them)."""
        return self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)


__all__ = ["LeanOPTForCausalLM", "LeanOPTModel", "LeanOPTDecoder", "opt_problem"]
