"""Benchmark: time-to-target-accuracy on a fleet of phones, mobiflower against federated LoRA.

One invocation runs three methods on the same fleet model, the same devices and the same samples
(same ``train-samples`` / ``validation-samples`` / ``test-samples`` / ``seed``, so every device
holds the same partition in every method):

* **fed-lora**: federated on-device LoRA (FedAvg), its learning rate and local epochs picked on
  the devices' validation splits over a small grid (:func:`tune_fed_lora`), then the chosen pair
  run once more with the test split scored after every round;
* **mobiflower-8bit**: side-tuning with fixed 8-bit frames (``adapt = false``);
* **mobiflower-adaptive**: side-tuning with the strategy adapting bits and work per device.

Every time is *virtual*: seconds measured on this machine, scaled by each device's profile
(``1 / speed`` for compute, latency + bytes / bandwidth for transfers), so a fleet of phones can
be timed honestly on one machine. The side-tuning run keeps its own virtual clock (its summary's
``virtual`` record); FedAvg is synchronous, so :func:`fed_lora_virtual_timeline` builds the
baseline's from its per-round, per-device record: a round lasts as long as its slowest device's
download + training + upload. Evaluation (traffic and compute spent scoring accuracy) is a
measurement, not training, and is excluded from both methods' virtual time and device compute.

The target is federated LoRA's final test accuracy minus one point; time-to-target is the first
evaluated round at or above it. Verdicts are computed from the measured numbers, never assumed: a
method that never reaches the target has no time-to-target (``None``, "never reached"), and a
comparison that this leaves undecided is ``n/a`` with the reason.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from mobiflower.simulations.bench.common import bench_run_config, keys_read_by
from mobiflower.simulations.bench.common import fmt as _num
from mobiflower.simulations.bench.fleet_report import ACCEPTANCE, ADAPTIVE, EIGHT_BIT, FED_LORA, METHODS, summarize
from mobiflower.strategies.fleet_model import DeviceProfile, load_fleet

EVALUATION_NOTE = (
    "virtual time and device compute count training only (forwards / local training and the "
    "transfers they need); the traffic and compute spent scoring accuracy are a measurement and "
    "are excluded for every method"
)

# Run-config keys the bench sets itself (its comparison and its measurement depend on them): `-c` may not
# set them, and the refusal says what does.
BENCH_SETS = {
    "train-samples": "use --train-samples",
    "validation-samples": "use --validation-samples",
    "test-samples": "use --test-samples",
    "seed": "use --seed",
    "model": "use --model",
    "devices": "use --devices",
    "fleet": "use --fleet",
    "num-server-rounds": "use --num-server-rounds (mobiflower) or --lora-rounds / --tune-rounds (federated LoRA)",
    "lr": "use --side-lrs (mobiflower) or --lrs / --skip-tuning (federated LoRA)",
    "local-epochs": "use --epochs or --skip-tuning",
    "train-seed": "use --side-seeds",
    "max-retries": "use --max-retries",
    "eval-every": "use --eval-every",
    "adapt": "it is what the methods compare (fixed 8-bit frames against adaptive)",
    "bits": "it is what the methods compare (fixed 8-bit frames against adaptive)",
    "eval-split": "every method is scored the same way, on the test split",
    "eval-samples": "every method is scored the same way, on every test sample",
    "final-eval": "every method is scored the same way, after its last round",
    "deliver": "delivery is part of what each method costs",
    "run-dir": "use --workdir",
}

SideRunner = Callable[[dict[str, Any]], dict[str, Any]]
"""Runs one side-tuning job from its run config; returns the run summary (``run_simulate``'s)."""


@dataclass
class FleetBenchSettings:
    """Everything one ``mobiflower bench fleet`` run depends on; recorded in the JSON as given."""

    fleet: str = "mixed-phones"  # a bundled fleet's name or a fleet TOML path
    devices: int = 4
    train_samples: int = 1000
    validation_samples: int = 400
    test_samples: int = 400
    seed: int = 0
    model: str = ""  # "" = the bundled model (both apps' default)
    rounds: int = 3  # mobiflower rounds (epochs over the fleet's samples; the pretrained tail's main job runs 2)
    eval_every: int = 1  # mobiflower: score the test split every k rounds (the curve's points)
    lora_rounds: int = 3  # federated LoRA rounds of the reported run
    tune_rounds: int = 2  # federated LoRA rounds of each tuning trial
    lrs: tuple[float, ...] = (5e-4, 1e-3, 2e-3)
    local_epochs: tuple[int, ...] = (1, 2)
    lora_pair: tuple[float, int] | None = None  # (lr, local epochs) given: no tuning
    # mobiflower's side-network learning rate: () = the app's default; several = picked on validation
    # (the same courtesy the baseline gets), each trial a fixed 8-bit run scored on validation
    side_lrs: tuple[float, ...] = ()
    # mobiflower's training seeds (run-config key train-seed: the side network's initial weights and the
    # trainer's shuffles; the data stay the `seed` split): each mobiflower method runs once per seed and
    # reports its mean final accuracy, its slowest time-to-target and its mean costs. () = one run.
    side_seeds: tuple[int, ...] = ()
    # A flaky fleet's worst tier answers half its requests: enough retries that a device is rarely
    # dropped for bad luck (each retry costs virtual time, which the side-tuning clock charges).
    max_retries: int = 8
    client_cpus: int = 1
    timeout_s: float = 3600.0  # per Flower run
    workdir: str = "runs/bench-fleet"
    # -c KEY=VALUE: more run-config keys, each given to every run whose app reads it (a key both apps read,
    # such as data or lora-r, goes to mobiflower's and federated LoRA's runs alike: they still share samples)
    run_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lrs = tuple(float(x) for x in self.lrs)
        self.local_epochs = tuple(int(x) for x in self.local_epochs)
        self.side_lrs = tuple(float(x) for x in self.side_lrs)
        self.side_seeds = tuple(int(x) for x in self.side_seeds)
        checks = [
            (self.devices >= 1, f"--devices must be at least 1, got {self.devices}"),
            (
                self.train_samples >= self.devices,
                f"--train-samples must be at least one per device ({self.devices}), got {self.train_samples}",
            ),
            (
                self.validation_samples >= self.devices,
                f"--validation-samples must be at least one per device ({self.devices}) to tune federated LoRA, "
                f"got {self.validation_samples}",
            ),
            (
                self.test_samples >= self.devices,
                f"--test-samples must be at least one per device ({self.devices}), got {self.test_samples}",
            ),
            (self.rounds >= 1, f"--num-server-rounds must be at least 1, got {self.rounds}"),
            (self.eval_every >= 1, f"--eval-every must be at least 1, got {self.eval_every}"),
            (self.lora_rounds >= 1, f"--lora-rounds must be at least 1, got {self.lora_rounds}"),
            (self.tune_rounds >= 1, f"--tune-rounds must be at least 1, got {self.tune_rounds}"),
            (
                bool(self.lrs) and all(math.isfinite(x) and x > 0 for x in self.lrs),
                f"--lrs must be positive learning rates, got {list(self.lrs)}",
            ),
            (
                bool(self.local_epochs) and all(e >= 1 for e in self.local_epochs),
                f"--epochs must be whole numbers >= 1, got {list(self.local_epochs)}",
            ),
            (
                all(math.isfinite(x) and x > 0 for x in self.side_lrs),
                f"--side-lrs must be positive learning rates, got {list(self.side_lrs)}",
            ),
            (
                all(x >= 0 for x in self.side_seeds) and len(set(self.side_seeds)) == len(self.side_seeds),
                f"--side-seeds must be distinct seeds >= 0, got {list(self.side_seeds)}",
            ),
            (self.max_retries >= 0, f"--max-retries must be 0 or more, got {self.max_retries}"),
            (self.client_cpus >= 1, f"--client-cpus must be at least 1, got {self.client_cpus}"),
            (self.timeout_s > 0, f"--timeout must be positive, got {self.timeout_s}"),
        ]
        if self.lora_pair is not None:
            lr, epochs = float(self.lora_pair[0]), int(self.lora_pair[1])
            self.lora_pair = (lr, epochs)
            checks.append(
                (
                    math.isfinite(lr) and lr > 0 and epochs >= 1,
                    f"--skip-tuning takes a positive LR and EPOCHS >= 1, got {lr} {epochs}",
                )
            )
        for ok, why in checks:
            if not ok:
                raise ValueError(why)
        if self.run_config:
            self.run_config = bench_run_config("fleet", self.run_config, BENCH_SETS, apps=("side", "fed-lora"))
        load_fleet(self.fleet).devices(self.devices)  # FleetModelError (a ValueError) says what to fix

    def device_ids(self) -> list[str]:
        """The fleet's device ids as both apps name them (``device-<partition>``)."""
        return [f"device-{i}" for i in range(self.devices)]

    def fleet_ref(self) -> str:
        """The fleet as the ServerApp must see it: a bundled name as is, a file as an absolute path
        (the ServerApp does not run in this directory)."""
        path = Path(self.fleet)
        return str(path.resolve()) if path.suffix else self.fleet

    def common_run_config(self, app: str = "side") -> dict[str, Any]:
        """The keys every method shares, so every device holds the same samples in every method, and the
        ``-c`` keys that ``app`` (``side``: mobiflower's, or ``fed-lora``) reads."""
        config: dict[str, Any] = {
            "train-samples": self.train_samples,
            "validation-samples": self.validation_samples,
            "test-samples": self.test_samples,
            "seed": self.seed,
        }
        if self.model:
            config["model"] = self.model
        return {**config, **keys_read_by(self.run_config, app)}

    def side_tuning_trial_config(self, lr: float) -> dict[str, Any]:
        """One mobiflower learning-rate trial: fixed 8-bit, no fleet clock (accuracy does not depend on
        it), the validation split scored once, the round before the last (the last scores test)."""
        return {
            **self.common_run_config(),
            "num-server-rounds": self.rounds,
            "lr": lr,
            "bits": 8,
            "eval-split": "validation",
            "eval-every": max(1, self.rounds - 1),
            "eval-samples": 0,
            "deliver": False,
        }

    def side_run_config(self, adapt: bool, lr: float | None = None) -> dict[str, Any]:
        """A side-tuning run on the fleet's virtual clock, scored on the test split after every round."""
        config = {
            **self.common_run_config(),
            "fleet": self.fleet_ref(),
            "adapt": adapt,
            "num-server-rounds": self.rounds,
            "eval-every": self.eval_every,
            "eval-split": "test",
            "eval-samples": 0,
            "max-retries": self.max_retries,
        }
        if not adapt:
            config["bits"] = 8
        if lr is not None:
            config["lr"] = lr
        return config

    def fed_lora_run_config(self, lr: float, local_epochs: int) -> dict[str, Any]:
        """The reported federated LoRA run: the chosen pair, test split scored after every round."""
        return {
            **self.common_run_config("fed-lora"),
            "num-server-rounds": self.lora_rounds,
            "lr": lr,
            "local-epochs": local_epochs,
            "eval-split": "test",
            "eval-samples": 0,
            "final-eval": True,
        }


# ------------------------------------------------------------------------------------------
# virtual time


def fed_lora_virtual_timeline(summary: Mapping[str, Any], profiles: Mapping[str, DeviceProfile]) -> dict[str, Any]:
    """Federated LoRA's rounds on the fleet's virtual clock.

    FedAvg is synchronous: round r waits for its slowest device, so it lasts
    max over devices of ``download_s(bytes_down) + compute_s(train_s) + upload_s(bytes_up)`` (that
    device's figures that round). Each curve point is the cumulative virtual time at a round's end
    with that round's accuracy; the final test (when the run scored one) is the last point, at the
    end of training. ``device_compute_s`` sums ``compute_s(train_s)`` over devices and rounds.
    Evaluation broadcasts and scoring are excluded (a measurement, not training); so is the
    server's FedAvg (microseconds next to a phone's round).
    """
    curve: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    now = compute = 0.0
    for record in summary.get("rounds", []):
        durations: dict[str, float] = {}
        for device, d in record.get("devices", {}).items():
            if "train_s" not in d:  # evaluated but did not train this round
                continue
            if device not in profiles:
                raise ValueError(
                    f"round {record.get('round')}: device {device!r} has no fleet profile "
                    f"(profiles for {sorted(profiles)})"
                )
            p = profiles[device]
            work = p.compute_s(float(d["train_s"]))
            compute += work
            durations[device] = p.download_s(int(d.get("bytes_down", 0))) + work + p.upload_s(int(d.get("bytes_up", 0)))
        slowest = max(durations, key=durations.__getitem__, default=None)
        span = durations[slowest] if slowest is not None else 0.0
        now += span
        rounds.append({"round": record.get("round"), "virtual_s": span, "critical_device": slowest})
        if record.get("accuracy") is not None:
            curve.append({"round": record.get("round"), "virtual_s": now, "accuracy": float(record["accuracy"])})
    if summary.get("final_accuracy_split") == "test" and summary.get("final_accuracy") is not None:
        curve.append({"round": "final", "virtual_s": now, "accuracy": float(summary["final_accuracy"])})
    return {"curve": curve, "total_s": now, "device_compute_s": compute, "rounds": rounds}


# ------------------------------------------------------------------------------------------
# one method's figures from its run summary


def _count(value: Any) -> int | None:
    """A fleet-wide count; a per-reason mapping of counts is summed."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return sum(_count(v) or 0 for v in value.values())
    return int(value)


def side_tuning_figures(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The bench's figures of one side-tuning run (from its ``virtual`` record and counts)."""
    virtual = summary.get("virtual")
    if not virtual:
        raise ValueError(
            "the side-tuning summary has no 'virtual' record: the run was not given a fleet "
            "(run config key 'fleet'), or the side-tuning app predates fleet runs"
        )
    status = summary.get("simulation", {}).get("status", "finished:completed")
    return {
        "completed": status == "finished:completed" and summary.get("test_accuracy") is not None,
        "status": status,
        "final_accuracy": summary.get("test_accuracy"),
        # the test curve's frames (server-side evaluation on the test split) are the benchmark's measurement
        "bytes_up": None
        if summary.get("bytes_up") is None
        else summary["bytes_up"]
        - sum(int(d.get("test_curve_bytes_up", 0)) for d in summary.get("devices", {}).values()),
        "test_curve_bytes_up": sum(int(d.get("test_curve_bytes_up", 0)) for d in summary.get("devices", {}).values()),
        "bytes_down": summary.get("bytes_down"),
        "device_compute_s": float(virtual["device_compute_s"]),
        "device_compute_measured_s": summary.get("device_forward_s"),
        "virtual_total_s": float(virtual["total_s"]),
        "curve": [dict(p) for p in virtual.get("curve", [])],
        "frames": _count(summary.get("frames")),
        "frames_accepted": _count(summary.get("frames_accepted")),
        "frames_refused": _count(summary.get("frames_refused")),
        "adapt": virtual.get("adapt"),
        "devices": virtual.get("devices", {}),
        "run_dir": summary.get("simulation", {}).get("run_dir"),
        "wall_s": summary.get("simulation", {}).get("wall_s", summary.get("run_wall_s")),
    }


def fed_lora_figures(summary: Mapping[str, Any], profiles: Mapping[str, DeviceProfile]) -> dict[str, Any]:
    """The bench's figures of the reported federated LoRA run, timed by :func:`fed_lora_virtual_timeline`."""
    timeline = fed_lora_virtual_timeline(summary, profiles)
    status = summary.get("simulation", {}).get("status", "finished:completed")
    cfg = summary.get("config", {})
    return {
        "completed": status == "finished:completed" and summary.get("final_accuracy") is not None,
        "status": status,
        "final_accuracy": summary.get("final_accuracy"),
        "bytes_up": summary.get("bytes_up"),
        "bytes_down": summary.get("bytes_down"),
        "bytes_down_eval": summary.get("bytes_down_eval"),
        # the final adapter on every device: delivery, counted in the method's total bytes (it is a
        # part of bytes_down_eval too: the bench scores the delivered adapter there)
        "bytes_down_delivery": summary.get("bytes_down_delivery", 0),
        "device_compute_s": timeline["device_compute_s"],
        "device_compute_measured_s": summary.get("device_compute_s"),
        "virtual_total_s": timeline["total_s"],
        "curve": timeline["curve"],
        "rounds": timeline["rounds"],
        "frames": None,
        "frames_accepted": None,
        "frames_refused": None,  # adapters, not frames
        "lr": cfg.get("lr"),
        "local_epochs": cfg.get("local_epochs"),
        "adapter_bytes": summary.get("adapter_bytes"),
        "run_dir": summary.get("simulation", {}).get("run_dir"),
        "wall_s": summary.get("simulation", {}).get("wall_s", summary.get("run_wall_s")),
    }


_SEED_MEANS = (
    "final_accuracy",
    "bytes_up",
    "bytes_down",
    "device_compute_s",
    "device_compute_measured_s",
    "virtual_total_s",
)


def over_seeds(runs: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> dict[str, Any]:
    """One method's figures from its runs at several training seeds: the first run's record (curve,
    frames, devices), with the mean of each figure in ``_SEED_MEANS`` over the seeds and every run kept
    under ``seed_runs``; :func:`summarize` adds the slowest seed's time-to-target."""
    figures = dict(runs[0])
    figures["seed_runs"] = [{"train_seed": seed, **run} for seed, run in zip(seeds, runs)]
    figures["completed"] = all(r.get("completed") for r in runs)
    for key in _SEED_MEANS:
        values = [r.get(key) for r in runs]
        figures[key] = None if None in values else sum(values) / len(values)
    return figures


def _failed(error: BaseException) -> dict[str, Any]:
    """A method whose run failed: recorded, so the other methods' figures still come out."""
    return {
        "completed": False,
        "status": "failed",
        "error": f"{type(error).__name__}: {error}",
        "final_accuracy": None,
        "bytes_up": None,
        "bytes_down": None,
        "device_compute_s": None,
        "device_compute_measured_s": None,
        "virtual_total_s": None,
        "curve": [],
        "frames": None,
        "frames_accepted": None,
        "frames_refused": None,
    }


# ------------------------------------------------------------------------------------------
# the run


def run_fleet_bench(
    settings: FleetBenchSettings,
    side_runner: SideRunner | None = None,
    fed_lora_runner: Callable[[Any], dict[str, Any]] | None = None,
    quiet: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Tune and run federated LoRA, then mobiflower fixed 8-bit and adaptive; the bench's result dict.

    ``side_runner(run_config) -> summary`` and ``fed_lora_runner(FedLoraRun) -> summary`` default
    to real Flower simulations (``run_simulate`` / ``run_fed_lora``); inject others to test. With
    the real side runner both side-tuning run configs are checked first, so a key the app does not
    read fails in seconds, not after the baseline's hour. A run that fails is recorded as failed
    (its error in the JSON) and the others still run.
    """
    fleet = load_fleet(settings.fleet)
    profiles = fleet.profiles_for(settings.device_ids())
    side_runner = side_runner or _simulate_runner(settings, quiet)
    fed_lora_runner = fed_lora_runner or _fed_lora_runner(quiet)
    lora_run = _lora_run_of(settings)
    methods: dict[str, dict[str, Any]] = {}

    def run_method(name: str, run_config: dict[str, Any], run: Callable[[], dict[str, Any]]) -> None:
        log(f"[bench fleet] {name}: {settings.devices} devices on fleet {fleet.name!r} ...")
        methods[name] = _run_method(run, run_config, log)

    side_tuning = _tune_side_lr(settings, side_runner, log)
    # side-tuning first: minutes, where the baseline's tuning takes most of the bench's hour
    for name, adapt in ((EIGHT_BIT, False), (ADAPTIVE, True)):
        side = settings.side_run_config(adapt=adapt, lr=side_tuning["lr"])
        run_method(name, side, lambda side=side: _side_method(settings, side_runner, side, log))
    tuning = _tune_fed_lora(settings, lora_run, fed_lora_runner, log)
    lora = settings.fed_lora_run_config(tuning["lr"], tuning["local_epochs"])
    run_method(FED_LORA, lora, lambda: fed_lora_figures(fed_lora_runner(lora_run(lora)), profiles))
    return summarize(
        {
            "benchmark": "fleet",
            "fleet": fleet.name,
            "fleet_source": fleet.source,
            "methods": {name: methods[name] for name in METHODS},
            "tuning": tuning,
            "side_tuning": side_tuning,
            "settings": {
                **asdict(settings),
                "acceptance": asdict(ACCEPTANCE),
                "profiles": {d: p.tier for d, p in profiles.items()},
            },
            "notes": _notes(),
        }
    )


def _fed_lora_runner(quiet: bool) -> Callable[[Any], dict[str, Any]]:
    """The real federated LoRA runner: one Flower simulation per ``FedLoraRun``."""
    from mobiflower.simulations.baselines.fed_lora import run_fed_lora

    return lambda run: run_fed_lora(run, quiet=quiet)


def _lora_run_of(settings: FleetBenchSettings) -> Callable[[dict[str, Any]], Any]:
    """``run_config -> FedLoraRun`` on the bench's fleet size, resources and scratch folder."""
    from mobiflower.simulations.baselines.fed_lora import FedLoraRun

    def lora_run(run_config: dict[str, Any]) -> FedLoraRun:
        return FedLoraRun(
            devices=settings.devices,
            client_cpus=settings.client_cpus,
            workdir=str(Path(settings.workdir) / "fed-lora"),
            timeout_s=settings.timeout_s,
            run_config=run_config,
        )

    return lora_run


def _tune_side_lr(settings: FleetBenchSettings, side_runner: SideRunner, log: Callable[[str], None]) -> dict[str, Any]:
    """mobiflower's learning rate: the settings' default, or the best of ``side_lrs`` on validation."""
    if not settings.side_lrs:
        return {"mode": "default", "lr": None}
    trials = []
    for lr in settings.side_lrs:
        log(f"[bench fleet] mobiflower learning-rate trial: lr {lr:g}, scored on validation ...")
        summary = side_runner(settings.side_tuning_trial_config(lr))
        scored = [
            r["validation_accuracy"] for r in summary.get("rounds", []) if r.get("validation_accuracy") is not None
        ]
        trials.append({"lr": lr, "validation_accuracy": scored[-1] if scored else None})
        log(f"  validation accuracy {_num(trials[-1]['validation_accuracy'], '.4f')}")
    best = max(
        (t for t in trials if t["validation_accuracy"] is not None),
        key=lambda t: t["validation_accuracy"],
        default=None,
    )
    if best is None:
        raise RuntimeError("no mobiflower learning-rate trial produced a validation accuracy")
    log(f"  chose lr {best['lr']:g} for mobiflower (validation accuracy {best['validation_accuracy']:.4f})")
    return {"mode": "validation-grid", "lr": best["lr"], "trials": trials}


def _tune_fed_lora(
    settings: FleetBenchSettings,
    lora_run: Callable[[dict[str, Any]], Any],
    fed_lora_runner: Callable[[Any], dict[str, Any]],
    log: Callable[[str], None],
) -> dict[str, Any]:
    """The baseline's learning rate and local epochs: given (``lora_pair``) or tuned on validation."""
    from mobiflower.simulations.baselines.fed_lora import tune_fed_lora

    if settings.lora_pair is not None:
        lr, epochs = settings.lora_pair
        return {
            "mode": "given",
            "lr": lr,
            "local_epochs": epochs,
            "note": "given on the command line (--skip-tuning), not tuned by this run",
        }
    grid = f"{len(settings.lrs)} lrs x {len(settings.local_epochs)} local-epochs"
    log(f"[bench fleet] fed-lora: tuning on validation, {grid}, {settings.tune_rounds} rounds each ...")
    base = lora_run(
        {**settings.common_run_config("fed-lora"), "num-server-rounds": settings.tune_rounds, "eval-samples": 0}
    )
    picked = tune_fed_lora(base, settings.lrs, settings.local_epochs, runner=fed_lora_runner)
    lr, epochs = picked["best"]["lr"], picked["best"]["local-epochs"]
    log(f"  chose lr {lr:g}, {epochs} local epochs (validation accuracy {picked['best']['validation_accuracy']:.4f})")
    return {
        "mode": "validation-grid",
        "lr": lr,
        "local_epochs": epochs,
        "lrs_grid": list(settings.lrs),
        "local_epochs_grid": list(settings.local_epochs),
        "tune_rounds": settings.tune_rounds,
        "best": picked["best"],
        "trials": picked["trials"],
    }


def _run_method(run: Callable[[], dict[str, Any]], run_config: dict[str, Any], log: Callable[[str], None]) -> dict:
    """One method's figures (a failed Flower run recorded as failed), with its time and run config."""
    t0 = time.perf_counter()
    try:
        figures = run()
    except RuntimeError as err:  # a Flower run that failed (FlowerRunError) or wrote no summary
        figures = _failed(err)
        log(f"  failed: {figures['error'].splitlines()[0]}")
    figures["bench_s"] = time.perf_counter() - t0
    figures["run_config"] = run_config
    if figures["completed"]:
        log(
            f"  final accuracy {figures['final_accuracy']:.4f}, virtual {figures['virtual_total_s']:.1f} s, "
            f"device compute {figures['device_compute_s']:.1f} s (virtual)"
        )
    return figures


def _side_method(
    settings: FleetBenchSettings, side_runner: SideRunner, run_config: dict[str, Any], log: Callable[[str], None]
) -> dict[str, Any]:
    """A side-tuning method's figures: one run, or the mean over ``side_seeds`` training seeds."""
    if not settings.side_seeds:
        return side_tuning_figures(side_runner(run_config))
    runs = []
    for seed in settings.side_seeds:
        log(f"  training seed {seed} ...")
        runs.append(side_tuning_figures(side_runner({**run_config, "train-seed": seed})))
        log(f"    final accuracy {_num(runs[-1]['final_accuracy'], '.4f')}")
    return over_seeds(runs, settings.side_seeds)


def _simulate_runner(settings: FleetBenchSettings, quiet: bool) -> SideRunner:
    """The real side runner, after checking both side-tuning run configs against the app's keys."""
    from mobiflower.simulations.simulate import SimulateConfig, run_simulate

    def config(run_config: dict[str, Any]) -> SimulateConfig:
        return SimulateConfig(
            devices=settings.devices,
            client_cpus=settings.client_cpus,
            workdir=str(Path(settings.workdir) / "simulate"),
            timeout_s=settings.timeout_s,
            run_config=run_config,
        )

    for adapt in (False, True):
        try:
            config(settings.side_run_config(adapt))
        except ValueError as err:
            raise ValueError(f"the installed side-tuning app cannot run a fleet benchmark: {err}") from err

    def run(run_config: dict[str, Any]) -> dict[str, Any]:
        return run_simulate(config(run_config), quiet=quiet)

    return run


def _notes() -> list[str]:
    """What a reader of the JSON must know to read the figures right."""
    return [
        EVALUATION_NOTE,
        "fed-lora's timeline is built here from its per-round, per-device record (synchronous FedAvg: each "
        "round waits for its slowest device); mobiflower's comes from the side-tuning run's own virtual clock",
        "fed-lora's timeline does not model the fleet's availability (every device answers every round), "
        "which favours the baseline on a flaky fleet",
        "device_compute_s is virtual (measured seconds / the device's speed, summed over devices); "
        "device_compute_measured_s is the same work in seconds measured on this machine",
        "bytes_down of fed-lora is training traffic only (its evaluation broadcasts are bytes_down_eval); "
        "mobiflower's bytes_down is its summary's, which includes the side networks sent to be evaluated "
        "and delivered (counted against mobiflower); mobiflower's bytes_up leaves out the test-curve frames "
        "its server-side evaluation asked for (test_curve_bytes_up: the benchmark's measurement, like "
        "fed-lora's evaluation broadcasts), and counts its validation frames",
        "fed-lora's tuning trials are not counted in its time-to-target, compute or bytes",
        "total bytes (the bytes verdict) = up + down + delivery: fed-lora's bytes_down_delivery is its final "
        "adapter sent to every device; mobiflower's deliveries are inside its bytes_down",
        "time_to_target_s is null when the method never reached the target in its run",
    ]
