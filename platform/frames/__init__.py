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

:func:`raw_header` reads a frame's header as it was sent, without the checks: for an audit of what
a frame carries (``mobiflower.platform.wire_table``), never for a frame the server will use.

Decoded activations are :class:`~mobiflower.platform.codec.QuantizedTensor` objects whose
arrays are zero-copy, read-only views into the input buffer (keep it alive and unmodified);
dequantize lazily with :func:`~mobiflower.platform.codec.dequantize`.

This package is the frame format's one public surface: import everything from
``mobiflower.platform.frames``. Its private modules are the vocabulary and limits (``_format``),
the rules every field must pass (``_checks``), the header reader that enforces the limits while it
reads (``_header``) and the frame with its encoding and decoding (``_frame``).
"""

from mobiflower.platform.frames._format import (
    FIELD_NAMES,
    FRAME_VERSION,
    HEADER_FIELDS,
    IGNORE_INDEX,
    MAGIC,
    SUPPORTED_VERSIONS,
    TARGET_KINDS,
    TENSOR_FIELDS,
    TOKEN_POLICIES,
    FrameError,
    FrameLimits,
)
from mobiflower.platform.frames._frame import Frame, decode_frame, encode_frame, raw_header, validate_frame

__all__ = [
    "FRAME_VERSION",
    "SUPPORTED_VERSIONS",
    "TOKEN_POLICIES",
    "TARGET_KINDS",
    "MAGIC",
    "IGNORE_INDEX",
    "HEADER_FIELDS",
    "TENSOR_FIELDS",
    "FIELD_NAMES",
    "FrameError",
    "FrameLimits",
    "Frame",
    "encode_frame",
    "decode_frame",
    "validate_frame",
    "raw_header",
]
