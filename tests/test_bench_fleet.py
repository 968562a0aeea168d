"""``mobiflower bench fleet``: virtual-time arithmetic, time-to-target, verdicts, JSON, CLI errors.

The Flower runs are replaced by injected runners returning synthetic summaries shaped like the
real ones (the fed-LoRA strategy's and the side-tuning run's), so every figure and verdict below is
hand-computable; one test runs the real fed-LoRA apps (in-process) to check that shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from mobiflower.simulations.bench.fleet import FleetBenchSettings, fed_lora_virtual_timeline, run_fleet_bench
from mobiflower.simulations.bench.fleet_report import (
    ADAPTIVE,
    EIGHT_BIT,
    FED_LORA,
    format_table,
    summarize,
    time_to_target,
)
from mobiflower.strategies.fleet_model import DeviceProfile

FAST = DeviceProfile("fast", uplink_mbps=8.0, downlink_mbps=80.0, latency_ms=0.0, speed=1.0)
SLOW = DeviceProfile("slow", uplink_mbps=1.0, downlink_mbps=8.0, latency_ms=100.0, speed=0.5)
MB = 1_000_000


def _device(train_s: float, up: int = MB, down: int = MB) -> dict:
    return {"bytes_up": up, "bytes_down": down, "train_s": train_s}


def test_fed_lora_round_lasts_as_long_as_its_slowest_device():
    summary = {
        "final_accuracy": 0.8,
        "final_accuracy_split": "test",
        "rounds": [
            # fast: 8 Mbit down at 80 Mbps = 0.1 s, 2 s compute, 8 Mbit up at 8 Mbps = 1 s -> 3.1 s
            # slow: 0.1 + 1.0 s down, 2 / 0.5 = 4 s compute, 0.1 + 8 s up -> 13.2 s (critical)
            {"round": 1, "accuracy": 0.6, "devices": {"a": _device(2.0), "b": _device(2.0)}},
            # fast: 0.1 + 10 + 1 = 11.1 s; slow: 1.1 + 1 / 0.5 + 8.1 = 11.2 s (critical, barely)
            {
                "round": 2,
                "accuracy": 0.8,
                "devices": {"a": _device(10.0), "b": _device(1.0), "c": {"test_accuracy": 0.9}},
            },  # scored only: not training
        ],
    }
    timeline = fed_lora_virtual_timeline(summary, {"a": FAST, "b": SLOW})
    assert [r["virtual_s"] for r in timeline["rounds"]] == pytest.approx([13.2, 11.2])
    assert [r["critical_device"] for r in timeline["rounds"]] == ["b", "b"]
    assert timeline["total_s"] == pytest.approx(24.4)
    assert timeline["device_compute_s"] == pytest.approx(2.0 + 4.0 + 10.0 + 2.0)
    assert [(p["round"], p["accuracy"]) for p in timeline["curve"]] == [(1, 0.6), (2, 0.8), ("final", 0.8)]
    assert [p["virtual_s"] for p in timeline["curve"]] == pytest.approx([13.2, 24.4, 24.4])

    with pytest.raises(ValueError, match="device 'b' has no fleet profile"):
        fed_lora_virtual_timeline(summary, {"a": FAST})


def test_time_to_target_is_the_first_point_at_or_above_it():
    curve = [
        {"round": 1, "virtual_s": 5.0, "accuracy": 0.7},
        {"round": 2, "virtual_s": 9.0, "accuracy": 0.65},
        {"round": 3, "virtual_s": 12.0, "accuracy": 0.81},
        {"round": "final", "virtual_s": 14.0, "accuracy": 0.8},
    ]
    assert time_to_target(curve, 0.7) == 5.0
    assert time_to_target(curve, 0.8) == 12.0
    assert time_to_target(curve, 0.7 + 0.1) == 12.0  # 0.7999999999999999: float noise is not a miss
    assert time_to_target(curve, 0.9) is None  # never reached: None, not a number
    assert time_to_target(curve, None) is None
    assert time_to_target([], 0.5) is None


# ------------------------------------------------------------------------------------------
# the harness, with synthetic runs
#
# mixed-phones, 4 devices: device-0 flagship (speed 1), device-1/2 mid-range (0.5), device-3
# budget (0.25, 1 Mbps up, 10 Mbps down, 80 ms). Each fed-LoRA round: every device gets and sends
# 2 MB and trains 30 s measured. The budget phone is critical: 0.08 + 1.6 s down, 120 s compute,
# 0.08 + 16 s up = 137.76 s a round; device compute 30 + 60 + 60 + 120 = 270 s a round.
ROUND_S, ROUND_COMPUTE_S = 137.76, 270.0
LORA_ACCURACY = (0.70, 0.78, 0.80)  # target = 0.80 - 0.01 = 0.79, first reached at the end of round 3


def _fed_lora_summary(run_config: dict) -> dict:
    if run_config["eval-split"] == "validation":  # a tuning trial: lr 1e-3 with 2 epochs wins
        score = 0.8 if (run_config["lr"], run_config["local-epochs"]) == (1e-3, 2) else 0.7
        return {"final_validation_accuracy": score, "device_compute_s": 1.0}
    rounds = [
        {
            "round": r + 1,
            "accuracy": acc,
            "test_accuracy": acc,
            "devices": {f"device-{i}": _device(30.0, 2 * MB, 2 * MB) for i in range(4)},
        }
        for r, acc in enumerate(LORA_ACCURACY)
    ]
    return {
        "method": "fed-lora",
        "final_accuracy": LORA_ACCURACY[-1],
        "final_accuracy_split": "test",
        "rounds": rounds,
        "bytes_up": 24 * MB,
        "bytes_down": 24 * MB,
        "bytes_down_eval": 36 * MB,
        "bytes_down_delivery": 8 * MB,
        "device_compute_s": 360.0,
        "adapter_bytes": 2 * MB,
        "config": {"lr": run_config["lr"], "local_epochs": run_config["local-epochs"]},
        "simulation": {"status": "finished:completed", "run_dir": "/tmp/x", "wall_s": 1.0},
    }


def _side_summary(curve, compute_s: float, frames=(10, 9, 1), adapt: bool = True) -> dict:
    points = [{"round": r, "virtual_s": t, "accuracy": a} for r, t, a in curve]
    return {
        "test_accuracy": points[-1]["accuracy"],
        "bytes_up": 3 * MB,
        "bytes_down": 2 * MB,
        "device_forward_s": compute_s / 2,
        "frames": frames[0],
        "frames_accepted": frames[1],
        "frames_refused": frames[2],
        "virtual": {
            "fleet": "mixed-phones",
            "adapt": adapt,
            "curve": points,
            "total_s": points[-1]["virtual_s"],
            "device_compute_s": compute_s,
            "devices": {},
        },
        "simulation": {"status": "finished:completed", "run_dir": "/tmp/y", "wall_s": 1.0},
    }


ADAPTIVE_CURVE = [(1, 20.0, 0.75), (2, 40.0, 0.795), ("final", 50.0, 0.81)]  # target at 40 s
EIGHT_BIT_CURVE = [(1, 50.0, 0.70), (2, 100.0, 0.80), ("final", 120.0, 0.815)]  # target at 100 s


class Runners:
    """Synthetic runs keyed on the run config, remembering every config they were given."""

    def __init__(self, adaptive=ADAPTIVE_CURVE, eight_bit=EIGHT_BIT_CURVE, adaptive_frames=(10, 9, 1), fail=None):
        self.adaptive, self.eight_bit, self.adaptive_frames, self.fail = adaptive, eight_bit, adaptive_frames, fail
        self.side_configs: list[dict] = []
        self.lora_configs: list[dict] = []

    def side(self, run_config: dict) -> dict:
        self.side_configs.append(run_config)
        if self.fail == run_config["adapt"]:
            raise RuntimeError("Flower run 7 on 'local' ended with status 'finished:failed'")
        if run_config["adapt"]:
            return _side_summary(self.adaptive, 100.0, self.adaptive_frames)
        return _side_summary(self.eight_bit, 200.0, (12, 12, 0), adapt=False)

    def lora(self, run) -> dict:
        assert run.devices == 4
        self.lora_configs.append(run.run_config)
        return _fed_lora_summary(run.run_config)


def _bench(runners: Runners, **settings) -> dict:
    return run_fleet_bench(
        FleetBenchSettings(workdir="/nonexistent-never-written", **settings),
        side_runner=runners.side,
        fed_lora_runner=runners.lora,
        log=lambda message: None,
    )


def test_every_verdict_passes_on_figures_that_meet_the_issue():
    runners = Runners()
    result = _bench(runners)
    lora, ada, eight = (result["methods"][n] for n in (FED_LORA, ADAPTIVE, EIGHT_BIT))
    assert result["target_accuracy"] == pytest.approx(0.79)
    assert result["settings"]["profiles"] == {
        "device-0": "flagship",
        "device-1": "mid-range",
        "device-2": "mid-range",
        "device-3": "budget",
    }
    assert lora["virtual_total_s"] == pytest.approx(3 * ROUND_S)
    assert lora["time_to_target_s"] == pytest.approx(3 * ROUND_S)
    assert lora["device_compute_s"] == pytest.approx(3 * ROUND_COMPUTE_S)
    assert lora["device_compute_measured_s"] == 360.0
    assert (ada["time_to_target_s"], eight["time_to_target_s"]) == (40.0, 100.0)
    ratios = result["ratios"]
    assert ratios["fed_lora_over_adaptive_time_to_target"] == pytest.approx(3 * ROUND_S / 40.0)
    assert ratios["8bit_over_adaptive_time_to_target"] == pytest.approx(2.5)
    assert ratios["fed_lora_over_adaptive_device_compute"] == pytest.approx(3 * ROUND_COMPUTE_S / 100.0)
    assert ratios["adaptive_minus_8bit_accuracy"] == pytest.approx(-0.005)
    assert {k: v["verdict"] for k, v in result["verdicts"].items()} == {
        "adaptive_3x_sooner_than_fed_lora": "PASS",
        "adaptive_1.5x_sooner_than_8bit": "PASS",
        "adaptive_device_compute_le_0.2x_fed_lora": "PASS",
        "adaptive_total_bytes_le_0.5x_fed_lora": "PASS",
        "adaptive_within_0.5pt_of_fed_lora_accuracy": "PASS",
        "adaptive_within_1pt_of_8bit_accuracy": "PASS",
        "runs_completed": "PASS",
        "no_arrived_frame_lost": "PASS",
    }
    assert ratios["adaptive_over_fed_lora_total_bytes"] == pytest.approx(5 / 56)  # fed-lora: 48 MB + 8 delivered
    assert ratios["adaptive_over_fed_lora_device_compute"] == pytest.approx(100.0 / (3 * ROUND_COMPUTE_S))
    assert result["verdicts"]["no_arrived_frame_lost"]["measured"][ADAPTIVE] == {
        "frames": 10,
        "accepted": 9,
        "refused": 1,
        "unaccounted": 0,
    }


def test_the_baseline_is_tuned_on_validation_and_every_method_gets_the_same_samples():
    runners = Runners()
    result = _bench(runners, train_samples=200, validation_samples=80, test_samples=80, seed=3)
    trials, final = runners.lora_configs[:-1], runners.lora_configs[-1]
    assert len(trials) == 6  # 3 lrs x 2 local epochs
    assert all(
        t["eval-split"] == "validation" and t["final-eval"] is False and t["num-server-rounds"] == 2 for t in trials
    )
    assert (final["lr"], final["local-epochs"], final["num-server-rounds"]) == (1e-3, 2, 3)
    assert final["eval-split"] == "test" and final["final-eval"] is True
    assert result["tuning"]["mode"] == "validation-grid" and result["tuning"]["lr"] == 1e-3
    assert len(result["tuning"]["trials"]) == 6
    same = {"train-samples": 200, "validation-samples": 80, "test-samples": 80, "seed": 3}
    for config in runners.lora_configs + runners.side_configs:
        assert {k: config[k] for k in same} == same
    eight, ada = runners.side_configs
    assert (eight["adapt"], eight["bits"], ada["adapt"]) == (False, 8, True) and "bits" not in ada
    assert all(
        c["fleet"] == "mixed-phones"
        and c["eval-every"] == 1
        and c["eval-split"] == "test"
        and c["num-server-rounds"] == FleetBenchSettings().rounds
        for c in runners.side_configs
    )


def test_a_given_pair_skips_tuning_and_says_so():
    runners = Runners()
    result = _bench(runners, lora_pair=(2e-3, 1))
    assert len(runners.lora_configs) == 1 and runners.lora_configs[0]["lr"] == 2e-3
    assert result["tuning"]["mode"] == "given" and result["tuning"]["local_epochs"] == 1


def test_verdicts_fail_when_the_figures_miss():
    # adaptive: target at 200 s (fed-lora / adaptive = 2.07 < 3; 8-bit / adaptive = 0.5 < 1.5), final
    # accuracy 0.80 against 8-bit's 0.815 (1.5 points lower), one frame neither accepted nor refused
    slow = [(1, 100.0, 0.75), (2, 200.0, 0.79), ("final", 210.0, 0.80)]
    result = _bench(Runners(adaptive=slow, adaptive_frames=(10, 8, 1)))
    verdicts = {k: v["verdict"] for k, v in result["verdicts"].items()}
    assert verdicts["adaptive_3x_sooner_than_fed_lora"] == "FAIL"
    assert result["verdicts"]["adaptive_3x_sooner_than_fed_lora"]["measured"] == pytest.approx(3 * ROUND_S / 200)
    assert verdicts["adaptive_1.5x_sooner_than_8bit"] == "FAIL"
    assert verdicts["adaptive_within_1pt_of_8bit_accuracy"] == "FAIL"
    assert verdicts["no_arrived_frame_lost"] == "FAIL"
    assert "mobiflower-adaptive: 1" in result["verdicts"]["no_arrived_frame_lost"]["reason"]
    assert verdicts["adaptive_device_compute_le_0.2x_fed_lora"] == "PASS"
    assert verdicts["adaptive_within_0.5pt_of_fed_lora_accuracy"] == "PASS"  # 0.80 against fed-lora's 0.80


def test_accuracy_compute_and_bytes_against_fed_lora_fail_when_they_miss():
    class Costly(Runners):
        def side(self, run_config):
            summary = super().side(run_config)
            summary["bytes_down"] = 30 * MB  # 33 MB of fed-lora's 56: 0.59x
            summary["virtual"]["device_compute_s"] = 200.0  # 0.247x fed-lora's 810 s
            return summary

    low = [(1, 20.0, 0.75), (2, 40.0, 0.795), ("final", 50.0, 0.794)]  # 0.6 points under fed-lora's 0.80
    verdicts = {k: v["verdict"] for k, v in _bench(Costly(adaptive=low))["verdicts"].items()}
    assert verdicts["adaptive_within_0.5pt_of_fed_lora_accuracy"] == "FAIL"
    assert verdicts["adaptive_device_compute_le_0.2x_fed_lora"] == "FAIL"
    assert verdicts["adaptive_total_bytes_le_0.5x_fed_lora"] == "FAIL"


def test_training_seeds_give_the_mean_accuracy_and_the_slowest_time_to_target():
    curves = {
        1: [(1, 20.0, 0.75), (2, 40.0, 0.795), ("final", 50.0, 0.81)],  # target (0.79) at 40 s
        2: [(1, 20.0, 0.75), (2, 45.0, 0.78), ("final", 60.0, 0.79)],
    }  # ... at 60 s

    class Seeded(Runners):
        def side(self, run_config):
            self.adaptive = curves[run_config["train-seed"]]
            return super().side(run_config)

    runners = Seeded()
    result = _bench(runners, side_seeds=(1, 2))
    assert [(c["adapt"], c["train-seed"]) for c in runners.side_configs] == [
        (False, 1),
        (False, 2),
        (True, 1),
        (True, 2),
    ]
    ada = result["methods"][ADAPTIVE]
    assert ada["final_accuracy"] == pytest.approx(0.80)
    assert [r["final_accuracy"] for r in ada["seed_runs"]] == [0.81, 0.79]
    assert [r["time_to_target_s"] for r in ada["seed_runs"]] == [40.0, 60.0] and ada["time_to_target_s"] == 60.0
    assert ada["virtual_total_s"] == pytest.approx(55.0)
    verdict = result["verdicts"]["adaptive_within_0.5pt_of_fed_lora_accuracy"]
    assert verdict["verdict"] == "PASS" and "mean over 2 training seeds" in verdict["reason"]
    table = format_table(result)
    assert "mobiflower-adaptive (mean)" in table and "train-seed 2" in table
    with pytest.raises(ValueError, match="--side-seeds must be distinct"):
        FleetBenchSettings(side_seeds=(1, 1))


def test_a_target_never_reached_is_not_a_number():
    never = [(1, 20.0, 0.70), ("final", 40.0, 0.75)]
    result = _bench(Runners(adaptive=never))
    assert result["methods"][ADAPTIVE]["time_to_target_s"] is None
    assert result["methods"][ADAPTIVE]["reached_target"] is False
    assert result["ratios"]["fed_lora_over_adaptive_time_to_target"] is None
    v = result["verdicts"]["adaptive_3x_sooner_than_fed_lora"]
    assert v["verdict"] == "FAIL" and "never reached" in v["reason"]
    assert "never" in format_table(result)

    # 8-bit never gets there: its whole run bounds its time-to-target from below
    result = _bench(Runners(eight_bit=[(1, 50.0, 0.70), ("final", 120.0, 0.785)]))
    v = result["verdicts"]["adaptive_1.5x_sooner_than_8bit"]
    assert v["verdict"] == "PASS" and v["measured"] == pytest.approx(120.0 / 40.0)  # at least 3x
    result = _bench(Runners(eight_bit=[(1, 50.0, 0.70), ("final", 50.0, 0.785)]))
    v = result["verdicts"]["adaptive_1.5x_sooner_than_8bit"]
    assert v["verdict"] == "n/a" and "never reached" in v["reason"]  # only >= 1.25x: cannot tell


def test_a_failed_run_is_recorded_and_the_rest_still_run():
    runners = Runners(fail=True)  # the adaptive run fails
    result = _bench(runners)
    ada = result["methods"][ADAPTIVE]
    assert ada["completed"] is False and "finished:failed" in ada["error"]
    assert result["methods"][EIGHT_BIT]["completed"] is True
    assert result["verdicts"]["runs_completed"]["verdict"] == "FAIL"
    assert result["verdicts"]["adaptive_3x_sooner_than_fed_lora"]["verdict"] == "n/a"
    assert result["verdicts"]["no_arrived_frame_lost"]["verdict"] == "n/a"
    assert "failed" in format_table(result)


def test_json_shape_table_and_figure(tmp_path):
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.fleet_report import plot

    result = _bench(Runners(), fleet="flaky")
    out = tmp_path / "bench_fleet.json"
    write_outputs(result, str(out), None, plot, lambda message: None)
    data = json.loads(out.read_text())
    assert set(data) >= {"fleet", "target_accuracy", "methods", "ratios", "verdicts", "tuning", "settings", "notes"}
    assert data["fleet"] == "flaky" and list(data["methods"]) == [ADAPTIVE, EIGHT_BIT, FED_LORA]
    for method in data["methods"].values():
        assert set(method) >= {
            "time_to_target_s",
            "final_accuracy",
            "bytes_up",
            "bytes_down",
            "device_compute_s",
            "device_compute_measured_s",
            "virtual_total_s",
            "curve",
            "frames",
            "frames_accepted",
            "frames_refused",
            "completed",
            "run_config",
        }
    assert all(v["verdict"] in ("PASS", "FAIL", "n/a") for v in data["verdicts"].values())
    assert any("evaluation" in note for note in data["notes"])
    assert (tmp_path / "bench_fleet.png").stat().st_size > 0
    assert "no_arrived_frame_lost" in format_table(result)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--fleet", "no-such-fleet"], "no fleet 'no-such-fleet'.*mixed-phones"),
        (["--devices", "0"], "--devices must be at least 1"),
        (["--lrs", "-1"], "--lrs must be positive"),
        (["--skip-tuning", "1e-3", "two"], "--skip-tuning takes a learning rate"),
    ],
)
def test_cli_refuses_what_a_user_can_fix(argv, message, capsys):
    from mobiflower.simulations.cli import main

    assert main(["bench", "fleet", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_exits_1_when_a_tuning_run_fails(monkeypatch, capsys):
    import mobiflower.simulations.bench.fleet as bench
    from mobiflower.simulations.cli import main

    def broken(run) -> dict:
        raise RuntimeError("Flower run 3 on 'local' timed out after 3600s")

    real = bench.run_fleet_bench
    monkeypatch.setattr(
        bench,
        "run_fleet_bench",
        lambda settings, quiet=True, log=print: real(
            settings, side_runner=Runners().side, fed_lora_runner=broken, log=log
        ),
    )
    assert main(["bench", "fleet", "--quiet", "--out", ""]) == 1
    assert "tuning run failed: Flower run 3" in capsys.readouterr().err


def test_cli_writes_the_table_json_and_figure(tmp_path, monkeypatch, capsys):
    import mobiflower.simulations.bench.fleet as bench
    from mobiflower.simulations.cli import main

    runners, real = Runners(), bench.run_fleet_bench
    seen = []

    def fake(settings, quiet=True, log=print):
        seen.append(settings)
        return real(settings, side_runner=runners.side, fed_lora_runner=runners.lora, log=log)

    monkeypatch.setattr(bench, "run_fleet_bench", fake)
    out = tmp_path / "fleet.json"
    assert (
        main(["bench", "fleet", "--out", str(out), "--skip-tuning", "1e-3", "2", "--num-server-rounds", "5", "--quiet"])
        == 0
    )
    assert seen[0].lora_pair == (1e-3, 2) and seen[0].rounds == 5
    assert "mobiflower-adaptive" in capsys.readouterr().out
    assert json.loads(out.read_text())["tuning"]["mode"] == "given" and out.with_suffix(".png").exists()


def test_a_real_fed_lora_run_on_the_fleet_clock(real_assets, tiny_llama, tmp_path, monkeypatch):
    """The baseline's half for real through its own runner (its ServerApp and ClientApp; ``flwr run`` is
    the in-process stand-in of tests/inprocess_grid.py; tiny random Llama, 2 devices, the pair given): its
    summary's per-round, per-device record is what the timeline reads, under the ids the fleet maps."""
    from inprocess_grid import run_simulation_in_process

    from mobiflower.simulations.baselines import fed_lora
    from mobiflower.strategies.fleet_model import load_fleet

    settings = FleetBenchSettings(
        devices=2,
        train_samples=32,
        validation_samples=16,
        test_samples=16,
        model=tiny_llama,
        lora_rounds=2,
        lora_pair=(1e-3, 1),
        workdir=str(tmp_path),
        timeout_s=300,
    )
    monkeypatch.setattr(fed_lora, "run_simulation", run_simulation_in_process)
    runners = Runners()
    result = run_fleet_bench(settings, side_runner=runners.side, log=lambda message: None)
    lora = result["methods"][FED_LORA]
    assert lora["completed"] and lora["status"] == "finished:completed"
    assert Path(lora["run_dir"]).is_relative_to(tmp_path)  # the bench's workdir, not $MOBIFLOWER_HOME
    profiles = load_fleet("mixed-phones").profiles_for(["device-0", "device-1"])
    summary = json.loads((Path(lora["run_dir"]) / "summary.json").read_text())
    spans = [
        max(
            profiles[d].download_s(v["bytes_down"])
            + profiles[d].compute_s(v["train_s"])
            + profiles[d].upload_s(v["bytes_up"])
            for d, v in r["devices"].items()
        )
        for r in summary["rounds"]
    ]
    assert len(spans) == 2 and all(len(r["devices"]) == 2 for r in summary["rounds"])
    assert lora["virtual_total_s"] == pytest.approx(sum(spans))
    assert [p["round"] for p in lora["curve"]] == [1, 2, "final"]
    assert lora["curve"][-1]["accuracy"] == lora["final_accuracy"] == summary["final_accuracy"]
    assert lora["device_compute_measured_s"] == pytest.approx(summary["device_compute_s"])
    assert lora["device_compute_s"] > lora["device_compute_measured_s"]  # mid-range phone: half speed


def test_mobiflower_can_have_its_learning_rate_picked_on_validation_too():
    runners = Runners()
    scores = {1e-3: 0.7, 3e-3: 0.8}
    real_side = runners.side

    def side(run_config):
        if run_config.get("eval-split") == "validation":
            runners.side_configs.append(run_config)
            return {"rounds": [{"round": 19, "validation_accuracy": scores[run_config["lr"]]}, {"round": 20}]}
        return real_side(run_config)

    result = run_fleet_bench(
        FleetBenchSettings(side_lrs=(1e-3, 3e-3), lora_pair=(1e-3, 1), workdir="/nonexistent"),
        side_runner=side,
        fed_lora_runner=runners.lora,
        log=lambda _: None,
    )
    assert result["side_tuning"]["mode"] == "validation-grid" and result["side_tuning"]["lr"] == 3e-3
    trials = [c for c in runners.side_configs if c.get("eval-split") == "validation"]
    assert [t["lr"] for t in trials] == [1e-3, 3e-3] and all("fleet" not in t for t in trials)
    reported = [c for c in runners.side_configs if c.get("eval-split") == "test"]
    assert len(reported) == 2 and all(c["lr"] == 3e-3 for c in reported)


def test_a_common_target_compares_speed_when_a_method_never_reaches_the_issues_target():
    result = summarize(
        {
            "methods": {
                ADAPTIVE: {
                    "completed": True,
                    "final_accuracy": 0.82,
                    "curve": [{"virtual_s": 40.0, "accuracy": 0.7}, {"virtual_s": 50.0, "accuracy": 0.82}],
                    "device_compute_s": 1.0,
                    "device_compute_measured_s": 1.0,
                    "bytes_up": 1,
                    "virtual_total_s": 50.0,
                },
                EIGHT_BIT: {
                    "completed": True,
                    "final_accuracy": 0.83,
                    "curve": [{"virtual_s": 90.0, "accuracy": 0.83}],
                    "device_compute_s": 2.0,
                    "device_compute_measured_s": 2.0,
                    "bytes_up": 2,
                    "virtual_total_s": 90.0,
                },
                FED_LORA: {
                    "completed": True,
                    "final_accuracy": 0.865,
                    "curve": [{"virtual_s": 400.0, "accuracy": 0.845}, {"virtual_s": 800.0, "accuracy": 0.865}],
                    "device_compute_s": 9.0,
                    "device_compute_measured_s": 9.0,
                    "bytes_up": 9,
                    "virtual_total_s": 800.0,
                },
            },
            "fleet": "mixed-phones",
        }
    )
    assert result["target_accuracy"] == pytest.approx(0.855) and result["methods"][ADAPTIVE]["time_to_target_s"] is None
    assert result["verdicts"]["adaptive_3x_sooner_than_fed_lora"]["verdict"] == "FAIL"
    assert result["common_target_accuracy"] == pytest.approx(0.81)
    assert result["ratios"]["fed_lora_over_adaptive_time_to_common_target"] == pytest.approx(8.0)
    assert result["ratios"]["8bit_over_adaptive_time_to_common_target"] == pytest.approx(1.8)


def test_c_keys_go_to_every_run_whose_app_reads_them_and_are_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runners = Runners()
    given = {"lora-r": 16, "chunk-size": 32, "lora-dropout": 0.1, "data": "mine.jsonl"}
    result = _bench(runners, run_config=given)
    mine = str(tmp_path / "mine.jsonl")  # made absolute: the fleet's devices do not run in this folder
    for config in runners.side_configs + runners.lora_configs:  # both apps read lora-r and data: same samples
        assert (config["lora-r"], config["data"]) == (16, mine)
    assert all(c["chunk-size"] == 32 and "lora-dropout" not in c for c in runners.side_configs)
    assert all(c["lora-dropout"] == 0.1 and "chunk-size" not in c for c in runners.lora_configs)
    assert result["settings"]["run_config"] == {**given, "data": mine}


@pytest.mark.parametrize(
    "given, message",
    [
        ({"rounds": 2}, "'rounds' was renamed: use num-server-rounds"),
        ({"bits": 4}, "sets bits itself; it is what the methods compare"),
        ({"train-samples": 10}, "sets train-samples itself; use --train-samples"),
        ({"no-such-key": 1}, r"unknown run-config key\(s\) \['no-such-key'\] for bench fleet"),
    ],
)
def test_c_keys_a_user_can_fix_are_refused_before_any_run(given, message):
    with pytest.raises(ValueError, match=message):
        FleetBenchSettings(run_config=given)
