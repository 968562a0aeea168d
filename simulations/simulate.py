"""``mobiflower simulate``: a Flower simulation of a device fleet side-tuning the bundled model.

It wraps ``flwr run`` with everything a run needs and nothing it leaves behind: its own
``FLWR_HOME`` in a scratch folder, runtime dependency installation off, free ports for the local
SuperLink, and that SuperLink (with Ray and every actor) stopped by pid at the end. The app folder
it runs is written from the installed package's defaults (:func:`default_app_config`), so it works
without the source tree; the repository's ``pyproject.toml`` declares the same defaults for
``flwr run .``. The ServerApp's log lines stream to the terminal, with live bars of rounds and
streamed samples on the command line; the run ends with the task's figures (accuracy and macro-F1,
or perplexity, loss and token accuracy) and the costs, also written by ``--out FILE.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mobiflower.clients.device_setup import DeviceSetup, device_run_config
from mobiflower.platform.run_summary import figure, format_metric, metric_key, summary_metrics
from mobiflower.simulations.flower_config import RunConfigValue, app_dir_for_run, fleet_run_config
from mobiflower.simulations.flower_run import FlowerRunResult, run_simulation
from mobiflower.simulations.loopback import LoopbackDeployment
from mobiflower.simulations.progress import RunProgress, line_printer
from mobiflower.strategies.config import SideTuningConfig


def default_app_config() -> dict[str, RunConfigValue]:
    """Every run-config key the app reads, with its default (devices' and the strategy's)."""
    config: dict[str, RunConfigValue] = device_run_config()
    config.update(SideTuningConfig().as_dict())
    config["delivery-dir"] = ""
    config["capture-dir"] = ""  # audit: write every reply as it leaves the device (clients.client_app)
    return config


@dataclass
class SimulateConfig:
    """One ``mobiflower simulate`` run: fleet size, resources, and run-config overrides."""

    devices: int = 4
    client_cpus: int = 1  # CPUs per simulated device (Ray actor); actors = machine CPUs // client_cpus
    workdir: str = "runs/simulate"
    timeout_s: float = 3600.0
    run_config: dict[str, RunConfigValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        merged = fleet_run_config(
            self.devices, self.client_cpus, self.run_config, default_app_config(), "the app reads"
        )
        config = SideTuningConfig.from_run_config(merged)  # fail here, not inside the ServerApp
        DeviceSetup.from_configs(merged, {"partition-id": 0, "num-partitions": self.devices})
        if config.fleet:
            from mobiflower.strategies.fleet_model import load_fleet

            load_fleet(config.fleet)  # a FleetModelError (a ValueError) says which fleets there are


ENGINES = ("simulation", "loopback", "processes")
"""Where the fleet runs: Flower's simulation engine (``flwr run``, Ray actors), a loopback deployment (a real
SuperLink and one SuperNode process per device on 127.0.0.1), or one OS process per device over a pipe
(:class:`mobiflower.simulations.device_grid.DeviceProcessGrid`: ``mobiflower local``). All three run the
same ServerApp strategy and the same ClientApp."""


def _run(
    config: SimulateConfig,
    scratch: Path,
    app_dir: Path,
    run_config: dict[str, RunConfigValue],
    env: dict[str, str],
    on_line: Callable[[str], None],
    engine: str,
) -> tuple[FlowerRunResult, dict[str, int] | None]:
    """One run of the app on ``engine`` (with Flower's traffic figures for a loopback deployment)."""
    if engine == "processes":
        return _run_in_processes(config, run_config, on_line), None
    if engine == "loopback":
        node_configs = [{"side-network-dir": str(scratch / "devices" / f"node-{i}")} for i in range(config.devices)]
        with LoopbackDeployment(scratch, config.devices, node_configs=node_configs, extra_env=env) as deployment:
            result = deployment.run(app_dir, run_config, on_line=on_line, timeout_s=config.timeout_s)
            return result, deployment.traffic(result.run_id)
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
    return result, None


class _LogLines(logging.Handler):
    """The ServerApp's log records as the lines ``flwr run`` would print (for the progress display)."""

    def __init__(self, on_line: Callable[[str], None]):
        super().__init__(logging.INFO)
        self.on_line = on_line

    def emit(self, record: logging.LogRecord) -> None:
        self.on_line(f"{record.levelname:<8}:  {record.getMessage()}")


def _run_in_processes(
    config: SimulateConfig, run_config: dict[str, RunConfigValue], on_line: Callable[[str], None]
) -> FlowerRunResult:
    """The ServerApp's strategy in this process over one device process per device (no Flower engine)."""
    from flwr.common.logger import FLOWER_LOGGER

    from mobiflower.simulations.device_grid import DeviceProcessGrid
    from mobiflower.strategies.server_app import fleet_clock
    from mobiflower.strategies.side_tuning import SideTuningStrategy

    merged = {**default_app_config(), **run_config}
    strategy_config = SideTuningConfig.from_run_config(merged)
    nodes = [{"partition-id": i, "num-partitions": config.devices} for i in range(config.devices)]
    logger = FLOWER_LOGGER
    handler, propagate_to_console = _LogLines(on_line), logger.handlers[:]
    for console in propagate_to_console:
        logger.removeHandler(console)  # the lines go through on_line, as flwr run's output does
    logger.addHandler(handler)
    t0 = time.perf_counter()
    try:
        with DeviceProcessGrid(merged, nodes) as grid:
            strategy = SideTuningStrategy(
                strategy_config, Path(str(merged["run-dir"])), merged, clock_for=fleet_clock(strategy_config)
            )
            strategy.start(grid)
    finally:
        logger.removeHandler(handler)
        for console in propagate_to_console:
            logger.addHandler(console)
    return FlowerRunResult(1, "finished:completed", True, "", time.perf_counter() - t0)


_ENGINE_NAMES = {
    "simulation": "simulation",
    "loopback": "loopback deployment (SuperLink + SuperNodes)",
    "processes": "device processes, no Flower engine",
}
"""How the opening line names each engine."""


def run_simulate(
    config: SimulateConfig,
    out: str | None = None,
    quiet: bool = False,
    engine: str = "simulation",
    progress: bool = False,
) -> dict[str, Any]:
    """Run the fleet; return (and write to ``out``) the run summary with Flower's run record.

    The ServerApp's log lines go to stderr unless ``quiet``; ``progress`` adds live bars of rounds
    and streamed samples over them (:class:`mobiflower.simulations.progress.RunProgress`).

    ``engine`` (:data:`ENGINES`): ``loopback`` runs the same job on a real Flower deployment on 127.0.0.1
    (a SuperLink and one SuperNode process per device, each installing its side network under the
    scratch folder) and adds Flower's own traffic figures to the summary; ``processes`` runs the
    strategy here over one device process per device (``mobiflower local``).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r} is unknown: use one of {', '.join(ENGINES)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    scratch = (Path(config.workdir) / f"{stamp}-{os.getpid()}").resolve()
    given = str(config.run_config.get("run-dir") or "")
    run_dir = Path(given).resolve() if given else scratch / "run"
    app_dir = app_dir_for_run(scratch, default_app_config())
    run_config = {**config.run_config, "run-dir": str(run_dir)}
    env = {"MOBIFLOWER_HOME": os.environ["MOBIFLOWER_HOME"]} if "MOBIFLOWER_HOME" in os.environ else {}
    if not quiet:
        where = _ENGINE_NAMES[engine]
        print(f"[simulate] {config.devices} devices, {where}; run folder {run_dir}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    on_line = RunProgress() if progress and not quiet else line_printer(quiet)
    try:
        result, traffic = _run(config, scratch, app_dir, run_config, env, on_line, engine)
    finally:
        if isinstance(on_line, RunProgress):
            on_line.close()
    summary = result.read_summary(run_dir)
    summary["simulation"] = {
        "devices": config.devices,
        "client_cpus": config.client_cpus,
        "engine": engine,
        "loopback": engine == "loopback",
        "run_id": result.run_id,
        "status": result.status,
        "wall_s": time.perf_counter() - t0,
        "run_dir": str(run_dir),
        "plot": str(run_dir / "summary.png"),
    }
    if traffic is not None:
        summary["flower_traffic"] = _flower_traffic_figures(summary, traffic)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(summary, indent=2))
    return summary


def _flower_traffic_figures(summary: dict[str, Any], traffic: dict[str, int]) -> dict[str, Any]:
    """Flower's own traffic counters beside what the frames cost, so its overhead per byte can be read."""
    frame_bytes = max(1, summary["frame_bytes"])
    return {
        **traffic,
        # Replies (device to SuperLink) are the frames plus small profile / evaluation replies,
        # so this bounds Flower's cost per frame byte from above.
        "inbound_per_frame_byte": traffic.get("inbound-bytes", 0) / frame_bytes,
        # ... and per byte the devices sent, evaluation frames included (what Flower adds on top)
        "inbound_per_up_byte": traffic.get("inbound-bytes", 0) / max(1, summary["bytes_up"]),
        "outbound_per_sent_byte": traffic.get("outbound-bytes", 0) / max(1, summary["bytes_down"]),
    }


SHORT = {"accuracy": "acc", "macro-f1": "F1", "perplexity": "ppl", "token-accuracy": "tok acc"}
"""Column headings of the task metrics (a metric not named here: its own name)."""


def _device_columns(summary: dict[str, Any]) -> list[tuple[str, int, Callable[[dict[str, Any]], str]]]:
    """The per-device table's columns (heading, width, cell): the task's test metrics, their zero-shot
    figures, the samples (and scored count where it differs) and the costs; a column empty for every
    device is left out (a zero-shot figure no device has, a count equal to the samples)."""
    names = summary_metrics(summary)["names"]

    def metric(prefix: str, name: str) -> Callable[[dict[str, Any]], str]:
        return lambda d: (
            ""
            if figure(d.get(f"{prefix}{metric_key(name)}")) is None
            else format_metric(name, d[f"{prefix}{metric_key(name)}"])
        )

    columns = [(f"test {SHORT.get(n, n)}", 9, metric("test_", n)) for n in names]
    columns += [(f"zero-shot {SHORT.get(n, n)}", 9, metric("zero_shot_", n)) for n in names]
    peak = "device_peak_rss_mb"  # the device process's peak resident memory (its own report)
    columns += [
        ("samples", 8, lambda d: str(d.get("test_samples", 0))),
        ("scored", 8, lambda d: str(d.get("test_count", ""))),
        ("MB up", 8, lambda d: f"{d['bytes_up'] / 1e6:.2f}"),
        ("MB down", 8, lambda d: f"{d['bytes_down'] / 1e6:.2f}"),
        ("fwd s", 7, lambda d: f"{d['device_forward_s']:.1f}"),
        ("peak MB", 8, lambda d: "n/a" if d.get(peak) is None else format(d[peak], ".0f")),
    ]
    devices = list(summary["devices"].values())
    counted = any(d.get("test_count", d.get("test_samples")) != d.get("test_samples") for d in devices)
    return [
        c
        for c in columns
        if c[0].startswith("test ")
        or (c[0] == "scored" and counted)
        or (c[0] != "scored" and any(c[2](d) for d in devices))
    ]


def _device_table(summary: dict[str, Any]) -> list[str]:
    columns = _device_columns(summary)
    widths = [max(width, len(heading)) for heading, width, _ in columns]
    lines = [f"{'device':<10} " + " ".join(f"{h:>{w}}" for (h, _, _), w in zip(columns, widths))]
    for name, d in sorted(summary["devices"].items()):
        lines.append(f"{name:<10} " + " ".join(f"{cell(d) or 'n/a':>{w}}" for (_, _, cell), w in zip(columns, widths)))
    return lines


def _fleet_figures(summary: dict[str, Any], prefix: str) -> str:
    """``accuracy 0.8537, macro-f1 0.8512``: the summary's ``<prefix><m>`` of every task metric it has."""
    names = summary_metrics(summary)["names"]
    shown = [(n, figure(summary.get(f"{prefix}{metric_key(n)}"))) for n in names]
    return ", ".join(f"{n} {format_metric(n, v)}" for n, v in shown if v is not None)


def format_summary(summary: dict[str, Any]) -> str:
    """The figures a user reads at the end of a run: the task's metrics per device and what it cost."""
    lines = _device_table(summary)
    sim = summary.get("simulation", {})
    cfg = summary.get("config", {})
    scored = "scored tokens" if summary.get("task") == "causal-lm" else "test samples"

    def num(value, fmt: str) -> str:
        return "n/a" if value is None else format(value, fmt)

    lines += [
        "",
        f"test {_fleet_figures(summary, 'test_') or 'n/a'} (all devices' {scored})   "
        f"{summary.get('task', 'classification')}, mode {cfg.get('mode')}, {cfg.get('num-server-rounds')} rounds, "
        f"{cfg.get('bits')}-bit frames",
        f"wire: {summary['bytes_up'] / 1e6:.2f} MB up ({summary['frames']} frames, "
        f"{summary['frame_bytes'] / max(1, summary['frames']) / 1024:.0f} KiB each), "
        f"{summary['bytes_down'] / 1e6:.2f} MB down",
        f"time: device forward {summary['device_forward_s']:.1f} s (all devices), server training "
        f"{summary['server_train_s']:.1f} s, training wall {summary['train_wall_s']:.1f} s, "
        f"pipeline efficiency {num(summary['pipeline_efficiency'], '.2f')}, run {sim.get('wall_s', summary['run_wall_s']):.0f} s",
        f"summary: {sim.get('run_dir', '')}/summary.json and summary.png",
    ]
    _insert_extras(summary, lines)
    return "\n".join(lines)


def _insert_extras(summary: dict[str, Any], lines: list[str]) -> None:
    """Flower's traffic, the fleet clock, zero-shot and round-0 figures, where the run has them."""
    if "flower_traffic" in summary:
        t = summary["flower_traffic"]
        lines.insert(
            -1,
            f"Flower moved {t.get('inbound-bytes', 0) / 1e6:.2f} MB up / {t.get('outbound-bytes', 0) / 1e6:.2f} "
            f"MB down: {t['inbound_per_frame_byte']:.3f} bytes up per frame byte",
        )
    virtual = summary.get("virtual") or {}
    if virtual.get("clock") == "virtual":
        adapted = {d: e["final_choice"] for d, e in virtual["devices"].items() if e.get("decisions")}
        lines.insert(
            -1,
            f"fleet {virtual['fleet']}: {virtual['total_s']:.1f} virtual s of training, device compute "
            f"{virtual['device_compute_s']:.1f} virtual s"
            + (
                f"; adapted ({virtual['deadline_s']:.1f} s deadline): "
                + ", ".join(f"{d} {c['bits']}-bit {c['taps']} layers" for d, c in sorted(adapted.items()))
                if virtual.get("adapt")
                else ""
            ),
        )
    at = lines.index("") + 2  # after the test figures
    initial = _fleet_figures(summary, "initial_test_")
    if initial:
        lines.insert(at, f"untrained side network (round 0): {initial}")
    zero_shot = _fleet_figures(summary, "zero_shot_")
    if zero_shot:
        lines.insert(at, f"zero-shot backbone: {zero_shot}")
