"""The side-tuning strategy: drives a fleet of forward-only devices and trains side networks on the server.

A Flower :class:`~flwr.serverapp.strategy.Strategy` whose ``start`` runs the MobiLLM loop on a
``Grid`` instead of FedAvg's synchronous rounds:

1. **Profile** every device (``query.profile``): backbone fingerprint, tapped layers, data sizes,
   forward speed, memory, and the frozen head state the server's side network needs.
2. **Stream** (round 1, and every round when the activation cache is off): each device's training
   samples are cut into chunks; ``in_flight`` forward requests per device stay pushed, so a device
   always has its next chunk queued while the server trains on the last one. Replies are pulled
   as they land and handed to a training thread, so pulling never waits for training.
3. **Cached rounds**: the backbone is frozen, so later rounds train from the activation cache;
   devices are idle.
4. Per round: optional FedAvg of per-device networks (``aggregate_train``, Flower's own
   sample-weighted average), on-device validation every ``eval-every`` rounds
   (``configure_evaluate`` / ``aggregate_evaluate``), and a checkpoint.
5. **Deliver** each device its side network, then have each device score its own test split with
   the installed network alone, and write the run summary (JSON and PNG plots).

Failures: a device's error reply or a frame that fails validation is recorded, never lost
silently; a forward request is retried ``max-retries`` times, then the device is dropped for the
rest of the run and the run goes on with the others. Every reply is checked before it is used
(:mod:`~mobiflower.strategies.reply_checks`); one that fails is a failed request, counted per
device and reason in the summary (``replies_refused``), and never stops the round.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from mobiflower.platform import messages as m
from mobiflower.platform.atomic import atomic_directory
from mobiflower.platform.intake import FrameIntake, Refusal, run_limits
from mobiflower.platform.process_memory import RssSampler, current_rss_mb, release_free_heap
from mobiflower.platform.run_summary import write_summary
from mobiflower.platform.pretrained_tail import load_tail_weights, save_peft_adapter
from mobiflower.platform.side_networks import SideNetworkConfig, SideNetworkError, build_side_network, save_side_network
from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
from mobiflower.platform.trainer import DecodedFrame, TrainConfig, decode_for, evaluate_network
from mobiflower.strategies.config import SideTuningConfig
from mobiflower.strategies.fair_queue import FairQueue
from mobiflower.strategies.frame_policy import FrameChoice, FramePolicy
from mobiflower.strategies.reply_checks import (ReplyError, delivery_receipt, evaluate_reply, forward_reply,
                                                 profile_reply, residual_reply)


class LinkProfile(Protocol):
    """What the strategy reads of a simulated device's profile (``simulations.fleet.DeviceProfile``)."""

    tier: str
    latency_ms: float
    availability: float

    def upload_s(self, nbytes: int) -> float: ...

    def compute_s(self, measured_s: float) -> float: ...


class FleetClock(Protocol):
    """A virtual clock of a simulated fleet (``simulations.fleet.VirtualClock``): in a simulation the
    strategy sees the transfer and compute times each device's profile dictates, derived from the
    compute it measured and the bytes it sent, so time-to-accuracy is honest on one machine."""

    profiles: Mapping[str, LinkProfile]
    device_busy: dict[str, float]

    def forward(self, device: str, sent_at: float, request_bytes: int, compute_s: float,
                reply_bytes: int) -> float: ...

    def answers(self, device: str, request: str) -> bool: ...

    def train(self, landed_at: float, train_s: float) -> float: ...


class FleetError(RuntimeError):
    """The fleet cannot run this job (no devices, mismatched backbones, every device failed)."""


@dataclass
class DeviceState:
    """What the server knows and has measured about one device."""

    node_id: int
    device_id: str
    profile: dict[str, Any]
    train_samples: int
    next_offset: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    frame_bytes: int = 0
    frames: int = 0
    samples_forwarded: int = 0
    samples_lost: int = 0  # samples a dropped device was asked for and never delivered
    forward_s: float = 0.0
    busy_s: float = 0.0
    failures: list[str] = field(default_factory=list)
    dropped: bool = False
    delivered_digest: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    replies_refused: dict[str, int] = field(default_factory=dict)  # replies that failed their checks, by reason

    def refuse(self, err: Exception, what: str, record: bool = True) -> str:
        """Count a reply that failed its checks (any other error reading it counts as 'unreadable') and,
        with ``record``, add why to the failures; returns why."""
        reason = err.reason if isinstance(err, ReplyError) else f"{what}: unreadable"
        self.replies_refused[reason] = self.replies_refused.get(reason, 0) + 1
        why = str(err) if isinstance(err, ReplyError) else f"unreadable reply ({type(err).__name__}: {err})"
        if record:
            self.failures.append(f"{what}: {why}")
        return why

    def account(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "fingerprint": self.profile.get("fingerprint"), "bytes_up": self.bytes_up, "bytes_down": self.bytes_down,
                "frame_bytes": self.frame_bytes, "frames": self.frames, "samples_forwarded": self.samples_forwarded, "samples_lost": self.samples_lost,
                "device_forward_s": self.busy_s, "backbone_forward_s": self.forward_s,
                "failures": self.failures, "dropped": self.dropped,
                "positive_share": self.profile.get("positive-share"),
                # device forward passes per training sample: 1 with the activation cache, the rounds without
                "forward_passes_per_sample": self.samples_forwarded / self.train_samples if self.train_samples else 0.0,
                "activation_cache": bool(self.profile.get("activation-cache", True)),
                "replies_refused": dict(self.replies_refused),
                **self.metrics}


def _config_bytes(record: ConfigRecord) -> int:
    return len(json.dumps({k: v if not isinstance(v, bytes) else len(v) for k, v in record.items()}, default=str))


def _forward_reply(reply: Message, samples: int | None = None) -> tuple[bytes, dict[str, Any]]:
    """The frame and checked cost metrics of a forward reply (``samples``: what the request asked for);
    raises :class:`ReplyError` (a ValueError) for a reply the strategy must not use."""
    return forward_reply(reply, samples)


def _evaluate_reply(reply: Message) -> dict[str, float] | None:
    """An evaluate reply's checked metrics, or None for an error or a reply that fails its checks."""
    try:
        return evaluate_reply(reply)
    except ReplyError:
        return None


class SideTuningStrategy(Strategy):
    """MobiLLM side-tuning over a Flower ``Grid`` (see the module docstring for the loop)."""

    def __init__(self, config: SideTuningConfig, run_dir: Path, run_config: dict[str, Any] | None = None,
                 clock_for: Callable[[list[str]], FleetClock] | None = None):
        """``clock_for`` builds a fleet's virtual clock for the profiled device ids (a simulation with a
        ``fleet``); without it, times are the ones measured (a deployment)."""
        self.config = config
        self.clock_for = clock_for
        self.clock: FleetClock | None = None
        self.policy: FramePolicy | None = None
        self.vnow = 0.0  # virtual seconds of training so far (a fleet simulation); wall seconds otherwise
        self.curve: list[dict[str, Any]] = []  # (round, virtual seconds, accuracy) after each evaluation
        self.late_frames: dict[str, int] = {}
        self._frames_accepted = 0
        # per streaming round: its start (virtual and wall), when each device can next be sent a request,
        # each pushed request's virtual send time and size, the last landing, the server's trainer
        self._round_v0, self._round_t0, self._v_landed, self._v_server = 0.0, time.perf_counter(), 0.0, 0.0
        self._v_ready: dict[int, float] = {}
        self._v_sent: dict[str, tuple[float, int]] = {}
        self._v_upload: dict[str, float] = {}
        self._only: set[int] | None = None
        self._backbone_keys: dict[int, dict[str, Any]] = {}  # per node: the backbone a fleet model gives it
        self.uncached: list[str] = []
        self.run_dir = Path(run_dir)
        self.run_config = dict(run_config or {})
        self.devices: dict[int, DeviceState] = {}
        self.store: SideNetworkStore | None = None
        self.intake: FrameIntake | None = None
        self.side_config: SideNetworkConfig | None = None
        self.rounds: list[dict[str, Any]] = []
        self.events: list[str] = []
        self.initial: dict[str, Any] | None = None
        self._stream_totals = {"wall_s": 0.0, "device_s": 0.0, "slowest_device_s": 0.0, "train_s": 0.0}
        self._eval_frames: dict[tuple[str, int], dict[str, list[DecodedFrame]]] = {}  # server-side evaluation
        self.profiles_refused: dict[str, dict[str, int]] = {}  # profile replies that failed their checks, by node

    # ---- Strategy hooks -------------------------------------------------------------------
    def summary(self) -> None:
        cfg = self.config
        log(INFO, "SideTuningStrategy: mode=%s family=%s r=%d rounds=%d chunk=%d in-flight=%d bits=%d cache=%s%s",
            cfg.mode, cfg.family, cfg.reduction, cfg.rounds, cfg.chunk_size, cfg.in_flight, cfg.bits,
            cfg.activation_cache, f" label-private (epsilon {cfg.label_epsilon:g})" if cfg.label_private else "")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """The first wave of forward requests of a streaming round: ``in_flight`` per working device."""
        plans = self._plan_round(self._only)
        waves = []
        for node_id, plan in plans.items():
            remaining = sum(int(r["samples"]) for r in plan) if self.policy else 0
            for _ in range(min(self.config.in_flight, len(plan))):
                choice = self._choose(node_id, remaining)  # samples not yet asked for, this request's included
                request = plan.popleft()
                waves.append(self._forward_message(node_id, request, server_round, config, choice))
        self._plans = plans
        return waves

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """FedAvg of per-device side networks, weighted by the samples each was trained on."""
        return self._aggregate([r.content for r in replies if r.has_content()])

    @staticmethod
    def _aggregate(records: list[RecordDict]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if not records:
            return None, None
        averaged = aggregate_arrayrecords(records, "num-examples")
        total = sum(int(r[m.STATS_KEY]["num-examples"]) for r in records)
        return averaged, MetricRecord({"num-examples": total, "devices": len(records)})

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """One evaluate request per working device, carrying that device's side network (built lazily)."""
        for node_id, dev in list(self._working().items()):
            content = RecordDict({m.CONFIG_KEY: ConfigRecord({**dict(config), **self._backbone_keys.get(node_id, {})})})
            if not bool(config.get("installed", False)):
                weights, net_cfg = m.network_records(self.store.network_for(dev.device_id))
                content[m.NETWORK_KEY], content[m.NETWORK_CONFIG_KEY] = weights, net_cfg
            dev.bytes_down += m.array_bytes(content.get(m.NETWORK_KEY, ArrayRecord())) + _config_bytes(
                content[m.CONFIG_KEY])
            yield Message(content, dst_node_id=node_id, message_type=m.EVALUATE, group_id=str(server_round),
                          ttl=self.config.request_timeout)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sample-weighted accuracy over the devices that answered."""
        correct = count = 0.0
        for reply in replies:
            stats = _evaluate_reply(reply)
            if stats is None:
                continue
            correct += float(stats["accuracy"]) * float(stats["samples"])
            count += float(stats["samples"])
        if count == 0:
            return None
        return MetricRecord({"accuracy": correct / count, "samples": count})

    # ---- the run ----------------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, **_: Any) -> dict[str, Any]:  # type: ignore[override]
        """Run the whole side-tuning job on ``grid``; returns (and writes) the run summary."""
        cfg = self.config
        if num_rounds is not None:
            cfg.rounds = num_rounds
        if timeout is not None:
            cfg.request_timeout = timeout
        torch.set_num_threads(max(1, cfg.server_threads))
        self._grid = grid  # label-private training steps ask devices for residuals through it
        self.summary()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        t_run = time.perf_counter()
        memory = RssSampler().start()  # the server process's RSS, sampled through the run
        self._profile(grid)
        first_round, train_wall = 1, 0.0
        if cfg.resume:
            first_round, train_wall = self._restore()
        elif (self.run_dir / "checkpoint").exists():
            log(WARNING, "%s holds an earlier run's checkpoint; starting over (set resume = true to continue it)",
                self.run_dir)
            for stale in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
                shutil.rmtree(self.run_dir / stale, ignore_errors=True)
        if cfg.eval_initial and first_round == 1:
            self.initial = self._evaluate(grid, 0, {"split": "test"})
        for rnd in range(first_round, cfg.rounds + 1):
            t0 = time.perf_counter()
            record: dict[str, Any] = {"round": rnd}
            up0 = {n: (d.bytes_up, d.bytes_down, d.busy_s, d.frame_bytes) for n, d in self.devices.items()}
            train0 = self.store.train_seconds
            aggregate = bool(cfg.aggregate_every and rnd % cfg.aggregate_every == 0)
            average = self.store.averaging(rnd)
            averaged = False
            if rnd == 1 or not cfg.activation_cache:
                record.update(self._stream_round(grid, rnd))
            else:  # one pass per trainer: train, then (unless FedAvg comes first) join the tail average
                opted_out = {n for n, d in self._working().items() if d.device_id in self.intake.uncached}
                if opted_out:  # devices outside the cache stream their samples again, trained on arrival
                    streamed = self._stream_round(grid, rnd, only=opted_out)
                averaged = average and not aggregate
                torch.set_num_threads(cfg.cache_threads or os.cpu_count() or 1)  # devices are idle now
                try:
                    stats = self.store.train_epoch(then_average=averaged)
                finally:
                    torch.set_num_threads(max(1, cfg.server_threads))
                record.update({"loss": stats["loss"], "phase": "cache", "cache_train_s": stats["seconds"]})
                if opted_out:
                    record.update({"phase": "cache+stream", "stream_loss": streamed["loss"],
                                   "samples": streamed["samples"]})
            if aggregate:  # FedAvg, and (in the same pass over the devices) the tail average
                averaged = self._fedavg(rnd, then_average=average) or averaged
                record["aggregated"] = True
            if average and not averaged:
                self.store.update_average()
            record["server_train_s"] = self.store.train_seconds - train0
            release_free_heap()  # the trainer threads' freed activations: back to the OS, not kept per arena
            train_wall += time.perf_counter() - t0
            if self.clock is None:
                self.vnow = train_wall
            elif record.get("phase", "").startswith("cache"):  # after any streaming: the server's epoch
                self.vnow += record["cache_train_s"]
            record["virtual_s" if self.clock is not None else "train_wall_s"] = self.vnow
            last = rnd == cfg.rounds
            if cfg.mode == "hybrid" and not last and cfg.eval_every and rnd % cfg.eval_every == 0:
                self.store.personalize([d.device_id for d in self._working().values()])
            if cfg.eval_every and rnd % cfg.eval_every == 0 and not last:
                result = self._evaluate(grid, rnd, {"split": cfg.eval_split, "max-samples": cfg.eval_samples})
                record[f"{cfg.eval_split}_accuracy"] = result.get("accuracy")
                self.curve.append({"round": rnd, "virtual_s": self.vnow, "accuracy": result.get("accuracy"),
                                   "split": cfg.eval_split})
            record["wall_s"] = time.perf_counter() - t0
            record["bytes_up"] = sum(d.bytes_up - up0[n][0] for n, d in self.devices.items())
            record["bytes_down"] = sum(d.bytes_down - up0[n][1] for n, d in self.devices.items())
            record["device_forward_s"] = sum(d.busy_s - up0[n][2] for n, d in self.devices.items())
            record["devices"] = {d.device_id: {"bytes_up": d.bytes_up - up0[n][0], "bytes_down": d.bytes_down - up0[n][1],
                                               "device_forward_s": d.busy_s - up0[n][2],
                                               "frame_bytes": d.frame_bytes - up0[n][3]}
                                 for n, d in self.devices.items()}
            self.rounds.append(record)
            self._checkpoint(rnd, train_wall)
            if cfg.crash_after_round == rnd:  # fault injection: die as a killed server would, no cleanup
                log(WARNING, "crash-after-round=%d: killing the server process now", rnd)
                os.kill(os.getpid(), signal.SIGKILL)
            val = record.get(f"{cfg.eval_split}_accuracy")
            record["server_rss_mb"] = current_rss_mb()
            log(INFO, "[round %d/%d] %s loss %.4f%s, server train %.1f s, wall %.1f s, up %.2f MB, server RSS %.0f MB%s",
                rnd, cfg.rounds, record.get("phase", "stream"), record.get("loss", float("nan")),
                f", {cfg.eval_split} accuracy {val:.4f}" if val is not None else "", record["server_train_s"],
                record["wall_s"], record["bytes_up"] / 1e6, record["server_rss_mb"],
                f", virtual {self.vnow:.1f} s" if self.clock is not None else "")
        final = self._finish(grid)
        self.curve.append({"round": "final", "virtual_s": self.vnow, "accuracy": final["accuracy"], "split": "test"})
        summary = self._summary(final, train_wall, time.perf_counter() - t_run)
        summary["server_memory"] = {**memory.stop(), "paging": self.store.paging()}
        write_summary(summary, self.run_dir)
        log(INFO, "test accuracy %.4f over %d devices; summary in %s", summary["test_accuracy"],
            len(summary["devices"]), self.run_dir / "summary.json")
        return summary

    # ---- request / reply ----------------------------------------------------------------------
    def _push_tracked(self, grid: Grid, messages: list[Message]) -> tuple[dict[str, Message], list[Message]]:
        """Push; return ({message id: message} for those Flower took, [messages it refused])."""
        if not messages:
            return {}, []
        ids = {str(i) for i in grid.push_messages(messages) if i}
        taken, refused = {}, []
        for msg in messages:
            mid = msg.metadata.message_id
            (taken.__setitem__(mid, msg) if mid and mid in ids else refused.append(msg))
        return taken, refused

    def _request_all(self, grid: Grid, messages: Iterable[Message], timeout: float,
                     window: int | None = None) -> dict[int, Message | str]:
        """Send one request per node and wait; {node id: its reply, or why there is none}.

        ``window`` bounds the requests in flight at once: the next message is only built (a
        generator builds lazily) and pushed when a reply frees a slot, so messages that carry a
        side network each (evaluate, deliver) never sit in memory for the whole fleet at once.
        Replies are matched by ``reply_to_message_id``: an error reply Flower makes itself (node
        unavailable, TTL expired) comes from the SuperLink, not from the node it is about.
        """
        todo = iter(messages)
        out: dict[int, Message | str] = {}
        taken: dict[str, Message] = {}
        sent_at: dict[str, float] = {}

        def fill() -> None:
            batch = []
            while window is None or len(taken) + len(batch) < window:
                msg = next(todo, None)
                if msg is None:
                    break
                batch.append(msg)
            pushed, refused = self._push_tracked(grid, batch)
            for msg in refused:
                out[msg.metadata.dst_node_id] = "Flower refused the request"
            now = time.monotonic()
            taken.update(pushed)
            sent_at.update({mid: now for mid in pushed})

        fill()
        wait = 0.001  # poll fast at first (a label-private step waits on this), then back off to 50 ms
        while taken:
            landed = False
            for reply in grid.pull_messages(list(taken)):
                msg = taken.pop(reply.metadata.reply_to_message_id, None)
                if msg is not None:
                    out[msg.metadata.dst_node_id] = reply
                    landed = True
            now = time.monotonic()
            for mid in [mid for mid in taken if now - sent_at[mid] > timeout]:
                out[taken.pop(mid).metadata.dst_node_id] = f"no reply within {timeout:.0f} s"
            fill()
            if taken:
                wait = 0.001 if landed else min(0.05, wait * 2)
                time.sleep(wait)
        return out

    @staticmethod
    def _why(reply: Message | str) -> str:
        if isinstance(reply, str):
            return reply
        return f"error {reply.error.code}: {reply.error.reason}" if reply.has_error() else "malformed reply"

    # ---- profile ----------------------------------------------------------------------------
    def _profile_message(self, node_id: int) -> Message:
        config = ConfigRecord({"probe-samples": 8, **self._backbone_keys.get(node_id, {})})
        return Message(RecordDict({m.CONFIG_KEY: config}), dst_node_id=node_id, message_type=m.PROFILE,
                       ttl=self.config.request_timeout)

    def _take_profiles(self, replies: dict[int, Message | str], frozen_by: dict[str, dict[str, torch.Tensor]]) -> None:
        """Record each device that described itself; a device whose profile failed is left out."""
        for node, reply in sorted(replies.items()):
            try:
                if isinstance(reply, str) or reply.has_error():
                    raise RuntimeError(self._why(reply))
                profile, frozen = profile_reply(reply)
            except Exception as err:  # noqa: BLE001 - a device that cannot describe itself is left out
                if not isinstance(err, RuntimeError):  # a reply that failed its checks: counted
                    reason = err.reason if isinstance(err, ReplyError) else "profile: unreadable"
                    counts = self.profiles_refused.setdefault(f"node {node}", {})
                    counts[reason] = counts.get(reason, 0) + 1
                self.events.append(f"profile of node {node} failed: {err}")
                log(WARNING, "node %s failed its profile and is left out: %s", node, err)
                continue
            if profile["device-id"] in {d.device_id for n, d in self.devices.items() if n != node}:
                raise FleetError(f"two SuperNodes claim {profile['device-id']}: give each its own partition-id "
                                 f"(--node-config 'partition-id=<i> num-partitions=<n>')")
            dev = DeviceState(node_id=node, device_id=profile["device-id"], profile=profile,
                              train_samples=int(profile["train"]))
            self.devices[node] = dev
            frozen_by.setdefault(profile["fingerprint"], frozen)
            log(INFO, "device %s (node %s): %s, %d train / %d validation / %d test samples, %.1f samples/s, "
                "%.0f MB", dev.device_id, node, profile["fingerprint"], profile["train"], profile["validation"],
                profile["test"], profile["forward-samples-per-s"], profile["rss-mb"])

    def _profile(self, grid: Grid) -> None:
        node_ids = sorted(grid.get_node_ids())
        if not node_ids:
            raise FleetError("no devices are connected: start SuperNodes (or set num-supernodes) first")
        frozen_by: dict[str, dict[str, torch.Tensor]] = {}
        self._take_profiles(self._request_all(grid, [self._profile_message(n) for n in node_ids],
                                              self.config.request_timeout), frozen_by)
        if not self.devices:
            raise FleetError(f"none of the {len(node_ids)} devices could be profiled: {self.events}")
        if self.clock_for is not None:
            self.clock = self.clock_for(sorted(d.device_id for d in self.devices.values()))
            for node, dev in self.devices.items():  # a fleet model may give a tier another backbone
                p = self.clock.profiles[dev.device_id]
                keys = {k: v for k, v in (("model", getattr(p, "backbone", "")),
                                          ("backbone-layers", int(getattr(p, "backbone_layers", 0) or 0)),
                                          ("weights", getattr(p, "weights", ""))) if v}
                if keys:
                    self._backbone_keys[node] = keys
            if self._backbone_keys:  # every device describes itself again, those devices with their backbone
                frozen_by.clear()
                profiled, self.devices = sorted(self.devices), {}  # one that fails now is left out
                self._take_profiles(self._request_all(grid, [self._profile_message(n) for n in profiled],
                                                      self.config.request_timeout), frozen_by)
                if not self.devices:
                    raise FleetError(f"none of the {len(profiled)} devices could be profiled on the fleet's "
                                     f"backbones: {self.events}")
            for dev in self.devices.values():
                p = self.clock.profiles[dev.device_id]
                log(INFO, "fleet %s: %s is a %s device (uplink %s Mbit/s, speed %s, availability %s)",
                    self.config.fleet, dev.device_id, p.tier, getattr(p, "uplink_mbps", "?"), getattr(p, "speed", "?"),
                    p.availability)
        by_fingerprint: dict[str, list[DeviceState]] = {}
        for dev in self.devices.values():
            by_fingerprint.setdefault(str(dev.profile["fingerprint"]), []).append(dev)
        # the backbone most devices run (on a tie, the deepest) comes first; the others of its family
        # get their own input norms and projections
        primary = min(by_fingerprint, key=lambda fp: (-len(by_fingerprint[fp]),
                                                      -int(by_fingerprint[fp][0].profile["num-layers"]), fp))
        first = by_fingerprint[primary][0].profile
        cfg = self.config
        if cfg.family == "tail":
            frozen, others, tail_keys = self._public_tail(str(first["model"]), primary, by_fingerprint)
            layers = [int(tail_keys.pop("cut")) - 1]
        else:
            frozen, others, tail_keys = frozen_by[primary], self._side_backbones(primary, by_fingerprint), {}
            layers = [int(x) for x in first["layers"]]
        self.side_config = SideNetworkConfig(
            hidden_size=int(first["hidden-size"]), layers=layers,
            fingerprint=str(first["fingerprint"]), family=cfg.family, reduction=cfg.reduction, dropout=cfg.dropout,
            norm_eps=float(first["norm-eps"]), feature_token="last" if first["is-decoder"] else "first",
            bits=cfg.bits, group_size=64 if cfg.bits >= 8 else 32, token_policy=cfg.frame_token_policy,
            extra={"model": str(first["model"])}, backbones=others, **tail_keys)
        train = TrainConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, epochs=cfg.rounds, batch_size=cfg.batch_size,
                            seed=cfg.training_seed, cache_bytes=cfg.cache_mb << 20 if cfg.activation_cache else 0,
                            average_epochs=cfg.average_epochs, mixed_precision=cfg.train_precision)

        def make_net():
            torch.manual_seed(cfg.training_seed)  # the side network's initial weights are part of the run's seed
            return build_side_network(self.side_config, frozen, frozen_by)

        pages = self.run_dir / "pages"
        shutil.rmtree(pages, ignore_errors=True)  # paged trainers of an earlier process; a resume loads the checkpoint
        self.store = SideNetworkStore(
            StoreConfig(mode=cfg.mode, personal_epochs=cfg.personal_epochs, personal_lr=cfg.personal_lr,
                        memory_budget_mb=cfg.side_memory_mb),
            make_net, train, {d.device_id: d.train_samples for d in self.devices.values()}, cfg.chunk_size,
            page_dir=pages, residuals=self._residuals if cfg.label_private else None)
        cache_dir = self.run_dir / "cache"
        if not cfg.resume:
            shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh run starts from an empty cache
        self.intake = FrameIntake(self.store, self.side_config, run_limits(self.side_config, cfg.chunk_size),
                                  persist_dir=cache_dir if cfg.activation_cache else None,
                                  label_private=cfg.label_private)
        net = self.store.network_for(next(iter(self.devices.values())).device_id)
        log(INFO, "%s side network(s), mode %s: %s trainable parameters each, training on %s", cfg.family, cfg.mode,
            f"{net.num_trainable():,}", next(iter(self.store.trainers.values())).device)
        self.uncached = sorted(d.device_id for d in self.devices.values() if not bool(d.profile.get("activation-cache", True))
                               or (self.clock is not None and not self.clock.profiles[d.device_id].activation_cache))
        for dev in self.devices.values():
            dev.profile["activation-cache"] = dev.device_id not in self.uncached
        if self.uncached and cfg.activation_cache:
            self.intake.uncached = set(self.uncached)
            log(INFO, "devices %s opted out of the activation cache: their frames are trained on and not kept, and "
                "they forward their samples again every round", ", ".join(self.uncached))
        if cfg.adapt:
            self.policy = FramePolicy(self.side_config.layers, full_bits=cfg.bits, min_bits=cfg.adapt_min_bits,
                                      min_taps=cfg.adapt_min_taps, deadline_s=cfg.deadline_s,
                                      layers_of={d.device_id: self.side_config.layers_for(str(d.profile["fingerprint"]))
                                                 for d in self.devices.values()})
            for dev in self.devices.values():  # the profile's measured forward: compute known before any frame
                rate = float(dev.profile.get("forward-samples-per-s", 0.0))
                if rate > 0:
                    per_sample = 1.0 / rate
                    self.policy.seed(dev.device_id, self.clock.profiles[dev.device_id].compute_s(per_sample)
                                     if self.clock is not None else per_sample)

    @staticmethod
    def _side_backbones(primary: str, by_fingerprint: dict[str, list[DeviceState]]) -> dict[str, list[int]]:
        """A ladder / adapter network's further backbones: their taps, slot by slot (one family only)."""
        first = by_fingerprint[primary][0].profile
        others: dict[str, list[int]] = {}
        for fp, devs in by_fingerprint.items():
            if fp == primary:
                continue
            desc = devs[0].profile
            if int(desc["hidden-size"]) != int(first["hidden-size"]) or len(desc["layers"]) != len(first["layers"]):
                raise FleetError(
                    f"the devices run backbones that one side network cannot serve: {primary} (width "
                    f"{first['hidden-size']}, {len(first['layers'])} taps) and {fp} (width {desc['hidden-size']}, "
                    f"{len(desc['layers'])} taps); a heterogeneous fleet needs one family: the same hidden size "
                    f"and the same num-taps (set num-taps for every device)")
            others[fp] = [int(x) for x in desc["layers"]]
        if others:
            log(INFO, "heterogeneous fleet: %s on %s; %s", primary, [d.device_id for d in by_fingerprint[primary]],
                "; ".join(f"{fp} taps {layers} on {[d.device_id for d in by_fingerprint[fp]]}"
                          for fp, layers in others.items()))
        return others

    def _public_tail(self, model: str, primary: str, by_fingerprint: dict[str, list[DeviceState]]
                     ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], dict[str, Any]]:
        """The pretrained tail's public weights (loaded here, from ``model``), checked against every
        device's backbone; every device sends block ``cut - 1``, whatever its depth or precision."""
        cfg = self.config
        try:
            public = load_tail_weights(model, cfg.tail_cut)
            for fp, devs in by_fingerprint.items():
                try:
                    public.check_device(fp)
                except SideNetworkError as err:
                    raise FleetError(f"devices {[d.device_id for d in devs]}: {err}") from None
        except SideNetworkError as err:
            raise FleetError(str(err)) from None
        others = {fp: [public.cut - 1] for fp in by_fingerprint if fp != primary}
        total = int(public.backbone_config["num_hidden_layers"])
        shallow = {d.device_id: int(d.profile["num-layers"]) for devs in by_fingerprint.values() for d in devs
                   if int(d.profile["num-layers"]) < total}
        if shallow:
            raise FleetError(f"devices {shallow} (id: blocks) run fewer than the model's {total} blocks: they could "
                             f"feed the tail, but not run blocks {public.cut}..{total - 1} with the delivered adapter "
                             "for their own inference. Use family 'ladder' or 'adapter' for a fleet of mixed depths, "
                             "or give every device the whole model")
        log(INFO, "pretrained tail: devices forward blocks 0..%d, the server trains blocks %d..%d of %s with LoRA "
            "(r %d, %s)", public.cut - 1, public.cut, total - 1, public.fingerprint, cfg.lora_rank,
            cfg.lora_targets)
        keys = {"backbone_config": public.backbone_config, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
                "lora_targets": cfg.lora_target_list, "cut": public.cut}
        return public.weights, others, keys

    # ---- checkpoints --------------------------------------------------------------------------
    _RESUMED_FIELDS = ("next_offset", "bytes_up", "bytes_down", "frame_bytes", "frames", "samples_forwarded",
                       "samples_lost", "forward_s", "busy_s", "failures", "dropped", "replies_refused")

    def _checkpoint(self, rnd: int, train_wall: float) -> None:
        """Everything a resumed run needs, written to a temp folder and swapped in whole.

        Side networks, optimizer state, schedules, RNG states and tail averages (per trainer), the
        cache index (how many persisted frames each trainer's cache holds), per-device cursors
        and accounting, and the metrics history. A crash mid-write leaves the previous one.
        """
        with atomic_directory(self.run_dir / "checkpoint") as tmp:  # a crash between its renames leaves checkpoint.old
            self.store.save(tmp, extra={"round": rnd})
            self.intake.save_digests(tmp / "accepted_frames.sha256")  # replays stay refused after a resume
            state = {"round": rnd, "train_wall_s": train_wall, "config": self._run_defining(), "rounds": self.rounds, "events": self.events,
                     "initial": self.initial, "stream_totals": self._stream_totals,
                     "virtual": {"now": self.vnow, "curve": self.curve, "late_frames": self.late_frames,
                                 "frames_accepted": self._frames_accepted},
                     "cached_frames": self.intake.cached_counts(),
                     "refused": {d: dict(c) for d, c in self.intake.refused.items()},
                     "devices": {d.device_id: {k: getattr(d, k) for k in self._RESUMED_FIELDS}
                                 for d in self.devices.values()}}
            (tmp / "strategy.json").write_text(json.dumps(state, default=str))

    def _run_defining(self) -> dict[str, Any]:
        """Settings a resumed run must share with the original (what was trained, and how)."""
        keys = ("mode", "family", "reduction", "dropout", "lr", "weight-decay", "batch-size", "rounds",
                "average-epochs", "activation-cache", "cache-mb", "aggregate-every", "personal-epochs",
                "personal-lr", "seed", "chunk-size", "bits", "token-policy", "label-private", "label-epsilon")
        config = self.config.as_dict()
        return {k: config[k] for k in keys}

    def _restore(self) -> tuple[int, float]:
        """Continue the run in ``run_dir`` from its last checkpoint; returns (next round, training wall s)."""
        directory = self.run_dir / "checkpoint"
        if not (directory / "strategy.json").exists() and (self.run_dir / "checkpoint.old" / "strategy.json").exists():
            directory = self.run_dir / "checkpoint.old"  # the crash hit between the two renames of a checkpoint
        if not (directory / "strategy.json").exists():
            raise FleetError(f"resume = true but {directory} holds no checkpoint: point run-dir at the folder of "
                             f"the run to continue (its summary and checkpoint live there), or drop resume")
        state = json.loads((directory / "strategy.json").read_text())
        now = self._run_defining()
        changed = {k: (v, now.get(k)) for k, v in state.get("config", {}).items() if now.get(k) != v}
        if changed:
            raise FleetError("resume needs the settings the run started with; changed: " + ", ".join(
                f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())))
        self.store.load(directory)
        restored = self.intake.restore(state["cached_frames"])
        if (directory / "accepted_frames.sha256").exists():
            self.intake.load_digests(directory / "accepted_frames.sha256")
        for device, counts in state.get("refused", {}).items():
            self.intake.refused[device].update(counts)
        by_id = {d.device_id: d for d in self.devices.values()}
        missing = sorted(set(state["devices"]) - set(by_id))
        if missing:
            raise FleetError(f"the checkpoint's devices {missing} are not connected: resume with the same fleet")
        for device, fields in state["devices"].items():
            for key, value in fields.items():
                setattr(by_id[device], key, value)
        self.rounds, self.events, self.initial = state["rounds"], state["events"], state["initial"]
        self._stream_totals = state["stream_totals"]
        virtual = state.get("virtual", {})
        self.vnow, self.curve = float(virtual.get("now", 0.0)), list(virtual.get("curve", []))
        self.late_frames = dict(virtual.get("late_frames", {}))
        self._frames_accepted = int(virtual.get("frames_accepted", 0))
        log(INFO, "resumed from round %d of %s: %d cached frames reloaded", state["round"], directory, restored)
        self.events.append(f"resumed after round {state['round']}")
        return int(state["round"]) + 1, float(state["train_wall_s"])

    # ---- streaming --------------------------------------------------------------------------
    def _working(self) -> dict[int, DeviceState]:
        return {n: d for n, d in self.devices.items() if not d.dropped}

    def _plan_round(self, only: set[int] | None = None) -> dict[int, deque]:
        """Each working device's chunks for one pass over its training samples (offsets continue);
        ``only``: just these nodes (devices outside the activation cache, in a cached round)."""
        plans: dict[int, deque] = {}
        for node_id, dev in self._working().items():
            if only is not None and node_id not in only:
                continue
            plan: deque = deque()
            remaining = dev.train_samples
            while remaining > 0:
                n = min(self.config.chunk_size, remaining)
                plan.append({"offset": dev.next_offset, "samples": n, "attempt": 0})
                dev.next_offset = (dev.next_offset + n) % dev.train_samples
                remaining -= n
            plans[node_id] = plan
        return plans

    def _forward_message(self, node_id: int, request: dict[str, Any], rnd: int, extra: ConfigRecord,
                         choice: FrameChoice | None = None, split: str = "train") -> Message:
        """A forward request; ``choice`` (bandwidth adaptation) sets its bit-width and tapped-layer prefix."""
        cfg = self.config
        bits = choice.bits if choice else cfg.bits
        layers = self.side_config.layers_for(str(self.devices[node_id].profile["fingerprint"]))
        layers = layers[:choice.taps] if choice else layers
        extra = ConfigRecord({**self._backbone_keys.get(node_id, {}), **dict(extra)})
        config = ConfigRecord({"split": split, "offset": int(request["offset"]), "samples": int(request["samples"]),
                               "bits": bits, "token-policy": cfg.frame_token_policy,
                               "batch-size": cfg.device_batch_size, "layers": layers,
                               "request": f"r{rnd}-o{request['offset']}-a{request['attempt']}", **dict(extra)})
        self.devices[node_id].bytes_down += _config_bytes(config)
        return Message(RecordDict({m.CONFIG_KEY: config}), dst_node_id=node_id, message_type=m.FORWARD,
                       group_id=str(rnd), ttl=cfg.request_timeout)

    def _stream_round(self, grid: Grid, rnd: int, only: set[int] | None = None) -> dict[str, Any]:
        """Keep ``in_flight`` forward requests per device and train on frames as they land
        (``only``: just these nodes)."""
        cfg = self.config
        self._only = only
        work = FairQueue()  # devices take turns at the trainer (fair service), each in arrival order
        losses: list[tuple[float, int]] = []
        train_s = [0.0]
        errors: list[BaseException] = []
        done_at = [0.0]

        devices_idle = threading.Event()  # every frame has landed: the trainer may take every core

        def trainer_loop() -> None:
            torch.set_num_threads(max(1, cfg.server_threads))
            while True:
                item = work.get()
                if devices_idle.is_set():  # OpenMP thread counts are per thread: the trainer sets its own
                    torch.set_num_threads(cfg.cache_threads or os.cpu_count() or 1)
                if item is None:
                    work.task_done()
                    return
                node_id, blob, landed = item
                dev = self.devices[node_id]
                try:
                    result = self.intake.offer(dev.device_id, blob)
                    if self.clock is not None:  # the server trains one landed frame at a time
                        self._v_server = self.clock.train(landed, float(result.stats.get("seconds", 0.0))
                                                          if result.accepted else 0.0)
                    if result.accepted:
                        self._frames_accepted += 1
                        losses.append((result.stats["loss"], int(result.stats["samples"])))
                        train_s[0] += result.stats["seconds"]
                    else:
                        dev.failures.append(f"round {rnd}: frame refused ({result.reason}): {result.message}")
                        log(WARNING, "frame from %s refused (%s), nothing trained on it: %s", dev.device_id,
                            result.reason, result.message)
                except BaseException as err:  # noqa: BLE001 - surfaced in the main thread
                    errors.append(err)
                    return
                finally:
                    done_at[0] = time.perf_counter()
                    work.task_done()

        worker = threading.Thread(target=trainer_loop, name="side-trainer", daemon=True)
        t0 = time.perf_counter()
        self._round_v0, self._round_t0 = self.vnow, t0
        self._v_landed = self._v_server = self.vnow
        self._v_ready, self._v_sent = {}, {}
        device_s0 = {n: d.busy_s for n, d in self.devices.items()}
        if not cfg.activation_cache:
            self.intake.new_pass()  # every round re-sends every sample
        elif rnd > 1:
            self.intake.new_pass(self.intake.uncached)  # devices outside the cache send their samples again
        first_wave = list(self.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        plans: dict[int, deque] = self._plans
        worker.start()
        pending: dict[str, tuple[int, dict[str, Any], float]] = {}
        self._push(grid, first_wave, pending, plans)
        total = sum(int(r["samples"]) for plan in plans.values() for r in plan) + sum(
            int(w.content[m.CONFIG_KEY]["samples"]) for w in first_wave)
        received = 0
        last_log = time.perf_counter()

        def top_up() -> None:
            """Keep in_flight requests per working device (after replies, retries and timeouts)."""
            busy: dict[int, int] = {}
            owed: dict[int, int] = {}  # samples asked for and not landed yet (the policy's remaining work)
            for node_id, request, _ in pending.values():
                busy[node_id] = busy.get(node_id, 0) + 1
                owed[node_id] = owed.get(node_id, 0) + int(request["samples"])
            out = []
            for node_id, plan in plans.items():
                if not plan or self.devices[node_id].dropped or busy.get(node_id, 0) >= cfg.in_flight:
                    continue
                remaining = owed.get(node_id, 0) + sum(int(r["samples"]) for r in plan) if self.policy else 0
                while plan and busy.get(node_id, 0) < cfg.in_flight:
                    choice = self._choose(node_id, remaining)
                    out.append(self._forward_message(node_id, plan.popleft(), rnd, ConfigRecord(), choice))
                    busy[node_id] = busy.get(node_id, 0) + 1
            self._push(grid, out, pending, plans)

        def wait_for_training() -> None:  # the serial baseline: train on a frame before asking for the next
            while work.unfinished_tasks and worker.is_alive():
                time.sleep(0.002)
            if errors:
                raise errors[0]

        def work_left() -> bool:
            return any(plan and not self.devices[n].dropped for n, plan in plans.items())

        while pending or work_left():
            if errors:
                raise errors[0]
            if not pending:
                top_up()
                continue
            replies = list(grid.pull_messages(list(pending)))
            if not replies:
                self._expire(pending, plans)
                top_up()
                time.sleep(0.02)
                continue
            for reply in replies:
                entry = pending.pop(reply.metadata.reply_to_message_id, None)
                if entry is None:
                    continue  # a reply to a request this round already gave up on
                node_id, request, sent_real = entry
                dev = self.devices[node_id]
                blob = None
                if reply.has_error():
                    self._forward_failed(dev, request, f"error {reply.error.code}: {reply.error.reason}", plans)
                else:
                    try:
                        blob, stats = _forward_reply(reply, int(request["samples"]))
                    except Exception as err:  # noqa: BLE001 - a reply that fails its checks is a failed request
                        why = dev.refuse(err, "forward", record=False)  # _forward_failed records it
                        self._forward_failed(dev, request, f"malformed reply: {why}", plans)
                        blob = None
                if blob is not None:
                    dev.bytes_up += len(blob) + 8 * len(stats)
                    dev.frame_bytes += len(blob)
                    dev.frames += 1
                    dev.samples_forwarded += int(stats["samples"])
                    dev.forward_s += float(stats["forward-s"])
                    dev.busy_s += float(stats["busy-s"])
                    received += int(stats["samples"])
                    landed = self._landed(dev, reply.metadata.reply_to_message_id, request, stats, len(blob),
                                          len(blob) + 8 * len(stats), sent_real)
                    if errors:
                        raise errors[0]
                    work.put((node_id, blob, landed), key=node_id)
                    if not cfg.overlap:
                        wait_for_training()
            top_up()
            if time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log(INFO, "[round %d] frames landed for %d/%d samples, %d training queued", rnd, received, total,
                    work.qsize())
        devices_idle.set()
        work.put(None)
        worker.join()
        if errors:
            raise errors[0]
        if not self._working():
            raise FleetError(f"every device failed in round {rnd}: {[d.failures for d in self.devices.values()]}")
        if not losses:
            raise FleetError(f"no frame of round {rnd} could be trained on; refusals per device: "
                             f"{self.intake.report()}")
        wall = max(done_at[0], t0) - t0
        per_device_s = {n: d.busy_s - device_s0[n] for n, d in self.devices.items()}
        device_s = sum(per_device_s.values())
        self._stream_totals["wall_s"] += wall
        self._stream_totals["device_s"] += device_s
        self._stream_totals["slowest_device_s"] += max(per_device_s.values())
        self._stream_totals["train_s"] += train_s[0]
        n = sum(c for _, c in losses)
        loss = sum(l * c for l, c in losses) / n if n else float("nan")
        if self.clock is not None:  # the round ends when the last frame landed and was trained on
            self.vnow = max(self._v_landed, self._v_server)
        return {"loss": loss, "phase": "stream", "stream_wall_s": wall, "stream_device_s": device_s,
                "stream_train_s": train_s[0], "samples": received}

    def _push(self, grid: Grid, messages: list[Message], pending: dict, plans: dict) -> None:
        """Push forward requests and track them; one Flower refuses is a failed request of its device."""
        if self.clock is not None:
            messages = [msg for msg in messages if self._answered(msg, plans)]
        taken, refused = self._push_tracked(grid, messages)
        now = time.perf_counter()
        for mid, msg in taken.items():
            node_id = msg.metadata.dst_node_id
            pending[mid] = (node_id, self._request_of(msg), now)
            if self.clock is not None:  # its virtual send time and size, for the clock when the reply lands
                self._v_sent[mid] = (self._v_ready.get(node_id, self._round_v0),
                                     _config_bytes(msg.content[m.CONFIG_KEY]))
        for msg in refused:
            self._forward_failed(self.devices[msg.metadata.dst_node_id], self._request_of(msg),
                                 "Flower refused the request (push failed)", plans)

    @staticmethod
    def _request_of(msg: Message) -> dict[str, Any]:
        cfg = msg.content[m.CONFIG_KEY]
        return {"offset": int(cfg["offset"]), "samples": int(cfg["samples"]),
                "attempt": int(str(cfg["request"]).rsplit("-a", 1)[1]),
                "choice": FrameChoice(len(cfg["layers"]), int(cfg["bits"]))}

    # ---- the fleet's virtual clock and the bandwidth policy ----------------------------------
    def _virtual_timeout(self, dev: DeviceState, samples: int) -> float:
        """How long the server waits (virtual seconds) before it gives up on a request: three times
        what the device's profile and its measured forward speed say the request should take, plus
        a second for the links; never more than ``request-timeout``."""
        rate = max(float(dev.profile.get("forward-samples-per-s", 0.0)), 1e-9)
        expected = self.clock.profiles[dev.device_id].compute_s(samples / rate)
        return min(3.0 * expected + 1.0, self.config.request_timeout)

    def _answered(self, msg: Message, plans: dict) -> bool:
        """Fleet simulation: whether the device answers this request (its profile's availability, a
        seeded draw). One it misses is not sent; it costs the virtual timeout and is retried like any
        failed request, so no frame is ever produced and then thrown away."""
        dev = self.devices[msg.metadata.dst_node_id]
        if self.clock.answers(dev.device_id, str(msg.content[m.CONFIG_KEY]["request"])):
            return True
        request = self._request_of(msg)
        wait = self._virtual_timeout(dev, int(request["samples"]))
        self._v_ready[dev.node_id] = self._v_ready.get(dev.node_id, self._round_v0) + wait
        dev.metrics["unanswered"] = dev.metrics.get("unanswered", 0) + 1
        self._forward_failed(dev, request, f"no reply within the {wait:.1f} s virtual timeout (availability "
                                           f"{self.clock.profiles[dev.device_id].availability:g})", plans)
        return False

    def _landed(self, dev: DeviceState, mid: str, request: dict[str, Any], stats: Mapping[str, Any], frame_bytes: int,
                reply_bytes: int, sent_real: float) -> float:
        """A frame landed: when (virtual seconds with a fleet clock, wall seconds without), and what the
        bandwidth policy learns from it (compute from the device's own busy time, the upload from the
        profile's link in a simulation or the wall time around the device's work in a deployment)."""
        busy = float(stats["busy-s"])
        v_sent, request_bytes = self._v_sent.pop(mid, (self._round_v0, 0))
        if self.clock is not None:
            profile = self.clock.profiles[dev.device_id]
            landed = self.clock.forward(dev.device_id, v_sent, request_bytes, busy, reply_bytes)
            compute, upload, latency = profile.compute_s(busy), profile.upload_s(reply_bytes), profile.latency_ms / 1e3
            self._v_upload[dev.device_id] = self._v_upload.get(dev.device_id, 0.0) + upload
        else:
            now = time.perf_counter()
            landed = self._round_v0 + now - self._round_t0
            compute, upload, latency = busy, max(0.0, now - sent_real - busy), 0.0
        self._v_ready[dev.node_id] = max(self._v_ready.get(dev.node_id, self._round_v0), landed)
        self._v_landed = max(self._v_landed, landed)
        if self.policy is not None:
            self.policy.observe(dev.device_id, request["choice"], int(stats["samples"]), compute, upload, frame_bytes,
                                latency)
            if self.policy.deadline_s > 0 and landed - self._round_v0 > self.policy.deadline_s:
                self.late_frames[dev.device_id] = self.late_frames.get(dev.device_id, 0) + 1
        return landed

    def _choose(self, node_id: int, remaining: int) -> FrameChoice | None:
        """The bandwidth policy's choice for a device's next request (None: the run's fixed bits, all layers)."""
        if self.policy is None:
            return None
        dev = self.devices[node_id]
        if self.policy.deadline_s <= 0:
            self.policy.set_deadline({d.device_id: d.train_samples for d in self._working().values()})
            if self.policy.deadline_s > 0:
                log(INFO, "[adapt] streaming deadline %.1f s: %s", self.policy.deadline_s, self.policy.deadline_reason)
        if self.clock is not None:
            elapsed = self._v_ready.get(node_id, self._round_v0) - self._round_v0
        else:
            elapsed = time.perf_counter() - self._round_t0
        before = len(self.policy.decisions)
        choice = self.policy.decide(dev.device_id, remaining, elapsed)
        if len(self.policy.decisions) > before:
            log(INFO, "[adapt] %s -> %s: %s", dev.device_id,
                choice.describe(self.side_config.layers_for(str(dev.profile["fingerprint"]))),
                self.policy.decisions[-1].reason)
        return choice

    def _expire(self, pending: dict, plans: dict) -> None:
        now = time.perf_counter()
        for mid, (node_id, request, sent) in list(pending.items()):
            if now - sent > self.config.request_timeout:
                del pending[mid]
                self._forward_failed(self.devices[node_id], request,
                                     f"no reply within {self.config.request_timeout:.0f} s", plans)

    def _forward_failed(self, dev: DeviceState, request: dict[str, Any], why: str, plans: dict) -> None:
        dev.failures.append(f"forward offset {request['offset']}: {why}")
        if dev.dropped:  # a request still in flight when the device was dropped: its samples are lost too
            dev.samples_lost += int(request["samples"])
            return
        if request["attempt"] < self.config.max_retries:
            plans.setdefault(dev.node_id, deque()).appendleft({**request, "attempt": request["attempt"] + 1})
            log(WARNING, "forward request to %s failed (%s); retrying", dev.device_id, why)
        else:
            dev.dropped = True
            unsent = plans.pop(dev.node_id, None) or []
            dev.samples_lost += int(request["samples"]) + sum(int(r["samples"]) for r in unsent)
            log(WARNING, "device %s dropped for the rest of the run after: %s (%d of its samples lost so far)",
                dev.device_id, why, dev.samples_lost)

    # ---- label-private training -----------------------------------------------------------------
    def _residuals(self, sample_ids: list[int], probs: torch.Tensor) -> torch.Tensor:
        """Ask each device owning some of a batch's samples for ``p - onehot(y)`` of those samples.

        Called by a trainer inside a training step (the trainer thread while streaming, the main
        thread in cached rounds). Rows of a device that fails to answer, or answers malformed,
        stay NaN and are left out of the step; the failure is recorded on the device.
        """
        by_node: dict[int, list[int]] = {}
        node_of = {d.device_id: n for n, d in self.devices.items()}
        for row, sample_id in enumerate(sample_ids):
            device = self.intake.owner.get(int(sample_id))
            if device is None or device not in node_of:
                raise FleetError(f"no device is known to own sample {sample_id}: cannot ask for its residual")
            by_node.setdefault(node_of[device], []).append(row)
        out = torch.full_like(probs, float("nan"), dtype=torch.float32)
        messages = []
        for node_id, rows in by_node.items():
            config = ConfigRecord({"sample-ids": [int(sample_ids[r]) for r in rows],
                                   "num-classes": int(probs.shape[1]), **self._backbone_keys.get(node_id, {})})
            record = ArrayRecord({m.PROBS_KEY: m.Array(probs[rows].float().numpy())})
            self.devices[node_id].bytes_down += m.array_bytes(record) + _config_bytes(config)
            messages.append(Message(RecordDict({m.CONFIG_KEY: config, m.PROBS_KEY: record}), dst_node_id=node_id,
                                    message_type=m.RESIDUAL, ttl=self.config.request_timeout))
        for node_id, reply in self._request_all(self._grid, messages, self.config.request_timeout).items():
            dev, rows = self.devices[node_id], by_node[node_id]
            if isinstance(reply, str) or reply.has_error():
                dev.failures.append(f"residual: {self._why(reply)}")
                continue
            try:
                residual = residual_reply(reply, len(rows), int(probs.shape[1]))
            except Exception as err:  # noqa: BLE001 - its rows stay NaN: left out of the step
                dev.refuse(err, "residual")
                continue
            dev.bytes_up += residual.nbytes
            dev.metrics["residual_requests"] = dev.metrics.get("residual_requests", 0) + 1
            out[rows] = torch.as_tensor(residual, dtype=torch.float32)
        return out

    # ---- aggregation, evaluation, delivery ---------------------------------------------------
    def _fedavg(self, rnd: int, then_average: bool = False) -> bool:
        """FedAvg of the per-device networks; True when ``then_average`` added them to the tail average."""
        weights = {}
        for dev in self._working().values():
            trained = int(self.intake.accepted_samples.get(dev.device_id, 0))
            if trained:  # a network that never trained would pull the average back to the start
                weights[dev.device_id] = trained
        if not weights:
            return False
        if self.config.side_memory_mb:  # paged networks: a streamed average holds one network at a time
            state = self.store.average_networks(weights)
        else:  # Flower's own FedAvg arithmetic over ArrayRecords
            records = []
            for device, trained in weights.items():
                net_state = {k: v.detach().cpu().clone() for k, v in self.store.trainers[device].net.state_dict().items()}
                records.append(RecordDict({"net": ArrayRecord(torch_state_dict=net_state),
                                           m.STATS_KEY: MetricRecord({"num-examples": trained})}))
            averaged, _ = self._aggregate(records)
            state = averaged.to_torch_state_dict()
        self.store.load_all(state, then_average=then_average)
        log(INFO, "[round %d] FedAvg of %d device side networks (%d samples)", rnd, len(weights),
            sum(weights.values()))
        return then_average

    def _evaluate(self, grid: Grid, rnd: int, config: dict[str, Any], final: bool = False) -> dict[str, Any]:
        """Score the current networks on ``config``'s split: on the server from kept frames (``eval-on``),
        or on the devices; the ``final`` test is always on the devices, with what they installed."""
        if not final and self.config.eval_on == "server" and not self.config.label_private:
            return self._server_evaluate(grid, rnd, str(config["split"]), int(config.get("max-samples", 0)))
        messages = self.configure_evaluate(rnd, ArrayRecord(), ConfigRecord(config), grid)
        replies = self._request_all(grid, messages, self.config.request_timeout, window=self.config.send_window)
        per_device, answered = {}, []
        for node, reply in replies.items():
            dev = self.devices[node]
            if isinstance(reply, str) or reply.has_error():
                dev.failures.append(f"evaluate ({config['split']}): {self._why(reply)}")
                continue
            held = int(dev.profile.get(str(config["split"]), 0))  # the most samples the device can score
            limit = int(config.get("max-samples", 0) or 0)
            try:
                stats = evaluate_reply(reply, min(held, limit) if limit else held)
            except Exception as err:  # noqa: BLE001 - a reply that fails its checks counts for nothing
                dev.refuse(err, f"evaluate ({config['split']})")
                continue
            per_device[dev.device_id] = stats
            answered.append(reply)
        agg = self.aggregate_evaluate(rnd, answered)
        result = {"accuracy": float(agg["accuracy"]) if agg else float("nan"), "per_device": per_device}
        log(INFO, "[round %d] on-device %s accuracy %.4f (%s)", rnd, config["split"], result["accuracy"],
            ", ".join(f"{d} {s['accuracy']:.3f}" for d, s in sorted(per_device.items())))
        return result

    def _eval_frames_for(self, grid: Grid, split: str, limit: int) -> dict[str, list[DecodedFrame]]:
        """Each working device's ``split`` samples (at most ``limit``; 0 = all), forwarded once as one frame
        each and kept: the server scores every later network on them, and no network travels down.

        Their upload counts in each device's bytes up (``eval_bytes_up`` says how much of it), and on a fleet
        clock the slowest device's forward and upload of them advance the virtual time, validation frames
        only: a test split is the benchmark's own measurement, not the method's cost.
        """
        if (split, limit) in self._eval_frames:
            return self._eval_frames[(split, limit)]
        messages, counts = [], {}
        for node_id, dev in self._working().items():
            count = min(int(dev.profile.get(split, 0)), limit) if limit else int(dev.profile.get(split, 0))
            if count > 0:
                counts[node_id] = count
                messages.append(self._forward_message(node_id, {"offset": 0, "samples": count, "attempt": 0}, 0,
                                                      ConfigRecord(), split=split))
        frames: dict[str, list[DecodedFrame]] = {}
        slowest = 0.0
        for node, reply in self._request_all(grid, messages, self.config.request_timeout,
                                             window=self.config.send_window).items():
            dev = self.devices[node]
            what = f"forward ({split} frames for evaluation)"
            if isinstance(reply, str) or reply.has_error():
                dev.failures.append(f"{what}: {self._why(reply)}")
                continue
            try:  # the frame passes the intake's checks (not its replay and repeat checks: it trains nothing)
                blob, stats = _forward_reply(reply, counts[node])
                frame = self.intake.inspect(blob, run_limits(self.side_config, counts[node]))
                decoded = decode_for(self.side_config, frame)
            except Refusal as refusal:
                reason = f"evaluation frame: {refusal.reason}"
                dev.replies_refused[reason] = dev.replies_refused.get(reason, 0) + 1
                dev.failures.append(f"{what}: refused ({refusal.reason}): {refusal.message}")
                continue
            except Exception as err:  # noqa: BLE001 - a reply that fails its checks is a failed request
                dev.refuse(err, what)
                continue
            frames[dev.device_id] = [decoded]
            dev.bytes_up += len(blob)
            dev.metrics["eval_bytes_up"] = dev.metrics.get("eval_bytes_up", 0) + len(blob)
            if split == "test":  # a test curve is the benchmark's measurement, not the method's cost
                dev.metrics["test_curve_bytes_up"] = dev.metrics.get("test_curve_bytes_up", 0) + len(blob)
            busy = float(stats["busy-s"])
            if split == "validation":
                dev.busy_s += busy
            if self.clock is not None:
                profile = self.clock.profiles[dev.device_id]
                slowest = max(slowest, profile.compute_s(busy) + profile.upload_s(len(blob)))
        if split == "validation" and self.clock is not None:
            self.vnow += slowest
        log(INFO, "%s frames for server-side evaluation: %d samples from %d devices", split,
            sum(len(f) for fs in frames.values() for f in fs), len(frames))
        self._eval_frames[(split, limit)] = frames
        return frames

    def _server_evaluate(self, grid: Grid, rnd: int, split: str, limit: int) -> dict[str, Any]:
        """Score each device's network on its kept ``split`` frames, on the server."""
        frames = self._eval_frames_for(grid, split, limit)
        per_device, correct, count = {}, 0.0, 0
        for dev in self._working().values():
            if dev.device_id not in frames:
                continue
            net = self.store.network_for(dev.device_id)
            device = next(net.parameters()).device
            stats = evaluate_network(net, frames[dev.device_id], device,
                                     mixed_precision=self.config.train_precision)
            per_device[dev.device_id] = {"accuracy": stats["accuracy"], "samples": stats["count"]}
            correct += stats["accuracy"] * stats["count"]
            count += stats["count"]
        result = {"accuracy": correct / count if count else float("nan"), "per_device": per_device}
        log(INFO, "[round %d] server-side %s accuracy %.4f (%s)", rnd, split, result["accuracy"],
            ", ".join(f"{d} {s['accuracy']:.3f}" for d, s in sorted(per_device.items())))
        return result

    def _finish(self, grid: Grid) -> dict[str, Any]:
        cfg = self.config
        exported = self.run_dir / "side_networks"

        def export(device: str, net) -> None:
            if net.config.family == "tail":  # a PEFT adapter folder for the stock model
                save_peft_adapter(net.config, net.state_dict(), exported / device)
            else:
                save_side_network(net, exported / f"{device}.safetensors")

        per_device = cfg.mode == "per-device"  # each device's own network: exported in the averaging pass
        if self.store.use_average(then=export if per_device else None):
            log(INFO, "delivering the mean weights of the last %d rounds (tail averaging)",
                min(cfg.average_epochs, cfg.rounds))
        if cfg.mode == "hybrid":  # personal heads over the delivered trunk
            self.store.personalize([d.device_id for d in self._working().values()])
        if not per_device:
            for dev in self.devices.values():
                export(dev.device_id, self.store.network_for(dev.device_id))
        installed = False
        if cfg.deliver:
            def deliveries() -> Iterable[Message]:  # built one by one as the send window frees
                for node_id, dev in list(self._working().items()):
                    net = self.store.network_for(dev.device_id)
                    weights, net_cfg = m.network_records(net)
                    dev.bytes_down += m.array_bytes(weights) + _config_bytes(net_cfg)
                    dev.delivered_digest = m.records_digest(weights, net_cfg)
                    content = RecordDict({m.NETWORK_KEY: weights, m.NETWORK_CONFIG_KEY: net_cfg})
                    if node_id in self._backbone_keys:
                        content[m.CONFIG_KEY] = ConfigRecord(dict(self._backbone_keys[node_id]))
                    yield Message(content, dst_node_id=node_id, message_type=m.DELIVER, ttl=cfg.request_timeout)

            for node, reply in self._request_all(grid, deliveries(), cfg.request_timeout,
                                                 window=cfg.send_window).items():
                dev = self.devices[node]
                if isinstance(reply, str) or reply.has_error():
                    dev.failures.append(f"delivery: {self._why(reply)}")
                    dev.metrics["delivered"] = 0
                    continue
                try:
                    digest, path = delivery_receipt(reply)
                except Exception as err:  # noqa: BLE001 - no receipt to trust: not delivered
                    dev.refuse(err, "delivery")
                    dev.metrics["delivered"] = 0
                    continue
                dev.metrics["delivered"] = int(digest == dev.delivered_digest)
                dev.metrics["delivered_path"] = path
            installed = True
            log(INFO, "delivered side networks to %d devices", sum(int(d.metrics.get("delivered", 0))
                                                                     for d in self.devices.values()))
        result = self._evaluate(grid, cfg.rounds, {"split": "test", "installed": installed}, final=True)
        for dev in self.devices.values():
            stats = result["per_device"].get(dev.device_id)
            if stats:
                dev.metrics["test_accuracy"] = float(stats["accuracy"])
                dev.metrics["test_samples"] = int(stats["samples"])
                dev.metrics["zero_shot_accuracy"] = float(stats["zero-shot-accuracy"])
                dev.metrics["device_peak_rss_mb"] = float(stats["peak-rss-mb"])
        return result

    def _virtual_summary(self) -> dict[str, Any]:
        """Time-to-accuracy material: the accuracy curve against virtual seconds (a fleet simulation)
        or training wall seconds (no fleet), device compute as the fleet would spend it, and every
        bandwidth decision with its reason. Evaluation is a measurement: it costs no virtual time."""
        devices: dict[str, dict[str, Any]] = {}
        for dev in self.devices.values():
            entry: dict[str, Any] = {"late_frames": self.late_frames.get(dev.device_id, 0),
                                     "unanswered": int(dev.metrics.get("unanswered", 0))}
            if self.clock is not None:
                entry.update(tier=self.clock.profiles[dev.device_id].tier,
                             compute_s=self.clock.device_busy.get(dev.device_id, 0.0),
                             upload_s=self._v_upload.get(dev.device_id, 0.0))
            if self.policy is not None:
                layers = self.side_config.layers_for(str(dev.profile["fingerprint"]))
                entry["decisions"] = [d.as_dict(layers) for d in self.policy.decisions if d.device == dev.device_id]
                entry["final_choice"] = {"bits": self.policy.choice(dev.device_id).bits,
                                         "taps": self.policy.choice(dev.device_id).taps}
            devices[dev.device_id] = entry
        clock = self.clock is not None
        return {"fleet": self.config.fleet, "adapt": self.config.adapt, "clock": "virtual" if clock else "wall",
                "curve": self.curve, "total_s": self.vnow,
                "device_compute_s": (sum(self.clock.device_busy.values()) if clock
                                     else sum(d.busy_s for d in self.devices.values())),
                "deadline_s": self.policy.deadline_s if self.policy else None,
                "deadline_reason": self.policy.deadline_reason if self.policy else "",
                "devices": devices}

    def _summary(self, final: dict[str, Any], train_wall: float, run_wall: float) -> dict[str, Any]:
        totals = self._stream_totals
        device_s = sum(d.busy_s for d in self.devices.values())
        server_s = self.store.train_seconds
        per_device = {d.device_id: {**d.account(), "frames_refused": dict(self.intake.refused.get(d.device_id, {})),
                                    "samples_trained": int(self.intake.accepted_samples.get(d.device_id, 0))}
                      for d in self.devices.values()}
        overflow = {k: c["rejected"] for k, c in self.store.cache_counts().items() if c["rejected"]}
        if overflow:
            self.events.append(f"activation cache full (cache-mb={self.config.cache_mb}): frames trained once and "
                               f"not kept for later rounds: {overflow}")
            log(WARNING, "%s", self.events[-1])
        # Devices work in parallel, so the device side's critical path is the slowest device's
        # forward time; 1.0 means the streaming wall time equals the slower of the two sides.
        slowest = totals["slowest_device_s"]
        efficiency = max(slowest, totals["train_s"]) / totals["wall_s"] if totals["wall_s"] else float("nan")
        tested = [d for d in self.devices.values() if "test_accuracy" in d.metrics]
        return {
            "test_accuracy": final["accuracy"],
            "initial_test_accuracy": self.initial["accuracy"] if self.initial else None,
            "mean_device_test_accuracy": (sum(d.metrics["test_accuracy"] for d in tested) / len(tested)
                                          if tested else float("nan")),
            "devices": per_device,
            "pipeline_efficiency": efficiency,
            "stream_wall_s": totals["wall_s"], "stream_device_forward_s": totals["device_s"],
            "stream_slowest_device_forward_s": slowest,
            "stream_server_train_s": totals["train_s"],
            "device_forward_s": device_s, "server_train_s": server_s, "train_wall_s": train_wall,
            "run_wall_s": run_wall,
            "bytes_up": sum(d.bytes_up for d in self.devices.values()),
            "bytes_down": sum(d.bytes_down for d in self.devices.values()),
            "frame_bytes": sum(d.frame_bytes for d in self.devices.values()),
            "frames": sum(d.frames for d in self.devices.values()),
            "frames_accepted": self._frames_accepted,
            "frames_refused": sum(sum(c.values()) for c in self.intake.refused.values()),
            "replies_refused": sum(sum(d.replies_refused.values()) for d in self.devices.values()),
            "profiles_refused": self.profiles_refused,
            "virtual": self._virtual_summary(),
            "rounds": self.rounds,
            "config": self.config.as_dict(),
            "run_config": {k: v for k, v in self.run_config.items()},
            "side_network": json.loads(self.side_config.to_json()),
            "trainable_parameters": next(iter(self.store.trainers.values())).net.num_trainable(),
            "events": self.events,
            "server_device": str(next(iter(self.store.trainers.values())).device),
            "cpu_count": os.cpu_count(),
        }
