"""Low-precision frozen backbones for the device, and a fast, memory-mapped start.

The device never trains its backbone, so its weights can live in low precision: on a phone they
are most of the memory a device spends. And in a Flower deployment every message starts a fresh
ClientApp process, so the backbone is loaded again and again; it must load fast.

Precisions (``WEIGHT_PRECISIONS``)
    ``fp32``  the checkpoint as is.
    ``bf16``  every weight and every activation in bfloat16 (fast where the CPU has native bf16:
              AVX512-BF16 / AMX on x86, BF16 on Arm; it runs anywhere, slowly elsewhere).
    ``int8``  weight-only int8 for every ``nn.Linear`` (and GPT-2 ``Conv1D``) of the transformer
              blocks: symmetric, one fp32 scale per output channel. Activations stay fp32.
              (Measured on the bundled SmolLM2: tapped states within about 2-3 % of fp32's.)
    ``int4``  weight-only 4-bit for the same layers: asymmetric, one fp16 scale and one fp16
              minimum per group of ``group_size`` (default 32) input values along each row, two
              values packed per byte (llama.cpp's Q4_1 grid: the bundled SmolLM2, itself converted
              from a Q4_1 GGUF, round-trips almost exactly; expect more error on a bf16 checkpoint).

    In both integer modes the token embedding table is stored in int8 (one scale per row; the
    residual stream starts there, so it does not go down to 4 bits), and a tied LM head is an
    int8 view of the same rows (stored once). Only the rows a batch looks up are dequantized.
    Norms, position embeddings and an untied LM head keep the checkpoint's precision.

How the quantized layers run (no hand-written kernels)
    The weights are stored in the "plain" layout torchao uses for its CPU weight-only workflows
    (int8 values + per-channel scales; uint8-packed int4 values + per-group scale and minimum).
    At run time a layer dequantizes its weight with two ATen element-wise ops and calls
    ``torch.nn.functional.linear`` (MKL / oneDNN GEMM) - the same CPU strategy as torchao's
    ``Int8Tensor`` weight-only path (``dequantize()`` + ``mm``). The dequantized copy of one layer
    is transient (at most a few MB), so the resident weights are the low-precision ones. Measured
    alternatives on torch 2.13 / x86 and why they are not used: ``torch.ao.quantization
    .quantize_dynamic`` and the quantized-tensor APIs (``torch.quantize_per_channel``) are
    deprecated in torch 2.13 (pytorch/pytorch#184982, pytorch/ao#2259) and their packed weights
    cannot be memory-mapped; torchao 0.18 (PyPI) takes about 2 s to import (its bundled extensions
    are CUDA builds) - most of the start-up budget of a fresh device process - and its CPU 4-bit
    path (prototype ``Int4OpaqueTensor``, ATen ``_weight_int4pack_mm_for_cpu``) and
    ``_weight_int8pack_mm`` are decode-shaped kernels: at a device's batch shape (1,024 tokens x
    576 -> 1,536) they ran 2-2.4x slower than fp32 GEMM with bf16 activations and 47-136x slower
    with fp32 ones, where dequantize + GEMM costs 1.03-1.15x.

Fast start: the prepared copy
    :func:`prepare_quantized_backbone` converts a model once into a folder
    (``$MOBIFLOWER_HOME/models/<name>-<precision>/``): ``model.safetensors`` (the tensors in their
    stored precision, tied weights once), ``config.json``, the tokenizer, and a manifest
    ``mobiflower-weights.json`` (precision, quantized layers, the backbone digest, a stamp of the
    source files). :func:`load_prepared_backbone` builds the module tree on the ``meta`` device
    (no allocation, no random init), swaps in the quantized layers, and assigns the tensors of a
    memory-mapped ``safetensors`` file without copying: loading costs milliseconds and no memory
    until the forward touches the pages. The digest comes from the manifest, so the load does not
    read every weight either. ``Backbone.load(ref, weights="int8")`` does all of it, building the
    copy first if it is missing or stale.

The precision is part of the backbone fingerprint frames carry (``llama-d576-L30-int8-<digest>``),
and the digest is computed on the quantized weights, so a side network trained on one precision
is never fed activations of another.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from mobiflower.platform.atomic import exclusive_lock
from mobiflower.platform.backbone import DECODER_TYPES, BackboneError, _find_blocks, load_checkpoint, weights_digest

WEIGHT_PRECISIONS = ("fp32", "bf16", "int8", "int4")
"""Backbone weight precisions a device can run; :func:`precision_support` says which run well here."""

PRECISION_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "int8": "int8", "int4": "int4"}
"""The precision's name in the backbone fingerprint (fp32/bf16 keep torch's dtype names)."""

DEFAULT_INT4_GROUP_SIZE = 32
FORMAT_VERSION = 2
MANIFEST = "mobiflower-weights.json"
WEIGHTS_FILE = "model.safetensors"

_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "f32": "fp32",
    "bf16": "bf16", "bfloat16": "bf16",
    "int8": "int8", "w8": "int8", "8bit": "int8", "8-bit": "int8",
    "int4": "int4", "w4": "int4", "4bit": "int4", "4-bit": "int4",
}
_NOT_ON_CPU = {
    "fp16": "float16 GEMM on CPU is slow and loses range; use bf16 (native on AVX512-BF16/AMX CPUs) or int8",
    "float16": "float16 GEMM on CPU is slow and loses range; use bf16 (native on AVX512-BF16/AMX CPUs) or int8",
    "int2": "no maintained CPU path runs 2-bit weights; 4-bit (int4) is the lowest here",
    "nf4": "NF4 needs bitsandbytes or torchao's NF4Tensor, both GPU-oriented; use int4",
    "fp8": "float8 weights need a GPU (torchao Float8WeightOnlyConfig); use int8",
}


class WeightPrecisionError(BackboneError):
    """The requested weight precision is unknown or cannot run here; the message says what to use."""


def normalize_precision(precision: str) -> str:
    """``fp32``/``bf16``/``int8``/``int4`` for any accepted spelling, or a :class:`WeightPrecisionError`."""
    key = str(precision).strip().lower().removeprefix("torch.")
    if key in _ALIASES:
        return _ALIASES[key]
    reason = _NOT_ON_CPU.get(key)
    raise WeightPrecisionError(
        f"weight precision {precision!r} is not supported{': ' + reason if reason else ''}. "
        f"Choose one of {', '.join(WEIGHT_PRECISIONS)}.")


def precision_of_dtype(dtype: torch.dtype) -> str:
    """``fp32``/``bf16`` for those dtypes; torch's name otherwise (e.g. ``float16``)."""
    name = str(dtype).removeprefix("torch.")
    return _ALIASES.get(name, name)


def bf16_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on Arm)."""
    cpu = getattr(torch._C, "_cpu", None)
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_arm_sve_bf16_supported"):
        fn = getattr(cpu, probe, None)
        try:
            if fn is not None and fn():
                return True
        except Exception:  # noqa: BLE001 - a probe missing in this build answers "no"
            pass
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
        return "bf16" in flags or "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def precision_support() -> dict[str, dict[str, Any]]:
    """For each precision: does it run here (``supported``), and is it fast here (``native``)."""
    native_bf16 = bf16_native()
    return {
        "fp32": {"supported": True, "native": True, "path": "ATen fp32 GEMM"},
        "bf16": {"supported": True, "native": native_bf16,
                 "path": "ATen bf16 GEMM (oneDNN)" + ("" if native_bf16 else
                                                      "; this CPU has no native bf16: it runs, slowly")},
        "int8": {"supported": True, "native": True,
                 "path": "weight-only int8 (per-channel scales), dequantized per layer + ATen fp32 GEMM"},
        "int4": {"supported": True, "native": True,
                 "path": "weight-only 4-bit (per-group scale and minimum), dequantized per layer + ATen fp32 GEMM"},
    }


# ------------------------------------------------------------------------------------------
# quantized layers


_WORKSPACES = threading.local()

DEQUANT_TILE_ELEMENTS = 1 << 19
"""At most this many weights are dequantized at once (2 MB in float32): a larger layer is run as a
few GEMMs over equal slices of its output features, each into its columns of the output."""


def _workspace(numel: int, dtype: torch.dtype, role: str) -> torch.Tensor:
    """A per-thread flat scratch tensor of at least ``numel`` elements for ``role``, reused across
    calls and layers (callers view a prefix of it).

    A quantized layer used to dequantize its weight into a fresh tensor on every call: 210 freed
    multi-MB blocks per forward of SmolLM2, which glibc's heap kept (its mmap threshold adapts
    upward after the first free, so they came from the heap and fragmented it): about 45 MB of
    int8's resident memory was heap that fp32 never had. Then one buffer per weight shape (about
    9 MB for SmolLM2); now one buffer of at most :data:`DEQUANT_TILE_ELEMENTS` for every layer
    (1.7 MB). Buffers are per thread (several devices may share a process) and per inference mode
    (an inference tensor cannot be written outside ``inference_mode``).
    """
    pool = getattr(_WORKSPACES, "pool", None)
    if pool is None:
        pool = _WORKSPACES.pool = {}
    key = (role, dtype, torch.is_inference_mode_enabled())
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def release_workspaces() -> None:
    """Drop this thread's dequantization buffers (they are rebuilt on the next forward)."""
    _WORKSPACES.pool = {}


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight is stored in low precision and dequantized per call.

    Subclasses hold plain tensors (buffers), so ``state_dict`` is tensors only and a
    ``safetensors`` file of it can be memory-mapped and assigned without a copy.
    """

    precision = ""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        if bias:
            self.register_buffer("bias", torch.empty(self.out_features))
        else:
            self.bias = None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def dequantize_rows(self, rows: torch.Tensor | list[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Only these output rows of the weight (e.g. two vocabulary rows of a tied LM head)."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a fresh tensor: for inspection, not for the hot path)."""
        return self.dequantize()

    def dequantize_into(self, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Dequantize output rows ``start .. start + len(out)`` of the weight into ``out``
        (``[rows, in_features]``, its dtype) and return it."""
        return out.copy_(self.dequantize_rows(torch.arange(start, start + out.shape[0]), out.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        if not (torch.is_inference_mode_enabled() or not torch.is_grad_enabled()):
            return F.linear(x, self.dequantize(x.dtype), bias)  # a graph may keep the weight: a fresh one
        # No autograd graph can keep the weight: dequantize into this thread's reusable buffer, a
        # slice of output rows at a time when the whole weight is larger than the buffer.
        n, k = self.out_features, self.in_features
        tiles = -(-n * k // DEQUANT_TILE_ELEMENTS)
        rows = -(-n // tiles)
        buf = _workspace(rows * k, x.dtype, "w")
        if tiles == 1:
            return F.linear(x, self.dequantize_into(buf.view(n, k)), bias)
        x2 = x.reshape(-1, k)
        y = torch.empty(x2.shape[0], n, dtype=x.dtype)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            w = self.dequantize_into(buf[:(r1 - r0) * k].view(r1 - r0, k), r0)
            torch.mm(x2, w.t(), out=y[:, r0:r1])  # strided output: BLAS writes the columns in place
        if bias is not None:
            y.add_(bias)
        return y.view(*x.shape[:-1], n)

    def weight_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(QuantizedLinear):
    """Weight-only int8: ``weight[o, i] = qweight[o, i] * scale[o]`` (symmetric, per output channel)."""

    precision = "int8"

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8Linear":
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        layer = cls(w.shape[1], w.shape[0], bias is not None)
        layer.qweight, layer.scale = q.contiguous(), scale.contiguous()
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.to(dtype).mul_(self.scale.to(dtype)[:, None])

    def dequantize_rows(self, rows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return self.qweight[rows].to(dtype).mul_(self.scale[rows].to(dtype)[:, None])

    def dequantize_into(self, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        # widen into the buffer, then scale in place: the same arithmetic as dequantize(), and faster
        # than a mixed-dtype torch.mul(out=) (measured: 285 vs 480 us for 1536 x 576 on one core)
        end = start + out.shape[0]
        return out.copy_(self.qweight[start:end]).mul_(self.scale[start:end].to(out.dtype)[:, None])

    @classmethod
    def sharing(cls, embedding: "Int8Embedding", bias: torch.Tensor | None = None) -> "Int8Linear":
        """A linear layer over the very same int8 rows and scales as ``embedding`` (a tied LM head)."""
        layer = cls(embedding.embedding_dim, embedding.num_embeddings, bias is not None)
        layer.qweight, layer.scale = embedding.qweight, embedding.scale
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer


_SHIFTS: torch.Tensor | None = None


def _nibble_shifts() -> torch.Tensor:
    global _SHIFTS
    if _SHIFTS is None:
        _SHIFTS = torch.tensor([0, 4], dtype=torch.uint8, device="cpu")
    return _SHIFTS


class Int4Linear(QuantizedLinear):
    """Weight-only 4-bit: per group of ``group_size`` inputs, ``weight = q * scale + minimum``, q in 0..15.

    ``qweight`` is ``uint8 [out, in/2]``: input ``2j`` in the low nibble, ``2j + 1`` in the high one.
    ``scale`` and ``minimum`` are ``float16 [out, in/group_size]``: 4 + 1 bits per weight at group 32.
    """

    precision = "int4"

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group_size: int = DEFAULT_INT4_GROUP_SIZE):
        super().__init__(in_features, out_features, bias)
        if in_features % group_size or group_size % 2:
            raise WeightPrecisionError(f"int4 needs in_features ({in_features}) divisible by an even "
                                       f"group_size ({group_size})")
        self.group_size = int(group_size)
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("minimum", torch.empty(out_features, groups, dtype=torch.float16))

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None,
                   group_size: int = DEFAULT_INT4_GROUP_SIZE) -> "Int4Linear":
        w = weight.detach().float()
        out_f, in_f = w.shape
        layer = cls(in_f, out_f, bias is not None, group_size)
        g = w.reshape(out_f, in_f // group_size, group_size)
        lo, hi = g.amin(dim=-1), g.amax(dim=-1)
        # The stored (fp16) scale and minimum are what dequantization uses: round against them.
        minimum = lo.to(torch.float16)
        scale = ((hi - minimum.float()) / 15.0).to(torch.float16)
        safe = torch.where(scale.float() > 0, scale.float(), torch.ones_like(lo))
        q = torch.round((g - minimum.float()[..., None]) / safe[..., None]).clamp_(0, 15).to(torch.uint8)
        q = q.reshape(out_f, in_f)
        layer.qweight = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
        layer.scale, layer.minimum = scale.contiguous(), minimum.contiguous()
        if bias is not None:
            layer.bias = bias.detach().float().clone()
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self._dequantize(self.qweight, self.scale, self.minimum, dtype)

    def dequantize_rows(self, rows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return self._dequantize(self.qweight[rows], self.scale[rows], self.minimum[rows], dtype)

    def dequantize_into(self, out: torch.Tensor, start: int = 0) -> torch.Tensor:
        n, in_f, gs = out.shape[0], self.in_features, self.group_size
        end = start + n
        codes = _workspace(n * in_f, torch.uint8, "int4-codes").view(n, in_f // 2, 2)
        torch.bitwise_right_shift(self.qweight[start:end].unsqueeze(-1), _nibble_shifts(), out=codes).bitwise_and_(15)
        dtype = out.dtype
        scale, minimum = self.scale[start:end], self.minimum[start:end]
        if dtype != torch.float16:
            scale, minimum = scale.to(dtype), minimum.to(dtype)
        w = out.view(n, in_f // gs, gs).copy_(codes.view(n, in_f // gs, gs))  # widen, then w = min + w * scale
        torch.addcmul(minimum[..., None], w, scale[..., None], out=w)
        return out

    def _dequantize(self, qweight, scale, minimum, dtype) -> torch.Tensor:
        n, in_f, gs = qweight.shape[0], self.in_features, self.group_size
        q = (qweight.unsqueeze(-1) >> _nibble_shifts()).bitwise_and_(15)  # [n, in/2, 2]: even, odd inputs
        q = q.view(n, in_f // gs, gs).to(dtype)
        w = torch.addcmul(minimum.to(dtype)[..., None], q, scale.to(dtype)[..., None])
        return w.view(n, in_f)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8Embedding(nn.Module):
    """A frozen embedding table in int8, one fp32 scale per row; looked-up rows are dequantized.

    Only the rows a batch uses are read (from the file itself on a prepared copy: see
    :mod:`mobiflower.platform.file_rows`; a memory-mapped table would have the kernel map 64 KB
    around each faulting row, so a busy table ends up mostly resident). The layout is :class:`Int8Linear`'s (``[rows, dim]``, a scale per row), so a tied
    LM head is an :class:`Int8Linear` over the same two tensors (:meth:`Int8Linear.sharing`).
    """

    precision = "int8"

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(num_embeddings), int(embedding_dim), padding_idx
        self.register_buffer("qweight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(num_embeddings, dtype=torch.float32))

    @classmethod
    def from_float(cls, embedding: nn.Embedding) -> "Int8Embedding":
        w = embedding.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=torch.finfo(torch.float32).tiny)
        table = cls(w.shape[0], w.shape[1], embedding.padding_idx)
        table.qweight = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8).contiguous()
        table.scale = scale.contiguous()
        return table

    file_rows = None  # set by mobiflower.platform.file_rows.read_rows_from_file: rows read from the file

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.file_rows is not None:
            return self.file_rows.lookup(input_ids, self.scale)
        rows = F.embedding(input_ids, self.qweight).to(torch.float32)
        return rows.mul_(F.embedding(input_ids, self.scale[:, None]))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (a fresh tensor: for inspection, not for the hot path)."""
        return self.qweight.to(torch.float32).mul_(self.scale[:, None])

    def weight_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with a transposed weight ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _linear_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if _is_conv1d(module) else module.weight


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every linear layer inside the model's transformer blocks."""
    config = model.config
    blocks = _find_blocks(model.base_model, int(config.num_hidden_layers))
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for block in blocks:
        for module in block.modules():
            if isinstance(module, (nn.Linear, QuantizedLinear)) or _is_conv1d(module):
                found.append((names[id(module)], module))
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_backbone_weights(model: nn.Module, precision: str,
                              group_size: int = DEFAULT_INT4_GROUP_SIZE, embeddings: bool = True) -> nn.Module:
    """Convert a frozen model in place to ``precision`` and return it.

    ``fp32``/``bf16`` cast every parameter (buffers such as rotary frequencies keep their
    precision, as transformers does when it loads a model in bf16); ``int8``/``int4`` replace the
    linear layers of the transformer blocks by :class:`Int8Linear`/:class:`Int4Linear`, and
    (``embeddings``) the token embedding table by an :class:`Int8Embedding` (per-row int8 in both
    modes: the residual stream starts there), with a tied LM head becoming an int8 view of the
    same rows. Position embeddings, norms and an untied LM head stay as they are.

    The replaced fp32 modules are dropped: nothing in the model references them afterwards. But a
    model whose weights are memory-mapped from a file keeps the pages this conversion read
    resident until the mapping goes, so a device loads the prepared copy
    (:func:`prepare_quantized_backbone`) rather than quantizing at start-up.
    """
    precision = normalize_precision(precision)
    if precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        return model
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    for name, module in block_linears(model):
        if isinstance(module, QuantizedLinear):
            raise WeightPrecisionError(f"{name} is already quantized ({module.precision}): quantize the "
                                       "fp32 checkpoint instead")
        weight, bias = _linear_weight(module), getattr(module, "bias", None)
        if precision == "int8":
            new = Int8Linear.from_float(weight, bias)
        else:
            if weight.shape[1] % group_size:
                raise WeightPrecisionError(f"int4 group_size {group_size} does not divide {name}'s "
                                           f"{weight.shape[1]} inputs: choose a group size that does (e.g. 32)")
            new = Int4Linear.from_float(weight, bias, group_size)
        _set_module(model, name, new)
        del module, weight, bias
    if embeddings:
        _quantize_embeddings(model)
    model.requires_grad_(False)
    return model


def _quantize_embeddings(model: nn.Module) -> None:
    """The input embedding to :class:`Int8Embedding`, and a tied LM head to an int8 view of it."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(head, nn.Linear) and head.weight.data_ptr() == emb.weight.data_ptr() and \
        head.weight.shape == emb.weight.shape
    names = {id(m): n for n, m in model.named_modules()}
    table = Int8Embedding.from_float(emb)
    _set_module(model, names[id(emb)], table)
    if tied:
        _set_module(model, names[id(head)], Int8Linear.sharing(table, head.bias))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights by kind: quantized block layers, and everything else (parameters + buffers)."""
    seen: set[int] = set()
    quantized = other = 0
    q_ids = {id(t) for m in model.modules() if isinstance(m, (QuantizedLinear, Int8Embedding)) for t in m.buffers()}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if id(t) in q_ids:
            quantized += t.numel() * t.element_size()
        else:
            other += t.numel() * t.element_size()
    return {"quantized": quantized, "other": other, "total": quantized + other}


# ------------------------------------------------------------------------------------------
# the prepared copy on disk


def _home() -> Path:
    from mobiflower.platform.assets import home

    return home()


def _source_path(ref: str) -> str:
    """Where ``ref``'s checkpoint is, without building a shipped shape's (a device that has only the
    prepared copy keeps using it)."""
    from mobiflower.platform.assets import resolve_model

    return resolve_model(ref, materialize=False)


def prepared_dir(ref: str, precision: str, cache_dir: str | Path | None = None,
                 group_size: int = DEFAULT_INT4_GROUP_SIZE) -> Path:
    """Where the prepared copy of ``ref`` at ``precision`` lives (``<cache>/<name>-<precision>``).

    ``cache`` is ``cache_dir`` or ``$MOBIFLOWER_HOME/models``. A local folder's name carries a
    hash of its absolute path, so two folders with the same base name never share a copy.
    """
    from mobiflower.platform.assets import BUNDLED_MODEL

    precision = normalize_precision(precision)
    root = Path(cache_dir) if cache_dir is not None else _home() / "models"
    if ref == BUNDLED_MODEL:
        name = ref
    elif Path(ref).expanduser().exists():
        path = Path(ref).expanduser().resolve()
        name = f"{path.name}-{hashlib.blake2b(str(path).encode(), digest_size=4).hexdigest()}"
    else:  # a hub id
        name = ref.replace("/", "--")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name)
    suffix = precision + (f"-g{group_size}" if precision == "int4" and group_size != DEFAULT_INT4_GROUP_SIZE else "")
    return root / f"{name}-{suffix}"


def _source_stamp(path: str) -> list | None:
    """Names, sizes and mtimes of a local model folder's weight and config files (None for a hub id)."""
    folder = Path(path)
    if not folder.is_dir():
        return None
    files = sorted(p for p in folder.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json"))
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _file_stamp(path: Path) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_manifest(folder: str | Path) -> dict | None:
    try:
        return json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def manifest_problem(folder: str | Path, ref: str | None = None, precision: str | None = None,
                     group_size: int | None = None) -> str | None:
    """Why the prepared copy at ``folder`` cannot be used (None when it can)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return "no manifest"
    if manifest.get("format_version") != FORMAT_VERSION:
        return f"format version {manifest.get('format_version')} (want {FORMAT_VERSION})"
    if precision is not None and manifest.get("precision") != normalize_precision(precision):
        return f"precision {manifest.get('precision')} (want {precision})"
    if group_size is not None and manifest.get("precision") == "int4" and manifest.get("group_size") != group_size:
        return f"group size {manifest.get('group_size')} (want {group_size})"
    weights = folder / WEIGHTS_FILE
    if not weights.is_file() or _file_stamp(weights) != manifest.get("file_stamp"):
        return f"{WEIGHTS_FILE} is missing or changed since it was prepared"
    if ref is not None:
        try:
            stamp = _source_stamp(_source_path(ref))
        except Exception:  # noqa: BLE001 - the source is gone (a device shipped only the copy): use the copy
            stamp = None
        if stamp is not None and stamp != manifest.get("source", {}).get("stamp"):
            return "the source model changed since the copy was prepared"
    return None


def is_prepared_folder(ref: str | Path) -> bool:
    """Whether ``ref`` is itself a prepared copy (a folder with a weights manifest)."""
    try:
        return (Path(ref).expanduser() / MANIFEST).is_file()
    except (OSError, ValueError):
        return False


def _disk_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """Tensors to save (each storage once), aliases of tied tensors, and the non-persistent buffers."""
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_ptr: dict[tuple, str] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in by_ptr:
            aliases[name] = by_ptr[key]
            continue
        by_ptr[key] = name
        tensors[name] = t.detach().contiguous()
    non_persistent = []
    for name, buf in model.named_buffers(remove_duplicate=False):
        if name not in state and buf is not None:
            tensors[name] = buf.detach().contiguous()
            non_persistent.append(name)
    return tensors, aliases, sorted(non_persistent)


def prepare_quantized_backbone(ref: str, precision: str, out_dir: str | Path | None = None, *,
                               cache_dir: str | Path | None = None, group_size: int = DEFAULT_INT4_GROUP_SIZE,
                               force: bool = False, log=None) -> Path:
    """Convert ``ref`` once into a ready-to-map folder at ``precision``; return the folder.

    Idempotent: a current copy (same precision, format, and unchanged source files) is reused.
    Safe when several processes prepare the same copy at once (each writes a private folder and
    renames it into place; the first one wins).
    """
    from safetensors.torch import save_file

    precision = normalize_precision(precision)
    out = Path(out_dir) if out_dir is not None else prepared_dir(ref, precision, cache_dir, group_size)
    if not force and manifest_problem(out, ref, precision, group_size) is None:
        return out
    log = log or (lambda msg: None)
    start = time.perf_counter()
    log(f"[weights] preparing a {precision} copy of {ref} at {out} (once)...")
    path = _source_path(ref)
    model, tokenizer = load_checkpoint(ref, torch.float32)
    model.eval().requires_grad_(False)
    quantize_backbone_weights(model, precision, group_size)
    digest = weights_digest(model)
    tensors, aliases, non_persistent = _disk_state(model)
    quantized = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            quantized[name] = {"kind": m.precision, "in": m.in_features, "out": m.out_features,
                               "bias": m.bias is not None, **({"group_size": m.group_size} if m.precision == "int4" else {})}
        elif isinstance(m, Int8Embedding):
            quantized[name] = {"kind": "int8-embedding", "num": m.num_embeddings, "dim": m.embedding_dim,
                               "padding_idx": m.padding_idx}
    sizes = weight_bytes(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "mobiflower_precision": precision})
        del tensors
        model.config.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "precision": precision,
            "dtype_name": PRECISION_DTYPE_NAMES[precision],
            "group_size": group_size if precision == "int4" else None,
            "digest": digest,
            "model_type": str(model.config.model_type),
            "auto": "causal_lm" if model.config.model_type in DECODER_TYPES else "base",
            "quantized": quantized,
            "aliases": aliases,
            "non_persistent": non_persistent,
            "weight_bytes": sizes,
            "file_stamp": _file_stamp(tmp / WEIGHTS_FILE),
            "source": {"ref": ref, "path": str(path), "stamp": _source_stamp(path)},
            "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
            "prepare_s": round(time.perf_counter() - start, 3),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if out.exists():
            shutil.rmtree(out, ignore_errors=True)
        try:
            os.replace(tmp, out)
        except OSError:  # another process renamed its copy into place first: use that one
            if manifest_problem(out, None, precision, group_size) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    del model
    log(f"[weights] {precision} copy ready in {time.perf_counter() - start:.1f} s: "
        f"{sizes['total'] / 2**20:.0f} MiB of weights")
    return out


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def ensure_prepared(ref: str, precision: str, cache_dir: str | Path | None = None,
                    group_size: int = DEFAULT_INT4_GROUP_SIZE, log=None) -> Path:
    """The prepared copy's folder, building (or rebuilding a stale) one first."""
    folder = prepared_dir(ref, precision, cache_dir, group_size)
    if manifest_problem(folder, ref, precision, group_size) is None:
        return folder
    # one process at a time rebuilds: the others wait, find the copy current and use it (a second
    # rebuild would delete the first's copy under whoever is loading it)
    with exclusive_lock(folder.with_name(f".{folder.name}.lock")):
        for stale in folder.parent.glob(f".{folder.name}.*.part"):  # a build killed mid-write (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        return prepare_quantized_backbone(ref, precision, folder, group_size=group_size, log=log)


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = tensor
    else:
        raise BackboneError(f"the prepared weights name {name!r}, which the model does not have")


def _share(model: nn.Module, name: str, target: str) -> None:
    """Make ``name`` the very same parameter (or buffer) object as ``target`` (tied weights)."""
    t_module, _, t_attr = target.rpartition(".")
    t_owner = model.get_submodule(t_module) if t_module else model
    obj = t_owner._parameters.get(t_attr)
    if obj is None:
        obj = t_owner._buffers[t_attr]
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if isinstance(obj, nn.Parameter):
        module._parameters[attr] = obj
    else:
        module._buffers[attr] = obj


FORWARD_IMPLEMENTATIONS = ("auto", "lean", "transformers")
"""How a prepared copy is run: ``lean`` (:mod:`mobiflower.platform.lean_llama` for the llama family,
:mod:`mobiflower.platform.lean_opt` for OPT,
no transformers import), ``transformers``, or ``auto`` (lean where it applies, else transformers).
The environment variable ``MOBIFLOWER_DEVICE_FORWARD`` sets the default."""


def forward_implementation(folder: str | Path, implementation: str | None = None) -> str:
    """``lean`` or ``transformers``: which forward (and tokenizer) a prepared copy loads with."""
    from mobiflower.platform.lean_llama import lean_problem, read_config, tokenizer_problem

    choice = (implementation or os.environ.get("MOBIFLOWER_DEVICE_FORWARD") or "auto").strip().lower()
    if choice not in FORWARD_IMPLEMENTATIONS:
        raise BackboneError(f"device forward {choice!r} is unknown: choose one of {', '.join(FORWARD_IMPLEMENTATIONS)}")
    if choice == "transformers":
        return choice
    problem = lean_problem(read_config(folder)) or tokenizer_problem(folder)
    if problem is None:
        return "lean"
    if choice == "lean":
        raise BackboneError(f"the lean device forward cannot load {folder}: {problem}")
    return "transformers"


def load_prepared_tokenizer(folder: str | Path, forward: str = "lean"):
    """The tokenizer of a prepared copy: the lean one (``tokenizers`` only) for the lean forward,
    transformers' ``AutoTokenizer`` otherwise. (The device may drop it while it forwards and load
    it again: :meth:`mobiflower.platform.backbone.Backbone.release_tokenizer`.)"""
    if forward == "lean":
        from mobiflower.platform.lean_llama import LeanTokenizer

        return LeanTokenizer.from_folder(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def load_prepared_backbone(folder: str | Path, precision: str | None = None, implementation: str | None = None):
    """``(model, tokenizer, manifest)`` from a prepared folder, the weights memory-mapped, not copied.

    A llama-family or OPT copy runs on the lean forward (:mod:`mobiflower.platform.lean_llama`,
    :mod:`mobiflower.platform.lean_opt`: same names,
    same arithmetic, no transformers import) unless ``implementation`` (or
    ``MOBIFLOWER_DEVICE_FORWARD``) says ``transformers``; the manifest returned names the one used
    (``forward``).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    problem = manifest_problem(folder, None, precision)
    if problem is not None:
        raise BackboneError(f"{folder} is not a usable prepared backbone ({problem}): prepare it with "
                            "prepare_quantized_backbone()")
    manifest = read_manifest(folder)
    forward = forward_implementation(folder, implementation)
    dtype = torch.bfloat16 if manifest["precision"] == "bf16" else torch.float32
    tokenizer = load_prepared_tokenizer(folder, forward)
    if forward == "lean":
        from mobiflower.platform.lean_llama import build_lean_model, read_config

        with torch.device("meta"):
            model = build_lean_model(read_config(folder), dtype)
    else:
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        logging.getLogger("transformers").setLevel(logging.ERROR)
        config = AutoConfig.from_pretrained(folder)
        auto = AutoModelForCausalLM if manifest["auto"] == "causal_lm" else AutoModel
        with torch.device("meta"):
            model = auto.from_config(config, dtype=dtype)
    with torch.device("meta"):
        for name, spec in manifest["quantized"].items():
            if spec["kind"] == "int8":
                layer = Int8Linear(spec["in"], spec["out"], spec["bias"])
            elif spec["kind"] == "int8-embedding":
                layer = Int8Embedding(spec["num"], spec["dim"], spec.get("padding_idx"))
            else:
                layer = Int4Linear(spec["in"], spec["out"], spec["bias"], spec["group_size"])
            _set_module(model, name, layer)
    # Tensors shared in the skeleton (tied embeddings) are saved once; remember who shares what.
    shared: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        shared.setdefault(id(param), []).append(name)
    state = load_file(str(folder / WEIGHTS_FILE))  # memory-mapped: no copy, no page read yet
    for name, tensor in state.items():
        _assign(model, name, tensor)
    del state
    for alias, target in manifest["aliases"].items():
        _share(model, alias, target)
    for names in shared.values():  # ties the file did not spell out: share what was loaded
        loaded = [n for n in names if not model.get_parameter(n).is_meta]
        for name in names:
            if loaded and model.get_parameter(name).is_meta:
                _share(model, name, loaded[0])
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise BackboneError(f"the prepared weights at {folder} lack {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}: prepare the copy again")
    model.eval().requires_grad_(False)
    # the few table rows a batch looks up are read from the file, not faulted in 64 KB at a time
    from mobiflower.platform.file_rows import read_rows_from_file

    embedding = "file rows" if read_rows_from_file(model, folder / WEIGHTS_FILE, manifest["aliases"]) else "mapped"
    release_free_heap()  # what parsing tokenizer.json and the config left behind
    return model, tokenizer, {**manifest, "forward": forward, "embedding": embedding}


def release_free_heap() -> bool:
    """Hand the C heap's free memory back to the OS (glibc ``malloc_trim``); False where unavailable.

    Loading a tokenizer parses a multi-MB JSON file; glibc keeps the freed parse buffers in the
    process (about 30 MB for SmolLM2's tokenizer), where they would sit under every later peak.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6")
                libc.malloc_trim  # noqa: B018 - glibc only (musl has none)
                _LIBC = libc
            except (OSError, AttributeError):
                pass
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


_LIBC = None


def load_backbone_weights(ref: str, precision: str | None, cache_dir: str | Path | None = None,
                          group_size: int = DEFAULT_INT4_GROUP_SIZE, log=None):
    """``(model, tokenizer, manifest)`` of ``ref`` at ``precision``, preparing the copy once if needed.

    ``ref`` may also be a prepared folder itself (``precision`` None or the folder's).
    """
    if is_prepared_folder(ref):
        folder = Path(ref).expanduser()
        model, tokenizer, manifest = load_prepared_backbone(folder, None if precision is None else
                                                            normalize_precision(precision))
        return model, tokenizer, {**manifest, "path": str(folder)}
    if precision is None:
        raise WeightPrecisionError(f"{ref!r} is not a prepared copy: name a weight precision "
                                   f"({', '.join(WEIGHT_PRECISIONS)})")
    precision = normalize_precision(precision)
    folder = ensure_prepared(ref, precision, cache_dir, group_size, log=log)
    model, tokenizer, manifest = load_prepared_backbone(folder, precision)
    manifest = {**manifest, "path": str(folder)}
    return model, tokenizer, manifest


def precision_from_fingerprint(fingerprint: str) -> str | None:
    """The weight precision a backbone fingerprint names (``llama-d576-L30-int8-ab12...`` -> ``int8``)."""
    parts = str(fingerprint).split("-")
    if len(parts) < 2:
        return None
    return _ALIASES.get(parts[-2])


def evict_from_page_cache(paths: Iterable[str | Path]) -> int:
    """Ask the kernel to drop these files' cached pages (for cold-start measurements); bytes advised."""
    total = 0
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    for path in paths:
        path = Path(path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += file.stat().st_size
            finally:
                os.close(fd)
    return total


__all__ = ["WEIGHT_PRECISIONS", "PRECISION_DTYPE_NAMES", "DEFAULT_INT4_GROUP_SIZE", "WeightPrecisionError",
           "normalize_precision", "precision_of_dtype", "bf16_native", "precision_support", "QuantizedLinear",
           "Int8Linear", "Int4Linear", "Int8Embedding", "block_linears", "quantize_backbone_weights", "weight_bytes",
           "prepared_dir", "prepare_quantized_backbone", "ensure_prepared", "load_prepared_backbone",
           "load_backbone_weights", "is_prepared_folder", "read_manifest", "manifest_problem", "precision_from_fingerprint",
           "evict_from_page_cache", "release_free_heap", "release_workspaces", "FORWARD_IMPLEMENTATIONS",
           "forward_implementation"]
