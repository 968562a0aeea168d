"""The checks a frame's fields must pass, shared by decoding, in-memory validation and encoding.

Why one place: the decoder (:func:`mobiflower.platform.frames.decode_frame`) checks a header built
from untrusted bytes, :func:`~mobiflower.platform.frames.validate_frame` an in-memory frame, and
:func:`~mobiflower.platform.frames.encode_frame` what it is about to write; all three must apply the
same rules, so that what one accepts the others accept. Every failure is a :class:`FrameError`
naming its field.
"""

from __future__ import annotations

from typing import Any, Mapping

import msgpack
import numpy as np

from mobiflower.platform.codec import MAX_GROUP_SIZE, ROTATIONS, SUPPORTED_BITS, expected_nbytes
from mobiflower.platform.frames._format import (
    IGNORE_INDEX,
    MAX_FINGERPRINT_LEN,
    SUPPORTED_VERSIONS,
    TARGET_FIELDS,
    TARGET_KINDS,
    TOKEN_POLICIES,
    FrameError,
    FrameLimits,
)

_MAX_INT64 = (1 << 63) - 1


# --------------------------------------------------------------------------------------------
# small typed accessors: every failure is a FrameError naming the field


def is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def int_field(v: object, name: str, lo: int | None = None, hi: int | None = None) -> int:
    if not is_int(v):
        raise FrameError(name, f"must be an integer, got {type(v).__name__}")
    v = int(v)
    if lo is not None and v < lo:
        raise FrameError(name, f"must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise FrameError(name, f"must be <= {hi}, got {v}")
    return v


def str_field(v: object, name: str) -> str:
    if not isinstance(v, str):
        raise FrameError(name, f"must be a string, got {type(v).__name__}")
    return v


def int_array(v: object, name: str, max_len: int, what: str = "entries") -> np.ndarray:
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
            bad = next((i for i, e in enumerate(v) if not is_int(e)), None)
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


def first_index(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


# --------------------------------------------------------------------------------------------
# semantic validation (shared by decode_frame, validate_frame and encode_frame)


def check_version(v: object) -> int:
    version = int_field(v, "version")
    if version not in SUPPORTED_VERSIONS:
        raise FrameError(
            "version",
            f"frame version {version} is not supported (this build reads {list(SUPPORTED_VERSIONS)}); "
            "run the same mobiflower release on devices and server",
        )
    return version


def check_free(value: object, name: str, limits: FrameLimits) -> None:
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
                raise FrameError(
                    name, f"holds a map or array of {len(obj)} entries, more than the limit {limits.max_meta_len}"
                )
        todo.extend((child, level + 1) for child in children)


def check_fields(
    fields: Mapping[str, object], *, expected_fingerprint: str | None, limits: FrameLimits
) -> tuple[int, int]:
    """Everything but the tensors (``fields``: the ``FRAME_FIELDS`` of a frame or of a header); returns
    (number of layers, rows = sum(token_counts))."""
    _check_fingerprint(fields["fingerprint"], expected_fingerprint)
    token_policy = fields["token_policy"]
    if not isinstance(token_policy, str) or token_policy not in TOKEN_POLICIES:
        raise FrameError("token_policy", f"must be one of {TOKEN_POLICIES}, got {token_policy!r}")
    n_layers = _check_layers(fields["layers"], limits)
    counts, lengths = _check_samples(fields["sample_ids"], fields["token_counts"], fields["seq_lengths"], limits)
    n = counts.size
    rows = int(counts.sum())
    if rows > limits.max_tokens:
        raise FrameError("token_counts", f"{rows} tokens in total, more than the limit {limits.max_tokens}")
    _check_token_policy(token_policy, counts, lengths)
    _check_targets(fields["targets"], n, rows, limits)
    meta = fields["meta"]
    if not isinstance(meta, dict) or not all(isinstance(k, str) for k in meta):
        raise FrameError("meta", "must be a map with string keys")
    if len(meta) > limits.max_meta_keys:
        raise FrameError("meta", f"has {len(meta)} keys, more than the limit {limits.max_meta_keys}")
    check_free(meta, "meta", limits)
    return n_layers, rows


def _check_fingerprint(fingerprint: object, expected_fingerprint: str | None) -> None:
    fp = str_field(fingerprint, "fingerprint")
    if not fp or len(fp) > MAX_FINGERPRINT_LEN:
        raise FrameError("fingerprint", f"must be a non-empty string of at most {MAX_FINGERPRINT_LEN} characters")
    if expected_fingerprint is not None and fp != expected_fingerprint:
        raise FrameError(
            "fingerprint",
            f"frame comes from backbone {fp!r} but the side network expects {expected_fingerprint!r}; "
            "the device must run the backbone the side network was built for",
        )


def _check_layers(layers: object, limits: FrameLimits) -> int:
    """Tapped layer ids: at least one, non-negative, strictly increasing; returns how many."""
    lay = int_array(layers, "layers", limits.max_layers, "layers")
    if lay.size == 0:
        raise FrameError("layers", "a frame needs at least one tapped layer")
    if (lay < 0).any():
        raise FrameError("layers", f"layer id {int(lay[first_index(lay < 0)])} is negative")
    if lay.size > 1 and not (np.diff(lay) > 0).all():
        j = first_index(np.diff(lay) <= 0) + 1
        raise FrameError(
            "layers", f"must be strictly increasing; layers[{j}] = {int(lay[j])} follows {int(lay[j - 1])}"
        )
    return int(lay.size)


def _check_samples(
    sample_ids: object, token_counts: object, seq_lengths: object, limits: FrameLimits
) -> tuple[np.ndarray, np.ndarray]:
    """One entry per sample in each column, ids unique and non-negative, counts and lengths in
    range; returns (token counts, sequence lengths)."""
    ids = int_array(sample_ids, "sample_ids", limits.max_samples, "samples")
    counts = int_array(token_counts, "token_counts", limits.max_samples, "samples")
    lengths = int_array(seq_lengths, "seq_lengths", limits.max_samples, "samples")
    n = ids.size
    if counts.size != n:
        raise FrameError("token_counts", f"has {counts.size} entries for {n} sample_ids; one per sample")
    if lengths.size != n:
        raise FrameError("seq_lengths", f"has {lengths.size} entries for {n} sample_ids; one per sample")
    if (ids < 0).any():
        raise FrameError("sample_ids", f"sample id {int(ids[first_index(ids < 0)])} is negative")
    if n > 1:
        srt = np.sort(ids)
        dup = srt[1:] == srt[:-1]
        if dup.any():
            raise FrameError("sample_ids", f"sample id {int(srt[1:][dup][0])} appears more than once")
    for name, arr in (("token_counts", counts), ("seq_lengths", lengths)):
        bad = (arr < 0) | (arr > limits.max_tokens)
        if bad.any():
            j = first_index(bad)
            raise FrameError(name, f"{name}[{j}] = {int(arr[j])} outside [0, {limits.max_tokens}]")
    return counts, lengths


def _check_token_policy(token_policy: str, counts: np.ndarray, lengths: np.ndarray) -> None:
    """What each token policy allows between tokens sent and real length."""
    if token_policy == "last":
        if (counts != 1).any():
            j = first_index(counts != 1)
            raise FrameError(
                "token_counts", f'policy "last" sends one token per sample; token_counts[{j}] = {int(counts[j])}'
            )
        if (lengths < 1).any():
            j = first_index(lengths < 1)
            raise FrameError("seq_lengths", f'policy "last" needs a real token; seq_lengths[{j}] = 0')
    elif token_policy == "nonpad":
        if (lengths < counts).any():
            j = first_index(lengths < counts)
            raise FrameError(
                "token_counts",
                f'policy "nonpad" sends only real tokens; token_counts[{j}] = {int(counts[j])} '
                f"> seq_lengths[{j}] = {int(lengths[j])}",
            )
    else:  # "all": every position (pads included) is sent, so the real length cannot exceed it
        if (lengths > counts).any():
            j = first_index(lengths > counts)
            raise FrameError(
                "seq_lengths",
                f'policy "all" sends every position; seq_lengths[{j}] = {int(lengths[j])} '
                f"> token_counts[{j}] = {int(counts[j])}",
            )


def check_tensor_params(
    pre: str,
    bits: object,
    gs: object,
    rotation: object,
    seed: object,
    shape: object,
    rows: int,
    hidden: int | None,
    limits: FrameLimits,
) -> tuple[int, int, tuple[int, int], int, int]:
    """Checks one layer's quantization header; returns (bits, group_size, shape, packed bytes, scale bytes)."""
    bits = int_field(bits, f"{pre}.bits")
    if bits not in SUPPORTED_BITS:
        raise FrameError(f"{pre}.bits", f"{bits} is not supported; use one of {SUPPORTED_BITS}")
    gs = int_field(gs, f"{pre}.group_size")
    if not (1 <= gs <= MAX_GROUP_SIZE) or gs & (gs - 1):
        raise FrameError(f"{pre}.group_size", f"must be a power of two in [1, {MAX_GROUP_SIZE}], got {gs}")
    if not isinstance(rotation, str) or rotation not in ROTATIONS:
        raise FrameError(f"{pre}.rotation", f"must be one of {ROTATIONS}, got {rotation!r}")
    int_field(seed, f"{pre}.seed", 0, (1 << 64) - 1)
    if not isinstance(shape, (tuple, list)) or len(shape) != 2 or not all(is_int(d) for d in shape):
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


def size_error(name: str, got: int, shape: tuple[int, int], bits: int, gs: int, want: int) -> FrameError:
    return FrameError(
        name, f"has {got} bytes but shape {list(shape)} at {bits} bits, group {gs} needs {want} (codec.expected_nbytes)"
    )


def check_finite(pre: str, bits: int, packed: np.ndarray, scales: np.ndarray) -> None:
    """NaN/Inf scales (or float16 values, for 16-bit passthrough) would poison training."""
    if scales.size:
        ok = np.isfinite(scales)
        if not ok.all():
            j = first_index(~ok)
            raise FrameError(f"{pre}.scales", f"entry #{j} is {float(scales[j])}; scales and offsets must be finite")
    if bits == 16 and packed.size:
        vals = packed.view("<f2")
        ok = np.isfinite(vals)
        if not ok.all():
            j = first_index(~ok)
            raise FrameError(f"{pre}.packed", f"float16 value #{j} is {float(vals[j])}; activations must be finite")


def _check_targets(targets: object, n: int, rows: int, limits: FrameLimits) -> None:
    if not isinstance(targets, dict):
        raise FrameError("targets", f"must be a map, got {type(targets).__name__}")
    if not all(isinstance(k, str) for k in targets):
        raise FrameError("targets", "keys must be strings")
    extras = [k for k in targets if k not in TARGET_FIELDS]
    if len(extras) > limits.max_meta_keys:
        raise FrameError(
            "targets",
            f"has {len(extras)} keys besides {list(TARGET_FIELDS)}, more than the limit {limits.max_meta_keys}",
        )
    for k in extras:
        check_free(targets[k], f"targets.{k}", limits)
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
        k = int_field(targets["num_classes"], "targets.num_classes", 1, _MAX_INT64)
        vals = int_array(targets["values"], "targets.values", limits.max_samples, "labels")
        if vals.size != n:
            raise FrameError("targets.values", f"has {vals.size} labels for {n} samples; one per sample")
        bad = (vals < 0) | (vals >= k)
        if bad.any():
            j = first_index(bad)
            raise FrameError("targets.values", f"label {int(vals[j])} of sample #{j} is outside [0, {k})")
    else:  # tokens: one target per sent token, IGNORE_INDEX where the loss skips it
        vals = int_array(targets["values"], "targets.values", limits.max_tokens, "token targets")
        if vals.size != rows:
            raise FrameError(
                "targets.values", f"has {vals.size} token targets for {rows} sent tokens; one per sent token"
            )
        vocab = None
        if "vocab_size" in targets:
            vocab = int_field(targets["vocab_size"], "targets.vocab_size", 1, _MAX_INT64)
        bad = (vals < 0) & (vals != IGNORE_INDEX)
        if vocab is not None:
            bad |= vals >= vocab
        if bad.any():
            j = first_index(bad)
            lim = f"in [0, {vocab})" if vocab is not None else ">= 0"
            raise FrameError(
                "targets.values", f"token target {int(vals[j])} at row {j} must be {lim} or {IGNORE_INDEX} (ignored)"
            )


def check_free_size(targets: dict[str, Any], meta: dict[str, Any], limits: FrameLimits) -> None:
    """The encoded size of the extra target keys and meta (in the order a decoder reads them)."""
    size = 0
    parts = [(f"targets.{k}", v) for k, v in targets.items() if k not in TARGET_FIELDS] + [("meta", meta)]
    for name, value in parts:
        size += len(packb(value, name))
        if size > limits.max_meta_bytes:
            raise FrameError(
                name,
                f"meta and the extra keys of targets take {size}+ bytes encoded, more than the "
                f"limit {limits.max_meta_bytes}",
            )


# --------------------------------------------------------------------------------------------
# free-form content to msgpack


def _plain(v: Any) -> Any:
    """numpy (or torch) scalars/arrays -> plain Python for msgpack."""
    if isinstance(v, np.generic):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"cannot serialize {type(v).__name__}")


def packb(obj: Any, name: str) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True, default=_plain)
    except Exception as exc:
        raise FrameError(name, f"is not msgpack-serialisable ({type(exc).__name__}: {exc})") from None


__all__ = [
    "is_int",
    "int_field",
    "str_field",
    "int_array",
    "first_index",
    "check_version",
    "check_free",
    "check_fields",
    "check_tensor_params",
    "size_error",
    "check_finite",
    "check_free_size",
    "packb",
]
