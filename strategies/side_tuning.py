"""The side-tuning strategy: drives a fleet of forward-only devices and trains side networks on the server.

A strategy whose ``start`` runs the MobiLLM loop on a Flower ``Grid`` instead of FedAvg's
synchronous rounds:

1. **Profile** every device (:mod:`~mobiflower.strategies.fleet_profile`) and build the job's side
   networks, trainers and frame intake (:mod:`~mobiflower.strategies.job`).
2. **Stream** (round 1, and every round when the activation cache is off): devices forward their
   training samples chunk by chunk while the server trains on what landed
   (:mod:`~mobiflower.strategies.streaming`: in-flight requests, retries, drops).
3. **Cached rounds**: the backbone is frozen, so later rounds train from the activation cache;
   devices are idle (those outside the cache stream again).
4. Per round: optional FedAvg of per-device networks (Flower's own sample-weighted average),
   validation every ``eval-every`` rounds (:mod:`~mobiflower.strategies.evaluation`), and a
   checkpoint (:mod:`~mobiflower.strategies.run_state`).
5. **Deliver** each device its side network, have each device score its own test split with the
   installed network alone (by the task's metrics: :mod:`mobiflower.platform.tasks`), and write the
   run summary (:mod:`~mobiflower.strategies.run_report`).

Time is the fleet's virtual clock in a simulation with a ``fleet``, wall time otherwise
(:mod:`~mobiflower.strategies.round_clock`). Every reply is checked before it is used
(:mod:`~mobiflower.strategies.reply_checks`); one that fails is a failed request, counted per device
and reason in the summary, and never stops the round.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from mobiflower.platform import messages as m
from mobiflower.platform.pretrained_tail import save_peft_adapter
from mobiflower.platform.process_memory import RssSampler, current_rss_mb, release_free_heap
from mobiflower.platform.run_summary import format_metric, metric_key, write_summary
from mobiflower.platform.side_networks import save_side_network
from mobiflower.platform.tasks import Task
from mobiflower.strategies.config import SideTuningConfig
from mobiflower.strategies.evaluation import Evaluator, deliver
from mobiflower.strategies.fleet_profile import profile_fleet
from mobiflower.strategies.job import Job, build_job
from mobiflower.strategies.round_clock import FleetClock
from mobiflower.strategies.run_report import run_report
from mobiflower.strategies.run_state import (
    DeviceState,
    FleetError,
    RunState,
    Usage,
    discard_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from mobiflower.strategies.streaming import StreamingRound

__all__ = ["DeviceState", "FleetError", "SideTuningStrategy"]


def curve_point(task: Task, rnd: int | str, now: float, split: str, result: dict[str, Any]) -> dict[str, Any]:
    """A point of the time-to-quality curve: the task's metrics (keys as in the summary) at ``now``."""
    point: dict[str, Any] = {"round": rnd, "virtual_s": now, "split": split, "metric": task.primary}
    point.update({metric_key(n): result.get(n) for n in task.metric_names})
    return point


def record_test(task: Task, dev: DeviceState, stats: dict[str, Any]) -> None:
    """A device's final test of what it installed: ``test_<m>`` and ``zero_shot_<m>`` per task metric,
    the samples and the count they were scored over, its peak memory."""
    for name in task.metric_names:
        dev.metrics[f"test_{metric_key(name)}"] = float(stats[name])
        dev.metrics[f"zero_shot_{metric_key(name)}"] = float(stats[f"zero-shot-{name}"])
    dev.metrics["test_samples"] = int(stats["samples"])
    dev.metrics["test_count"] = int(stats["count"])
    dev.metrics["device_peak_rss_mb"] = float(stats["peak-rss-mb"])


class SideTuningStrategy:
    """MobiLLM side-tuning over a Flower ``Grid`` (see the module docstring for the loop).

    The ServerApp's strategy: like Flower's strategies it runs from ``start(grid)``, but it drives
    its own loop (streaming rounds, cached rounds, delivery) rather than FedAvg's synchronous
    configure/aggregate rounds, so it does not subclass :class:`flwr.serverapp.strategy.Strategy`,
    whose hooks it would never call.
    """

    def __init__(
        self,
        config: SideTuningConfig,
        run_dir: Path,
        run_config: dict[str, Any] | None = None,
        clock_for: Callable[[list[str]], FleetClock] | None = None,
    ):
        """``clock_for`` builds a fleet's virtual clock for the profiled device ids (a simulation with a
        ``fleet``); without it, times are the ones measured (a deployment)."""
        self.config = config
        self.clock_for = clock_for
        self.run_dir = Path(run_dir)
        self.run_config = dict(run_config or {})
        self.task = config.task.build()  # what the fleet fine-tunes for: its metrics name every figure
        self.state = RunState()
        self.job: Job | None = None  # built by start, once the fleet is profiled

    # ---- the run ----------------------------------------------------------------------------
    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        **_: Any,
    ) -> dict[str, Any]:
        """Run the whole side-tuning job on ``grid``; returns (and writes) the run summary.

        ``num_rounds`` and ``timeout`` (Flower's names) override the config's rounds and request timeout
        for this run: the strategy takes a checked copy, the config it was given stays as it was."""
        overrides = {"num_server_rounds": num_rounds, "request_timeout": timeout}
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if overrides:
            self.config = dataclasses.replace(self.config, **overrides)
        cfg = self.config
        torch.set_num_threads(max(1, cfg.server_threads))
        self.summary()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t_run = time.perf_counter()
        memory = RssSampler().start()  # the server process's RSS, sampled through the run
        job = self.job = build_job(
            cfg, grid, self.run_dir, self.state, profile_fleet(grid, cfg, self.state, self.clock_for)
        )
        evaluator = Evaluator(job)
        first_round, train_wall = 1, 0.0
        if cfg.resume:
            restored = restore_checkpoint(self.run_dir, self.state, job.store, job.intake, cfg)
            first_round, train_wall, job.clock.now = restored.next_round, restored.train_wall, restored.virtual_now
        elif (self.run_dir / "checkpoint").exists():
            log(
                WARNING,
                "%s holds an earlier run's checkpoint; starting over (set resume = true to continue it)",
                self.run_dir,
            )
            discard_checkpoint(self.run_dir)
        if cfg.eval_initial and first_round == 1:
            self.state.initial = evaluator.evaluate(0, "test")
        for rnd in range(first_round, cfg.num_server_rounds + 1):
            t0, usage = time.perf_counter(), self.state.usage()
            record = self._train_round(job, rnd)
            train_wall += time.perf_counter() - t0
            self._advance_clock(job, record, train_wall)
            self._validate(job, evaluator, rnd, record)
            self._close_round(job, rnd, record, t0, usage, train_wall)
        final = self._finish(job, evaluator)
        self.state.curve.append(curve_point(self.task, "final", job.clock.now, "test", final))
        summary = run_report(job, final, train_wall, time.perf_counter() - t_run, self.run_config)
        summary["server_memory"] = {**memory.stop(), "paging": job.store.paging()}
        write_summary(summary, self.run_dir)
        primary = self.task.primary
        log(
            INFO,
            "test %s %s over %d devices; summary in %s",
            primary,
            format_metric(primary, summary[f"test_{metric_key(primary)}"]),
            len(summary["devices"]),
            self.run_dir / "summary.json",
        )
        return summary

    def _train_round(self, job: Job, rnd: int) -> dict[str, Any]:
        """One round's training: stream (round 1, or without the cache) or an epoch over the cache."""
        cfg, store = self.config, job.store
        record: dict[str, Any] = {"round": rnd}
        train0 = store.train_seconds
        aggregate = bool(cfg.aggregate_every and rnd % cfg.aggregate_every == 0)
        average = store.averaging(rnd)
        averaged = False
        if rnd == 1 or not cfg.activation_cache:
            record.update(StreamingRound(job, rnd).run())
        else:  # one pass per trainer: train, then (unless FedAvg comes first) join the tail average
            opted_out = {n for n, d in self.state.working().items() if d.device_id in job.intake.uncached}
            streamed = StreamingRound(job, rnd, only=opted_out).run() if opted_out else None
            averaged = average and not aggregate
            torch.set_num_threads(cfg.cache_threads or os.cpu_count() or 1)  # devices are idle now
            try:
                stats = store.train_epoch(then_average=averaged)
            finally:
                torch.set_num_threads(max(1, cfg.server_threads))
            record.update({"loss": stats["loss"], "phase": "cache", "cache_train_s": stats["seconds"]})
            if streamed is not None:  # devices outside the cache streamed their samples again, trained on arrival
                record.update(
                    {"phase": "cache+stream", "stream_loss": streamed["loss"], "samples": streamed["samples"]}
                )
        if aggregate:  # FedAvg, and (in the same pass over the devices) the tail average
            averaged = self._fedavg(job, rnd, then_average=average) or averaged
            record["aggregated"] = True
        if average and not averaged:
            store.update_average()
        record["server_train_s"] = store.train_seconds - train0
        release_free_heap()  # the trainer threads' freed activations: back to the OS, not kept per arena
        return record

    def _advance_clock(self, job: Job, record: dict[str, Any], train_wall: float) -> None:
        clock = job.clock
        if not clock.virtual:
            clock.now = train_wall
        elif record.get("phase", "").startswith("cache"):  # after any streaming: the server's epoch
            clock.advance(record["cache_train_s"])
        record["virtual_s" if clock.virtual else "train_wall_s"] = clock.now

    def _validate(self, job: Job, evaluator: Evaluator, rnd: int, record: dict[str, Any]) -> None:
        """Every ``eval-every`` rounds but the last: validation (and hybrid mode's personal heads first)."""
        cfg = self.config
        if not cfg.eval_every or rnd % cfg.eval_every or rnd == cfg.num_server_rounds:
            return
        if cfg.mode == "hybrid":
            job.store.personalize([d.device_id for d in self.state.working().values()], evaluator.personal_validation())
        result = evaluator.evaluate(rnd, cfg.eval_split, max_samples=cfg.eval_samples)
        for name in self.task.metric_names:
            record[f"{cfg.eval_split}_{metric_key(name)}"] = result.get(name)
        self.state.curve.append(curve_point(self.task, rnd, job.clock.now, cfg.eval_split, result))

    def _close_round(
        self, job: Job, rnd: int, record: dict[str, Any], t0: float, usage: dict[int, Usage], train_wall: float
    ) -> None:
        """The round's traffic and times (``usage``: the devices' at its start), per device too; then its
        checkpoint."""
        cfg, state = self.config, self.state
        record["wall_s"] = time.perf_counter() - t0
        spent = {n: state.devices[n].usage() - before for n, before in usage.items()}
        record["bytes_up"] = sum(u.bytes_up for u in spent.values())
        record["bytes_down"] = sum(u.bytes_down for u in spent.values())
        record["device_forward_s"] = sum(u.busy_s for u in spent.values())
        record["devices"] = {state.devices[n].device_id: u.as_round() for n, u in spent.items()}
        record["server_rss_mb"] = current_rss_mb()
        state.rounds.append(record)
        save_checkpoint(self.run_dir, rnd, train_wall, job.clock.now, state, job.store, job.intake, cfg)
        if cfg.crash_after_round == rnd:  # fault injection: die as a killed server would, no cleanup
            log(WARNING, "crash-after-round=%d: killing the server process now", rnd)
            os.kill(os.getpid(), signal.SIGKILL)
        primary = self.task.primary
        val = record.get(f"{cfg.eval_split}_{metric_key(primary)}")
        log(
            INFO,
            "[round %d/%d] %s loss %.4f%s, server train %.1f s, wall %.1f s, up %.2f MB, server RSS %.0f MB%s",
            rnd,
            cfg.num_server_rounds,
            record.get("phase", "stream"),
            record.get("loss", float("nan")),
            f", {cfg.eval_split} {primary} {format_metric(primary, val)}" if val is not None else "",
            record["server_train_s"],
            record["wall_s"],
            record["bytes_up"] / 1e6,
            record["server_rss_mb"],
            f", virtual {job.clock.now:.1f} s" if job.clock.virtual else "",
        )

    def _fedavg(self, job: Job, rnd: int, then_average: bool = False) -> bool:
        """FedAvg of the per-device networks; True when ``then_average`` added them to the tail average."""
        weights = {}
        for dev in self.state.working().values():
            trained = int(job.intake.accepted_samples.get(dev.device_id, 0))
            if trained:  # a network that never trained would pull the average back to the start
                weights[dev.device_id] = trained
        if not weights:
            return False
        if self.config.side_memory_mb:  # paged networks: a streamed average holds one network at a time
            state = job.store.average_networks(weights)
        else:  # Flower's own FedAvg arithmetic over ArrayRecords
            records = []
            for device, trained in weights.items():
                net = job.store.trainers[device].net
                records.append(
                    RecordDict(
                        {
                            "net": ArrayRecord(
                                torch_state_dict={k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
                            ),
                            m.STATS_KEY: MetricRecord({"num-examples": trained}),
                        }
                    )
                )
            averaged = aggregate_arrayrecords(records, "num-examples")
            state = averaged.to_torch_state_dict()
        job.store.load_all(state, then_average=then_average)
        log(INFO, "[round %d] FedAvg of %d device side networks (%d samples)", rnd, len(weights), sum(weights.values()))
        return then_average

    def _finish(self, job: Job, evaluator: Evaluator) -> dict[str, Any]:
        """Export the final networks, deliver them, and have every device test what it installed."""
        cfg, store = self.config, job.store
        exported = self.run_dir / "side_networks"

        def export(device: str, net) -> None:
            if net.config.family == "tail":  # a PEFT adapter folder for the stock model
                save_peft_adapter(net.config, net.state_dict(), exported / device)
            else:
                save_side_network(net, exported / f"{device}.safetensors")

        per_device = cfg.mode == "per-device"  # each device's own network: exported in the averaging pass
        if store.use_average(then=export if per_device else None):
            log(
                INFO,
                "delivering the mean weights of the last %d rounds (tail averaging)",
                min(cfg.average_epochs, cfg.num_server_rounds),
            )
        if cfg.mode == "hybrid":  # personal heads over the delivered trunk
            store.personalize([d.device_id for d in self.state.working().values()], evaluator.personal_validation())
            for dev in self.state.working().values():  # how much of its own text each device's network kept
                if dev.device_id in store.personal_epochs_kept:
                    dev.metrics["personal_epochs"] = store.personal_epochs_kept[dev.device_id]
        if not per_device:
            for dev in self.state.devices.values():
                export(dev.device_id, store.network_for(dev.device_id))
        if cfg.deliver:
            deliver(job)
        result = evaluator.evaluate(cfg.num_server_rounds, "test", installed=cfg.deliver, final=True)
        for dev in self.state.devices.values():
            stats = result["per_device"].get(dev.device_id)
            if stats:
                record_test(self.task, dev, stats)
        return result

    def summary(self) -> None:
        """Log the run's settings (the line `mobiflower simulate` reads its round count from)."""
        cfg = self.config
        log(
            INFO,
            "SideTuningStrategy: task=%s mode=%s family=%s r=%d rounds=%d chunk=%d in-flight=%d bits=%d cache=%s%s",
            self.task.name,
            cfg.mode,
            cfg.family,
            cfg.reduction,
            cfg.num_server_rounds,
            cfg.chunk_size,
            cfg.in_flight,
            cfg.bits,
            cfg.activation_cache,
            f" label-private (epsilon {cfg.label_epsilon:g})" if cfg.label_private else "",
        )
