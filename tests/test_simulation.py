"""A real Flower simulation (``flwr run`` with the Ray engine) of a two-device fleet, its CLI errors, and
what a run prints and plots for its task (the table, the summary plot, ``compare``).

The backbone is a tiny random Llama (fast); the data is the bundled corpus. Accuracy is not the
point here (test_local and the benchmarks measure it on the real model): the run must survive its
ServerApp being killed, resume, train per-device side networks, average them, evaluate on the
devices, deliver, and account for every byte and second it reports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mobiflower.simulations.simulate import SimulateConfig, default_app_config, run_simulate


def _one_actor() -> int:
    """Every CPU Ray will see (its own count, cgroup quotas included) to each virtual device: Ray starts
    one ClientApp actor, which serves both devices in turn as a few actors serve a large simulated fleet
    (each actor costs a process start and its imports)."""
    from ray._private.utils import get_num_cpus

    return int(get_num_cpus())


def test_pyproject_declares_the_apps_defaults():
    """`flwr run .` (pyproject) and `mobiflower simulate` (package defaults) run the same job."""
    import tomllib

    app = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "mobiflower.strategies.server_app:app",
        "clientapp": "mobiflower.clients.client_app:app",
    }
    assert app["config"] == default_app_config()


def test_train_seed_varies_training_alone():
    """`train-seed` seeds the side network and the trainer; the data split stays `seed`'s."""
    from mobiflower.strategies.config import SideTuningConfig

    assert SideTuningConfig(seed=3).training_seed == 3
    assert SideTuningConfig.from_run_config({"seed": 3, "train-seed": 5}).training_seed == 5
    assert SimulateConfig(run_config={"train-seed": 5}).run_config["train-seed"] == 5  # a key the app reads


def test_bad_run_config_fails_before_flower_starts():
    with pytest.raises(ValueError, match="unknown run-config key"):
        SimulateConfig(run_config={"learning-rate": 0.1})
    with pytest.raises(ValueError, match="aggregate-every"):
        SimulateConfig(run_config={"aggregate-every": 2})  # shared mode has nothing to average
    with pytest.raises(ValueError, match="num-taps=0 must be at least 1"):
        SimulateConfig(run_config={"num-taps": 0})  # a device key: caught before Flower starts too
    proc = subprocess.run(
        [sys.executable, "-m", "mobiflower.simulations.cli", "simulate", "-c", "mode=federated"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "mode='federated' is unknown" in proc.stderr


def _killed_after_round_2(scratch: Path, run_config: dict) -> None:
    """A real ``flwr run`` whose ServerApp process SIGKILLs itself after round 2's checkpoint.

    Flower marks a run whose ServerApp died as failed only when its heartbeat lapses (30 s, twice), and
    the dying process's last log lines never reach the stream; an operator who saw the server die stops
    the run, and so does this once the round-2 checkpoint is on disk (the kill follows it at once)."""
    import re
    import threading
    import time

    from mobiflower.simulations.flower_config import LOCAL_CONNECTION, app_dir_for_run
    from mobiflower.simulations.flower_processes import flower_env, free_ports
    from mobiflower.simulations.flower_run import flwr_json, run_simulation

    state = Path(run_config["run-dir"]) / "checkpoint" / "strategy.json"
    ports = dict(zip(("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", "FLWR_LOCAL_CONTROL_API_PORT"), map(str, free_ports(2))))
    started: list[str] = []
    finished = threading.Event()

    def stop_after_the_kill() -> None:
        while not finished.wait(0.2):
            if started and state.exists() and json.loads(state.read_text() or "{}").get("round") == 2:
                time.sleep(2.0)
                flwr_json(["stop", started[-1], LOCAL_CONNECTION], {**flower_env(scratch), **ports})
                return

    threading.Thread(target=stop_after_the_kill, daemon=True).start()
    try:
        crashed = run_simulation(
            app_dir_for_run(scratch, default_app_config()),
            {**run_config, "crash-after-round": 2},
            num_supernodes=2,
            client_cpus=_one_actor(),
            scratch=scratch,
            on_line=lambda line: started.extend(re.findall(r"Successfully started run (\d+)", line)),
            extra_env=ports,  # the same local SuperLink for `flwr stop`
            timeout_s=600,
            check=False,
        )
    finally:
        finished.set()
    assert started and not crashed.ok, crashed.status


@pytest.mark.slow
def test_simulated_fleet_per_device_with_fedavg_survives_a_killed_server(real_assets, tiny_llama, tmp_path):
    """Two real ``flwr run`` simulations: the first's ServerApp process is SIGKILLed after round 2 (an
    averaging round), the second resumes from its checkpoint and finishes. The resumed run must account
    for every byte, frame and round as an uninterrupted one would (tests/test_resume.py compares the two
    in-process), so the whole run is checked here on the resumed summary."""
    run_dir = (tmp_path / "run").resolve()
    run_config = {
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 48,
        "validation-samples": 16,
        "test-samples": 16,
        "mode": "per-device",
        "aggregate-every": 2,
        "num-server-rounds": 3,
        "chunk-size": 8,
        "eval-every": 2,
        "reduction": 4,
        "bits": 4,
        "run-dir": str(run_dir),
    }
    _killed_after_round_2((tmp_path / "killed").resolve(), run_config)
    saved = json.loads((run_dir / "checkpoint" / "strategy.json").read_text())
    assert not (run_dir / "summary.json").exists() and saved["cached_frames"] == {"device-0": 3, "device-1": 3}
    config = SimulateConfig(
        devices=2,
        client_cpus=_one_actor(),
        workdir=str(tmp_path / "sim"),
        timeout_s=600,
        run_config={**run_config, "resume": True},
    )
    summary = run_simulate(config, out=str(tmp_path / "sim.json"), quiet=True)
    assert summary["simulation"]["status"] == "finished:completed" and summary["metrics"]["primary"] == "accuracy"
    assert summary["events"] == ["resumed after round 2"]
    assert json.loads((tmp_path / "sim.json").read_text())["test_accuracy"] == summary["test_accuracy"]
    assert (run_dir / "summary.png").stat().st_size > 0
    assert {p.name for p in (run_dir / "checkpoint").iterdir()} >= {"device-0", "device-1", "store.json"}

    devices = summary["devices"]
    assert sorted(devices) == ["device-0", "device-1"]
    for device in devices.values():
        assert device["frames"] == 3 and device["samples_forwarded"] == 24  # 24 samples in chunks of 8, once
        assert device["bytes_up"] >= device["frame_bytes"] > 0 and "test_macro_f1" in device
        assert device["bytes_down"] > 0 and device["delivered"] == 1 and device["test_samples"] == 8
        assert 8 * device["test_accuracy"] == pytest.approx(round(8 * device["test_accuracy"]))  # of its 8 samples
        assert not device["failures"]
    assert summary["test_accuracy"] == pytest.approx(sum(d["test_accuracy"] for d in devices.values()) / 2)
    assert summary["frame_bytes"] == sum(d["frame_bytes"] for d in devices.values())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["phase"] == "stream" and rounds[1]["phase"] == "cache"
    # a cached round forwards nothing for training; round 2's validation (on the server) forwarded each device's
    # validation samples once, and they are all its bytes up
    assert rounds[1]["bytes_up"] == sum(d["eval_bytes_up"] for d in devices.values()) > 0
    assert rounds[1].get("aggregated") and "validation_accuracy" in rounds[1] and "validation_macro_f1" in rounds[1]
    assert summary["device_forward_s"] > 0 and summary["server_train_s"] > 0
    assert 0 < summary["pipeline_efficiency"] <= 1.05
    assert summary["side_network"]["bits"] == 4
    # per device and per round: what each device sent and received, and its forward time
    first = rounds[0]["devices"]
    assert sum(d["frame_bytes"] for d in first.values()) == summary["frame_bytes"]
    assert all(rounds[2]["devices"][d]["bytes_up"] == 0 for d in devices)


# ---- what a run prints and plots, for any task ------------------------------------------------------
def _lm_summary() -> dict:
    """A causal-LM run's summary as the strategy writes it (two devices, a zero-shot figure on one)."""
    device = {"bytes_up": 1e6, "bytes_down": 2e5, "device_forward_s": 3.0, "test_samples": 4, "test_count": 300}
    lm = {"test_perplexity": 23.4137, "test_loss": 3.1533, "test_token_accuracy": 0.4012}
    return {
        "task": "causal-lm",
        "metrics": {
            "primary": "perplexity",
            "names": ["perplexity", "loss", "token-accuracy"],
            "higher_is_better": False,
        },
        "devices": {
            "device-0": {**device, **lm, "zero_shot_perplexity": 61.2, "device_peak_rss_mb": 900.0},
            "device-1": {**device, **lm, "zero_shot_perplexity": None, "zero_shot_macro_f1": None},
        },
        **lm,
        "zero_shot_perplexity": 61.2,
        "zero_shot_loss": 4.114,
        "zero_shot_token_accuracy": None,
        "initial_test_perplexity": 70.0,
        "bytes_up": 2e6,
        "bytes_down": 4e5,
        "frames": 2,
        "frame_bytes": 9e5,
        "device_forward_s": 6.0,
        "server_train_s": 1.0,
        "train_wall_s": 2.0,
        "pipeline_efficiency": 0.8,
        "run_wall_s": 60.0,
        "config": {"mode": "shared", "num-server-rounds": 2, "bits": 8, "eval-split": "validation"},
        "rounds": [
            {"round": 1, "loss": 4.0, "validation_perplexity": 40.0, "bytes_up": 1e6, "bytes_down": 0},
            {"round": 2, "loss": 3.0, "validation_perplexity": None, "bytes_up": 1e6, "bytes_down": 4e5},
        ],
    }


def test_the_printed_table_has_the_tasks_columns_and_leaves_empty_ones_out():
    from mobiflower.simulations.simulate import format_summary

    text = format_summary(_lm_summary())
    header, first, second = text.splitlines()[:3]
    assert header.split()[:6] == ["device", "test", "ppl", "test", "loss", "test"]
    assert "zero-shot ppl" in header and "zero-shot loss" not in header and "zero-shot tok acc" not in header
    assert "scored" in header and "acc" not in header.replace("tok acc", "")  # no classification column
    assert first.split()[1:3] == ["23.41", "3.1533"] and "61.20" in first and "300" in first
    assert second.split()[first.split().index("61.20")] == "n/a"  # device-1 has no zero-shot figure
    assert "test perplexity 23.41, loss 3.1533, token-accuracy 0.4012 (all devices' scored tokens)" in text
    assert "zero-shot backbone: perplexity 61.20, loss 4.1140" in text
    assert "untrained side network (round 0): perplexity 70.00" in text


def test_a_classification_table_keeps_its_columns():
    from mobiflower.simulations.simulate import format_summary

    device = {"bytes_up": 1e6, "bytes_down": 2e5, "device_forward_s": 3.0, "test_samples": 4, "test_count": 4}
    summary = {
        **{k: v for k, v in _lm_summary().items() if not k.startswith(("test_", "zero_shot_", "initial_"))},
        "task": "classification",
        "metrics": {"primary": "accuracy", "names": ["accuracy", "macro-f1"], "higher_is_better": True},
        "devices": {"device-0": {**device, "test_accuracy": 0.75, "test_macro_f1": 0.7, "zero_shot_accuracy": 0.5}},
        "test_accuracy": 0.75,
        "test_macro_f1": 0.7,
    }
    header, row = format_summary(summary).splitlines()[:2]
    assert header.split()[1:5] == ["test", "acc", "test", "F1"] and "zero-shot acc" in header
    assert "zero-shot F1" not in header and "scored" not in header  # no F1 zero-shot; count = samples
    assert row.split()[1:4] == ["0.7500", "0.7000", "0.5000"]
    assert "test accuracy 0.7500, macro-f1 0.7000 (all devices' test samples)" in format_summary(summary)


def test_the_summary_plot_shows_the_primary_metric_by_name(tmp_path, monkeypatch):
    import matplotlib.axes

    from mobiflower.platform.run_summary import plot_rounds

    titles, labels = [], []
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, t, *a, **k: titles.append(t))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_ylabel", lambda ax, t, *a, **k: labels.append(t))
    path = plot_rounds(_lm_summary(), tmp_path / "summary.png")
    assert path.stat().st_size > 0
    assert "perplexity" in titles and labels == ["perplexity"] and "accuracy" not in titles


def test_the_summary_plot_draws_loss_per_frame_and_costs_against_samples_trained():
    """summary.png's data (not its pixels): a streamed round's loss per frame and a cached epoch's mean at the
    samples trained so far, validation where a round scored it, the final test after every epoch, cumulative
    bytes with the delivery last; a zero-shot figure that is NaN draws no line."""
    from mobiflower.platform.run_summary import plot_data

    stream = {"round": 1, "phase": "stream", "samples": 8, "loss": 0.6, "bytes_up": 300, "bytes_down": 10}
    stream.update({"frame_log": [[4, 0.7, 100, 1.0], [4, float("nan"), 120, 2.0]], "train_wall_s": 2.5})
    stream.update({"server_train_s": 1.0, "device_forward_s": 2.0})
    cache = {"round": 2, "phase": "cache", "loss": 0.4, "validation_accuracy": 0.7, "bytes_up": 50, "bytes_down": 0}
    cache.update({"train_wall_s": 3.0, "server_train_s": 0.5})
    summary = {
        "rounds": [stream, cache],
        "test_accuracy": 0.8,
        "zero_shot_accuracy": float("nan"),
        "initial_test_accuracy": 0.5,
        "bytes_up": 400,
        "bytes_down": 1010,
        "config": {"eval-split": "validation"},
    }
    data = plot_data(summary)
    assert data["x"] == "samples trained" and data["metric"] == "accuracy"
    assert data["loss"]["frames"] == [(4, 0.7), (8, None)]  # NaN (a label-private step): a gap, not a point
    assert data["loss"]["rounds"] == [(8, 0.6), (16, 0.4)]  # the cached epoch trains round 1's 8 samples again
    assert data["loss"]["frame_mb"] == [(4, 100e-6), (8, 220e-6)] and data["loss"]["landed_s"] == [(4, 1.0), (8, 2.0)]
    assert data["validation"] == [(16, 0.7)] and data["test"] == (16, 0.8)
    assert data["references"] == {"untrained": 0.5}
    assert data["up_mb"] == [(0, 0.0), (8, 300e-6), (16, 350e-6), (16, 400e-6)]
    assert data["down_mb"][-1] == (16, 1010e-6)
    assert data["seconds"]["clock"] == "wall" and data["seconds"]["run"] == [(0, 0.0), (8, 2.5), (16, 3.0)]
    assert data["seconds"]["server training"] == [(0, 0.0), (8, 1.0), (16, 1.5)]


def test_a_column_of_nan_is_left_out_of_the_printed_table():
    from mobiflower.simulations.simulate import format_summary

    summary = _lm_summary()
    for device in summary["devices"].values():
        device["zero_shot_perplexity"] = float("nan")  # a tail's backbone alone has no zero-shot answer
    header = format_summary(summary).splitlines()[0]
    assert "zero-shot" not in header and "nan" not in format_summary(summary).split("\n\n")[0]


def test_compare_shows_each_tasks_metrics_and_leaves_empty_columns_out():
    from mobiflower.simulations.compare import format_comparison, seed_groups

    cls = {"method": "lora", "test_accuracy": 0.85, "zero_shot_accuracy": float("nan"), "config": {"seed": 0}}
    lm = {
        "method": "mobiflower",
        "family": "tail",
        **{k: v for k, v in _lm_summary().items() if k in ("task", "metrics", "test_perplexity", "test_loss")},
        "zero_shot_perplexity": 61.2,
    }
    header, *rows = format_comparison([("cls.json", cls), ("lm.json", lm)]).splitlines()
    assert header.split("  ")[2:] and "test accuracy" in header and "test perplexity" in header
    assert "zero-shot perplexity" in header and "zero-shot accuracy" not in header  # NaN everywhere: left out
    assert "test token-accuracy" not in header and "wire" not in header
    assert "23.41" in rows[1] and "61.20" in rows[1] and "0.8500" in rows[0]
    assert [g["metric"] for g in seed_groups([("cls.json", cls), ("lm.json", lm)])] == ["accuracy", "perplexity"]
