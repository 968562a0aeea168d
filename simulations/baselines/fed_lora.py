"""Federated on-device LoRA as a real Flower simulation, in the same harness as ``mobiflower simulate``.

Same fleet (``--devices`` SuperNodes, ``client-cpus`` each), same device config keys, so the same
partitions of the same samples as the side-tuning run (:class:`DeviceSetup`), and the same run
folder convention: the ServerApp writes ``summary.json`` there and :func:`run_fed_lora` reads it
back. :func:`tune_fed_lora` picks the learning rate and local epochs on the devices' *validation*
splits (the issue asks for an honestly tuned baseline, not a weak default); the test split is only
read for the final figure of each trial and never drives the choice. The task (``task``, ``labels``,
``prompt-template``, ``max-length``) is the run config's, as for ``simulate``: the devices train and score
it, and tuning chooses by its primary metric (accuracy: highest; perplexity: lowest).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mobiflower.clients.device_setup import RUN_CONFIG_KEYS, device_run_config
from mobiflower.platform.run_config import as_config
from mobiflower.platform.run_summary import metric_key, summary_metrics
from mobiflower.platform.tasks import TaskConfig
from mobiflower.simulations.baselines.fed_lora_strategy import FedLoraConfig
from mobiflower.simulations.flower_config import RunConfigValue, fleet_run_config, write_app_dir
from mobiflower.simulations.flower_run import run_simulation

SERVERAPP = "mobiflower.simulations.baselines.fed_lora_server_app:app"
CLIENTAPP = "mobiflower.simulations.baselines.fed_lora_client_app:app"
# the device fields the fed-LoRA ClientApp reads: all but the forward's (it trains the whole fp32 model:
# no taps, no weight precision)
_DEVICE_FIELDS = tuple(name for name in RUN_CONFIG_KEYS if name not in ("weights", "num_taps"))
DEFAULT_LR_GRID = (1e-4, 5e-4, 1e-3, 2e-3)
DEFAULT_EPOCH_GRID = (1, 2)


def default_fed_lora_app_config() -> dict[str, RunConfigValue]:
    """Every run-config key the fed-LoRA apps read, with its default (devices' keys as in ``simulate``)."""
    config: dict[str, RunConfigValue] = device_run_config(_DEVICE_FIELDS)
    config.update(FedLoraConfig().as_dict())  # includes seed, batch-size, lr, num-server-rounds, run-dir
    config.update(as_config(TaskConfig()))  # task, labels, prompt-template, max-length
    return config


@dataclass
class FedLoraRun:
    """One federated LoRA simulation: fleet size, resources, and run-config overrides."""

    devices: int = 4
    client_cpus: int = 1
    workdir: str = "runs/fed-lora"
    timeout_s: float = 3600.0
    run_config: dict[str, RunConfigValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        merged = fleet_run_config(
            self.devices, self.client_cpus, self.run_config, default_fed_lora_app_config(), "the fed-LoRA apps read"
        )
        FedLoraConfig.from_run_config(merged)  # fail here, not inside the ServerApp
        TaskConfig.from_run_config(merged).build()


def run_fed_lora(config: FedLoraRun, out: str | None = None, quiet: bool = True) -> dict[str, Any]:
    """Run federated LoRA as a Flower simulation; return (and write to ``out``) its summary."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    scratch = (Path(config.workdir) / f"{stamp}-{os.getpid()}-{time.monotonic_ns() % 10**6}").resolve()
    given = str(config.run_config.get("run-dir") or "")
    run_dir = Path(given).resolve() if given else scratch / "run"
    app_dir = write_app_dir(
        scratch / "flower-app",
        default_fed_lora_app_config(),
        serverapp=SERVERAPP,
        clientapp=CLIENTAPP,
        name="mobiflower-fed-lora",
    )
    run_config = {**config.run_config, "run-dir": str(run_dir), "devices": config.devices}
    env = {"MOBIFLOWER_HOME": os.environ["MOBIFLOWER_HOME"]} if "MOBIFLOWER_HOME" in os.environ else {}

    def on_line(line: str) -> None:
        if not quiet and "fed-lora round" in line:
            print(line.rstrip(), file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    result = run_simulation(
        app_dir,
        run_config,
        num_supernodes=config.devices,
        client_cpus=config.client_cpus,
        scratch=scratch,
        on_line=on_line,
        timeout_s=config.timeout_s,
        extra_env=env,
    )
    summary = result.read_summary(run_dir, "the fed-LoRA run")
    summary["simulation"] = {
        "devices": config.devices,
        "client_cpus": config.client_cpus,
        "run_id": result.run_id,
        "status": result.status,
        "wall_s": time.perf_counter() - t0,
        "run_dir": str(run_dir),
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2))
    return summary


def tune_fed_lora(
    base: FedLoraRun,
    lrs: Sequence[float] = DEFAULT_LR_GRID,
    local_epochs: Sequence[int] = DEFAULT_EPOCH_GRID,
    runner: Callable[[FedLoraRun], dict[str, Any]] = run_fed_lora,
) -> dict[str, Any]:
    """Try every (lr, local-epochs) pair on the devices' validation splits; keep the best by the task's
    primary metric (classification: highest accuracy; causal-LM: lowest perplexity).

    Each trial is a full federated run (same fleet, rounds and data as ``base``) scored on
    validation after its last round; ties go to the cheaper trial (less device compute). The
    final test evaluation is switched off in trials, so the test split cannot leak into the
    choice. Returns ``{"best": {"lr", "local-epochs", "validation_<metric>", ...}, "trials": [...],
    "metric": ...}``; run the chosen pair once more with ``final-eval`` on for the reported figure.
    """
    if not lrs or not local_epochs:
        raise ValueError("tune_fed_lora needs at least one learning rate and one local-epochs value")
    task = TaskConfig.from_run_config(base.run_config).build()
    key = f"validation_{metric_key(task.primary)}"
    trials = []
    for lr, epochs in itertools.product(lrs, local_epochs):
        run = FedLoraRun(
            devices=base.devices,
            client_cpus=base.client_cpus,
            workdir=base.workdir,
            timeout_s=base.timeout_s,
            run_config={
                **base.run_config,
                "lr": float(lr),
                "local-epochs": int(epochs),
                "eval-split": "validation",
                "final-eval": False,
                "run-dir": "",
            },
        )
        summary = runner(run)
        trials.append(
            {
                "lr": float(lr),
                "local-epochs": int(epochs),
                key: summary.get(f"final_{key}"),
                "device_compute_s": summary.get("device_compute_s"),
                "run_dir": summary.get("simulation", {}).get("run_dir"),
            }
        )
    scored = [t for t in trials if t[key] is not None and math.isfinite(t[key])]
    if not scored:
        raise RuntimeError(
            f"no tuning trial produced a validation {task.primary}: check the devices' validation splits"
        )
    sign = 1.0 if task.higher_is_better else -1.0
    best = max(scored, key=lambda t: (sign * t[key], -(t["device_compute_s"] or 0.0)))
    return {"best": best, "trials": trials, "metric": task.primary}


def format_summary(summary: dict[str, Any]) -> str:
    """The run's final figure (the task's primary metric), its settings, what went over the wire and what
    the devices computed."""
    cfg = summary.get("config", {})
    metric = summary_metrics(summary)["primary"]
    value = summary.get(f"final_{metric_key(metric)}")
    split = summary.get("final_split", summary.get("final_accuracy_split"))
    lines = [
        f"fed-lora: {split} {metric} {'n/a' if value is None else format(value, '.4f')} after {cfg.get('num_server_rounds')} "
        f"rounds (lr {cfg.get('lr')}, {cfg.get('lr_schedule')}, {cfg.get('local_epochs')} local epochs, "
        f"r {cfg.get('lora_r')})",
        f"wire: {summary['bytes_up'] / 1e6:.2f} MB up, {summary['bytes_down'] / 1e6:.2f} MB down "
        f"(+{summary['bytes_down_eval'] / 1e6:.2f} MB for evaluation); adapter {summary['adapter_bytes'] / 1e6:.2f} MB",
        f"device compute: {summary['device_compute_s']:.1f} s over all devices, "
        f"{summary['device_compute_critical_s']:.1f} s on the slowest device per round (summed)",
    ]
    return "\n".join(lines)


__all__ = [
    "FedLoraRun",
    "run_fed_lora",
    "tune_fed_lora",
    "default_fed_lora_app_config",
    "format_summary",
    "DEFAULT_LR_GRID",
    "DEFAULT_EPOCH_GRID",
    "SERVERAPP",
    "CLIENTAPP",
]
