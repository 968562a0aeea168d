"""Bad input at the server's front door: each kind refused alone, counted, and the store untouched."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_frames import join, split  # the frame tests' header surgery (re-encodes with a valid CRC)

from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import quantize
from mobiflower.platform.data import Example
from mobiflower.platform.frames import FrameLimits, encode_frame
from mobiflower.platform.intake import FrameIntake
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig
from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
from mobiflower.platform.trainer import TrainConfig


@pytest.fixture(scope="module")
def setup(tiny_llama):
    backbone = Backbone.load(tiny_llama, num_taps=2)
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=8), device_id="device-0")

    def frame(ids, labels=None, **forward):
        examples = [
            Example(id=i, text=f"sample {i} was {'great' if i % 2 else 'dull'}", label=(labels or {}).get(i, i % 2))
            for i in ids
        ]
        cfg = dataclasses.replace(runtime.config, **forward) if forward else None
        return runtime.make_frame(examples, config=cfg)[0]

    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=backbone.layers,
        fingerprint=backbone.fingerprint,
        family="ladder",
        reduction=4,
        dropout=0.0,
    )
    return backbone, frame, config, backbone.frozen_head_state(lm_head=False)


def _intake(setup, limits=FrameLimits()):
    _, frame, config, frozen = setup
    store = SideNetworkStore(
        StoreConfig("shared"),
        lambda: build_side_network(config, frozen),
        TrainConfig(epochs=2, batch_size=4),
        {"device-0": 64},
        chunk_size=8,
    )
    intake = FrameIntake(store, config, limits)
    assert intake.offer("device-0", encode_frame(frame(range(8)))).accepted  # a state worth protecting
    return intake


def _header(blob: bytes, mutate) -> bytes:
    header, payload = split(blob)
    changed = mutate(header, payload)
    return join(header, changed if isinstance(changed, bytes) else payload)


def _nan_scale(h, p):
    off = h["tensors"]["scales"][0][0]
    b = bytearray(p)
    b[off : off + 2] = np.array([np.nan], dtype="<f2").tobytes()
    return bytes(b)


def _bad_inputs(setup) -> dict[str, bytes]:
    """At least 12 kinds of bad frame, each built from a valid one."""
    backbone, frame, config, _ = setup
    good = encode_frame(frame(range(100, 108)))
    other_fp = dataclasses.replace(frame(range(200, 204)), fingerprint="llama-d64-L4-float32-0000000000000000")
    return {
        "truncated payload": good[:-9],
        "unknown schema version": _header(good, lambda h, p: h.update(version=99)),
        "mismatched backbone fingerprint": encode_frame(other_fp),
        "declared payload size disagrees": _header(good, lambda h, p: h.update(payload_bytes=h["payload_bytes"] + 4)),
        "over the size limit": encode_frame(frame(range(300, 340))),  # the intake's limit is 8 samples
        "NaN scale": _header(good, _nan_scale),
        "out-of-range label": _header(good, lambda h, p: h["targets"]["values"].__setitem__(0, 7)),
        "label count disagrees": _header(good, lambda h, p: h["targets"]["values"].pop()),
        "duplicated sample ids": _header(good, lambda h, p: h["sample_ids"].__setitem__(1, h["sample_ids"][0])),
        "missing header field": _header(good, lambda h, p: h.pop("seq_lengths")),
        "unsupported bit-width": _header(
            good, lambda h, p: h["tensors"].__setitem__("bits", [3] * len(h["tensors"]["bits"]))
        ),
        "wrong layers": _header(good, lambda h, p: h.update(layers=[0, 1][: len(h["layers"])])),
        "wrong token policy": encode_frame(frame(range(400, 404), token_policy="nonpad")),
        "wrong number of classes": _header(good, lambda h, p: h["targets"].update(num_classes=5)),
        "garbage": b"\x00" * 64,
        "empty frame": encode_frame(
            dataclasses.replace(
                frame(range(800, 801)),
                sample_ids=[],
                token_counts=[],
                seq_lengths=[],
                targets={"kind": "class", "values": [], "num_classes": 2},
                activations=[
                    quantize(torch.zeros(0, backbone.hidden_size), 8, 64, "hadamard", 0) for _ in config.layers
                ],
            )
        ),
    }


def test_each_kind_of_bad_frame_is_refused_alone_and_changes_nothing(setup):
    intake = _intake(setup, FrameLimits(max_samples=8))
    bad = _bad_inputs(setup)
    assert len(bad) >= 12
    before = intake.store.state_digest()
    reasons = {}
    for kind, blob in bad.items():
        result = intake.offer("device-0", blob)
        assert not result.accepted, kind
        assert result.message, kind  # a clear error, naming what is wrong
        reasons[kind] = result.reason
        assert intake.store.state_digest() == before, f"{kind} changed the store"
    assert sum(intake.refused["device-0"].values()) == len(bad)
    # the run goes on: a good frame after all of that still trains
    _, frame, _, _ = setup
    assert intake.offer("device-0", encode_frame(frame(range(500, 508)))).accepted
    assert intake.store.state_digest() != before
    assert reasons["mismatched backbone fingerprint"] == "invalid fingerprint"
    assert reasons["wrong layers"] == "wrong layers" and reasons["wrong number of classes"] == "wrong targets"
    assert reasons["empty frame"] == "empty frame"


def test_replayed_frames_and_repeated_samples_are_refused(setup):
    _, frame, _, _ = setup
    intake = _intake(setup)
    blob = encode_frame(frame(range(600, 608)))
    assert intake.offer("device-0", blob).accepted
    digest = intake.store.state_digest()
    assert intake.offer("device-0", blob).reason == "replayed frame"
    overlap = intake.offer("device-0", encode_frame(frame(range(604, 612))))
    assert overlap.reason == "repeated samples" and "id 604" in overlap.message
    assert intake.store.state_digest() == digest
    assert intake.report() == {"device-0": {"replayed frame": 1, "repeated samples": 1}}
    intake.new_pass()  # without a cache every round re-sends every sample: that is not a repeat
    assert intake.offer("device-0", encode_frame(frame(range(604, 612)))).accepted


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_frames_are_refused_or_taken_whole(setup, data):
    """Random byte edits, truncations and appends: a refused frame leaves the store byte-identical."""
    _, frame, _, _ = setup
    intake = _intake(setup)
    blob = bytearray(encode_frame(frame(range(700, 704))))
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "append"]))
        if op == "flip":
            pos = data.draw(st.integers(0, len(blob) - 1))
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
        else:
            blob += data.draw(st.binary(min_size=1, max_size=16))
        if not blob:
            break
    before = intake.store.state_digest()
    result = intake.offer("device-0", bytes(blob))
    if not result.accepted:
        assert intake.store.state_digest() == before and result.reason
