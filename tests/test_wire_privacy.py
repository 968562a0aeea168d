"""What leaves a device: every reply of a fleet run, captured as Flower serializes it (the ClientApp's
capture mod, run in-process by tests/inprocess_grid.py as a SuperNode runs it), holds no text of the
device's samples and no run of their token ids in raw bytes; and every frame's msgpack header holds no
more than the wire table (platform/wire_table.py) says: a classification frame no token id at all, a
causal-LM frame the text's next-token ids in its targets and nowhere else."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from inprocess_grid import run_fleet

from mobiflower.clients import runtime as device_runtime
from mobiflower.clients.device_setup import DeviceSetup
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.frames import encode_frame, raw_header
from mobiflower.platform.tasks import BUNDLED_TASK, CausalLMTask, Example
from mobiflower.platform.wire_table import audit_frame, wire_row

WINDOW = 6  # consecutive token ids that would count as a leak


def _needles(texts: list[str], token_ids: list[list[int]]) -> list[tuple[str, bytes]]:
    """Byte patterns whose presence in a capture would mean data left the device."""
    out = []
    for text in texts:
        raw = text.strip().encode()
        out.append(("text", raw[:32]))
        out.append(("text", raw[-32:]))
    for ids in token_ids:
        for start in range(0, max(1, len(ids) - WINDOW), WINDOW):
            window = np.asarray(ids[start : start + WINDOW])
            if len(window) == WINDOW:
                out += [(f"token ids as {dt}", window.astype(dt).tobytes()) for dt in ("<i8", "<i4")]
    return out


def _leaks(blob: bytes, needles: list[tuple[str, bytes]]) -> list[str]:
    return sorted({kind for kind, needle in needles if needle and needle in blob})


def test_the_scanner_finds_a_planted_leak():
    needles = _needles(["a gripping, beautiful film about nothing in particular"], [list(range(40, 60))])
    assert _leaks(b"\x00" * 10 + b"a gripping, beautiful film about nothing" + b"\x01", needles) == ["text"]
    planted = b"xx" + np.arange(40, 60, dtype="<i8").tobytes()
    assert "token ids as <i8" in _leaks(planted, needles)
    assert _leaks(bytes(range(256)) * 4, needles) == []


@pytest.fixture
def sent_frames(monkeypatch) -> dict[str, list[bytes]]:
    """Every encoded frame each device's runtime hands to its reply, by device id."""
    sent: dict[str, list[bytes]] = {}
    encode = device_runtime.DeviceRuntime.encode

    def recording(self, frame):
        blob = encode(self, frame)
        sent.setdefault(self.device_id, []).append(blob)
        return blob

    monkeypatch.setattr(device_runtime.DeviceRuntime, "encode", recording)
    return sent


def _device_token_ids(run_config, partition, devices, backbone, task=None):
    setup = DeviceSetup.from_configs(run_config, {"partition-id": partition, "num-partitions": devices})
    data = setup.data()
    examples = data.train + data.validation + data.test
    runtime = DeviceRuntime(backbone, ForwardConfig(), task=task or setup.task)
    return examples, [e.ids for e in runtime.encode_samples(examples)]


def test_the_audit_fails_a_frame_that_carries_more_than_the_table(tiny_llama):
    """Broken on purpose: token ids planted in a header's meta, a classification frame whose targets are
    token ids, a header key the format does not have; each is named, and the honest frames pass."""
    backbone = Backbone.load(tiny_llama, num_taps=2)
    examples = [Example(i, f"a quiet warm film about a cold long story number {i}", i % 2) for i in range(4)]
    runtime = DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad"))
    ids = [e.ids for e in runtime.encode_samples(examples)]
    frame, _ = runtime.make_frame(examples)
    row = wire_row("classification", False)
    assert audit_frame(encode_frame(frame), row, ids) == []
    planted = dataclasses.replace(frame, meta={**frame.meta, "debug": ids[2][3:12]})
    assert audit_frame(encode_frame(planted), row, ids) == [
        "header.meta.debug holds 6 consecutive token ids of a sample"
    ]
    lm = DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad"), task=CausalLMTask())
    lm_frame, _ = lm.make_frame(examples)
    lm_ids = [e.ids for e in lm.encode_samples(examples)]
    assert audit_frame(encode_frame(lm_frame), wire_row("causal-lm", False), lm_ids) == []
    assert audit_frame(encode_frame(lm_frame), row, lm_ids) == [
        "targets of kind 'tokens'; the table says 'class' for classification",
        "header.targets.values holds 6 consecutive token ids of a sample",
    ]
    blob = encode_frame(frame)
    assert raw_header(blob)["targets"]["kind"] == "class"
    extra = blob.replace(b"\xa4meta", b"\xa4mega", 1)  # a key the format does not know (same length)
    assert audit_frame(extra, row, ids)[0] == "header key 'mega' is not in the frame format"


def test_no_text_or_token_ids_leave_a_device(real_assets, tiny_llama, tmp_path, sent_frames):
    capture = tmp_path / "capture"
    run_config = {
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 24,
        "validation-samples": 8,
        "test-samples": 8,
        "num-server-rounds": 2,
        "chunk-size": 8,
        "eval-every": 1,
        "reduction": 4,
        "token-policy": "nonpad",
        "capture-dir": str(capture),
    }
    summary, _ = run_fleet(tmp_path / "sim", 2, run_config)

    backbone = Backbone.load(tiny_llama, num_taps=2)
    for partition in (0, 1):
        files = sorted((capture / f"partition-{partition}").glob("*.bin"))
        kinds = {f.name.split("-", 1)[1].removesuffix(".bin") for f in files}
        assert kinds == {"query-profile", "train-forward", "evaluate", "train-deliver"}, kinds
        blob = b"".join(f.read_bytes() for f in files)
        assert len(blob) > summary["devices"][f"device-{partition}"]["frame_bytes"]  # the frames are in it
        data = DeviceSetup.from_configs(run_config, {"partition-id": partition, "num-partitions": 2}).data()
        examples = data.train + data.validation + data.test
        ids = [backbone.tokenize([BUNDLED_TASK.render(e.text)])["input_ids"][0].tolist() for e in examples]
        needles = _needles([e.text for e in examples], ids)
        assert len(needles) > 100
        assert _leaks(blob, needles) == [], f"device {partition} sent its data"
        frames = sent_frames[f"device-{partition}"]
        assert len(frames) >= 3  # training chunks and validation
        for frame in frames:
            assert audit_frame(frame, wire_row("classification", False), ids) == []


def test_a_causal_lm_frame_carries_the_text_as_its_targets_and_nowhere_else(
    real_assets, tiny_llama, tmp_path, sent_frames
):
    """What the wire table says of causal-LM, held against a fleet run: the targets are the text's next
    tokens (the server reads the text from them), and no other header field holds a run of them."""
    run_config = {"model": tiny_llama, "task": "causal-lm", "num-taps": 2, "train-samples": 12}
    run_config |= {
        "validation-samples": 4,
        "test-samples": 4,
        "num-server-rounds": 1,
        "chunk-size": 6,
        "max-length": 32,
    }
    run_fleet(tmp_path, 2, run_config)
    backbone = Backbone.load(tiny_llama, num_taps=2)
    for partition in (0, 1):
        _, ids = _device_token_ids(run_config, partition, 2, backbone)
        frames = sent_frames[f"device-{partition}"]
        assert frames
        for blob in frames:
            assert audit_frame(blob, wire_row("causal-lm", False), ids) == []
        targets = [t for blob in frames for t in raw_header(blob)["targets"]["values"] if t >= 0]
        text = {t for sample in ids for t in sample}
        assert len(targets) > 50 and set(targets) <= text  # the targets are the text's own tokens
