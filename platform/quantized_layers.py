"""Frozen linear layers and embedding tables stored in int8 or 4 bits and dequantized as they run.

How they run (no hand-written kernels)
    The weights are stored in the "plain" layout torchao uses for its CPU weight-only workflows
    (int8 values + per-channel scales; uint8-packed int4 values + per-group scale and minimum).
    At run time a layer dequantizes its weight with two ATen element-wise ops and calls
    ``torch.nn.functional.linear`` (MKL / oneDNN GEMM) - the same CPU strategy as torchao's
    ``Int8Tensor`` weight-only path (``dequantize()`` + ``mm``). The dequantized copy of one layer
    is transient and tiled (:data:`DEQUANT_TILE_ELEMENTS`), so the resident weights are the
    low-precision ones.

    Alternatives on torch 2.13 / x86 and why they are not used (figures in RESULTS.md):
    ``torch.ao.quantization.quantize_dynamic`` and the quantized-tensor APIs
    (``torch.quantize_per_channel``) are deprecated in torch 2.13 (pytorch/pytorch#184982,
    pytorch/ao#2259) and their packed weights cannot be memory-mapped; torchao (PyPI) is slow to
    import (its bundled extensions are CUDA builds), which a fresh device process pays on every
    start, and its CPU 4-bit path (prototype ``Int4OpaqueTensor``, ATen
    ``_weight_int4pack_mm_for_cpu``) and ``_weight_int8pack_mm`` are decode-shaped kernels: at a
    device's batch shape (a thousand tokens at once) they ran slower than fp32 GEMM, where
    dequantize + GEMM costs about the same.

Every layer holds plain tensors (buffers), so ``state_dict`` is tensors only and a ``safetensors``
file of it can be memory-mapped and assigned without a copy (:mod:`mobiflower.platform.prepared_weights`).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from mobiflower.platform.precision import DEFAULT_INT4_GROUP_SIZE, WeightPrecisionError

_WORKSPACES = threading.local()

DEQUANT_TILE_ELEMENTS = 1 << 19
"""At most this many weights are dequantized at once (2 MB in float32): a larger layer is run as a
few GEMMs over equal slices of its output features, each into its columns of the output."""


def _workspace(numel: int, dtype: torch.dtype, role: str) -> torch.Tensor:
    """A per-thread flat scratch tensor of at least ``numel`` elements for ``role``, reused across
    calls and layers (callers view a prefix of it).

    A layer that dequantized its weight into a fresh tensor on every call left a freed multi-MB
    block per layer and forward, which glibc's heap kept (its mmap threshold adapts upward after
    the first free, so they came from the heap and fragmented it): int8 then held heap that fp32
    never had. One buffer of at most :data:`DEQUANT_TILE_ELEMENTS` serves every layer instead.
    Buffers are per thread (several devices may share a process) and per inference mode (an
    inference tensor cannot be written outside ``inference_mode``).
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
            w = self.dequantize_into(buf[: (r1 - r0) * k].view(r1 - r0, k), r0)
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
        # than a mixed-dtype torch.mul(out=)
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

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, group_size: int = DEFAULT_INT4_GROUP_SIZE
    ):
        super().__init__(in_features, out_features, bias)
        if in_features % group_size or group_size % 2:
            raise WeightPrecisionError(
                f"int4 needs in_features ({in_features}) divisible by an even group_size ({group_size})"
            )
        self.group_size = int(group_size)
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("minimum", torch.empty(out_features, groups, dtype=torch.float16))

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = DEFAULT_INT4_GROUP_SIZE
    ) -> "Int4Linear":
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
    :mod:`mobiflower.platform.file_rows`; a memory-mapped table would have the kernel map a
    read-ahead window around each faulting row, so a busy table ends up mostly resident). The
    layout is :class:`Int8Linear`'s (``[rows, dim]``, a scale per row), so a tied LM head is an
    :class:`Int8Linear` over the same two tensors (:meth:`Int8Linear.sharing`).
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


__all__ = [
    "DEQUANT_TILE_ELEMENTS",
    "QuantizedLinear",
    "Int8Linear",
    "Int4Linear",
    "Int8Embedding",
    "release_workspaces",
]
