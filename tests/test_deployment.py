"""A real Flower deployment on 127.0.0.1: one SuperLink, three SuperNodes, one of them killed mid-run.

Each SuperNode reads its own data file (``--node-config 'data="..." device-id="..."'``: a
three-label JSON Lines file written here, not the bundled data), splits its own validation and test,
and starts a fresh ClientApp process per message, as on a real fleet. Once the fleet is profiled the third SuperNode is
SIGKILLed: its work must be reported lost, never silently gone, and the other two must side-tune,
install what the server delivered and score their test splits. One deployment serves every test
here (starting one costs most of a minute, and Flower takes about as long to notice the dead node);
every process is stopped by pid when it ends, also when an assertion fails. The backbone is a tiny
random Llama: what is measured is the deployment, not accuracy (``test_local`` and the benchmarks
measure that on the bundled model).
"""

from __future__ import annotations

import os
import signal
import threading

import psutil
import pytest

from mobiflower.platform.pretrained_tail import read_peft_adapter
from mobiflower.simulations.flower_config import app_dir_for_run
from mobiflower.simulations.flower_processes import MARKER_VAR
from mobiflower.simulations.loopback import LoopbackDeployment
from mobiflower.simulations.simulate import default_app_config

pytestmark = [pytest.mark.slow, pytest.mark.real_model]
DEVICES, TRAIN_PER_DEVICE, TEST_PER_DEVICE, CHUNK = 3, 16, 4, 8
ROWS_PER_DEVICE = 24  # 16 train, 4 validation, 4 test at fractions 1/6 and 1/6
LABELS = ("low", "mid", "high")


def _own_file(path, device: int):
    """A device's own labelled file: three labels by name, a user column, texts of its own."""
    import json

    rows = [
        {
            "text": f"device {device} reading {i}: {'calm ' * (i % 3)}value {i % 3}",
            "label": LABELS[i % 3],
            "user": f"u{device}",
        }
        for i in range(ROWS_PER_DEVICE)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _marked(scratch_root) -> list[psutil.Process]:
    """Processes still carrying this test's scratch marker (what simulations.flower_processes uses to stop them)."""
    left = []
    for proc in psutil.process_iter(["pid"]):
        try:
            marker = proc.environ().get(MARKER_VAR, "")
        except (psutil.Error, OSError):
            continue
        if marker.startswith(str(scratch_root)) and proc.status() != psutil.STATUS_ZOMBIE:
            left.append(proc)
    return left


@pytest.fixture(scope="module")
def deployment(real_assets, tiny_llama, tmp_path_factory):
    """Run the default job (the pretrained tail) once; returns (summary, Flower's traffic, processes left)."""
    import json

    from mobiflower.platform.prepared_weights import ensure_prepared

    scratch = tmp_path_factory.mktemp("deploy").resolve()
    # int8 devices read a prepared, memory-mapped copy (built here once, as `mobiflower assets` does for the
    # bundled model): each message's fresh ClientApp process then starts without importing transformers
    ensure_prepared(tiny_llama, "int8")
    run_dir = scratch / "run"
    run_config = {
        "model": tiny_llama,
        "num-taps": 2,
        "labels": ",".join(LABELS),
        "prompt-template": "Reading: {text}\nLevel:",
        "validation-fraction": 1 / 6,
        "test-fraction": 1 / 6,
        "num-server-rounds": 2,
        "chunk-size": CHUNK,
        "eval-every": 0,
        "reduction": 4,
        "bits": 8,
        "weight-precision": "int8",
        "request-timeout": 240.0,
        "run-dir": str(run_dir),
    }
    env = {"MOBIFLOWER_HOME": os.environ["MOBIFLOWER_HOME"]} if "MOBIFLOWER_HOME" in os.environ else {}
    node_configs = [
        {
            "data": str(_own_file(scratch / f"device-{i}.jsonl", i)),
            "device-id": f"phone-{i}",
            "side-network-dir": str(scratch / "devices" / f"node-{i}"),
        }
        for i in range(DEVICES)
    ]
    killed = threading.Event()
    try:
        with LoopbackDeployment(scratch, DEVICES, node_configs=node_configs, extra_env=env) as flower:
            victim = flower.supernodes[-1]

            def on_line(line: str) -> None:  # once its profile is in, the last device dies
                if f"device phone-{DEVICES - 1} (node" in line and not killed.is_set():
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.set()

            result = flower.run(
                app_dir_for_run(scratch, default_app_config()), run_config, on_line=on_line, timeout_s=600
            )
            traffic = flower.traffic(result.run_id)
    finally:
        left = _marked(scratch)
        for proc in left:
            proc.kill()
    assert killed.is_set() and result.ok, result.details
    return json.loads((run_dir / "summary.json").read_text()), traffic, left


def _split(summary) -> tuple[list[dict], list[dict]]:
    devices = list(summary["devices"].values())
    return [d for d in devices if not d["dropped"]], [d for d in devices if d["dropped"]]


def test_every_process_is_stopped_when_the_deployment_ends(deployment):
    _, _, left = deployment
    assert not left, f"processes left running after the deployment: {[p.pid for p in left]}"


def test_the_live_devices_side_tune_install_the_delivery_and_score_it(deployment):
    summary, _, _ = deployment
    alive, _ = _split(summary)
    assert len(summary["devices"]) == DEVICES and len(alive) == DEVICES - 1
    assert set(summary["devices"]) == {f"phone-{i}" for i in range(DEVICES)}  # their own ids, from their configs
    for device in alive:  # its own file's samples: counts in the summary, no empty or refused rows
        assert device["data"] == {
            "train": TRAIN_PER_DEVICE,
            "validation": 4,
            "test": TEST_PER_DEVICE,
            "empty": 0,
            "refused": 0,
            "truncated": 0,
        }
        assert len(device["label_shares"]) == len(LABELS)
    for device in alive:  # streamed everything, installed the server's PEFT adapter folder, scored its test split
        assert device["samples_forwarded"] == TRAIN_PER_DEVICE and device["frames"] == TRAIN_PER_DEVICE // CHUNK
        assert not device["failures"] and not device["frames_refused"]
        assert device["delivered"] == 1 and device["test_samples"] == TEST_PER_DEVICE
        config, _ = read_peft_adapter(device["delivered_path"])
        assert config.family == "tail" and config.fingerprint.startswith("llama-d64-L4-int8-")
        right = device["test_accuracy"] * TEST_PER_DEVICE  # a count of right answers over its test samples
        assert right == pytest.approx(round(right))
    assert [r["round"] for r in summary["rounds"]] == [1, 2] and summary["rounds"][1]["phase"] == "cache"


def test_a_supernode_killed_mid_run_is_dropped_and_its_work_reported(deployment):
    summary, _, _ = deployment
    alive, lost = _split(summary)
    assert len(lost) == 1
    dead = lost[0]
    # every sample it was asked for is forwarded or counted lost; nothing was delivered to it
    assert dead["samples_forwarded"] + dead["samples_lost"] == TRAIN_PER_DEVICE
    assert dead["samples_lost"] > 0 and dead["failures"]
    assert dead.get("delivered", 0) == 0
    assert summary["frames"] == sum(d["frames"] for d in alive) + dead["frames"]


def test_flowers_own_traffic_adds_little_to_what_the_devices_sent(deployment):
    """What Flower moved from the nodes (training frames, small profile, delivery and evaluate replies) is
    what the devices sent plus an envelope of at most 2 KB per reply. Each device answers at most a
    profile, its forward requests, a delivery and a test: on the bundled model's frames that envelope is
    under 5% of the bytes (RESULTS.md); the tiny model's frames are too small for a ratio to say much."""
    summary, traffic, _ = deployment
    replies = DEVICES * (1 + TRAIN_PER_DEVICE // CHUNK + 2)
    assert traffic["inbound-bytes"] >= summary["bytes_up"] > summary["frame_bytes"] > 0
    assert traffic["inbound-bytes"] - summary["bytes_up"] <= 2048 * replies, (traffic, summary["bytes_up"])
