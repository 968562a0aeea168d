"""Tests of the self-describing activation frame (mobiflower.platform.frames)."""

from __future__ import annotations

import pickle
import random
import re
import struct
import zlib
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobiflower.platform.codec import SUPPORTED_BITS, QuantizedTensor, dequantize, quantize
from mobiflower.platform.frames import (
    FIELD_NAMES,
    FRAME_VERSION,
    HEADER_FIELDS,
    MAGIC,
    TARGET_KINDS,
    TOKEN_POLICIES,
    Frame,
    FrameError,
    FrameLimits,
    decode_frame,
    encode_frame,
    raw_header,
    validate_frame,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FP = "smollm2-135m:sha256:0123abcd"


def make_frame(
    *,
    n: int = 4,
    layers: tuple[int, ...] = (2, 5),
    hidden: int = 64,
    bits: int = 4,
    policy: str = "nonpad",
    counts: list[int] | None = None,
    lengths: list[int] | None = None,
    targets: dict[str, Any] | None = None,
    seed: int = 0,
) -> Frame:
    if counts is None:
        counts = {"last": [1] * n, "nonpad": [2, 3, 1, 2] * (n // 4) + [1] * (n % 4), "all": [6] * n}[policy]
    if lengths is None:
        lengths = {"last": [5] * n, "nonpad": [3, 3, 2, 5] * (n // 4) + [4] * (n % 4), "all": [3] * n}[policy]
    rows = sum(counts)
    g = torch.Generator().manual_seed(seed)
    acts = [
        quantize(torch.randn(rows, hidden, generator=g), bits, 64, "hadamard", seed + i) for i in range(len(layers))
    ]
    if targets is None:
        targets = {"kind": "class", "values": [i % 3 for i in range(n)], "num_classes": 3}
    return Frame(
        fingerprint=FP,
        layers=list(layers),
        token_policy=policy,
        sample_ids=[100 + 7 * i for i in range(n)],
        token_counts=counts,
        seq_lengths=lengths,
        targets=targets,
        activations=acts,
        meta={"device": "phone-3", "chunk": 11, "t_forward_s": 0.25},
    )


def split(data: bytes) -> tuple[dict, bytes]:
    """(header dict, payload) of an encoded frame."""
    (hlen,) = struct.unpack_from("<I", data, 4)
    return msgpack.unpackb(data[8 : 8 + hlen], raw=False), data[8 + hlen : -4]


def join(header: Any, payload: bytes, *, raw_header: bytes | None = None) -> bytes:
    """Re-encode with a correct CRC so that the semantic check, not the checksum, must fire."""
    hdr = raw_header if raw_header is not None else msgpack.packb(header, use_bin_type=True)
    body = MAGIC + struct.pack("<I", len(hdr)) + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def assert_same(a: Frame, b: Frame) -> None:
    for name in (
        "fingerprint",
        "layers",
        "token_policy",
        "sample_ids",
        "token_counts",
        "seq_lengths",
        "targets",
        "meta",
        "version",
    ):
        va, vb = getattr(a, name), getattr(b, name)
        if isinstance(va, np.ndarray):
            va = va.tolist()
        if name in ("targets", "meta"):  # free-form values: bit for bit, so that a NaN equals itself
            assert msgpack.packb(va, use_bin_type=True) == msgpack.packb(vb, use_bin_type=True), name
        else:
            assert va == vb, name
    assert len(a.activations) == len(b.activations)
    for qa, qb in zip(a.activations, b.activations):
        assert (qa.bits, qa.group_size, tuple(qa.shape), qa.rotation, qa.seed) == (
            qb.bits,
            qb.group_size,
            tuple(qb.shape),
            qb.rotation,
            qb.seed,
        )
        assert np.array_equal(qa.packed, qb.packed)
        assert np.array_equal(qa.scales.view(np.uint16), qb.scales.view(np.uint16))
        assert torch.equal(dequantize(qa), dequantize(qb))


def refused(data: Any, **kwargs: Any) -> FrameError:
    """The FrameError decoding ``data`` raises, from a check that names its field.

    ``decode_frame`` turns any other exception into a FrameError ("malformed frame"), so "only
    FrameError is raised" holds by construction; a refusal by the catch-all, or naming a field outside
    the frame's vocabulary, is what a decoder bug looks like from outside."""
    with pytest.raises(FrameError) as e:
        decode_frame(data, **kwargs)
    err = e.value
    assert "malformed frame" not in err.message, f"no check named the problem: {err}"
    name = re.sub(r"\[\d+\]", "[i]", err.field)  # an entry of a list field is named after the field
    assert {name, name.removesuffix("[i]")} & FIELD_NAMES or name.startswith(("meta", "targets.")), (
        f"unknown field in {err}"
    )
    return err


@pytest.fixture(scope="module")
def base() -> bytes:
    return encode_frame(make_frame())


# ---------------------------------------------------------------------------------------------
# round trip


@st.composite
def frames(draw) -> Frame:
    n = draw(st.integers(0, 5))
    policy = draw(st.sampled_from(TOKEN_POLICIES))
    lengths = draw(st.lists(st.integers(1 if policy == "last" else 0, 12), min_size=n, max_size=n))
    if policy == "last":
        counts = [1] * n
    elif policy == "nonpad":
        counts = [draw(st.integers(0, ln)) for ln in lengths]
    else:  # "all": padded to a common length
        pad = draw(st.integers(max(lengths, default=0), 12))
        counts = [pad] * n
    rows = sum(counts)
    n_layers = draw(st.integers(1, 4))
    layers = sorted(draw(st.sets(st.integers(0, 40), min_size=n_layers, max_size=n_layers)))
    hidden = draw(st.integers(1, 80))
    acts = []
    for _ in layers:
        bits = draw(st.sampled_from(SUPPORTED_BITS))
        gs = 1 << draw(st.integers(0, 7))
        rot = draw(st.sampled_from(("hadamard", "none")))
        seed = draw(st.integers(0, 2**64 - 1))
        acts.append(quantize(torch.randn(rows, hidden), bits, gs, rot, seed))
    kind = draw(st.sampled_from(TARGET_KINDS))
    if kind == "class":
        k = draw(st.integers(1, 5))
        targets = {
            "kind": "class",
            "values": draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n)),
            "num_classes": k,
        }
    elif kind == "tokens":
        targets = {
            "kind": "tokens",
            "values": draw(st.lists(st.sampled_from([-100, 0, 1, 7, 49151]), min_size=rows, max_size=rows)),
        }
    else:
        targets = {"kind": "none"}
    meta = draw(
        st.dictionaries(
            st.text(max_size=6),
            st.one_of(
                st.integers(-(2**63), 2**64 - 1),
                st.floats(allow_nan=False),
                st.text(max_size=8),
                st.binary(max_size=8),
                st.booleans(),
                st.none(),
                st.lists(st.integers(0, 9), max_size=3),
            ),
            max_size=4,
        )
    )
    return Frame(
        fingerprint=draw(st.text(min_size=1, max_size=40)),
        layers=layers,
        token_policy=policy,
        sample_ids=draw(st.lists(st.integers(0, 2**62), min_size=n, max_size=n, unique=True)),
        token_counts=counts,
        seq_lengths=lengths,
        targets=targets,
        activations=acts,
        meta=meta,
    )


@FAST
@given(frames())
def test_round_trip(frame):
    data = encode_frame(frame)
    out = decode_frame(data, expected_fingerprint=frame.fingerprint)
    assert_same(frame, out)
    assert out.nbytes() == frame.nbytes()
    assert out.num_samples == frame.num_samples and out.hidden_size == frame.hidden_size
    assert len(data) < frame.nbytes() + 1024 + 40 * (len(frame.sample_ids) + sum(frame.token_counts)) + 200


def test_decode_accepts_bytes_bytearray_memoryview_and_uint8_arrays(base):
    ref = decode_frame(base)
    arr = np.frombuffer(base, dtype=np.uint8).copy()  # what an ArrayRecord hands back
    for data in (bytearray(base), memoryview(base), arr, arr.view(np.int8)):
        assert_same(ref, decode_frame(data))
    out = decode_frame(arr)
    q = out.activations[0]
    assert np.shares_memory(q.packed, arr) and np.shares_memory(q.scales, arr)  # zero-copy views
    assert not q.packed.flags.writeable and not q.scales.flags.writeable
    with pytest.raises(FrameError) as e:
        decode_frame(arr.view(np.uint16) if arr.size % 2 == 0 else arr[:-1].view(np.uint16))
    assert e.value.field == "data"
    with pytest.raises(FrameError):
        decode_frame("not bytes")  # type: ignore[arg-type]


def test_header_is_small():
    frame = make_frame(n=16, layers=tuple(range(0, 24, 3)), hidden=576, bits=4, policy="last")
    data = encode_frame(frame)
    (hlen,) = struct.unpack_from("<I", data, 4)
    assert frame.nbytes() == 8 * (16 * 576 // 2 + 16 * 576 // 64 * 4)
    assert len(data) == 8 + hlen + frame.nbytes() + 4
    assert hlen < 1024, hlen


def test_frame_error_is_picklable_and_names_the_field():
    e = FrameError("layers[2].packed", "has 3 bytes, needs 4")
    e2 = pickle.loads(pickle.dumps(e))
    assert isinstance(e2, FrameError) and isinstance(e2, ValueError)
    assert e2.field == "layers[2].packed" and "needs 4" in str(e2) and "layers[2].packed" in str(e2)


# ---------------------------------------------------------------------------------------------
# truncation and corruption: any damage is a FrameError


def test_every_truncation_of_a_small_frame_raises():
    data = encode_frame(make_frame(n=2, layers=(1,), hidden=8, bits=2, policy="last"))
    assert len(data) < 400
    for cut in range(len(data)):
        refused(data[:cut])
    assert refused(data + b"\0").field == "payload_bytes"


def test_sampled_truncations_of_a_bigger_frame_raise():
    data = encode_frame(make_frame(n=16, layers=tuple(range(8)), hidden=576, bits=4, policy="last"))
    (hlen,) = struct.unpack_from("<I", data, 4)
    rng = random.Random(0)
    cuts = {0, 3, 4, 7, 8, 9, 8 + hlen - 1, 8 + hlen, 8 + hlen + 1, len(data) - 5, len(data) - 4, len(data) - 1}
    cuts |= {rng.randrange(len(data)) for _ in range(150)}
    for cut in sorted(cuts):
        err = refused(data[:cut])
        assert err.field in ("data", "header_length", "header", "payload_bytes", "crc"), (cut, err)
    assert "truncated" in str(refused(data[: len(data) // 2]))


def test_every_single_byte_flip_of_a_small_frame_raises():
    data = encode_frame(make_frame(n=2, layers=(1, 4), hidden=8, bits=4, policy="last"))
    for pos in range(len(data)):
        for xor in (0x01, 0x80, 0xFF):
            bad = bytearray(data)
            bad[pos] ^= xor
            refused(bytes(bad))


@settings(max_examples=150, deadline=None)
@given(pos=st.integers(0, 10**9), xor=st.integers(1, 255), big=st.booleans())
def test_random_single_byte_corruption_raises(pos, xor, big):
    data = _BIG if big else _SMALL
    bad = bytearray(data)
    bad[pos % len(data)] ^= xor
    refused(bytes(bad))


_SMALL = encode_frame(make_frame())
_BIG = encode_frame(make_frame(n=16, layers=tuple(range(0, 32, 4)), hidden=576, bits=4, policy="last"))


def test_payload_corruption_is_caught_by_the_crc(base):
    bad = bytearray(base)
    bad[len(bad) - 40] ^= 0x10
    with pytest.raises(FrameError) as e:
        decode_frame(bytes(bad))
    assert e.value.field == "crc"
    bad = bytearray(base)
    bad[-1] ^= 0x01  # the trailer itself
    with pytest.raises(FrameError) as e:
        decode_frame(bytes(bad))
    assert e.value.field == "crc"


# ---------------------------------------------------------------------------------------------
# each validation, with a correct CRC so the specific check must fire


def _set(path: str, value: Any) -> Callable[[dict, bytes], None]:
    """Mutator setting header[path] (dotted; ints index lists) to value."""

    def mutate(h: dict, p: bytes) -> None:
        *parents, last = path.split(".")
        obj: Any = h
        for key in parents:
            obj = obj[int(key)] if isinstance(obj, list) else obj[key]
        if isinstance(obj, list):
            obj[int(last)] = value
        else:
            obj[last] = value

    return mutate


def _del(key: str) -> Callable[[dict, bytes], None]:
    def mutate(h: dict, p: bytes) -> None:
        del h[key]

    return mutate


def _nan_scale(value: float) -> Callable[[dict, bytes], bytes]:
    def mutate(h: dict, p: bytes) -> bytes:
        off = h["tensors"]["scales"][1][0] + 2 * 3  # layer 1, 4th float16
        b = bytearray(p)
        b[off : off + 2] = np.array([value], dtype="<f2").tobytes()
        return bytes(b)

    return mutate


def _grow_payload(h: dict, p: bytes) -> bytes:
    h["payload_bytes"] += 4
    return p + b"\0\0\0\0"


CASES: list[tuple[str, Callable, str]] = [
    ("version-unknown", _set("version", 2), "version"),
    ("version-type", _set("version", "1"), "version"),
    ("version-missing", _del("version"), "version"),
    ("field-missing", _del("sample_ids"), "sample_ids"),
    ("field-unknown", _set("extra", 1), "extra"),
    ("fingerprint-type", _set("fingerprint", 5), "fingerprint"),
    ("fingerprint-empty", _set("fingerprint", ""), "fingerprint"),
    ("policy-unknown", _set("token_policy", "first"), "token_policy"),
    ("policy-type", _set("token_policy", 3), "token_policy"),
    ("layers-decreasing", _set("layers", [5, 2]), "layers"),
    ("layers-repeated", _set("layers", [2, 2]), "layers"),
    ("layers-negative", _set("layers", [-1, 2]), "layers"),
    ("layers-type", _set("layers", "ab"), "layers"),
    ("layers-entry-type", _set("layers", [2, "x"]), "layers[1]"),
    ("layers-float", _set("layers", [2, 5.0]), "layers[1]"),
    ("layers-empty", _set("layers", []), "layers"),
    ("ids-too-few", _set("sample_ids", [1, 2, 3]), "token_counts"),
    ("lengths-too-few", _set("seq_lengths", [3, 3, 2]), "seq_lengths"),
    ("ids-duplicated", _set("sample_ids", [1, 2, 2, 3]), "sample_ids"),
    ("ids-negative", _set("sample_ids", [1, -2, 3, 4]), "sample_ids"),
    ("ids-huge", _set("sample_ids", [1, 2, 3, 2**64 - 1]), "sample_ids"),
    ("last-needs-one-token", _set("token_policy", "last"), "token_counts"),
    ("nonpad-count-over-length", _set("seq_lengths", [1, 3, 2, 5]), "token_counts"),
    ("all-length-over-count", _set("token_policy", "all"), "seq_lengths"),
    ("counts-negative", _set("token_counts", [2, 3, -1, 2]), "token_counts"),
    ("shape-rows", _set("tensors.shape.0", [9, 64]), "layers[0].shape"),
    ("shape-rank", _set("tensors.shape.0", [8, 64, 1]), "layers[0].shape"),
    ("hidden-differs", _set("tensors.shape.1", [8, 128]), "layers[1].shape"),
    ("hidden-zero", _set("tensors.shape.0", [8, 0]), "layers[0].shape"),
    ("bits-unsupported", _set("tensors.bits.0", 3), "layers[0].bits"),
    ("bits-type", _set("tensors.bits.0", "4"), "layers[0].bits"),
    ("bits-other-width", _set("tensors.bits.0", 8), "layers[0].packed"),
    ("group-not-pow2", _set("tensors.group_size.1", 48), "layers[1].group_size"),
    ("group-other", _set("tensors.group_size.0", 32), "layers[0].scales"),
    ("rotation-unknown", _set("tensors.rotation.0", "fourier"), "layers[0].rotation"),
    ("seed-negative", _set("tensors.seed.0", -1), "layers[0].seed"),
    ("packed-length", _set("tensors.packed.0", [0, 255]), "layers[0].packed"),
    ("scales-length", _set("tensors.scales.0", [256, 30]), "layers[0].scales"),
    ("packed-out-of-bounds", _set("tensors.packed.1", [10**6, 256]), "layers[1].packed"),
    ("range-not-a-pair", _set("tensors.packed.0", [0]), "layers[0].packed"),
    ("packed-overlap", _set("tensors.packed.1", [0, 256]), "layers[1].packed"),
    ("unaccounted-payload", _grow_payload, "payload_bytes"),
    ("scale-nan", _nan_scale(float("nan")), "layers[1].scales"),
    ("scale-inf", _nan_scale(float("inf")), "layers[1].scales"),
    ("tensors-type", _set("tensors", []), "tensors"),
    ("tensors-column-length", _set("tensors.bits", [4]), "tensors.bits"),
    ("tensors-unknown-column", _set("tensors.zero_point", [0, 0]), "tensors.zero_point"),
    ("payload-bytes-type", _set("payload_bytes", "x"), "payload_bytes"),
    ("label-too-big", _set("targets.values", [0, 3, 1, 0]), "targets.values"),
    ("label-negative", _set("targets.values", [0, -1, 1, 0]), "targets.values"),
    ("label-count", _set("targets.values", [0, 1, 1]), "targets.values"),
    ("label-type", _set("targets.values", "abc"), "targets.values"),
    ("num-classes-zero", _set("targets.num_classes", 0), "targets.num_classes"),
    ("num-classes-missing", _set("targets", {"kind": "class", "values": [0, 1, 1, 0]}), "targets.num_classes"),
    ("targets-kind", _set("targets.kind", "regression"), "targets.kind"),
    ("targets-type", _set("targets", [1]), "targets"),
    ("tokens-count", _set("targets", {"kind": "tokens", "values": [1] * 7}), "targets.values"),
    ("tokens-negative", _set("targets", {"kind": "tokens", "values": [1, -5, 1, 1, 1, 1, 1, 1]}), "targets.values"),
    (
        "tokens-over-vocab",
        _set("targets", {"kind": "tokens", "values": [1] * 7 + [10], "vocab_size": 10}),
        "targets.values",
    ),
    ("none-with-values", _set("targets", {"kind": "none", "values": [1]}), "targets.values"),
    ("meta-type", _set("meta", [1, 2]), "meta"),
]


@pytest.mark.parametrize("mutate,field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tampered_header_names_the_field(base, mutate, field):
    h, p = split(base)
    new_p = mutate(h, p)
    data = join(h, p if new_p is None else new_p)
    with pytest.raises(FrameError) as e:
        decode_frame(data)
    assert e.value.field == field, str(e.value)


def test_non_finite_float16_passthrough_values_are_rejected():
    data = encode_frame(make_frame(bits=16))
    h, p = split(data)
    off = h["tensors"]["packed"][0][0] + 2 * 5
    for value in (float("nan"), float("inf")):
        b = bytearray(p)
        b[off : off + 2] = np.array([value], dtype="<f2").tobytes()
        with pytest.raises(FrameError) as e:
            decode_frame(join(h, bytes(b)))
        assert e.value.field == "layers[0].packed", str(e.value)


def test_token_targets_and_ignore_index_are_accepted(base):
    h, p = split(base)
    h["targets"] = {"kind": "tokens", "values": [5, -100, 3, 3, -100, 0, 9, 9], "vocab_size": 10}
    out = decode_frame(join(h, p))
    assert out.targets["values"][1] == -100


def test_unknown_version_says_which_are_supported(base):
    h, p = split(base)
    h["version"] = 99
    with pytest.raises(FrameError, match=r"99.*\[1\]"):
        decode_frame(join(h, p))


def test_fingerprint_mismatch_names_both(base):
    with pytest.raises(FrameError) as e:
        decode_frame(base, expected_fingerprint="qwen2-0.5b:sha256:ffff")
    assert e.value.field == "fingerprint"
    assert FP in str(e.value) and "qwen2-0.5b:sha256:ffff" in str(e.value)
    assert decode_frame(base, expected_fingerprint=FP).fingerprint == FP


def test_bad_magic_and_garbage_headers(base):
    with pytest.raises(FrameError) as e:
        decode_frame(b"MBFX" + base[4:])
    assert e.value.field == "magic"
    h, p = split(base)
    for raw in (b"\xc1", b"\x92\x01\x02", b"\x81\x01\x02", b"\xa3abc\x00", b"\xdd\xff\xff\xff\xff"):
        with pytest.raises(FrameError) as e:
            decode_frame(join(None, p, raw_header=raw))
        assert e.value.field == "header", (raw, e.value)
    with pytest.raises(FrameError) as e:
        decode_frame(MAGIC + struct.pack("<I", 2**32 - 1) + base[8:])
    assert e.value.field == "header_length"


def test_raw_header_reads_what_was_sent_unchecked(base):
    """The audit's reader: the header as sent, a key the format lacks and a broken checksum included;
    only what is not a frame's envelope is refused."""
    h, p = split(base)
    assert raw_header(base) == h
    tampered = base.replace(b"\xa4meta", b"\xa4mega", 1)  # the CRC no longer holds
    assert "mega" in raw_header(tampered) and "meta" not in raw_header(tampered)
    for data, field in (
        (b"MBFX" + base[4:], "magic"),
        (base[:6], "data"),
        (join(None, p, raw_header=b"\x01"), "header"),
    ):
        with pytest.raises(FrameError) as e:
            raw_header(data)
        assert e.value.field == field


@pytest.mark.parametrize(
    "limits,field",
    [
        (FrameLimits(max_samples=3), "sample_ids"),
        (FrameLimits(max_layers=1), "layers"),
        (FrameLimits(max_hidden=32), "layers[0].shape"),
        (FrameLimits(max_tokens=7), "token_counts"),
        (FrameLimits(max_bytes=100), "data"),
    ],
)
def test_limits(base, limits, field):
    with pytest.raises(FrameError) as e:
        decode_frame(base, limits=limits)
    assert e.value.field == field, str(e.value)


msgpack_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64 - 1),
        st.floats(),
        st.text(max_size=5),
        st.binary(max_size=5),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(
        [
            *HEADER_FIELDS,
            "tensors.bits",
            "tensors.shape",
            "tensors.packed",
            "tensors.scales",
            "tensors.seed",
            "targets.values",
            "targets.num_classes",
            "tensors.shape.0",
            "tensors.packed.1",
        ]
    ),
    value=msgpack_values,
)
def test_a_fuzzed_header_field_is_refused_by_its_check_or_decodes_to_what_was_sent(key, value):
    """A refusal names its field (never the decoder's catch-all); a frame accepted with a fuzzed field
    validates in memory, survives re-encoding, and holds exactly the value sent."""
    h, p = split(_SMALL)
    _set(key, value)(h, p)
    try:
        data = join(h, p)
    except (OverflowError, TypeError, ValueError):
        return  # not representable in msgpack at all
    try:
        out = decode_frame(data)
    except FrameError:
        refused(data)
        return
    validate_frame(out)
    assert_same(out, decode_frame(encode_frame(out)))
    if "." not in key and hasattr(out, key):  # bit for bit: a NaN in meta included
        assert msgpack.packb(getattr(out, key), use_bin_type=True) == msgpack.packb(value, use_bin_type=True)


# ---------------------------------------------------------------------------------------------
# in-memory validation and encoding


def test_validate_frame_in_memory():
    validate_frame(make_frame(), expected_fingerprint=FP)
    f = make_frame()
    f.sample_ids[1] = f.sample_ids[0]
    with pytest.raises(FrameError) as e:
        encode_frame(f)
    assert e.value.field == "sample_ids"

    f = make_frame()
    q = f.activations[1]
    s = q.scales.copy()
    s[0] = np.inf
    f.activations[1] = QuantizedTensor(q.bits, q.group_size, q.shape, q.rotation, q.seed, q.packed, s)
    with pytest.raises(FrameError) as e:
        validate_frame(f)
    assert e.value.field == "layers[1].scales"

    f = make_frame()
    f.activations[0] = dequantize(f.activations[0])  # type: ignore[assignment]
    with pytest.raises(FrameError) as e:
        validate_frame(f)
    assert e.value.field == "layers[0]"

    f = make_frame()
    f.activations.append(f.activations[0])
    with pytest.raises(FrameError) as e:
        validate_frame(f)
    assert e.value.field == "activations"

    f = make_frame(hidden=64)
    f.activations[1] = make_frame(hidden=32).activations[1]
    with pytest.raises(FrameError) as e:
        validate_frame(f)
    assert e.value.field == "layers[1].shape"

    f = make_frame()
    with pytest.raises(FrameError) as e:
        validate_frame(f, expected_fingerprint="other")
    assert e.value.field == "fingerprint"

    f = make_frame()
    f.version = 2
    with pytest.raises(FrameError) as e:
        encode_frame(f)
    assert e.value.field == "version"


def test_encode_accepts_numpy_targets_and_rejects_unserialisable_meta():
    f = make_frame(policy="last", targets={"kind": "class", "values": np.array([0, 1, 2, 1]), "num_classes": 3})
    f.sample_ids = np.array(f.sample_ids)  # type: ignore[assignment]
    out = decode_frame(encode_frame(f))
    assert out.targets["values"] == [0, 1, 2, 1] and out.sample_ids == [100, 107, 114, 121]
    f.meta = {"when": object()}
    with pytest.raises(FrameError) as e:
        encode_frame(f)
    assert e.value.field == "meta"


def test_empty_chunk_round_trips():
    f = make_frame(n=0, policy="last", targets={"kind": "none"})
    out = decode_frame(encode_frame(f))
    assert out.num_samples == 0 and out.hidden_size == 64
    assert dequantize(out.activations[0]).shape == (0, 64)


def test_frame_defaults():
    f = make_frame()
    assert f.version == FRAME_VERSION
    assert f.num_samples == 4 and f.hidden_size == 64
    assert f.nbytes() == sum(q.nbytes() for q in f.activations)


# ---------------------------------------------------------------------------------------------
# hostile header content: free-form content bounded, maps strict (each refusal names its field)


def _raw_map(pairs: list[tuple[Any, Any]]) -> bytes:
    """A msgpack map written pair by pair (a dict cannot hold a key twice)."""
    body = b"".join(msgpack.packb(k, use_bin_type=True) + msgpack.packb(v, use_bin_type=True) for k, v in pairs)
    return b"\xde" + struct.pack(">H", len(pairs)) + body


@pytest.mark.parametrize("key", ["fingerprint", "payload_bytes", "version", "sample_ids", "targets", "meta"])
def test_a_header_field_given_twice_is_refused_naming_it(base, key):
    h, p = split(base)
    for value in (h[key], "other"):  # the same value twice is refused too: the map is strict
        data = join(None, p, raw_header=_raw_map([*h.items(), (key, value)]))
        with pytest.raises(FrameError) as e:
            decode_frame(data)
        assert e.value.field == key and "appears twice" in e.value.message, str(e.value)


@pytest.mark.parametrize(
    "where,field", [("targets", "targets.values"), ("tensors", "tensors.bits"), ("meta", "meta.chunk")]
)
def test_a_nested_key_given_twice_is_refused_naming_it(base, where, field):
    h, p = split(base)
    key = field.split(".")[1]
    inner = _raw_map([*h[where].items(), (key, h[where][key])])
    raw = _raw_map([(k, v) for k, v in h.items() if k != where])
    raw = raw[:1] + struct.pack(">H", len(h)) + raw[3:] + msgpack.packb(where) + inner
    with pytest.raises(FrameError) as e:
        decode_frame(join(None, p, raw_header=raw))
    assert e.value.field == field and "appears twice" in e.value.message, str(e.value)


LIMITS = FrameLimits()
FREE_CASES: list[tuple[str, Callable, str, str]] = [
    (
        "meta-keys",
        _set("meta", {f"k{i}": i for i in range(LIMITS.max_meta_keys + 1)}),
        "meta",
        f"has {LIMITS.max_meta_keys + 1} keys, more than the limit",
    ),
    ("meta-huge-map", _set("meta", {f"k{i}": i for i in range(100_000)}), "meta", "exceeds max_map_len"),
    ("meta-long-array", _set("meta", {"x": [0] * (LIMITS.max_meta_len + 1)}), "meta", "exceeds max_array_len"),
    ("meta-deep", _set("meta", {"x": [[[[1]]]]}), "meta", "more than 4 deep"),
    ("meta-bytes", _set("meta", {"x": "y" * LIMITS.max_meta_bytes}), "meta", "bytes encoded, the limit"),
    ("meta-many-empties", _set("meta", {f"k{i}": [[]] * 250 for i in range(64)}), "meta", "bytes encoded"),
    ("meta-int-key", _set("meta", {"x": {1: 2}}), "meta", "not allowed for map key"),
    ("meta-ext", _set("meta", {"x": msgpack.ExtType(1, b"abc")}), "meta", "max_ext_len"),
    ("targets-extra-deep", _set("targets.note", [[[[[0]]]]]), "targets.note", "more than 4 deep"),
    (
        "targets-extra-keys",
        lambda h, p: h["targets"].update({f"k{i}": 0 for i in range(LIMITS.max_meta_keys + 1)}),
        "targets",
        f"keys besides {['kind', 'values', 'num_classes', 'vocab_size']}, more than the limit",
    ),
    (
        "targets-many-keys",
        lambda h, p: h["targets"].update({f"k{i}": 0 for i in range(10_000)}),
        "targets",
        "more than its 4 fields",
    ),
    (
        "targets-extra-bytes",
        lambda h, p: h["targets"].update(a="x" * 9000, b="y" * 9000),
        "targets.b",
        "bytes encoded, the limit",
    ),
    ("values-nested", _set("targets.values", [[0, 1], [1, 0]]), "targets.values", "must not hold maps or arrays"),
    ("values-empty-lists", _set("targets.values", [[]] * 100_000), "targets.values", "must not hold maps or arrays"),
    ("ids-of-maps", _set("sample_ids", [{}, {}, {}, {}]), "sample_ids", "must not hold maps or arrays"),
    ("fingerprint-huge", _set("fingerprint", "f" * 5000), "fingerprint", "bytes of header the limits leave it"),
    ("version-list", _set("version", list(range(100))), "version", "exceeds max_array_len(0)"),
]


@pytest.mark.parametrize("mutate,field,reason", [c[1:] for c in FREE_CASES], ids=[c[0] for c in FREE_CASES])
def test_header_content_beyond_the_limits_is_refused_naming_field_and_reason(base, mutate, field, reason):
    """Each check fires by name: a decoder that wrapped every exception as 'malformed' would fail here."""
    h, p = split(base)
    mutate(h, p)
    with pytest.raises(FrameError) as e:
        decode_frame(join(h, p))
    assert (e.value.field, reason in e.value.message) == (field, True), str(e.value)
    assert "malformed frame" not in e.value.message


def test_free_form_content_within_the_limits_round_trips_and_is_counted_as_kept():
    f = make_frame()
    f.meta = {"note": "x" * 1000, "tags": list(range(200)), "nested": {"a": {"b": [1, 2]}}}
    f.targets = {**f.targets, "source": {"split": "train"}}
    out = decode_frame(encode_frame(f))
    assert out.meta == f.meta and out.targets["source"] == {"split": "train"}
    assert out.kept_nbytes() > out.nbytes() + 1000 + 200 * 8  # the header's content counts as kept
    f.meta = {"note": "x" * LIMITS.max_meta_bytes}
    with pytest.raises(FrameError) as e:
        encode_frame(f)  # what the decoder would refuse is never written
    assert e.value.field == "meta" and "bytes encoded" in e.value.message


def test_the_header_cap_follows_the_limits():
    small = FrameLimits(max_samples=64, max_layers=2, max_tokens=64 * 512)
    data = encode_frame(make_frame(n=4))
    assert decode_frame(data, limits=small).num_samples == 4
    assert small.max_header_bytes < 400_000 and FrameLimits().max_header_bytes > 30_000_000
