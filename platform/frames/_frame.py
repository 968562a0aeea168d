"""The frame, its validation, encoding and decoding (the layout is in :mod:`mobiflower.platform.frames`)."""

from __future__ import annotations

import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from mobiflower.platform.codec import QuantizedTensor
from mobiflower.platform.frames._checks import (
    check_fields,
    check_finite,
    check_free_size,
    check_tensor_params,
    check_version,
    int_field,
    is_int,
    packb,
    size_error,
)
from mobiflower.platform.frames._format import (
    FRAME_FIELDS,
    FRAME_VERSION,
    HEADER_FIELDS,
    MAGIC,
    TENSOR_FIELDS,
    FrameError,
    FrameLimits,
    max_header_bytes,
)
from mobiflower.platform.frames._header import read_header

_PREFIX = struct.Struct("<4sI")
_TRAILER = struct.Struct("<I")


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
        return self.nbytes() + sum(_list_nbytes(v) for v in lists) + _content_nbytes(rest) + _content_nbytes(self.meta)


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


def validate_frame(
    frame: Frame, *, expected_fingerprint: str | None = None, limits: FrameLimits = FrameLimits()
) -> None:
    """Check an in-memory frame with the same rules as :func:`decode_frame` (raises FrameError)."""
    if not isinstance(frame, Frame):
        raise FrameError("frame", f"expected a Frame, got {type(frame).__name__}")
    check_version(frame.version)
    n_layers, rows = check_fields(
        {k: getattr(frame, k) for k in FRAME_FIELDS}, expected_fingerprint=expected_fingerprint, limits=limits
    )
    check_free_size(frame.targets, frame.meta, limits)
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
        bits, gs, shape, want_p, want_s = check_tensor_params(
            pre, q.bits, q.group_size, q.rotation, q.seed, q.shape, rows, hidden, limits
        )
        hidden = shape[1]
        for name, arr, dt, want in (("packed", q.packed, np.uint8, want_p), ("scales", q.scales, np.float16, want_s)):
            if not isinstance(arr, np.ndarray) or arr.dtype != dt or arr.ndim != 1:
                raise FrameError(f"{pre}.{name}", f"must be a 1-D {np.dtype(dt).name} array")
            if arr.nbytes != want:
                raise size_error(f"{pre}.{name}", arr.nbytes, shape, bits, gs, want)
        check_finite(pre, bits, q.packed, q.scales)
        total += want_p + want_s
    if total > limits.max_bytes:
        raise FrameError("activations", f"payload of {total} bytes exceeds the limit {limits.max_bytes}")


def encode_frame(frame: Frame) -> bytes:
    """Validate ``frame`` (default limits) and serialise it to the wire layout of the module doc."""
    validate_frame(frame)
    cols: dict[str, list] = {k: [] for k in TENSOR_FIELDS}
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
    packb(frame.targets, "targets")
    packb(frame.meta, "meta")
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
    hdr = packb(header, "header")
    total = _PREFIX.size + len(hdr) + off + _TRAILER.size
    limits = FrameLimits()
    if total > limits.max_bytes or len(hdr) > max_header_bytes(limits):
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
# decode


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
    o = int_field(v[0], name, 0)
    n = int_field(v[1], name, 0)
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


def raw_header(data: bytes | memoryview | np.ndarray) -> dict[str, Any]:
    """The header map of an encoded frame as it was sent, checked for nothing but the envelope (magic
    and header length): what an audit of a frame's content reads, unknown keys and all, where
    :func:`decode_frame` would refuse the frame at its first fault. Raises :class:`FrameError`."""
    buf = _as_buffer(data)
    raw = buf[_PREFIX.size : _header_end(buf)]
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:  # as the decoder: nothing but FrameError leaves
        raise FrameError("header", f"not a msgpack map ({type(exc).__name__}: {exc})") from None
    if not isinstance(header, dict):
        raise FrameError("header", f"must be a map, got {type(header).__name__}")
    return header


def _declared_size(buf: memoryview, hend: int, limits: FrameLimits) -> int | None:
    """Best-effort total size a (possibly damaged) header declares; None if it cannot tell."""
    try:
        payload_bytes = read_header(buf[_PREFIX.size : hend], limits)["payload_bytes"]
    except (FrameError, KeyError):
        return None
    if not is_int(payload_bytes) or payload_bytes < 0:
        return None
    return hend + int(payload_bytes) + _TRAILER.size


def _decode(data: object, expected_fingerprint: str | None, limits: FrameLimits) -> Frame:
    buf = _as_buffer(data)
    hend = _check_envelope(buf, limits)
    header, version, payload_bytes = _read_checked_header(buf, hend, limits)
    fields = {k: header[k] for k in FRAME_FIELDS}
    n_layers, rows = check_fields(fields, expected_fingerprint=expected_fingerprint, limits=limits)
    tensors = _tensor_columns(header["tensors"], n_layers)
    specs = _tensor_specs(tensors, n_layers, rows, payload_bytes, limits)
    return Frame(**fields, activations=_activations(buf, hend, specs), version=version)


def _header_end(buf: memoryview) -> int:
    """Where the header ends, from the magic and the header length that open every frame."""
    size = buf.nbytes
    if size < _PREFIX.size + _TRAILER.size:
        raise FrameError("data", f"truncated: {size} bytes is shorter than the smallest frame")
    magic, hlen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise FrameError("magic", f"expected {MAGIC!r}, got {bytes(magic)!r}; this is not an activation frame")
    hend = _PREFIX.size + hlen
    if hend + _TRAILER.size > size:
        raise FrameError("header_length", f"truncated: a header of {hlen} bytes does not fit in {size} bytes")
    return hend


def _check_envelope(buf: memoryview, limits: FrameLimits) -> int:
    """Size limit, magic, header length and CRC32; returns where the header ends."""
    size = buf.nbytes
    if size > limits.max_bytes:
        raise FrameError("data", f"frame of {size} bytes exceeds the limit {limits.max_bytes}")
    hend = _header_end(buf)
    hlen = hend - _PREFIX.size
    if hlen > max_header_bytes(limits):
        raise FrameError(
            "header_length", f"header of {hlen} bytes exceeds {max_header_bytes(limits)} (derived from the limits)"
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
    return hend


def _read_checked_header(buf: memoryview, hend: int, limits: FrameLimits) -> tuple[dict[str, Any], int, int]:
    """The header with every field present and the total length it declares checked; returns
    (header, version, payload bytes)."""
    header = read_header(buf[_PREFIX.size : hend], limits)
    if "version" not in header:
        raise FrameError("version", "missing from the header")
    version = check_version(header["version"])
    for k in HEADER_FIELDS:
        if k not in header:
            raise FrameError(k, "missing from the header")
    payload_bytes = int_field(header["payload_bytes"], "payload_bytes", 0)
    want = hend + payload_bytes + _TRAILER.size
    size = buf.nbytes
    if size != want:
        what = "truncated" if size < want else "trailing bytes"
        raise FrameError("payload_bytes", f"{what}: frame is {size} bytes, its header says {want}")
    return header, version, payload_bytes


def _tensor_columns(tensors: object, n_layers: int) -> dict[str, list]:
    """The per-layer tensor columns: exactly the known fields, one entry per layer each."""
    if not isinstance(tensors, dict):
        raise FrameError("tensors", f"must be a map of per-layer columns, got {type(tensors).__name__}")
    for k in TENSOR_FIELDS:
        if k not in tensors:
            raise FrameError(f"tensors.{k}", "missing from the header")
        if not isinstance(tensors[k], list) or len(tensors[k]) != n_layers:
            raise FrameError(f"tensors.{k}", f"must be a list with one entry per layer ({n_layers})")
    for k in tensors:
        if k not in TENSOR_FIELDS:
            raise FrameError(f"tensors.{k}", "unknown tensor field")
    return tensors


def _tensor_specs(
    tensors: dict[str, list], n_layers: int, rows: int, payload_bytes: int, limits: FrameLimits
) -> list[tuple]:
    """Check each layer's quantization parameters and byte ranges (in bounds, sized for the
    shape, disjoint and covering the payload exactly); returns one spec per layer."""
    specs = []
    spans: list[tuple[int, int, str]] = []
    hidden = None
    for i in range(n_layers):
        pre = f"layers[{i}]"
        t = {k: tensors[k][i] for k in TENSOR_FIELDS}
        bits, gs, shape, want_p, want_s = check_tensor_params(
            pre, t["bits"], t["group_size"], t["rotation"], t["seed"], t["shape"], rows, hidden, limits
        )
        hidden = shape[1]
        po, pn = _range(t["packed"], f"{pre}.packed", payload_bytes)
        so, sn = _range(t["scales"], f"{pre}.scales", payload_bytes)
        if pn != want_p:
            raise size_error(f"{pre}.packed", pn, shape, bits, gs, want_p)
        if sn != want_s:
            raise size_error(f"{pre}.scales", sn, shape, bits, gs, want_s)
        spans += [(po, pn, f"{pre}.packed"), (so, sn, f"{pre}.scales")]
        specs.append((pre, bits, gs, shape, t["rotation"], int(t["seed"]), po, pn, so, sn))
    _check_spans(spans, payload_bytes)
    return specs


def _check_spans(spans: list[tuple[int, int, str]], payload_bytes: int) -> None:
    """Byte ranges must not overlap and must cover the payload exactly (no hidden bytes)."""
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


def _activations(buf: memoryview, hend: int, specs: list[tuple]) -> list[QuantizedTensor]:
    """Read-only zero-copy views of each layer's packed values and scales (scales checked finite)."""
    activations: list[QuantizedTensor] = []
    for pre, bits, gs, shape, rotation, seed, po, pn, so, sn in specs:
        packed = np.frombuffer(buf, dtype=np.uint8, count=pn, offset=hend + po)
        scales = np.frombuffer(buf, dtype="<f2", count=sn // 2, offset=hend + so)
        check_finite(pre, bits, packed, scales)
        packed.flags.writeable = False
        scales.flags.writeable = False
        activations.append(QuantizedTensor(bits, gs, shape, rotation, seed, packed, scales))
    return activations
