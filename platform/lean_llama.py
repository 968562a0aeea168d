"""A plain llama-family forward for the device, and a tokenizer read straight from ``tokenizer.json``.

Why: in a Flower deployment every message starts a fresh ClientApp process, and importing
transformers' model code (``transformers`` + ``modeling_llama``) costs a large share of its
start-up on a small CPU - more than torch itself. The device only ever runs a frozen,
forward-only backbone from a prepared copy (:mod:`mobiflower.platform.prepared_weights`), so for the llama
family (Llama, SmolLM2, ...) it can use this small re-statement of the same computation instead
(nanoGPT / litgpt spirit): RMSNorm, rotary position embeddings, grouped-query attention through
``torch.nn.functional.scaled_dot_product_attention``, and a SwiGLU MLP.

The module tree and the parameter names are transformers' (``model.layers.3.self_attn.q_proj``,
``model.norm``, ``lm_head``, ...), so the prepared ``model.safetensors`` (quantized layers
included) loads into it unchanged, forward hooks on ``model.layers[i]`` tap the same tensors,
and :func:`mobiflower.platform.hf_model.weights_digest` sees the same state. The arithmetic follows
``transformers.models.llama.modeling_llama`` (5.x) step by step (float32 RMSNorm, rotary tables in
float32 cast to the activation dtype, ``repeat_kv`` + SDPA with a boolean mask when there is
padding, ``is_causal`` when there is none); ``tests/test_lean_llama.py`` checks the tapped states
against transformers' own forward on random llama models (GQA, biases, fp32 and bf16, quantized
layers) and on the bundled SmolLM2. What differs is only where memory goes: the SwiGLU product, the
residual adds, the norms' scaling and the rotary sums are done in place (the same products and
sums, bit for bit), so a layer holds fewer full-size temporaries.

OPT has its own lean forward (:mod:`mobiflower.platform.lean_opt`, built from the same pieces;
:func:`mobiflower.platform.device_forward.lean_problem` and
:func:`~mobiflower.platform.device_forward.build_lean_model` dispatch on ``model_type``). A llama
config the lean forward cannot run (a rope scaling, an activation other than SiLU ...) is named by
:func:`llama_problem`, a tokenizer whose transformers class adds tokens of its own by
:func:`tokenizer_problem`, and the caller falls back to transformers.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class LeanConfig(SimpleNamespace):
    """The model's ``config.json`` as attributes (what the device reads: ``model_type``, sizes, eps)."""

    def __init__(self, values: dict[str, Any]):
        super().__init__(**values)
        self.is_encoder_decoder = bool(values.get("is_encoder_decoder", False))
        self._name_or_path = str(values.get("_name_or_path", ""))

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def get(self, key: str, default=None):
        return getattr(self, key, default)


def _rope_parameters(config: dict) -> dict:
    """``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (4.x), with defaults."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params.setdefault("rope_type", params.pop("type", "default"))
    return params


def llama_problem(config: dict) -> str | None:
    """Why this llama ``config.json`` cannot run on the lean llama forward (None when it can)."""
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    rope = _rope_parameters(config)
    if (
        rope.get("rope_type", "default") != "default"
        or set(rope) - {"rope_theta", "rope_type", "partial_rotary_factor"}
        or rope.get("partial_rotary_factor", 1.0) != 1.0
    ):
        return f"rope {rope}"
    if int(config.get("pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    heads, kv = (
        int(config["num_attention_heads"]),
        int(config.get("num_key_value_heads") or config["num_attention_heads"]),
    )
    if heads % kv:
        return f"{heads} heads are not a multiple of {kv} key/value heads"
    return None


class Linear(nn.Linear):
    """``nn.Linear`` without the random initialisation: its weights always come from a checkpoint.

    (Initialising on the ``meta`` device still runs torch's init functions, and the first of them
    imports ``torch._dynamo``: a large part of a device's start-up.)
    """

    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    """``nn.Embedding`` without the random initialisation (see :class:`Linear`).

    With ``file_rows`` set (:func:`mobiflower.platform.file_rows.read_rows_from_file`), looked-up
    rows are read from the weights file instead of the memory-mapped table.
    """

    file_rows = None

    def reset_parameters(self) -> None:
        pass

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.file_rows is not None:
            return self.file_rows.lookup(input_ids)
        return super().forward(input_ids)


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the statistics in float32 (transformers' LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * h.pow(2).mean(-1, keepdim=True).add_(self.eps).rsqrt_()
        # weight * h, formed in place (one full-size temporary fewer; the product is the same)
        return (h if dtype == torch.float32 else h.to(dtype)).mul_(self.weight)


class RotaryEmbedding(nn.Module):
    """The (default) rotary tables: ``cos``/``sin`` of ``position * inv_freq``, computed in float32."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        # computed on the CPU even while the tree is built on ``meta`` (a checkpoint usually brings
        # its own copy; arithmetic on meta tensors would import torch._dynamo, which is slow)
        steps = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float)
        inv_freq = 1.0 / (theta ** (steps / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.to(torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary positions."""

    def __init__(self, config: LeanConfig):
        super().__init__()
        d, heads = int(config.hidden_size), int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        self.head_dim = int(getattr(config, "head_dim", None) or d // heads)
        self.heads, self.kv_heads = heads, kv
        bias = bool(getattr(config, "attention_bias", False))
        self.q_proj = Linear(d, heads * self.head_dim, bias=bias)
        self.k_proj = Linear(d, kv * self.head_dim, bias=bias)
        self.v_proj = Linear(d, kv * self.head_dim, bias=bias)
        self.o_proj = Linear(heads * self.head_dim, d, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        # (x * cos) + (rotate_half(x) * sin), the second product and the sum formed in place
        q = (q * cos).add_(_rotate_half(q).mul_(sin))
        k = (k * cos).add_(_rotate_half(k).mul_(sin))
        groups = self.heads // self.kv_heads
        if groups > 1:  # as transformers does with a mask on CPU: repeat the key/value heads
            k = (
                k[:, :, None]
                .expand(b, self.kv_heads, groups, t, self.head_dim)
                .reshape(b, self.heads, t, self.head_dim)
            )
            v = (
                v[:, :, None]
                .expand(b, self.kv_heads, groups, t, self.head_dim)
                .reshape(b, self.heads, t, self.head_dim)
            )
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and t > 1, scale=self.head_dim**-0.5
        )
        del q, k, v
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, the product formed in place."""

    def __init__(self, config: LeanConfig):
        super().__init__()
        d, inner = int(config.hidden_size), int(config.intermediate_size)
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_proj = Linear(d, inner, bias=bias)
        self.up_proj = Linear(d, inner, bias=bias)
        self.down_proj = Linear(inner, d, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.gate_proj(x), inplace=True)
        h.mul_(self.up_proj(x))
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(self, config: LeanConfig):
        super().__init__()
        eps = float(config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(int(config.hidden_size), eps)
        self.post_attention_layernorm = RMSNorm(int(config.hidden_size), eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        # residual + f(x), written as f(x) += residual: the same sum, one temporary fewer
        h = self.self_attn(self.input_layernorm(x), cos, sin, mask).add_(x)
        return self.mlp(self.post_attention_layernorm(h)).add_(h)


class LeanOutput(SimpleNamespace):
    last_hidden_state: torch.Tensor


class LeanLlamaModel(nn.Module):
    """The decoder stack (transformers' ``LlamaModel``): embeddings, blocks, final norm."""

    def __init__(self, config: LeanConfig):
        super().__init__()
        self.config = config
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.embed_tokens = Embedding(int(config.vocab_size), int(config.hidden_size), self.padding_idx)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(int(config.num_hidden_layers)))
        self.norm = RMSNorm(int(config.hidden_size), float(config.rms_norm_eps))
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
        self.rotary_emb = RotaryEmbedding(head_dim, float(_rope_parameters(vars(config))["rope_theta"]))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, use_cache: bool = False, **_: Any
    ) -> LeanOutput:
        h = self.embed_tokens(input_ids)
        b, t = input_ids.shape
        positions = torch.arange(t).unsqueeze(0)
        cos, sin = self.rotary_emb(h, positions)
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            causal = torch.ones(t, t, dtype=torch.bool).tril_()
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]
        for layer in self.layers:
            h = layer(h, cos, sin, mask)
        return LeanOutput(last_hidden_state=self.norm(h))


class LeanLlamaForCausalLM(nn.Module):
    """``LeanLlamaModel`` plus the LM head (tied to the embeddings when the config says so)."""

    base_model_prefix = "model"

    def __init__(self, config: LeanConfig):
        super().__init__()
        self.config = config
        self.model = LeanLlamaModel(config)
        self.lm_head = Linear(int(config.hidden_size), int(config.vocab_size), bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def base_model(self) -> LeanLlamaModel:
        return self.model

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Logits (for checks; the device taps blocks and never needs them)."""
        return self.lm_head(self.model(input_ids, attention_mask).last_hidden_state)


def read_config(folder: str | Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


# ------------------------------------------------------------------------------------------
# tokenizer

_PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
_TOKENIZER_FLAGS = ("add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "from_slow")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def tokenizer_problem(folder: str | Path) -> str | None:
    """Why ``folder``'s tokenizer needs transformers (None when ``tokenizer.json`` alone reproduces it).

    transformers' plain fast tokenizer is the ``tokenizers`` object of ``tokenizer.json`` plus
    padding and truncation settings; model-specific classes (e.g. Llama's, with ``add_bos_token``)
    rewrite the post-processor at load time, which this path would miss.
    """
    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return "no readable tokenizer_config.json"
    if cfg.get("tokenizer_class") not in _PLAIN_TOKENIZER_CLASSES:
        return f"tokenizer class {cfg.get('tokenizer_class')!r}"
    flags = [k for k in _TOKENIZER_FLAGS if k in cfg]
    if flags:
        return f"tokenizer options {flags}"
    if (folder / "special_tokens_map.json").is_file() or (folder / "added_tokens.json").is_file():
        return "special tokens outside tokenizer.json"
    return None


class LeanTokenizer:
    """The subset of transformers' fast-tokenizer call the device uses, on a ``tokenizers.Tokenizer``.

    ``tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt")`` and
    ``tok(text, add_special_tokens=False)["input_ids"]`` set the same padding and truncation on the
    same Rust tokenizer that transformers would, so the ids are identical (tested).
    """

    def __init__(self, tokenizer, config: dict):
        self._tokenizer = tokenizer
        self.init_kwargs = dict(config)
        self.eos_token = _token_text(config.get("eos_token"))
        self.bos_token = _token_text(config.get("bos_token"))
        self.unk_token = _token_text(config.get("unk_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.padding_side = config.get("padding_side", "right")
        self.truncation_side = config.get("truncation_side", "right")
        self.name_or_path = config.get("name_or_path", "")

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LeanTokenizer":
        from tokenizers import Tokenizer

        folder = Path(folder)
        problem = tokenizer_problem(folder)
        if problem is not None:
            raise ValueError(f"{folder}: the lean tokenizer cannot reproduce this one ({problem})")
        config = json.loads((folder / "tokenizer_config.json").read_text())
        return cls(Tokenizer.from_file(str(folder / "tokenizer.json")), config)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tokenizer.token_to_id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tokenizer.token_to_id(self.eos_token)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __call__(
        self,
        text: str | Sequence[str],
        padding: bool = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
    ) -> dict:
        tok = self._tokenizer
        if truncation and max_length is not None:
            tok.enable_truncation(int(max_length), stride=0, strategy="longest_first", direction=self.truncation_side)
        elif tok.truncation is not None:
            tok.no_truncation()
        if padding:
            if self.pad_token_id is None:
                raise ValueError("padding needs a pad token: set tokenizer.pad_token")
            tok.enable_padding(
                direction=self.padding_side, pad_id=self.pad_token_id, pad_type_id=0, pad_token=self.pad_token
            )
        elif tok.padding is not None:
            tok.no_padding()
        single = isinstance(text, str)
        encodings = tok.encode_batch([text] if single else list(text), add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encodings]
        mask = [e.attention_mask for e in encodings]
        if return_tensors == "pt":
            return {
                "input_ids": torch.tensor(ids, dtype=torch.long),
                "attention_mask": torch.tensor(mask, dtype=torch.long),
            }
        if return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: the lean tokenizer returns 'pt' or lists")
        if single:
            return {"input_ids": ids[0], "attention_mask": mask[0]}
        return {"input_ids": ids, "attention_mask": mask}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


__all__ = [
    "LeanConfig",
    "LeanLlamaModel",
    "LeanLlamaForCausalLM",
    "LeanTokenizer",
    "llama_problem",
    "read_config",
    "tokenizer_problem",
]
