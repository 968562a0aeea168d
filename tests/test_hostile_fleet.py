"""A 4-device fleet (in-process, tests/inprocess_grid.py) in which the last device is hostile
(tests/hostile_device.py): every reply
after its profile is a hostile frame or a lying reply. The run finishes, the three honest devices train
to the accuracy of a clean run of the same fleet, and the summary reports the hostile device's refusals
by reason."""

from __future__ import annotations

import time
from pathlib import Path

from families import LADDER
from inprocess_grid import run_fleet

HONEST = ("device-0", "device-1", "device-2")


def _run(tiny_llama: str, scratch: Path, hostile: bool) -> dict:
    import hostile_device

    # per-device networks without dropout, one request in flight: each honest device's network trains on
    # its own frames in its own order, whatever the hostile device does
    run_config = {
        **LADDER,
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 48,
        "validation-samples": 8,
        "test-samples": 32,
        "num-server-rounds": 2,
        "chunk-size": 4,
        "eval-every": 0,
        "reduction": 4,
        "mode": "per-device",
        "dropout": 0.0,
        "in-flight": 1,
        "activation-cache": False,
        "max-retries": 4,
    }
    return run_fleet(scratch, 4, run_config, apps={3: hostile_device.app} if hostile else None)[0]


HOSTILE_FRAME_REASONS = {
    "invalid meta",
    "invalid fingerprint",
    "wrong targets",
    "invalid targets.values",
    "replayed frame",
    "invalid payload_bytes",
    "invalid magic",
    "invalid crc",
    "invalid header",
    "invalid targets",
    "invalid data",
}


def test_a_hostile_device_is_refused_alone_and_the_honest_ones_train_as_in_a_clean_run(
    real_assets, tiny_llama, tmp_path
):
    t0 = time.perf_counter()
    clean = _run(tiny_llama, tmp_path / "clean", False)
    t1 = time.perf_counter()
    hostile = _run(tiny_llama, tmp_path / "hostile", True)
    t2 = time.perf_counter()
    bad = hostile["devices"]["device-3"]
    print(f"\nclean run {t1 - t0:.1f} s, hostile run {t2 - t1:.1f} s")
    print(
        "honest test accuracy, clean vs hostile run:",
        {d: (clean["devices"][d]["test_accuracy"], hostile["devices"][d]["test_accuracy"]) for d in HONEST},
    )
    print("device-3 frames refused by reason:", bad["frames_refused"])
    print("device-3 replies refused by reason:", bad["replies_refused"])
    print(
        "device-3 frames",
        bad["frames"],
        "accepted frames in the run",
        hostile["frames_accepted"],
        "refused",
        hostile["frames_refused"],
        "dropped",
        bad["dropped"],
    )
    for device in HONEST:  # the honest devices: untouched by it
        account = hostile["devices"][device]
        assert not account["failures"] and not account["frames_refused"] and not account["replies_refused"]
        assert account["samples_trained"] == clean["devices"][device]["samples_trained"] == 24
        assert abs(account["test_accuracy"] - clean["devices"][device]["test_accuracy"]) <= 0.125  # one sample
        assert account["delivered"] == 1
    assert (
        abs(
            sum(hostile["devices"][d]["test_accuracy"] for d in HONEST)
            - sum(clean["devices"][d]["test_accuracy"] for d in HONEST)
        )
        / 3
        <= 0.05
    )
    # the hostile device: every kind refused alone, counted by reason, and reported
    # which hostile kinds a run meets depends on how Flower spreads requests over worker processes (each
    # cycles through them on its own), so this asks for several of them; tests/test_hostile_frames.py and
    # test_hostile_replies.py refuse every kind one by one with its exact reason
    frame_reasons = set(bad["frames_refused"])
    assert len(frame_reasons) >= 3 and sum(bad["frames_refused"].values()) >= 4, frame_reasons
    assert frame_reasons <= HOSTILE_FRAME_REASONS, frame_reasons - HOSTILE_FRAME_REASONS
    reply_reasons = set(bad["replies_refused"])
    # its evaluate replies (accuracy 7 or NaN over -3 samples) are refused on the first bad key checked
    assert "deliver: digest" in reply_reasons and reply_reasons & {"evaluate: accuracy", "evaluate: samples"}
    assert any(r.startswith("forward: ") for r in reply_reasons), reply_reasons
    assert bad["delivered"] == 0 and "test_accuracy" not in bad
    assert hostile["frames"] == hostile["frames_accepted"] + hostile["frames_refused"]
    assert hostile["replies_refused"] == sum(bad["replies_refused"].values())
