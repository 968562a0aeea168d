"""The self-describing activation frame: what a device sends for one chunk of samples (DESIGN.md §5).

Why: frames cross a trust boundary (any device, any link, any bug). The server must reject a
bad frame alone, with a clear error naming the field, before it touches side networks,
caches or checkpoints. So decoding checks every size, offset, id and value against the header
and against :class:`FrameLimits` before a tensor is built, and only ever raises
:class:`FrameError`.

Wire layout (all integers little-endian)::

    b"MBFL" | u32 header_len | header (msgpack map, header_len bytes) | payload | u32 crc32

* ``crc32`` is ``zlib.crc32`` of every byte before it (magic, length, header and payload), so
  any flipped byte or truncation is detected before the header is trusted; the header's
  ``payload_bytes`` pins the exact total length (a truncation is reported as such).
* The header holds ``version, fingerprint, layers, token_policy, sample_ids, token_counts,
  seq_lengths, targets, meta, payload_bytes`` and ``tensors``: a map of per-layer columns
  (one list entry per layer, columnar to keep the header small) ``bits, group_size, rotation,
  seed, shape, packed, scales``, where ``packed``/``scales`` are ``[offset, length]`` byte
  ranges into the payload. Ranges must be in bounds, must not overlap and must cover the
  payload exactly (no hidden bytes).
* ``targets``: ``{"kind": "class", "values": [label per sample], "num_classes": k}`` (labels in
  ``[0, k)``), ``{"kind": "tokens", "values": [target per sent token]}`` (``>= 0`` or ``-100`` =
  ignored; an optional ``"vocab_size"`` bounds them) or ``{"kind": "none"}``; other keys are
  free-form, like ``meta``.
* ``meta`` and the extra keys of ``targets`` are free-form msgpack values, bounded together by
  :class:`FrameLimits` (encoded bytes, keys, entries per map or array, nesting depth).
* Maps are strict: a key that appears twice is an error naming it (two readers that kept the
  first or the last value would otherwise see two different frames in the same bytes).
* token policies: ``"last"`` sends one token per sample (``token_counts`` all 1,
  ``seq_lengths >= 1``); ``"nonpad"`` sends real tokens only (``token_counts <= seq_lengths``);
  ``"all"`` sends every (padded) position (``seq_lengths <= token_counts``).
* The payload is the ``packed`` then ``scales`` bytes of each layer, back to back (scales are
  little-endian float16, see :mod:`mobiflower.platform.codec` for their layout).

Decoded activations are :class:`~mobiflower.platform.codec.QuantizedTensor` objects whose
arrays are zero-copy, read-only views into the input buffer (keep it alive and unmodified);
dequantize lazily with :func:`~mobiflower.platform.codec.dequantize`.
"""

from __future__ import annotations

import gc
import struct
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import msgpack
import numpy as np

from .codec import (
    MAX_GROUP_SIZE,
    ROTATIONS,
    SUPPORTED_BITS,
    QuantizedTensor,
    expected_nbytes,
)

__all__ = [
    "FRAME_VERSION",
    "SUPPORTED_VERSIONS",
    "TOKEN_POLICIES",
    "TARGET_KINDS",
    "MAGIC",
    "FrameError",
    "Frame",
    "FrameLimits",
    "FIELD_NAMES",
    "encode_frame",
    "decode_frame",
    "validate_frame",
]

FRAME_VERSION = 1
SUPPORTED_VERSIONS = (1,)
TOKEN_POLICIES = ("all", "nonpad", "last")
TARGET_KINDS = ("class", "tokens", "none")
MAGIC = b"MBFL"
IGNORE_INDEX = -100  # token targets: position not used by the loss
_PREFIX = struct.Struct("<4sI")
_TRAILER = struct.Struct("<I")
_MAX_INT64 = (1 << 63) - 1
_MAX_FINGERPRINT_LEN = 1024

_HEADER_FIELDS = (
    "version", "fingerprint", "layers", "token_policy", "sample_ids", "token_counts",
    "seq_lengths", "targets", "meta", "payload_bytes", "tensors",
)
_TENSOR_FIELDS = ("bits", "group_size", "rotation", "seed", "shape", "packed", "scales")
_TARGET_FIELDS = ("kind", "values", "num_classes", "vocab_size")  # any other key is free-form content
# What a FrameError's ``field`` is made of, list indices written ``[i]``. A field the frame names
# itself (an unknown key, a key of meta given twice) is not among these.
FIELD_NAMES = frozenset((
    "data", "magic", "header_length", "header", "crc", "frame", "activations", *_HEADER_FIELDS,
    *(f"targets.{k}" for k in _TARGET_FIELDS), *(f"tensors.{k}" for k in _TENSOR_FIELDS),
    "layers[i]", *(f"layers[i].{k}" for k in _TENSOR_FIELDS),
))


class FrameError(ValueError):
    """A frame that must be rejected; ``.field`` names the offending header field."""

    def __init__(self, field: str, message: str):
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")

    def __reduce__(self):  # picklable across processes (Ray actors, multiprocessing)
        return (type(self), (self.field, self.message))


@dataclass
class Frame:
    """Activations of a chunk of samples at the tapped layers, plus what the loss needs."""

    fingerprint: str  # backbone fingerprint the activations come from
    layers: list[int]  # tapped layer ids, strictly increasing, >= 0
    token_policy: str  # one of TOKEN_POLICIES
    sample_ids: list[int]  # one per sample, unique, >= 0
    token_counts: list[int]  # tokens sent per sample; sum = rows of each activation
    seq_lengths: list[int]  # real (non-pad) length of each sample
    targets: dict[str, Any]  # {"kind": "class"|"tokens"|"none", "values": [...], ...}
    activations: list[QuantizedTensor]  # one per layer, each [sum(token_counts), hidden]
    meta: dict[str, Any] = field(default_factory=dict)  # free-form, msgpack-serialisable
    version: int = FRAME_VERSION

    @property
    def hidden_size(self) -> int:
        """Width of the backbone states (last dim of the activations; 0 if there are none)."""
        return int(self.activations[0].shape[-1]) if self.activations else 0

    @property
    def num_samples(self) -> int:
        """Number of samples in the chunk."""
        return len(self.sample_ids)

    def nbytes(self) -> int:
        """Payload bytes (sum of the activations' packed + scales), what the uplink pays for."""
        return sum(q.nbytes() for q in self.activations)

    def kept_nbytes(self) -> int:
        """Memory a server holds to keep this frame: the payload plus its header's content as Python
        objects (what a cache budget must count, or free-form header content would go uncounted)."""
        lists = [self.layers, self.sample_ids, self.token_counts, self.seq_lengths]
        targets = self.targets if isinstance(self.targets, dict) else {}
        if "values" in targets:
            lists.append(targets["values"])
        rest = {k: v for k, v in targets.items() if k != "values"}
        return self.nbytes() + sum(_list_nbytes(v) for v in lists) + _content_nbytes(rest) + \
            _content_nbytes(self.meta)


@dataclass(frozen=True)
class FrameLimits:
    """Upper bounds a frame must respect; decoding never allocates beyond them."""

    max_bytes: int = 1 << 30  # whole encoded frame
    max_samples: int = 65536
    max_layers: int = 256
    max_hidden: int = 65536
    max_tokens: int = 1 << 22  # rows of each activation (sum of token_counts)
    # free-form header content: ``meta`` and the extra keys of ``targets``, together
    max_meta_bytes: int = 1 << 14  # encoded size
    max_meta_keys: int = 64  # keys of meta, and extra keys of targets
    max_meta_len: int = 256  # entries of any one map or array inside them
    max_meta_depth: int = 4  # nesting of maps and arrays (a map or array value itself is level 1)

    @property
    def max_header_bytes(self) -> int:
        """The longest header a frame within these limits can need (longer ones are refused unread)."""
        return _max_header_bytes(self)


# --------------------------------------------------------------------------------------------
# small typed accessors: every failure is a FrameError naming the field


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _int(v: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if not _is_int(v):
        raise FrameError(name, f"must be an integer, got {type(v).__name__}")
    v = int(v)
    if lo is not None and v < lo:
        raise FrameError(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise FrameError(name, f"must be <= {hi}, got {v}")
    return v


def _str(v: object, name: str) -> str:
    if not isinstance(v, str):
        raise FrameError(name, f"must be a string, got {type(v).__name__}")
    return v


def _int_array(v: object, name: str, max_len: int, what: str = "entries") -> np.ndarray:
    """A list/tuple/1-D array of ints as an int64 array; the length bound is checked first."""
    if isinstance(v, np.ndarray):
        arr = v
    elif isinstance(v, (list, tuple)):
        if len(v) > max_len:
            raise FrameError(name, f"has {len(v)} {what}, more than the limit {max_len}")
        if not v:
            return np.zeros(0, np.int64)
        try:
            arr = np.asarray(v)
        except (ValueError, TypeError, OverflowError):
            arr = None
        if arr is None or arr.ndim != 1 or arr.dtype.kind not in "iu":
            bad = next((i for i, e in enumerate(v) if not _is_int(e)), None)
            if bad is not None:
                raise FrameError(f"{name}[{bad}]", f"must be an integer, got {type(v[bad]).__name__}")
            raise FrameError(name, "entries must be integers that fit in int64")
    else:
        raise FrameError(name, f"must be a list of integers, got {type(v).__name__}")
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise FrameError(name, "must be a 1-D list of integers")
    if arr.size > max_len:
        raise FrameError(name, f"has {arr.size} {what}, more than the limit {max_len}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > _MAX_INT64:
        raise FrameError(name, "entries must fit in int64")
    return arr.astype(np.int64, copy=False)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


_INT_OBJECT_BYTES = 32  # a Python int of up to 60 bits; the list holds an 8-byte pointer to each


def _list_nbytes(v: object) -> int:
    """Memory of a list of integers (or an array) as a decoded header holds it."""
    if isinstance(v, np.ndarray):
        return sys.getsizeof(v) + (0 if v.base is None else v.nbytes)
    if isinstance(v, (list, tuple)):
        return sys.getsizeof(v) + _INT_OBJECT_BYTES * len(v)
    return sys.getsizeof(v)


def _content_nbytes(value: object) -> int:
    """Deep memory of decoded msgpack content (maps, arrays and scalars), each object once."""
    seen: set[int] = set()
    todo = [value]
    total = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, np.ndarray):
            total += _list_nbytes(obj)
            continue
        total += sys.getsizeof(obj)
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            todo.extend(obj)
    return total


# --------------------------------------------------------------------------------------------
# semantic validation (shared by decode_frame, validate_frame and encode_frame)


def _check_version(v: object) -> int:
    version = _int(v, "version")
    if version not in SUPPORTED_VERSIONS:
        raise FrameError(
            "version",
            f"frame version {version} is not supported (this build reads {list(SUPPORTED_VERSIONS)}); "
            "run the same mobiflower release on devices and server",
        )
    return version


def _check_free(value: object, name: str, limits: FrameLimits) -> None:
    """Free-form content (``meta``, an extra key of ``targets``) within the limits: entries per map or
    array, nesting depth, string keys. Its encoded size is bounded where it is read or written."""
    todo = [(value, 1)]
    while todo:
        obj, level = todo.pop()
        if isinstance(obj, dict):
            if not all(isinstance(k, str) for k in obj):
                raise FrameError(name, "map keys must be strings")
            children: Any = obj.values()
        elif isinstance(obj, (list, tuple)):
            children = obj
        else:
            continue
        if level > limits.max_meta_depth:
            raise FrameError(name, f"nests maps and arrays more than {limits.max_meta_depth} deep, the limit")
        if obj is not value or name != "meta":  # meta's own keys are bounded by max_meta_keys
            if len(obj) > limits.max_meta_len:
                raise FrameError(name, f"holds a map or array of {len(obj)} entries, more than the limit "
                                       f"{limits.max_meta_len}")
        todo.extend((child, level + 1) for child in children)


def _check_fields(
    *,
    fingerprint: object,
    token_policy: object,
    layers: object,
    sample_ids: object,
    token_counts: object,
    seq_lengths: object,
    targets: object,
    meta: object,
    expected_fingerprint: str | None,
    limits: FrameLimits,
) -> tuple[int, int]:
    """Everything but the tensors; returns (number of layers, rows = sum(token_counts))."""
    fp = _str(fingerprint, "fingerprint")
    if not fp or len(fp) > _MAX_FINGERPRINT_LEN:
        raise FrameError("fingerprint", f"must be a non-empty string of at most {_MAX_FINGERPRINT_LEN} characters")
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise FrameError(
            "fingerprint",
            f"frame comes from backbone {fp!r} but the side network expects {expected_fingerprint!r}; "
            "the device must run the backbone the side network was built for",
        )
    if not isinstance(token_policy, str) or token_policy not in TOKEN_POLICIES:
        raise FrameError("token_policy", f"must be one of {TOKEN_POLICIES}, got {token_policy!r}")

    lay = _int_array(layers, "layers", limits.max_layers, "layers")
    if lay.size == 0:
        raise FrameError("layers", "a frame needs at least one tapped layer")
    if (lay < 0).any():
        raise FrameError("layers", f"layer id {int(lay[_first(lay < 0)])} is negative")
    if lay.size > 1 and not (np.diff(lay) > 0).all():
        j = _first(np.diff(lay) <= 0) + 1
        raise FrameError(
            "layers", f"must be strictly increasing; layers[{j}] = {int(lay[j])} follows {int(lay[j - 1])}"
        )

    ids = _int_array(sample_ids, "sample_ids", limits.max_samples, "samples")
    counts = _int_array(token_counts, "token_counts", limits.max_samples, "samples")
    lengths = _int_array(seq_lengths, "seq_lengths", limits.max_samples, "samples")
    n = ids.size
    if counts.size != n:
        raise FrameError("token_counts", f"has {counts.size} entries for {n} sample_ids; one per sample")
    if lengths.size != n:
        raise FrameError("seq_lengths", f"has {lengths.size} entries for {n} sample_ids; one per sample")
    if (ids < 0).any():
        raise FrameError("sample_ids", f"sample id {int(ids[_first(ids < 0)])} is negative")
    if n > 1:
        srt = np.sort(ids)
        dup = srt[1:] == srt[:-1]
        if dup.any():
            raise FrameError("sample_ids", f"sample id {int(srt[1:][dup][0])} appears more than once")
    for name, arr in (("token_counts", counts), ("seq_lengths", lengths)):
        bad = (arr < 0) | (arr > limits.max_tokens)
        if bad.any():
            j = _first(bad)
            raise FrameError(name, f"{name}[{j}] = {int(arr[j])} outside [0, {limits.max_tokens}]")
    rows = int(counts.sum())
    if rows > limits.max_tokens:
        raise FrameError("token_counts", f"{rows} tokens in total, more than the limit {limits.max_tokens}")
    if token_policy == "last":
        if (counts != 1).any():
            j = _first(counts != 1)
            raise FrameError(
                "token_counts", f'policy "last" sends one token per sample; token_counts[{j}] = {int(counts[j])}'
            )
        if (lengths < 1).any():
            j = _first(lengths < 1)
            raise FrameError("seq_lengths", f'policy "last" needs a real token; seq_lengths[{j}] = 0')
    elif token_policy == "nonpad":
        if (lengths < counts).any():
            j = _first(lengths < counts)
            raise FrameError(
                "token_counts",
                f'policy "nonpad" sends only real tokens; token_counts[{j}] = {int(counts[j])} '
                f"> seq_lengths[{j}] = {int(lengths[j])}",
            )
    else:  # "all": every position (pads included) is sent, so the real length cannot exceed it
        if (lengths > counts).any():
            j = _first(lengths > counts)
            raise FrameError(
                "seq_lengths",
                f'policy "all" sends every position; seq_lengths[{j}] = {int(lengths[j])} '
                f"> token_counts[{j}] = {int(counts[j])}",
            )
    _check_targets(targets, n, rows, limits)
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise FrameError("meta", "must be a map with string keys")
    if len(meta) > limits.max_meta_keys:
        raise FrameError("meta", f"has {len(meta)} keys, more than the limit {limits.max_meta_keys}")
    _check_free(meta, "meta", limits)
    return int(lay.size), rows


def _check_tensor_params(
    pre: str, bits: object, gs: object, rotation: object, seed: object, shape: object,
    rows: int, hidden: int | None, limits: FrameLimits,
) -> tuple[int, int, tuple[int, int], int, int]:
    """Checks one layer's quantization header; returns (bits, group_size, shape, packed bytes, scale bytes)."""
    bits = _int(bits, f"{pre}.bits")
    if bits not in SUPPORTED_BITS:
        raise FrameError(f"{pre}.bits", f"{bits} is not supported; use one of {SUPPORTED_BITS}")
    gs = _int(gs, f"{pre}.group_size")
    if not (1 <= gs <= MAX_GROUP_SIZE) or gs & (gs - 1):
        raise FrameError(f"{pre}.group_size", f"must be a power of two in [1, {MAX_GROUP_SIZE}], got {gs}")
    if not isinstance(rotation, str) or rotation not in ROTATIONS:
        raise FrameError(f"{pre}.rotation", f"must be one of {ROTATIONS}, got {rotation!r}")
    _int(seed, f"{pre}.seed", 0, (1 << 64) - 1)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2 or not all(_is_int(d) for d in shape):
        raise FrameError(f"{pre}.shape", f"must be [tokens, hidden] (two integers), got {shape!r}")
    r, h = int(shape[0]), int(shape[1])
    if r != rows:
        raise FrameError(
            f"{pre}.shape", f"has {r} rows but sum(token_counts) = {rows}; one row per sent token is required"
        )
    if not (1 <= h <= limits.max_hidden):
        raise FrameError(f"{pre}.shape", f"hidden size {h} outside [1, {limits.max_hidden}]")
    if hidden is not None and h != hidden:
        raise FrameError(f"{pre}.shape", f"hidden size {h} differs from layer 0's {hidden}; all layers must match")
    want_p, want_s = expected_nbytes((r, h), bits, gs)
    return bits, gs, (r, h), want_p, want_s


def _size_error(name: str, got: int, shape: tuple[int, int], bits: int, gs: int, want: int) -> FrameError:
    return FrameError(
        name, f"has {got} bytes but shape {list(shape)} at {bits} bits, group {gs} needs {want} (codec.expected_nbytes)"
    )


def _check_finite(pre: str, bits: int, packed: np.ndarray, scales: np.ndarray) -> None:
    """NaN/Inf scales (or float16 values, for 16-bit passthrough) would poison training."""
    if scales.size:
        ok = np.isfinite(scales)
        if not ok.all():
            j = _first(~ok)
            raise FrameError(f"{pre}.scales", f"entry #{j} is {float(scales[j])}; scales and offsets must be finite")
    if bits == 16 and packed.size:
        vals = packed.view("<f2")
        ok = np.isfinite(vals)
        if not ok.all():
            j = _first(~ok)
            raise FrameError(f"{pre}.packed", f"float16 value #{j} is {float(vals[j])}; activations must be finite")


def _check_targets(targets: object, n: int, rows: int, limits: FrameLimits) -> None:
    if not isinstance(targets, dict):
        raise FrameError("targets", f"must be a map, got {type(targets).__name__}")
    if not all(isinstance(k, str) for k in targets):
        raise FrameError("targets", "keys must be strings")
    extras = [k for k in targets if k not in _TARGET_FIELDS]
    if len(extras) > limits.max_meta_keys:
        raise FrameError("targets", f"has {len(extras)} keys besides {list(_TARGET_FIELDS)}, more than the "
                                    f"limit {limits.max_meta_keys}")
    for k in extras:
        _check_free(targets[k], f"targets.{k}", limits)
    kind = targets.get("kind")
    if not isinstance(kind, str) or kind not in TARGET_KINDS:
        raise FrameError("targets.kind", f"must be one of {TARGET_KINDS}, got {kind!r}")
    if kind == "none":
        if "values" in targets:
            raise FrameError("targets.values", 'kind "none" carries no values')
        return
    if "values" not in targets:
        raise FrameError("targets.values", f'missing (kind "{kind}" needs values)')
    if kind == "class":
        if "num_classes" not in targets:
            raise FrameError("targets.num_classes", 'missing (kind "class" needs num_classes)')
        k = _int(targets["num_classes"], "targets.num_classes", 1, _MAX_INT64)
        vals = _int_array(targets["values"], "targets.values", limits.max_samples, "labels")
        if vals.size != n:
            raise FrameError("targets.values", f"has {vals.size} labels for {n} samples; one per sample")
        bad = (vals < 0) | (vals >= k)
        if bad.any():
            j = _first(bad)
            raise FrameError("targets.values", f"label {int(vals[j])} of sample #{j} is outside [0, {k})")
    else:  # tokens: one target per sent token, IGNORE_INDEX where the loss skips it
        vals = _int_array(targets["values"], "targets.values", limits.max_tokens, "token targets")
        if vals.size != rows:
            raise FrameError(
                "targets.values", f"has {vals.size} token targets for {rows} sent tokens; one per sent token"
            )
        vocab = None
        if "vocab_size" in targets:
            vocab = _int(targets["vocab_size"], "targets.vocab_size", 1, _MAX_INT64)
        bad = (vals < 0) & (vals != IGNORE_INDEX)
        if vocab is not None:
            bad |= vals >= vocab
        if bad.any():
            j = _first(bad)
            lim = f"in [0, {vocab})" if vocab is not None else ">= 0"
            raise FrameError(
                "targets.values", f"token target {int(vals[j])} at row {j} must be {lim} or {IGNORE_INDEX} (ignored)"
            )


def _check_free_size(targets: dict[str, Any], meta: dict[str, Any], limits: FrameLimits) -> None:
    """The encoded size of the extra target keys and meta (in the order a decoder reads them)."""
    size = 0
    parts = [(f"targets.{k}", v) for k, v in targets.items() if k not in _TARGET_FIELDS] + [("meta", meta)]
    for name, value in parts:
        size += len(_packb(value, name))
        if size > limits.max_meta_bytes:
            raise FrameError(name, f"meta and the extra keys of targets take {size}+ bytes encoded, more than the "
                                   f"limit {limits.max_meta_bytes}")


def validate_frame(
    frame: Frame, *, expected_fingerprint: str | None = None, limits: FrameLimits = FrameLimits()
) -> None:
    """Check an in-memory frame with the same rules as :func:`decode_frame` (raises FrameError)."""
    if not isinstance(frame, Frame):
        raise FrameError("frame", f"expected a Frame, got {type(frame).__name__}")
    _check_version(frame.version)
    n_layers, rows = _check_fields(
        fingerprint=frame.fingerprint, token_policy=frame.token_policy, layers=frame.layers,
        sample_ids=frame.sample_ids, token_counts=frame.token_counts, seq_lengths=frame.seq_lengths,
        targets=frame.targets, meta=frame.meta, expected_fingerprint=expected_fingerprint, limits=limits,
    )
    _check_free_size(frame.targets, frame.meta, limits)
    acts = frame.activations
    if not isinstance(acts, (list, tuple)):
        raise FrameError("activations", f"must be a list, got {type(acts).__name__}")
    if len(acts) != n_layers:
        raise FrameError("activations", f"has {len(acts)} tensors for {n_layers} layers; one per layer")
    hidden = None
    total = 0
    for i, q in enumerate(acts):
        pre = f"layers[{i}]"
        if not isinstance(q, QuantizedTensor):
            raise FrameError(pre, f"activation must be a QuantizedTensor, got {type(q).__name__}")
        bits, gs, shape, want_p, want_s = _check_tensor_params(
            pre, q.bits, q.group_size, q.rotation, q.seed, q.shape, rows, hidden, limits
        )
        hidden = shape[1]
        for name, arr, dt, want in (("packed", q.packed, np.uint8, want_p), ("scales", q.scales, np.float16, want_s)):
            if not isinstance(arr, np.ndarray) or arr.dtype != dt or arr.ndim != 1:
                raise FrameError(f"{pre}.{name}", f"must be a 1-D {np.dtype(dt).name} array")
            if arr.nbytes != want:
                raise _size_error(f"{pre}.{name}", arr.nbytes, shape, bits, gs, want)
        _check_finite(pre, bits, q.packed, q.scales)
        total += want_p + want_s
    if total > limits.max_bytes:
        raise FrameError("activations", f"payload of {total} bytes exceeds the limit {limits.max_bytes}")


# --------------------------------------------------------------------------------------------
# encode


def _plain(v: Any) -> Any:
    """numpy (or torch) scalars/arrays -> plain Python for msgpack."""
    if isinstance(v, np.generic):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"cannot serialize {type(v).__name__}")


def _packb(obj: Any, name: str) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True, default=_plain)
    except Exception as exc:
        raise FrameError(name, f"is not msgpack-serialisable ({type(exc).__name__}: {exc})") from None


def encode_frame(frame: Frame) -> bytes:
    """Validate ``frame`` (default limits) and serialise it to the wire layout of the module doc."""
    validate_frame(frame)
    cols: dict[str, list] = {k: [] for k in _TENSOR_FIELDS}
    parts: list[np.ndarray] = []
    off = 0
    for q in frame.activations:
        packed = np.ascontiguousarray(q.packed)
        scales = np.ascontiguousarray(q.scales, dtype="<f2").view(np.uint8)
        cols["bits"].append(int(q.bits))
        cols["group_size"].append(int(q.group_size))
        cols["rotation"].append(q.rotation)
        cols["seed"].append(int(q.seed))
        cols["shape"].append([int(d) for d in q.shape])
        cols["packed"].append([off, packed.nbytes])
        cols["scales"].append([off + packed.nbytes, scales.nbytes])
        off += packed.nbytes + scales.nbytes
        parts += [packed, scales]
    _packb(frame.targets, "targets")
    _packb(frame.meta, "meta")
    header = {
        "version": int(frame.version),
        "fingerprint": frame.fingerprint,
        "layers": [int(v) for v in frame.layers],
        "token_policy": frame.token_policy,
        "sample_ids": [int(v) for v in frame.sample_ids],
        "token_counts": [int(v) for v in frame.token_counts],
        "seq_lengths": [int(v) for v in frame.seq_lengths],
        "targets": frame.targets,
        "meta": frame.meta,
        "payload_bytes": off,
        "tensors": cols,
    }
    hdr = _packb(header, "header")
    total = _PREFIX.size + len(hdr) + off + _TRAILER.size
    limits = FrameLimits()
    if total > limits.max_bytes or len(hdr) > _max_header_bytes(limits):
        raise FrameError(
            "data", f"encoded frame of {total} bytes (header {len(hdr)}) exceeds the limits; send smaller chunks"
        )
    pieces: list[Any] = [_PREFIX.pack(MAGIC, len(hdr)), hdr] + [memoryview(p).cast("B") for p in parts]
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    pieces.append(_TRAILER.pack(crc))
    return b"".join(pieces)  # the only copy of the payload


# --------------------------------------------------------------------------------------------
# reading the header: every field within its own caps, enforced while msgpack builds it
#
# A header is read field by field. Each value gets a window of the header no longer than the
# field can need within the limits, and msgpack builds it with that field's bounds on strings,
# arrays and maps (and, through its hooks, on how many maps and arrays, how deep, and no key twice).
# So whatever a header holds, decoding it builds at most a few objects per byte of those windows.

_INT_BYTES = 9  # the longest msgpack integer
_SHORT_STR = 64  # bytes of a key, a token policy or a rotation name


@dataclass(frozen=True)
class _Caps:
    """What msgpack may build for one header field: the bytes it may span, the longest string, binary,
    array and map, how many maps and arrays in all, and (free-form content) how deep they nest."""

    nbytes: int
    str_len: int = _SHORT_STR
    bin_len: int = 0
    array_len: int = 0
    map_len: int = 0
    containers: int = 1
    depth: int | None = None


def _ints(n: int) -> _Caps:
    """A flat list of at most ``n`` integers."""
    return _Caps(5 + _INT_BYTES * n, array_len=n)


def _field_caps(limits: FrameLimits) -> dict[str, _Caps]:
    """The caps of every field but the free-form ones (``meta``, extra keys of ``targets``)."""
    column = 3 + _SHORT_STR + 5  # a tensor column's key and list header
    entry = 3 * _INT_BYTES + 3 + _SHORT_STR + 3 * (1 + 2 * _INT_BYTES)  # one layer's entry in every column
    return {
        "version": _Caps(_INT_BYTES),
        "payload_bytes": _Caps(_INT_BYTES),
        "fingerprint": _Caps(5 + 4 * _MAX_FINGERPRINT_LEN, str_len=4 * _MAX_FINGERPRINT_LEN),
        "token_policy": _Caps(3 + _SHORT_STR),
        "layers": _ints(limits.max_layers),
        "sample_ids": _ints(limits.max_samples),
        "token_counts": _ints(limits.max_samples),
        "seq_lengths": _ints(limits.max_samples),
        "tensors": _Caps(5 + len(_TENSOR_FIELDS) * column + limits.max_layers * entry,
                         array_len=max(2, limits.max_layers), map_len=len(_TENSOR_FIELDS) + 1,
                         containers=1 + (len(_TENSOR_FIELDS) + 1) * (1 + limits.max_layers)),
        "targets.kind": _Caps(3 + _SHORT_STR),
        "targets.values": _ints(max(limits.max_samples, limits.max_tokens)),
        "targets.num_classes": _Caps(_INT_BYTES),
        "targets.vocab_size": _Caps(_INT_BYTES),
    }


def _free_caps(limits: FrameLimits, nbytes: int) -> _Caps:
    """Free-form content in what is left (``nbytes``) of the budget meta and extra target keys share."""
    longest = max(limits.max_meta_len, limits.max_meta_keys)
    return _Caps(nbytes, str_len=limits.max_meta_bytes, bin_len=limits.max_meta_bytes, array_len=longest,
                 map_len=longest, containers=limits.max_meta_bytes, depth=limits.max_meta_depth)


class _Hooks:
    """msgpack's hooks while it builds one field: strict maps, and the caps on maps and arrays."""

    def __init__(self, name: str, caps: _Caps):
        self.name = name
        self.caps = caps
        self.left = caps.containers
        self.levels: dict[int, int] = {}  # free-form content: nesting level of each map and array built

    def _built(self, obj: Any, children: Any) -> Any:
        self.left -= 1
        if self.left < 0:
            if self.caps.containers == 1:
                raise FrameError(self.name, "must not hold maps or arrays inside it")
            raise FrameError(self.name, f"holds more than {self.caps.containers} maps and arrays, the most its "
                                        f"layout allows within the limits")
        if self.caps.depth is not None:
            level = 1 + max((self.levels.get(id(c), 0) for c in children), default=0)
            if level > self.caps.depth:
                raise FrameError(self.name, f"nests maps and arrays more than {self.caps.depth} deep, the limit")
            self.levels[id(obj)] = level
        return obj

    def array(self, items: list) -> list:
        return self._built(items, items)

    def map(self, pairs: list[tuple[Any, Any]]) -> dict:
        out: dict = {}
        for key, value in pairs:
            if key in out:
                raise FrameError(f"{self.name}.{key}" if isinstance(key, str) else self.name,
                                 f"key {key!r} appears twice in one map; a frame must read the same to every reader")
            out[key] = value
        return self._built(out, out.values())


_READ_SIZE = 1 << 14  # msgpack reads a field's window in pieces this size: no copy of a whole window


class _Window:
    """A read-only file over part of the header, for msgpack to read a field from."""

    def __init__(self, view: memoryview):
        self.view = view
        self.pos = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n is None or n < 0 else min(len(self.view), self.pos + n)
        chunk = bytes(self.view[self.pos:end])
        self.pos = end
        return chunk


def _unpack(raw: memoryview, pos: int, caps: _Caps, name: str) -> tuple[Any, int]:
    """The msgpack value at ``raw[pos:]``, built within ``caps``; returns it and the position after it."""
    window = _Window(raw[pos:pos + caps.nbytes])
    hooks = _Hooks(name, caps)
    unpacker = msgpack.Unpacker(
        window, read_size=min(_READ_SIZE, max(1, len(window.view))), max_buffer_size=max(1, len(window.view)),
        raw=False, strict_map_key=True, use_list=True,
        max_str_len=caps.str_len, max_bin_len=caps.bin_len, max_array_len=caps.array_len,
        max_map_len=caps.map_len, max_ext_len=0, list_hook=hooks.array, object_pairs_hook=hooks.map,
    )
    error = None
    try:
        value = unpacker.unpack()
    except FrameError as err:
        error = FrameError(err.field, err.message)
    except msgpack.OutOfData:
        if len(window.view) < caps.nbytes:
            error = FrameError(name, "truncated: the header ends inside this field")
        else:
            error = FrameError(name, f"takes more than the {caps.nbytes} bytes of header the limits leave it")
    except Exception as exc:  # msgpack refused it: a bound exceeded, a bad type byte or UTF-8, nesting
        error = FrameError(name, f"not valid msgpack within the limits ({type(exc).__name__}: {exc})")
    if error is not None:
        del unpacker  # what it built so far goes now, not with the traceback of a refusal
        raise error
    return value, pos + unpacker.tell()


def _map_len(raw: memoryview, pos: int, name: str) -> tuple[int, int]:
    """The number of entries of the map at ``raw[pos:]`` and the position of its first key."""
    unpacker = msgpack.Unpacker(max_buffer_size=8)
    unpacker.feed(raw[pos:pos + 5])
    try:
        n = unpacker.read_map_header()
    except msgpack.OutOfData:
        raise FrameError(name, "truncated: the header ends inside this field") from None
    except Exception:  # another type
        raise FrameError(name, "must be a msgpack map") from None
    return n, pos + unpacker.tell()


def _key(raw: memoryview, pos: int, name: str) -> tuple[str, int]:
    key, pos = _unpack(raw, pos, _Caps(3 + _SHORT_STR), name)
    if not isinstance(key, str):
        raise FrameError(name, f"keys must be strings, got {type(key).__name__}")
    return key, pos


def _read_free(raw: memoryview, pos: int, name: str, limits: FrameLimits, left: list[int]) -> tuple[Any, int]:
    """Free-form content within what is ``left`` of the byte budget meta and extra target keys share."""
    try:
        value, end = _unpack(raw, pos, _free_caps(limits, left[0]), name)
    except FrameError as err:
        if "bytes of header the limits leave it" in err.message:
            raise FrameError(name, f"meta and the extra keys of targets take more than {limits.max_meta_bytes} "
                                   f"bytes encoded, the limit") from None
        raise
    left[0] -= end - pos
    return value, end


def _read_targets(raw: memoryview, pos: int, caps: dict[str, _Caps], limits: FrameLimits,
                  left: list[int]) -> tuple[dict[str, Any], int]:
    n, pos = _map_len(raw, pos, "targets")
    if n > len(_TARGET_FIELDS) + limits.max_meta_keys:
        raise FrameError("targets", f"has {n} keys, more than its {len(_TARGET_FIELDS)} fields and "
                                    f"{limits.max_meta_keys} others (the limit)")
    targets: dict[str, Any] = {}
    for _ in range(n):
        key, pos = _key(raw, pos, "targets")
        name = f"targets.{key}"
        if key in targets:
            raise FrameError(name, "appears twice in targets; a frame must read the same to every reader")
        if key in _TARGET_FIELDS:
            targets[key], pos = _unpack(raw, pos, caps[name], name)
        else:
            targets[key], pos = _read_free(raw, pos, name, limits, left)
    return targets, pos


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while msgpack builds a header: the many small containers it may
    build would start a pass over every object of the process (hundreds of ms in a server holding
    a model), for objects that cannot form cycles. Only the thread that paused it resumes it."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


def _read_header(raw: memoryview, limits: FrameLimits) -> dict[str, Any]:
    """The header map, each field built within its caps; a repeated or unknown field is refused."""
    with _gc_paused():
        return _read_fields(raw, limits)


def _read_fields(raw: memoryview, limits: FrameLimits) -> dict[str, Any]:
    caps = _field_caps(limits)
    left = [limits.max_meta_bytes]  # free-form bytes left, shared by meta and the extra target keys
    n, pos = _map_len(raw, 0, "header")
    header: dict[str, Any] = {}
    for _ in range(n):
        key, pos = _key(raw, pos, "header")
        if key in header:
            raise FrameError(key, "appears twice in the header; a frame must read the same to every reader")
        if key not in _HEADER_FIELDS:
            raise FrameError(key, f"unknown header field for frame version {header.get('version', FRAME_VERSION)}")
        if key == "targets":
            header[key], pos = _read_targets(raw, pos, caps, limits, left)
        elif key == "meta":
            header[key], pos = _read_free(raw, pos, key, limits, left)
        else:
            header[key], pos = _unpack(raw, pos, caps[key], key)
        if key == "version":  # a newer frame is named as such before its new fields are
            _check_version(header[key])
    if pos != len(raw):
        raise FrameError("header", f"{len(raw) - pos} bytes follow the header map; frame corrupted")
    return header


# --------------------------------------------------------------------------------------------
# decode


def _max_header_bytes(limits: FrameLimits) -> int:
    """Largest header a frame within ``limits`` can need: every field at its caps, every key at its
    longest, and the free-form budget."""
    keys = (len(_HEADER_FIELDS) + len(_TARGET_FIELDS) + limits.max_meta_keys) * (3 + _SHORT_STR)
    return 5 + keys + sum(c.nbytes for c in _field_caps(limits).values()) + limits.max_meta_bytes


def _as_buffer(data: object) -> memoryview:
    if isinstance(data, np.ndarray):
        if data.dtype not in (np.uint8, np.int8):
            raise FrameError("data", f"expected a uint8 array, got dtype {data.dtype}")
        return memoryview(np.ascontiguousarray(data).reshape(-1)).cast("B")
    if isinstance(data, (bytes, bytearray)):
        return memoryview(data)
    if isinstance(data, memoryview):
        if not data.contiguous:
            raise FrameError("data", "memoryview must be contiguous")
        return data if (data.format == "B" and data.ndim == 1) else data.cast("B")
    raise FrameError("data", f"expected bytes, memoryview or a uint8 array, got {type(data).__name__}")


def _range(v: object, name: str, payload_bytes: int) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise FrameError(name, "must be an [offset, length] pair")
    o = _int(v[0], name, 0)
    n = _int(v[1], name, 0)
    if o + n > payload_bytes:
        raise FrameError(name, f"byte range [{o}, {o + n}) is outside the payload of {payload_bytes} bytes")
    return o, n


def decode_frame(
    data: bytes | memoryview | np.ndarray,
    *,
    expected_fingerprint: str | None = None,
    limits: FrameLimits = FrameLimits(),
) -> Frame:
    """Parse and fully validate a frame; raises only :class:`FrameError`.

    Order: size limit, magic, header length, CRC32 (a mismatch is reported as truncation when
    the header says so), header (a msgpack map with exactly the version's fields), total
    length, then every field (as :func:`validate_frame`) and every tensor range and scale. The
    returned activations are read-only views into ``data``.
    """
    try:
        return _decode(data, expected_fingerprint, limits)
    except FrameError:
        raise
    except Exception as exc:  # defensive: nothing but FrameError may leave the decoder
        raise FrameError("data", f"malformed frame ({type(exc).__name__}: {exc})") from None


def _declared_size(buf: memoryview, hend: int, limits: FrameLimits) -> int | None:
    """Best-effort total size a (possibly damaged) header declares; None if it cannot tell."""
    try:
        payload_bytes = _read_header(buf[_PREFIX.size:hend], limits)["payload_bytes"]
    except (FrameError, KeyError):
        return None
    if not _is_int(payload_bytes) or payload_bytes < 0:
        return None
    return hend + int(payload_bytes) + _TRAILER.size


def _decode(data: object, expected_fingerprint: str | None, limits: FrameLimits) -> Frame:
    buf = _as_buffer(data)
    size = buf.nbytes
    if size > limits.max_bytes:
        raise FrameError("data", f"frame of {size} bytes exceeds the limit {limits.max_bytes}")
    if size < _PREFIX.size + _TRAILER.size:
        raise FrameError("data", f"truncated: {size} bytes is shorter than the smallest frame")
    magic, hlen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError("magic", f"expected {MAGIC!r}, got {bytes(magic)!r}; this is not an activation frame")
    hend = _PREFIX.size + hlen
    if hend + _TRAILER.size > size:
        raise FrameError("header_length", f"truncated: a header of {hlen} bytes does not fit in {size} bytes")
    if hlen > _max_header_bytes(limits):
        raise FrameError(
            "header_length", f"header of {hlen} bytes exceeds {_max_header_bytes(limits)} (derived from the limits)"
        )

    (crc,) = _TRAILER.unpack_from(buf, size - _TRAILER.size)
    actual = zlib.crc32(buf[: size - _TRAILER.size])
    if crc != actual:
        declared = _declared_size(buf, hend, limits)
        if declared is not None and declared != size:  # the common case: say what happened
            what = "truncated" if size < declared else "trailing bytes"
            raise FrameError("payload_bytes", f"{what}: frame is {size} bytes, its header says {declared}")
        raise FrameError(
            "crc", f"checksum mismatch (stored {crc:#010x}, computed {actual:#010x}); frame corrupted in transit"
        )

    header = _read_header(buf[_PREFIX.size:hend], limits)
    if "version" not in header:
        raise FrameError("version", "missing from the header")
    version = _check_version(header["version"])
    for k in _HEADER_FIELDS:
        if k not in header:
            raise FrameError(k, "missing from the header")
    payload_bytes = _int(header["payload_bytes"], "payload_bytes", 0)
    want = hend + payload_bytes + _TRAILER.size
    if size != want:
        what = "truncated" if size < want else "trailing bytes"
        raise FrameError("payload_bytes", f"{what}: frame is {size} bytes, its header says {want}")

    n_layers, rows = _check_fields(
        fingerprint=header["fingerprint"], token_policy=header["token_policy"], layers=header["layers"],
        sample_ids=header["sample_ids"], token_counts=header["token_counts"],
        seq_lengths=header["seq_lengths"], targets=header["targets"], meta=header["meta"],
        expected_fingerprint=expected_fingerprint, limits=limits,
    )
    tensors = header["tensors"]
    if not isinstance(tensors, dict):
        raise FrameError("tensors", f"must be a map of per-layer columns, got {type(tensors).__name__}")
    for k in _TENSOR_FIELDS:
        if k not in tensors:
            raise FrameError(f"tensors.{k}", "missing from the header")
        if not isinstance(tensors[k], list) or len(tensors[k]) != n_layers:
            raise FrameError(f"tensors.{k}", f"must be a list with one entry per layer ({n_layers})")
    for k in tensors:
        if k not in _TENSOR_FIELDS:
            raise FrameError(f"tensors.{k}", "unknown tensor field")

    specs = []
    spans: list[tuple[int, int, str]] = []
    hidden = None
    for i in range(n_layers):
        pre = f"layers[{i}]"
        t = {k: tensors[k][i] for k in _TENSOR_FIELDS}
        bits, gs, shape, want_p, want_s = _check_tensor_params(
            pre, t["bits"], t["group_size"], t["rotation"], t["seed"], t["shape"], rows, hidden, limits
        )
        hidden = shape[1]
        po, pn = _range(t["packed"], f"{pre}.packed", payload_bytes)
        so, sn = _range(t["scales"], f"{pre}.scales", payload_bytes)
        if pn != want_p:
            raise _size_error(f"{pre}.packed", pn, shape, bits, gs, want_p)
        if sn != want_s:
            raise _size_error(f"{pre}.scales", sn, shape, bits, gs, want_s)
        spans += [(po, pn, f"{pre}.packed"), (so, sn, f"{pre}.scales")]
        specs.append((pre, bits, gs, shape, t["rotation"], int(t["seed"]), po, pn, so, sn))

    spans.sort()
    end = 0
    for o, n, name in spans:
        if n and o < end:
            raise FrameError(name, f"byte range [{o}, {o + n}) overlaps another range ending at {end}")
        end = max(end, o + n)
    covered = sum(n for _, n, _ in spans)
    if covered != payload_bytes:
        raise FrameError(
            "payload_bytes",
            f"tensors cover {covered} of {payload_bytes} payload bytes; unaccounted bytes are not allowed",
        )

    activations: list[QuantizedTensor] = []
    for pre, bits, gs, shape, rotation, seed, po, pn, so, sn in specs:
        packed = np.frombuffer(buf, dtype=np.uint8, count=pn, offset=hend + po)
        scales = np.frombuffer(buf, dtype="<f2", count=sn // 2, offset=hend + so)
        _check_finite(pre, bits, packed, scales)
        packed.flags.writeable = False
        scales.flags.writeable = False
        activations.append(QuantizedTensor(bits, gs, shape, rotation, seed, packed, scales))

    return Frame(
        fingerprint=header["fingerprint"],
        layers=header["layers"],
        token_policy=header["token_policy"],
        sample_ids=header["sample_ids"],
        token_counts=header["token_counts"],
        seq_lengths=header["seq_lengths"],
        targets=header["targets"],
        activations=activations,
        meta=header["meta"],
        version=version,
    )
