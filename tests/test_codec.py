"""Tests of the low-bit activation codec (mobiflower.platform.codec)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobiflower.platform import codec as C
from mobiflower.platform.codec import (
    SUPPORTED_BITS,
    CodecError,
    QuantizedTensor,
    dequantize,
    expected_nbytes,
    quantize,
    relative_error,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def outlier_data(shape: tuple[int, ...], seed: int = 0, n_outliers: int = 6, magnitude: float = 30.0) -> torch.Tensor:
    """Gaussian hidden states with a few huge outlier channels, like an LLM's residual stream."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    channels = torch.randperm(shape[-1], generator=g)[:n_outliers]
    x[..., channels] *= magnitude
    return x


# ---------------------------------------------------------------------------------------------
# round trip


@FAST
@given(
    shape=st.lists(st.integers(1, 7), min_size=0, max_size=2).flatmap(
        lambda lead: st.integers(1, 300).map(lambda last: tuple(lead) + (last,))
    ),
    bits=st.sampled_from(SUPPORTED_BITS),
    log_group=st.integers(0, 8),
    rotation=st.sampled_from(C.ROTATIONS),
    seed=st.integers(0, 2**64 - 1),
    out_dtype=st.sampled_from([torch.float32, torch.float16, torch.float64]),
)
def test_round_trip_shape_dtype_and_sizes(shape, bits, log_group, rotation, seed, out_dtype):
    gs = 1 << log_group
    x = torch.randn(shape)
    q = quantize(x, bits, gs, rotation, seed)
    assert q.shape == shape and q.bits == bits and q.group_size == gs and q.seed == seed
    assert q.rotation == ("none" if bits == 16 else rotation)
    assert q.packed.dtype == np.uint8 and q.packed.ndim == 1
    assert q.scales.dtype == np.float16 and q.scales.ndim == 1
    assert not q.packed.flags.writeable and not q.scales.flags.writeable
    assert (q.packed.nbytes, q.scales.nbytes) == expected_nbytes(shape, bits, gs)
    assert q.nbytes() == sum(expected_nbytes(shape, bits, gs))
    y = dequantize(q, out_dtype)
    assert y.shape == x.shape and y.dtype == out_dtype and y.is_contiguous()
    assert torch.isfinite(y).all()
    # loose sanity bound that holds for any shape (tight bounds are tested below)
    assert relative_error(x, y) < {16: 1e-3, 8: 0.05, 4: 0.35, 2: 0.9}[bits]


@pytest.mark.parametrize("shape", [(0,), (0, 576), (16, 0), (3, 0, 5)])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_empty_tensors(shape, bits):
    q = quantize(torch.zeros(shape), bits)
    assert q.nbytes() == 0 and q.shape == shape
    assert dequantize(q).shape == shape


def test_input_dtypes_and_inference_tensors():
    x = outlier_data((8, 128))
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        y = dequantize(quantize(x.to(dt), 4))
        assert relative_error(x.to(dt).float(), y) < 0.12
    with torch.inference_mode():
        xi = x * 1.0
        qi = quantize(xi, 4)  # inside inference mode (the device's forward hook)
    q2 = quantize(xi, 4)  # an inference tensor used outside inference mode
    assert np.array_equal(qi.packed, q2.packed)
    assert np.array_equal(qi.packed, quantize(x, 4).packed)


def test_quantize_does_not_touch_or_alias_the_input():
    x = outlier_data((4, 64))
    before = x.clone()
    for bits in SUPPORTED_BITS:
        for rotation in C.ROTATIONS:
            q = quantize(x, bits, 64, rotation)
            assert torch.equal(x, before)
            packed = q.packed.copy()
            x.add_(1.0)  # the caller reuses its buffer: the quantized copy must not change
            assert np.array_equal(q.packed, packed)
            x.copy_(before)
    x16 = before.half()
    q = quantize(x16, 16)
    x16.zero_()
    assert torch.equal(dequantize(q, torch.float16), before.half())


def test_deterministic_and_seed_dependent():
    x = outlier_data((16, 576))
    a, b = quantize(x, 4, seed=3), quantize(x, 4, seed=3)
    assert np.array_equal(a.packed, b.packed) and np.array_equal(a.scales, b.scales)
    c = quantize(x, 4, seed=4)
    assert not np.array_equal(a.packed, c.packed)
    assert relative_error(x, dequantize(c)) < 0.12


# ---------------------------------------------------------------------------------------------
# accuracy


@pytest.fixture(scope="module")
def outliers() -> torch.Tensor:
    return outlier_data((64, 576), seed=1)


def test_error_bounds_with_outlier_channels(outliers):
    x = outliers
    err = {bits: relative_error(x, dequantize(quantize(x, bits))) for bits in (8, 4, 2)}
    assert err[8] < 0.02
    assert err[4] < 0.12
    assert err[2] < 0.5
    assert err[8] < err[4] < err[2]


def test_hadamard_beats_no_rotation_on_outliers(outliers):
    x = outliers
    had = relative_error(x, dequantize(quantize(x, 4, rotation="hadamard")))
    none = relative_error(x, dequantize(quantize(x, 4, rotation="none")))
    assert none > 0.12  # the problem is real on this data
    assert had < 0.5 * none


def test_error_bounds_gaussian():
    x = torch.randn(32, 576, generator=torch.Generator().manual_seed(2))
    err = {bits: relative_error(x, dequantize(quantize(x, bits))) for bits in (8, 4, 2)}
    assert err[8] < 0.01 and err[4] < 0.1 and err[2] < 0.4


def test_two_bit_refinement_beats_plain_min_max(outliers, monkeypatch):
    x = outliers
    refined = relative_error(x, dequantize(quantize(x, 2)))
    monkeypatch.setitem(C._REFINE_STEPS, 2, 0)
    monkeypatch.setitem(C._INIT_CLIP_STD, 2, None)
    plain = relative_error(x, dequantize(quantize(x, 2)))
    assert refined < 0.9 * plain


@FAST
@given(st.lists(st.floats(-65504, 65504, width=16), min_size=1, max_size=200))
def test_16_bits_exact_for_float16_values(values):
    x = torch.tensor(values, dtype=torch.float32)
    y = dequantize(quantize(x, 16))
    assert torch.equal(x, y)
    assert torch.equal(dequantize(quantize(x, 16), torch.float16), x.half())


def test_16_bits_out_of_range_raises():
    assert dequantize(quantize(torch.tensor([65504.0, -65504.0]), 16)).tolist() == [65504.0, -65504.0]
    for v in (70000.0, -1e6, 1e30):
        with pytest.raises(CodecError, match="float16 range"):
            quantize(torch.tensor([1.0, v]), 16)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rotation", C.ROTATIONS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_inf_input_raises(bits, rotation, bad):
    x = torch.randn(4, 64)
    x[2, 17] = bad
    with pytest.raises(CodecError, match="NaN or Inf"):
        quantize(x, bits, 64, rotation)


@pytest.mark.parametrize("bits", (8, 4, 2))
def test_group_beyond_float16_after_rotation_raises(bits):
    x = torch.full((1, 64), 60000.0)
    with pytest.raises(CodecError, match="float16 range"):
        quantize(x, bits)  # the rotation concentrates the block into one 480000 value


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("rotation", C.ROTATIONS)
def test_all_zero_and_constant_input(bits, rotation):
    z = dequantize(quantize(torch.zeros(3, 100), bits, 64, rotation))
    assert torch.equal(z, torch.zeros(3, 100))
    c = torch.full((2, 64), 0.75)
    y = dequantize(quantize(c, bits, 64, rotation))
    assert torch.isfinite(y).all()
    if rotation == "none":  # a constant group has scale 0 and decodes to its offset
        assert relative_error(c, y) < 1e-3
    else:  # rotated, a constant block is an ordinary (spiky) block
        assert relative_error(c, y) < {16: 1e-3, 8: 0.01, 4: 0.12, 2: 0.5}[bits]


# ---------------------------------------------------------------------------------------------
# wire format


@pytest.mark.parametrize("shape", [(16, 576), (16, 88, 576), (4, 2048), (1, 896), (8, 3, 768)])
@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_wire_size_close_to_ideal(shape, bits):
    x = torch.randn(shape)
    q = quantize(x, bits)
    numel = math.prod(shape)
    ideal = numel * bits / 8 + q.scales.nbytes
    assert numel * bits / 8 <= q.nbytes() <= 1.03 * ideal
    if bits < 16:
        assert q.scales.nbytes == 2 * 2 * numel // 64  # one fp16 scale + one fp16 offset per group


def test_expected_nbytes_pads_the_last_dim():
    # 100 -> 128 values per row, 2 groups per row
    assert expected_nbytes((3, 100), 4, 64) == (3 * 128 // 2, 3 * 2 * 4)
    assert expected_nbytes((3, 100), 2, 64) == (3 * 128 // 4, 3 * 2 * 4)
    assert expected_nbytes((3, 100), 8, 64) == (3 * 128, 3 * 2 * 4)
    assert expected_nbytes((3, 100), 16, 64) == (600, 0)
    assert expected_nbytes((3,), 2, 1) == (1, 12)  # 3 codes of 2 bits -> one byte
    with pytest.raises(CodecError):
        expected_nbytes((3, 100), 3, 64)
    with pytest.raises(CodecError):
        expected_nbytes((3, -1), 4, 64)


def test_bit_packing_is_little_endian_within_a_byte():
    q = quantize(torch.tensor([[0.0, 1.0]]), 4, 2, "none")
    assert q.packed.tolist() == [0xF0]  # codes 0, 15: first code in the low nibble
    q = quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2, 4, "none")
    assert q.packed.tolist() == [0b11_10_01_00]
    assert q.scales.tolist() == [1.0, 0.0]  # (scale, offset)
    q = quantize(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), 2, 2, "none")
    assert q.packed.tolist() == [0b11_00_11_00]
    assert q.scales.reshape(-1, 2)[:, 1].tolist() == [0.0, 2.0]  # interleaved (scale, offset) per group
    q = quantize(torch.tensor([[0.0, 1.0, 2.0]]), 2, 1, "none")  # 3 codes padded to one byte
    assert q.packed.nbytes == 1
    assert dequantize(q).tolist() == [[0.0, 1.0, 2.0]]


def test_sign_vectors_are_pinned():
    # The rotation must be identical on every device and server release: pin the generator.
    signs = "".join("+" if v > 0 else "-" for v in C._signs_np(0, 32))
    assert signs == "-++-+++-+-+-----+-+----+--++---+"
    signs = "".join("+" if v > 0 else "-" for v in C._signs_np(2**64 - 1, 32))
    assert signs == "--++---+-++-+-+-+++++-+++--+-++-"


@pytest.mark.parametrize("gs", [1, 2, 16, 64, 512, 1024, 2048])
def test_rotation_is_orthonormal_and_inverted(gs):
    g = torch.randn(5, gs, dtype=torch.float32)
    y = C.hadamard_rotate(g, 7)
    assert torch.allclose(y.norm(dim=-1), g.norm(dim=-1), rtol=1e-4)
    assert torch.allclose(C.hadamard_unrotate(y, 7), g, atol=1e-4)
    # dense and butterfly forms are the same transform
    s = torch.from_numpy(C._signs_np(7, gs))
    assert torch.allclose(C._fwht(g * s) / math.sqrt(gs), y, atol=1e-4)


def test_hadamard_spreads_an_outlier():
    g = torch.zeros(1, 64)
    g[0, 5] = 64.0
    y = C.hadamard_rotate(g, 0)
    assert torch.allclose(y.abs(), torch.full((1, 64), 8.0))


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(bits=3),
        dict(bits=32),
        dict(bits=4.0),
        dict(bits=True),
        dict(group_size=48),
        dict(group_size=0),
        dict(group_size=1 << 13),
        dict(rotation="fourier"),
        dict(seed=-1),
        dict(seed=2**64),
    ],
)
def test_bad_parameters_raise(kwargs):
    args = dict(bits=4, group_size=64, rotation="hadamard", seed=0) | kwargs
    with pytest.raises(CodecError):
        quantize(torch.randn(2, 64), **args)


def test_bad_inputs_raise():
    with pytest.raises(CodecError):
        quantize(torch.tensor(1.0), 4)
    with pytest.raises(CodecError):
        quantize(torch.arange(64), 4)
    with pytest.raises(CodecError):
        quantize(np.zeros((2, 64), np.float32), 4)  # type: ignore[arg-type]


def test_dequantize_rejects_inconsistent_tensors():
    q = quantize(torch.randn(4, 64), 4)
    bad_len = QuantizedTensor(4, 64, q.shape, "hadamard", 0, q.packed[:-1], q.scales)
    with pytest.raises(CodecError, match="packed"):
        dequantize(bad_len)
    s = q.scales.copy()
    s[1] = np.nan
    with pytest.raises(CodecError, match="NaN"):
        dequantize(QuantizedTensor(4, 64, q.shape, "hadamard", 0, q.packed, s))
    with pytest.raises(CodecError):
        dequantize(QuantizedTensor(5, 64, q.shape, "hadamard", 0, q.packed, q.scales))
    h = quantize(torch.randn(4, 64), 16)
    p = h.packed.copy()
    p[6:8] = np.array([np.inf], dtype="<f2").view(np.uint8)
    with pytest.raises(CodecError, match="NaN or Inf"):
        dequantize(QuantizedTensor(16, 64, h.shape, "none", 0, p, h.scales))
    with pytest.raises(CodecError):
        dequantize(QuantizedTensor(4, 64, q.shape, "hadamard", 0, q.packed.astype(np.int16), q.scales))


@FAST
@given(
    rows=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    trailing=st.lists(st.integers(1, 3), max_size=1).flatmap(
        lambda lead: st.integers(1, 70).map(lambda last: tuple(lead) + (last,))
    ),
    bits=st.sampled_from(SUPPORTED_BITS),
    log_group=st.integers(0, 6),
)
def test_concatenate_equals_quantizing_each_part(rows, trailing, bits, log_group):
    gs = 1 << log_group
    xs = [torch.randn((r,) + trailing) for r in rows]
    parts = [quantize(x, bits, gs, "hadamard", 5) for x in xs]
    joined = C.concatenate(parts)
    assert joined.shape == (sum(rows),) + trailing
    assert (joined.packed.nbytes, joined.scales.nbytes) == expected_nbytes(joined.shape, bits, gs)
    assert torch.equal(dequantize(joined), torch.cat([dequantize(q) for q in parts]))


def test_concatenate_repacks_parts_that_end_mid_byte():
    xs = [torch.randn(1, 3), torch.randn(2, 3), torch.randn(1, 3)]  # 2-bit codes, group 1: 3 and 6 codes
    parts = [quantize(x, 2, 1, "none") for x in xs]
    joined = C.concatenate(parts)
    assert joined.packed.nbytes == 3  # 12 codes, not 1 + 2 + 1 bytes
    assert torch.equal(dequantize(joined), torch.cat([dequantize(q) for q in parts]))


def test_concatenate_rejects_mismatched_parts():
    a = quantize(torch.randn(2, 64), 4)
    with pytest.raises(CodecError):
        C.concatenate([])
    with pytest.raises(CodecError):
        C.concatenate([a, quantize(torch.randn(2, 64), 2)])
    with pytest.raises(CodecError):
        C.concatenate([a, quantize(torch.randn(2, 32), 4)])
    with pytest.raises(CodecError):
        C.concatenate([a, quantize(torch.randn(2, 64), 4, seed=1)])
    with pytest.raises(CodecError):
        C.concatenate([quantize(torch.randn(64), 4), quantize(torch.randn(64), 4)])
    assert C.concatenate([a]) is a


def test_relative_error():
    x = torch.tensor([3.0, 4.0])
    assert relative_error(x, torch.tensor([3.0, 4.0])) == 0.0
    assert relative_error(x, torch.tensor([0.0, 4.0])) == pytest.approx(0.6)
    assert relative_error(np.array([3.0, 4.0]), np.array([3.0, 4.5])) == pytest.approx(0.1)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.zeros(3), torch.ones(3)) == math.inf
    with pytest.raises(CodecError):
        relative_error(torch.zeros(3), torch.zeros(4))


def test_quantize_is_fast_enough():
    # A forward hook quantizes every tapped layer: a [16, 576] state must take milliseconds.
    x = outlier_data((16, 576))
    for bits in (8, 4, 2):
        quantize(x, bits)
        times = []
        for _ in range(5):
            t = time.perf_counter()
            quantize(x, bits)
            times.append(time.perf_counter() - t)
        assert sorted(times)[2] < 0.05, (bits, times)  # generous: the CI box is shared
