"""Low-bit activation codec: a self-describing quantized tensor.

Why this exists: a device sends the hidden states of its tapped layers to the server, and the
uplink is the bottleneck of server-assisted side-tuning. LLM hidden states carry a few huge
outlier channels, so naive 4-bit group quantization loses much of the signal. Before
quantizing, each block of ``group_size`` values along the last dimension is rotated by an
orthonormal random-sign Walsh-Hadamard transform ``y = H (s * x) / sqrt(G)``; this spreads an
outlier over the whole block and makes the block roughly Gaussian, which a uniform quantizer
handles well. The rotation is reproducible from ``(seed, group_size)`` alone, so only the seed
travels.

Quantization scheme (chosen per bit-width to minimise error, see ``_REFINE_STEPS``):

* ``bits == 16``: float16 passthrough (no rotation, ``rotation`` is recorded as ``"none"``);
  ``packed`` holds the little-endian float16 bytes and ``scales`` is empty. Values outside the
  float16 range raise :class:`CodecError` instead of becoming ``inf``.
* ``bits in (8, 4, 2)``: asymmetric (affine) round-to-nearest per group,
  ``x_hat = code * scale + offset`` with ``code in [0, 2**bits - 1]``. Asymmetric beat
  symmetric absmax on rotated Gaussian/outlier data at 8 and 4 bits, and the extra float16
  per group is a small part of the wire (2 bytes per 64 at 8 bits, group 64); one layout for
  all widths keeps the decoder simple. Scale and offset are stored as float16 and the codes
  are computed *with the rounded float16 values*, so encoder and decoder agree exactly. At 8 and 4 bits the range is the group's min/max. At 2 bits it
  starts at the Gaussian-optimal clip (mean +- 1.494 std, clamped to min/max; min/max
  without rotation, where outlier groups are bimodal) and is refined
  by one least-squares step (codes fixed -> best scale/offset by linear regression ->
  re-round), which lowers the 2-bit error clearly against plain min/max. More steps buy
  little per step at 4 and 2 bits for a forward's worth of extra compute on a device's CPU,
  so they are off; tune ``_REFINE_STEPS`` where compute is cheap and the uplink
  is not. Constant groups (an all-zero block stays all-zero after rotation) get scale 0 and
  decode to their offset; no NaN can arise.

Layouts:

* the tensor is viewed as ``[rows, last]`` (``rows`` = product of the leading dims), the last
  dim is zero-padded to a multiple of ``group_size`` (``padded``), giving
  ``n_groups = rows * padded / group_size`` groups in row-major order;
* ``packed`` (uint8, 1-D): the ``rows * padded`` codes (of the rotated values when
  ``rotation == "hadamard"``) in row-major order, ``8 // bits`` codes per byte, little-endian
  within a byte (code ``i`` sits at bit ``(i * bits) % 8`` of byte ``i * bits // 8``); the code
  count is zero-padded to a whole byte;
* ``scales`` (float16, 1-D, length ``2 * n_groups``): interleaved ``[scale_0, offset_0,
  scale_1, offset_1, ...]``.

Everything is vectorised torch on the input's device (it runs inside forward hooks). The
rotation of a large input (more than 32768 values, or any CUDA tensor) is one matmul with a
cached, sign-folded Hadamard matrix for group sizes <= 512: several times faster on CPU than
the memory-bound butterflies, and the same transform up to float32 rounding. Small inputs
and larger groups use the fast Walsh-Hadamard butterflies (``log2(G)`` steps with reshapes),
whose elementwise ops stay single-threaded: a threaded BLAS/VML call costs a scheduler time
slice when CPU cores are oversubscribed (many simulated clients on one machine), which
is also why rounding is done with a uint8 cast rather than ``torch.round``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import NoReturn, Sequence

import numpy as np
import torch

__all__ = [
    "SUPPORTED_BITS",
    "ROTATIONS",
    "MAX_GROUP_SIZE",
    "CodecError",
    "QuantizedTensor",
    "quantize",
    "dequantize",
    "expected_nbytes",
    "default_group_size",
    "relative_error",
    "check_quantized",
    "concatenate",
    "hadamard_rotate",
    "hadamard_unrotate",
]

SUPPORTED_BITS = (16, 8, 4, 2)
ROTATIONS = ("hadamard", "none")
MAX_GROUP_SIZE = 1 << 12  # bounds padding (a frame cannot make us pad a 1-wide tensor to 2**30)
FLOAT16_MAX = 65504.0
_MAX_SEED = (1 << 64) - 1
# Least-squares refinement steps of the (scale, offset) per group, by bit-width.
_REFINE_STEPS = {8: 0, 4: 0, 2: 1}
# Initial half-range in standard deviations (Gaussian-optimal uniform quantizer); None = min/max.
_INIT_CLIP_STD = {8: None, 4: None, 2: 1.494}
# Up to this group size the rotation is a dense matmul (faster on CPU and GPU); above, butterflies.
_DENSE_MAX_GROUP = 512  # measured crossover on CPU: dense wins up to 512, butterflies at 1024
_SMALL_NUMEL = 1 << 15  # at most this many values: butterflies (torch's intra-op grain size)


class CodecError(ValueError):
    """Invalid codec input or a quantized tensor that cannot be decoded."""


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A self-describing quantized tensor: everything needed to dequantize travels with it.

    ``packed``/``scales`` layouts are described in the module docstring. Instances made by
    :func:`quantize` or decoded from a frame hold read-only arrays.
    """

    bits: int  # 16 = float16 passthrough, else 8/4/2
    group_size: int  # power of two; values are grouped along the last dim
    shape: tuple[int, ...]  # original shape (rank >= 1)
    rotation: str  # "hadamard" or "none"
    seed: int  # seed of the random signs of the rotation
    packed: np.ndarray  # uint8, 1-D
    scales: np.ndarray  # float16, 1-D: interleaved (scale, offset) per group; empty for 16 bits

    def nbytes(self) -> int:
        """Wire size of the payload (codes + scales), what the uplink pays for."""
        return int(self.packed.nbytes + self.scales.nbytes)

    @property
    def numel(self) -> int:
        """Number of values of the original tensor."""
        return math.prod(self.shape)


# --------------------------------------------------------------------------------------------
# argument checks and sizes


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _check_params(bits: object, group_size: object, rotation: object = "none", seed: object = 0) -> None:
    if not _is_int(bits) or int(bits) not in SUPPORTED_BITS:
        raise CodecError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if (
        not _is_int(group_size)
        or not (1 <= int(group_size) <= MAX_GROUP_SIZE)
        or (int(group_size) & (int(group_size) - 1))
    ):
        raise CodecError(f"group_size must be a power of two in [1, {MAX_GROUP_SIZE}], got {group_size!r}")
    if rotation not in ROTATIONS:
        raise CodecError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
    if not _is_int(seed) or not (0 <= int(seed) <= _MAX_SEED):
        raise CodecError(f"seed must be an integer in [0, 2**64), got {seed!r}")


def _check_shape(shape: object) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or len(shape) < 1:
        raise CodecError(f"shape must be a non-empty sequence of ints, got {shape!r}")
    if not all(_is_int(d) and int(d) >= 0 for d in shape):
        raise CodecError(f"shape entries must be non-negative ints, got {shape!r}")
    return tuple(int(d) for d in shape)


def _geometry(shape: tuple[int, ...], group_size: int) -> tuple[int, int, int, int]:
    """(rows, last, padded last, number of groups) of a tensor of ``shape``."""
    last = shape[-1]
    rows = math.prod(shape[:-1])
    padded = -(-last // group_size) * group_size
    return rows, last, padded, rows * padded // group_size


DEFAULT_GROUP_SIZE = {16: 64, 8: 64, 4: 32, 2: 32}
"""Group size per bit-width when none is given. At 4 bits, groups of 32 cost more bytes than 64
(one more fp16 scale/offset pair per 32 values) and bought accuracy on the bundled task (RESULTS.md);
at 8 bits 64 loses nothing."""


def default_group_size(bits: int) -> int:
    """The group size used for ``bits`` unless the caller chooses one."""
    if bits not in DEFAULT_GROUP_SIZE:
        raise CodecError(f"bits={bits} is not supported: choose one of {SUPPORTED_BITS}")
    return DEFAULT_GROUP_SIZE[bits]


def expected_nbytes(shape: Sequence[int], bits: int, group_size: int) -> tuple[int, int]:
    """(packed bytes, scale bytes) a valid tensor of this shape/bit-width must have.

    Frame validation uses it to reject payloads whose lengths disagree with their header
    before any buffer is touched.
    """
    _check_params(bits, group_size)
    shp = _check_shape(shape)
    if bits == 16:
        return 2 * math.prod(shp), 0
    rows, _, padded, n_groups = _geometry(shp, int(group_size))
    return -(-(rows * padded * int(bits)) // 8), 4 * n_groups


def relative_error(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> float:
    """||x - y|| / ||x|| in float64 (0.0 when both are zero, inf when only x is zero)."""
    xt = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    yt = torch.as_tensor(y).detach().to(device="cpu", dtype=torch.float64)
    if xt.shape != yt.shape:
        raise CodecError(f"shapes differ: {tuple(xt.shape)} vs {tuple(yt.shape)}")
    num = float(torch.linalg.vector_norm(xt - yt))
    den = float(torch.linalg.vector_norm(xt))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


# --------------------------------------------------------------------------------------------
# rotation


def _signs_np(seed: int, group_size: int) -> np.ndarray:
    """Random +-1 signs from splitmix64(seed, i): stable across numpy/torch versions and hosts."""
    i = np.arange(1, group_size + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + i * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.where((z >> np.uint64(63)) == 1, -1.0, 1.0).astype(np.float32)


@lru_cache(maxsize=64)
def _signs(seed: int, group_size: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_signs_np(seed, group_size)).to(device)


@lru_cache(maxsize=16)
def _rotation_matrices(seed: int, group_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, M^T) with ``rotate(g) = g @ M``, ``M = diag(s) H / sqrt(G)`` (orthonormal)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < group_size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    s = torch.from_numpy(_signs_np(seed, group_size)).to(torch.float64)
    m = (s[:, None] * h) / math.sqrt(group_size)
    return m.to(torch.float32).to(device).contiguous(), m.t().to(torch.float32).to(device).contiguous()


def _fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform over the last dim (a power of two)."""
    g = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < g:
        x = x.reshape(*lead, g // (2 * h), 2, h)
        a = x[..., 0, :]
        b = x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, g)


def _use_dense(t: torch.Tensor) -> bool:
    # Small inputs use the butterflies: their elementwise ops stay single-threaded, while a
    # threaded BLAS matmul costs a scheduler time slice per call on oversubscribed CPUs.
    gs = t.shape[-1]
    return gs <= _DENSE_MAX_GROUP and (t.is_cuda or t.numel() > _SMALL_NUMEL)


def hadamard_rotate(g: torch.Tensor, seed: int) -> torch.Tensor:
    """Orthonormal random-sign Hadamard rotation of the last dim (a power of two): H (s*g)/sqrt(G)."""
    gs = g.shape[-1]
    if _use_dense(g):
        m, _ = _rotation_matrices(int(seed), gs, g.device)
        return g @ m.to(g.dtype)
    return _fwht(g * _signs(int(seed), gs, g.device)) * (1.0 / math.sqrt(gs))


def hadamard_unrotate(y: torch.Tensor, seed: int) -> torch.Tensor:
    """Inverse of :func:`hadamard_rotate`: s * H y / sqrt(G)."""
    gs = y.shape[-1]
    if _use_dense(y):
        _, mt = _rotation_matrices(int(seed), gs, y.device)
        return y @ mt.to(y.dtype)
    return _fwht(y) * (_signs(int(seed), gs, y.device) * (1.0 / math.sqrt(gs)))


# --------------------------------------------------------------------------------------------
# packing


def _pack(codes: torch.Tensor, bits: int) -> np.ndarray:
    """uint8 codes (1-D, any device) -> bytes, little-endian within a byte; packs before the
    device-to-host copy so that only the packed bytes cross it."""
    if bits != 8:
        per = 8 // bits
        n = codes.numel()
        if n % per:
            codes = torch.cat([codes, codes.new_zeros(per - n % per)])
        c = codes.view(-1, per)
        out = c[:, 0].clone()
        for k in range(1, per):
            out |= c[:, k] << (k * bits)
        codes = out
    return codes.cpu().numpy()


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """bytes -> float32 codes (a new, writable array of ``count`` values)."""
    if bits == 8:
        return packed[:count].astype(np.float32)
    per = 8 // bits
    mask = (1 << bits) - 1
    out = np.empty((packed.size, per), dtype=np.float32)
    for k in range(per):
        src = packed if k == 0 else np.right_shift(packed, k * bits)
        np.bitwise_and(src, mask, out=out[:, k], casting="unsafe")
    return out.reshape(-1)[:count]


# --------------------------------------------------------------------------------------------
# quantize / dequantize


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products as a column ([n, G] x [n, G] -> [n, 1]); einsum beats vecdot on CPU."""
    return torch.einsum("nk,nk->n", a, b).unsqueeze(-1)


def _round_codes(g: torch.Tensor, offset: torch.Tensor, inv: torch.Tensor, levels: int) -> torch.Tensor:
    """uint8 codes ``round((g - offset) * inv)`` clamped to [0, levels].

    Round-to-nearest as ``trunc(clamped + 0.5)`` via the uint8 cast (ties round up): on CPU
    ``torch.round``/``floor`` go through a threaded VML path that costs a scheduler time slice
    per call when the cores are oversubscribed, as in a simulation with many clients.
    (A broadcast ``addcmul`` is also several times slower than sub + mul_ here.)
    """
    return (g - offset).mul_(inv).clamp_(0, levels).add_(0.5).to(torch.uint8)


def _fit_affine(g: torch.Tensor, bits: int, rotated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, offset) columns, float32, for groups ``g`` of shape [n, G].

    The Gaussian clip start only suits rotated (near-Gaussian) groups; unrotated groups with
    outlier channels are bimodal and start from min/max.
    """
    levels = (1 << bits) - 1
    n = g.shape[-1]
    mn = g.amin(-1, keepdim=True)  # two reductions are faster than aminmax on CPU
    mx = g.amax(-1, keepdim=True)
    clip = _INIT_CLIP_STD[bits] if rotated else None
    steps = _REFINE_STEPS[bits]
    if clip is not None or steps:
        sx = g.sum(-1, keepdim=True)
    if clip is not None:
        mean = sx / n
        # (a norm, not .sqrt(): VML ops like sqrt/round stall on oversubscribed CPUs, see _round_codes)
        std = torch.linalg.vector_norm(g - mean, dim=-1, keepdim=True) * (1.0 / math.sqrt(n))
        lo = torch.maximum(mean - clip * std, mn)
        hi = torch.minimum(mean + clip * std, mx)
    else:
        lo, hi = mn, mx
    scale = (hi - lo) / levels
    offset = lo
    for _ in range(steps):
        inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        q = _round_codes(g, offset, inv, levels).to(g.dtype)
        sq = q.sum(-1, keepdim=True)
        sqq = _rowdot(q, q)
        sxq = _rowdot(g, q)
        var = n * sqq - sq * sq  # n^2 * Var(q); >= n - 1 whenever two codes differ
        ok = var > 0.5
        new_scale = (n * sxq - sq * sx) / torch.where(ok, var, torch.ones_like(var))
        ok &= new_scale > 0
        new_offset = (sx - new_scale * sq) / n
        scale = torch.where(ok, new_scale, scale)
        offset = torch.where(ok, new_offset, offset)
    return scale, offset


def _check_input(x: object) -> None:
    """Raise :class:`CodecError` unless ``x`` is a floating-point tensor of rank >= 1."""
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise CodecError("cannot quantize a 0-d tensor; reshape it to rank >= 1")
    if not x.is_floating_point():
        raise CodecError(f"expected a floating-point tensor, got {x.dtype}")


def _refuse_nonfinite(x: torch.Tensor, overflow: str) -> NoReturn:
    """Raise :class:`CodecError` for a result that is not finite: NaN/Inf in ``x``, else ``overflow``."""
    if not bool(torch.isfinite(x).all()):
        raise CodecError("input contains NaN or Inf")
    raise CodecError(overflow)


def _as_float16(x: torch.Tensor, shape: tuple[int, ...], group_size: int, seed: int) -> QuantizedTensor:
    """The 16-bit "quantization": ``x`` as float16, refused where it overflows float16."""
    h = x.to(dtype=torch.float16, copy=True)
    if h.numel() and not bool(torch.isfinite(h).all()):
        _refuse_nonfinite(
            x,
            f"input has values beyond the float16 range (+-{FLOAT16_MAX:g}); use bits=8/4/2 or rescale the activations",
        )
    packed = h.reshape(-1).cpu().numpy().view(np.uint8)
    return QuantizedTensor(16, group_size, shape, "none", seed, _frozen(packed), _frozen(np.zeros(0, dtype=np.float16)))


def _groups(x: torch.Tensor, shape: tuple[int, ...], group_size: int, rotation: str, seed: int) -> torch.Tensor:
    """``x`` as float32 groups of ``group_size`` (last axis zero-padded to a multiple), rotated if asked."""
    rows, last, padded, n_groups = _geometry(shape, group_size)
    xf = x.to(torch.float32).reshape(rows, last)
    if padded != last:
        xf = torch.nn.functional.pad(xf, (0, padded - last))
    g = xf.reshape(n_groups, group_size)
    if rotation == "hadamard":
        g = hadamard_rotate(g, seed)
    # never modify g in place: without rotation/padding it may alias the caller's tensor
    return g


def _group_params(x: torch.Tensor, g: torch.Tensor, bits: int, rotated: bool) -> torch.Tensor:
    """Each group's float16 (scale, offset), ``[n_groups, 2]``; refused where they are not finite."""
    scale, offset = _fit_affine(g, bits, rotated)
    if not (bool(torch.isfinite(scale).all()) and bool(torch.isfinite(offset).all())):
        _refuse_nonfinite(x, "input range overflows float32 during quantization; rescale the activations")
    params = torch.cat([scale, offset], dim=1).to(torch.float16)  # [n_groups, 2] interleaved
    if not bool(torch.isfinite(params).all()):
        raise CodecError(
            f"a group's scale/offset is beyond the float16 range (+-{FLOAT16_MAX:g}); rescale the activations"
        )
    return params


@torch.no_grad()
def quantize(
    x: torch.Tensor, bits: int, group_size: int = 64, rotation: str = "hadamard", seed: int = 0
) -> QuantizedTensor:
    """Quantize ``x`` (any float dtype/device, rank >= 1) to a self-describing low-bit tensor.

    Raises :class:`CodecError` for NaN/Inf input, values beyond float16 range (16 bits, or a
    group whose float16 scale/offset would overflow) and invalid parameters.
    """
    _check_params(bits, group_size, rotation, seed)
    bits, group_size, seed = int(bits), int(group_size), int(seed)
    _check_input(x)
    shape = tuple(int(d) for d in x.shape)
    x = x.detach()
    if bits == 16:
        return _as_float16(x, shape, group_size, seed)
    if _geometry(shape, group_size)[3] == 0:
        return QuantizedTensor(
            bits, group_size, shape, rotation, seed, _frozen(np.zeros(0, np.uint8)), _frozen(np.zeros(0, np.float16))
        )
    g = _groups(x, shape, group_size, rotation, seed)
    params = _group_params(x, g, bits, rotation == "hadamard")
    p32 = params.to(torch.float32)
    s32, o32 = p32[:, :1], p32[:, 1:]
    inv = torch.where(s32 > 0, 1.0 / s32, torch.zeros_like(s32))
    codes = _round_codes(g, o32, inv, (1 << bits) - 1)
    packed = _pack(codes.reshape(-1), bits)
    scales = params.reshape(-1).cpu().numpy()
    return QuantizedTensor(bits, group_size, shape, rotation, seed, _frozen(packed), _frozen(scales))


def check_quantized(q: QuantizedTensor) -> None:
    """Raise :class:`CodecError` unless ``q`` is internally consistent (types, sizes, finite scales)."""
    if not isinstance(q, QuantizedTensor):
        raise CodecError(f"expected a QuantizedTensor, got {type(q).__name__}")
    _check_params(q.bits, q.group_size, q.rotation, q.seed)
    shape = _check_shape(q.shape)
    for name, arr, dt in (("packed", q.packed, np.uint8), ("scales", q.scales, np.float16)):
        if not isinstance(arr, np.ndarray) or arr.dtype != dt or arr.ndim != 1:
            raise CodecError(f"{name} must be a 1-D {np.dtype(dt).name} array")
    want_p, want_s = expected_nbytes(shape, q.bits, q.group_size)
    if q.packed.nbytes != want_p:
        raise CodecError(f"packed has {q.packed.nbytes} bytes, shape {shape} at {q.bits} bits needs {want_p}")
    if q.scales.nbytes != want_s:
        raise CodecError(f"scales has {q.scales.nbytes} bytes, shape {shape} at {q.bits} bits needs {want_s}")
    if q.scales.size and not bool(np.isfinite(q.scales).all()):
        raise CodecError("scales contain NaN or Inf")
    if q.bits == 16 and q.packed.size and not bool(np.isfinite(np.ascontiguousarray(q.packed).view("<f2")).all()):
        raise CodecError("float16 values contain NaN or Inf")


@torch.no_grad()
def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the tensor (on CPU, in ``dtype``): unpack, affine map, inverse rotation, unpad."""
    check_quantized(q)
    shape = tuple(int(d) for d in q.shape)
    if q.bits == 16:
        arr = np.ascontiguousarray(q.packed).view("<f2").astype(np.float32 if dtype != torch.float16 else np.float16)
        return torch.from_numpy(arr).reshape(shape).to(dtype)
    rows, last, padded, n_groups = _geometry(shape, q.group_size)
    if n_groups == 0:
        return torch.zeros(shape, dtype=dtype)
    codes = torch.from_numpy(_unpack(q.packed, q.bits, n_groups * q.group_size))
    params = torch.from_numpy(q.scales.astype(np.float32)).view(n_groups, 2)
    y = codes.view(n_groups, q.group_size).mul_(params[:, :1]).add_(params[:, 1:])
    if q.rotation == "hadamard":
        y = hadamard_unrotate(y, q.seed)
    y = y.reshape(rows, padded)
    if padded != last:
        y = y[:, :last]
    return y.reshape(shape).to(dtype).contiguous()


def concatenate(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """Join quantized tensors along dim 0 without dequantizing.

    Why: the device quantizes each batch inside the forward hook and ships one tensor per layer
    per frame. Groups run along the last dim, so rows of codes and scales simply append (codes
    are re-packed only when a part does not end on a byte boundary). All parts must share bits,
    group_size, rotation, seed and the trailing dims; rank must be >= 2.
    """
    parts = list(parts)
    if not parts:
        raise CodecError("concatenate needs at least one tensor")
    for q in parts:
        check_quantized(q)
    first = parts[0]
    if len(first.shape) < 2:
        raise CodecError("concatenate joins along dim 0 and needs rank >= 2 (groups run along the last dim)")
    key = (first.bits, first.group_size, first.rotation, first.seed, tuple(first.shape[1:]))
    for i, q in enumerate(parts[1:], 1):
        other = (q.bits, q.group_size, q.rotation, q.seed, tuple(q.shape[1:]))
        if other != key:
            raise CodecError(
                f"part {i} has (bits, group_size, rotation, seed, trailing dims) {other}, part 0 has {key}"
            )
    if len(parts) == 1:
        return first
    shape = (sum(q.shape[0] for q in parts),) + tuple(first.shape[1:])
    scales = np.concatenate([q.scales for q in parts])
    n_codes = [math.prod(_geometry(tuple(q.shape), q.group_size)[::2]) for q in parts]  # rows * padded
    if first.bits == 16 or all(n * first.bits % 8 == 0 for n in n_codes[:-1]):
        packed = np.concatenate([q.packed for q in parts])
    else:  # a part ends mid-byte (tiny groups at 2/4 bits): unpack the codes and pack them again
        codes = np.concatenate([_unpack(q.packed, q.bits, n) for q, n in zip(parts, n_codes)])
        packed = _pack(torch.from_numpy(codes).to(torch.uint8), first.bits)
    return QuantizedTensor(
        first.bits, first.group_size, shape, first.rotation, first.seed, _frozen(packed), _frozen(scales)
    )
