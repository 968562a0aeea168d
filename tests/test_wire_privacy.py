"""What leaves a device: every reply of a fleet run, captured as Flower serializes it (the ClientApp's
capture mod, run in-process by tests/inprocess_grid.py as a SuperNode runs it), holds no text of the
device's samples and no run of their token ids."""

from __future__ import annotations

import numpy as np
from inprocess_grid import run_fleet

from mobiflower.clients.device_setup import DeviceSetup
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.tasks import BUNDLED_TASK

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


def test_no_text_or_token_ids_leave_a_device(real_assets, tiny_llama, tmp_path):
    capture = tmp_path / "capture"
    run_config = {
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 24,
        "validation-samples": 8,
        "test-samples": 8,
        "rounds": 2,
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
