"""Runs on data the bundled assets do not contain: a three-label file with a user column, through a natural
partition (one simulated device per user), through `local`, and devices that read their own files; a
device whose file gives it nothing to train on is left out with its reason while the others go on."""

from __future__ import annotations

import json

import pytest

from mobiflower.simulations.device_grid import DeviceProcessGrid
from mobiflower.simulations.simulate import SimulateConfig, default_app_config, run_simulate
from mobiflower.strategies.config import SideTuningConfig
from mobiflower.strategies.side_tuning import SideTuningStrategy

LABELS = ("cold", "mild", "hot")
SMALL = {
    "chunk-size": 8,
    "tail-cut": 2,
    "num-server-rounds": 1,
    "labels": ",".join(LABELS),
    "prompt-template": "Day: {text}\nIt was",
}


def _write(path, users: dict[str, int]) -> str:
    rows = [
        {
            "text": f"{user} wrote note {i} about the weather {'and more ' * (i % 3)}",
            "label": LABELS[i % 3],
            "user": user,
        }
        for user, n in users.items()
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_natural_partition_gives_one_device_per_user(tiny_llama, tmp_path):
    data = _write(tmp_path / "notes.jsonl", {"ana": 30, "ben": 20, "cy": 10})
    config = SimulateConfig(
        devices=3,
        workdir=str(tmp_path / "w"),
        run_config={"model": tiny_llama, "data": data, "partitioning": "natural", **SMALL},
    )
    summary = run_simulate(config, quiet=True, engine="processes")
    counts = {
        d: (a["data"]["train"], a["data"]["validation"], a["data"]["test"]) for d, a in summary["devices"].items()
    }
    assert sorted(sum(c) for c in counts.values()) == [10, 20, 30]  # each device holds exactly its user's rows
    assert all(a["test_samples"] == a["data"]["test"] for a in summary["devices"].values())
    assert all(len(a["label_shares"]) == 3 for a in summary["devices"].values())
    tested = [(a["test_accuracy"], a["test_samples"]) for a in summary["devices"].values()]
    assert all(acc * n == pytest.approx(round(acc * n)) for acc, n in tested)  # right answers over its samples
    fleet = sum(acc * n for acc, n in tested) / sum(n for _, n in tested)  # each device weighted by its samples
    assert summary["test_accuracy"] == pytest.approx(fleet) and summary["task"] == "classification"


def test_local_reads_a_users_file(tiny_llama, tmp_path, capsys):
    from mobiflower.simulations.cli import main

    data = _write(tmp_path / "mine.jsonl", {"me": 40})
    out = tmp_path / "local.json"
    args = ["local", "--data", data, "--quiet", "--workdir", str(tmp_path / "w"), "--out", str(out)]
    for key, value in {"model": tiny_llama, **SMALL}.items():
        args += ["-c", f"{key}={json.dumps(value) if isinstance(value, str) else value}"]
    assert main(args) == 0
    summary = json.loads(out.read_text())
    device = summary["devices"]["device-0"]
    assert device["data"]["train"] + device["data"]["validation"] + device["data"]["test"] == 40
    assert "test acc" in capsys.readouterr().out


def test_a_device_without_training_samples_is_left_out_and_the_others_go_on(tiny_llama, tmp_path):
    blank = tmp_path / "b.jsonl"  # every text empty: skipped and counted, nothing left to train on
    blank.write_text("".join(json.dumps({"text": "   ", "label": "cold"}) + "\n" for _ in range(5)))
    files = [_write(tmp_path / "a.jsonl", {"a": 24}), str(blank)]
    run_config = {**default_app_config(), "model": tiny_llama, **SMALL, "run-dir": str(tmp_path / "run")}
    nodes = [{"data": f, "device-id": name} for f, name in zip(files, ("phone-a", "phone-b"))]
    with DeviceProcessGrid(run_config, nodes) as grid:
        SideTuningStrategy(SideTuningConfig.from_run_config(run_config), tmp_path / "run", run_config).start(grid)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert list(summary["devices"]) == ["phone-a"]  # phone-b sent no frame: it was never part of the run
    assert any("phone-b takes no part in this run" in e and "no training samples" in e for e in summary["events"])
    assert summary["devices"]["phone-a"]["samples_forwarded"] == summary["devices"]["phone-a"]["data"]["train"]
