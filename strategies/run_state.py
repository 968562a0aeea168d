"""What a side-tuning run knows and has measured: per-device accounting, the run's history, and the
checkpoint that lets a killed server continue where it stopped."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path
from typing import Any, ClassVar

from flwr.common.logger import log

from mobiflower.platform.atomic import atomic_directory
from mobiflower.platform.intake import FrameIntake
from mobiflower.platform.side_store import SideNetworkStore
from mobiflower.strategies.config import SideTuningConfig
from mobiflower.strategies.reply_checks import ReplyError


class FleetError(RuntimeError):
    """The fleet cannot run this job (no devices, mismatched backbones, every device failed)."""


@dataclass(frozen=True)
class Usage:
    """What a device has cost so far; a round's share is the difference of two snapshots."""

    bytes_up: int = 0
    bytes_down: int = 0
    busy_s: float = 0.0
    frame_bytes: int = 0

    def __sub__(self, other: "Usage") -> "Usage":
        return Usage(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    def as_round(self) -> dict[str, Any]:
        return {
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "device_forward_s": self.busy_s,
            "frame_bytes": self.frame_bytes,
        }


@dataclass
class DeviceState:
    """What the server knows and has measured about one device.

    Its counters, failures, refusals and metrics are written by two threads: the main thread (requests
    and replies) and, while a round streams, the trainer thread (a frame it refuses, a label-private
    step's residual requests). So they change only through :meth:`add`, :meth:`fail`, :meth:`count`
    and :meth:`refuse`, which hold the device's lock for the read-modify-write; reading them needs no
    lock (the summary and checkpoints read them once the trainer thread has stopped).
    """

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
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    COUNTERS: ClassVar[frozenset[str]] = frozenset(
        ("bytes_up", "bytes_down", "frame_bytes", "frames", "samples_forwarded", "samples_lost", "forward_s", "busy_s")
    )

    RESUMED: ClassVar[tuple[str, ...]] = (
        "next_offset",
        "bytes_up",
        "bytes_down",
        "frame_bytes",
        "frames",
        "samples_forwarded",
        "samples_lost",
        "forward_s",
        "busy_s",
        "failures",
        "dropped",
        "replies_refused",
        "metrics",  # evaluation bytes, residual requests ...: counted over the whole run
    )

    @property
    def fingerprint(self) -> str:
        return str(self.profile["fingerprint"])

    def usage(self) -> Usage:
        return Usage(self.bytes_up, self.bytes_down, self.busy_s, self.frame_bytes)

    def add(self, **amounts: float) -> None:
        """Add to the device's counters (:data:`COUNTERS`: bytes, frames, samples, seconds) in one step."""
        unknown = set(amounts) - self.COUNTERS
        if unknown:
            raise KeyError(f"not a device counter: {sorted(unknown)}; counters are {sorted(self.COUNTERS)}")
        with self._lock:
            for key, amount in amounts.items():
                setattr(self, key, getattr(self, key) + amount)

    def fail(self, message: str) -> None:
        """Record a failed request (or a refused frame) with why."""
        with self._lock:
            self.failures.append(message)

    def count(self, key: str, amount: float = 1) -> None:
        """Add to one of the device's extra metrics (residual requests, evaluation bytes ...)."""
        with self._lock:
            self.metrics[key] = self.metrics.get(key, 0) + amount

    def refuse(self, err: Exception, what: str, record: bool = True) -> str:
        """Count a reply that failed its checks (any other error reading it counts as 'unreadable') and,
        with ``record``, add why to the failures; returns why."""
        reason = err.reason if isinstance(err, ReplyError) else f"{what}: unreadable"
        why = str(err) if isinstance(err, ReplyError) else f"unreadable reply ({type(err).__name__}: {err})"
        self.refused(reason, f"{what}: {why}" if record else None)
        return why

    def refused(self, reason: str, failure: str | None = None) -> None:
        """Count one refusal under ``reason`` and, given, record ``failure`` with it."""
        with self._lock:
            self.replies_refused[reason] = self.replies_refused.get(reason, 0) + 1
            if failure is not None:
                self.failures.append(failure)

    def account(self) -> dict[str, Any]:
        return {
            "node_id": self.node_id,
            "fingerprint": self.profile.get("fingerprint"),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "frame_bytes": self.frame_bytes,
            "frames": self.frames,
            "samples_forwarded": self.samples_forwarded,
            "samples_lost": self.samples_lost,
            "device_forward_s": self.busy_s,
            "backbone_forward_s": self.forward_s,
            "failures": self.failures,
            "dropped": self.dropped,
            # the share of each label in its training samples (classification; empty for a task without labels)
            "label_shares": self.profile.get("label-shares"),
            # the device's own sample counts, and what reading its data skipped (empty texts, refused rows) or
            # cut to max-length
            "data": {
                **{split: self.profile.get(split) for split in ("train", "validation", "test")},
                **{k: self.profile.get(f"data-{k}", 0) for k in ("empty", "refused", "truncated")},
            },
            # device forward passes per training sample: 1 with the activation cache, the rounds without
            "forward_passes_per_sample": self.samples_forwarded / self.train_samples if self.train_samples else 0.0,
            "activation_cache": bool(self.profile.get("activation-cache", True)),
            # what the device did to the states it sent (platform/state_defense.py), as it reported it
            "state_defense": self.profile.get("state-defense", "none"),
            "replies_refused": dict(self.replies_refused),
            **self.metrics,
        }


@dataclass
class StreamTotals:
    """Streaming rounds summed: wall time, device forward time (all and the slowest device's), training."""

    wall_s: float = 0.0
    device_s: float = 0.0
    slowest_device_s: float = 0.0
    train_s: float = 0.0


@dataclass
class RunState:
    """The run's devices and history: everything the summary reports and a checkpoint keeps."""

    devices: dict[int, DeviceState] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    initial: dict[str, Any] | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)  # (round, virtual seconds, task metrics) per evaluation
    late_frames: dict[str, int] = field(default_factory=dict)
    frames_accepted: int = 0
    stream: StreamTotals = field(default_factory=StreamTotals)
    profiles_refused: dict[str, dict[str, int]] = field(default_factory=dict)  # failed profile checks, by node

    def working(self) -> dict[int, DeviceState]:
        return {n: d for n, d in self.devices.items() if not d.dropped}

    def usage(self) -> dict[int, Usage]:
        return {n: d.usage() for n, d in self.devices.items()}


# ---- checkpoints ------------------------------------------------------------------------------------
RUN_DEFINING = (
    "task",
    "labels",
    "prompt-template",
    "max-length",
    "mode",
    "family",
    "reduction",
    "dropout",
    "lr",
    "weight-decay",
    "batch-size",
    "num-server-rounds",
    "average-epochs",
    "activation-cache",
    "cache-mb",
    "aggregate-every",
    "personal-epochs",
    "personal-lr",
    "personal-select",
    "seed",
    "chunk-size",
    "bits",
    "token-policy",
    "label-private",
    "label-epsilon",
)


def run_defining(config: SideTuningConfig) -> dict[str, Any]:
    """Settings a resumed run must share with the original (what was trained, and how)."""
    values = config.as_dict()
    return {k: values[k] for k in RUN_DEFINING}


def save_checkpoint(
    run_dir: Path,
    rnd: int,
    train_wall: float,
    virtual_now: float,
    state: RunState,
    store: SideNetworkStore,
    intake: FrameIntake,
    config: SideTuningConfig,
) -> None:
    """Everything a resumed run needs, written to a temp folder and swapped in whole.

    Side networks, optimizer state, schedules, RNG states and tail averages (per trainer), the
    cache index (how many persisted frames each trainer's cache holds), per-device cursors
    and accounting, and the metrics history. A crash mid-write leaves the previous one.
    """
    with atomic_directory(run_dir / "checkpoint") as tmp:  # a crash between its renames leaves checkpoint.old
        store.save(tmp, extra={"round": rnd})
        intake.save_digests(tmp / "accepted_frames.sha256")  # replays stay refused after a resume
        saved = {
            "round": rnd,
            "train_wall_s": train_wall,
            "config": run_defining(config),
            "rounds": state.rounds,
            "events": state.events,
            "initial": state.initial,
            "stream_totals": dataclasses.asdict(state.stream),
            "virtual": {
                "now": virtual_now,
                "curve": state.curve,
                "late_frames": state.late_frames,
                "frames_accepted": state.frames_accepted,
            },
            "cached_frames": intake.cached_counts(),
            "refused": {d: dict(c) for d, c in intake.refused.items()},
            "devices": {d.device_id: {k: getattr(d, k) for k in DeviceState.RESUMED} for d in state.devices.values()},
        }
        (tmp / "strategy.json").write_text(json.dumps(saved, default=str))


def discard_checkpoint(run_dir: Path) -> None:
    for stale in ("checkpoint", "checkpoint.old", "checkpoint.tmp"):
        shutil.rmtree(run_dir / stale, ignore_errors=True)


@dataclass(frozen=True)
class Restored:
    next_round: int
    train_wall: float
    virtual_now: float


def restore_checkpoint(
    run_dir: Path, state: RunState, store: SideNetworkStore, intake: FrameIntake, config: SideTuningConfig
) -> Restored:
    """Continue the run in ``run_dir`` from its last checkpoint: fills ``state``, ``store`` and ``intake``."""
    directory = run_dir / "checkpoint"
    if not (directory / "strategy.json").exists() and (run_dir / "checkpoint.old" / "strategy.json").exists():
        directory = run_dir / "checkpoint.old"  # the crash hit between the two renames of a checkpoint
    if not (directory / "strategy.json").exists():
        raise FleetError(
            f"resume = true but {directory} holds no checkpoint: point run-dir at the folder of "
            f"the run to continue (its summary and checkpoint live there), or drop resume"
        )
    saved = json.loads((directory / "strategy.json").read_text())
    now = run_defining(config)
    changed = {k: (v, now.get(k)) for k, v in saved.get("config", {}).items() if now.get(k) != v}
    if changed:
        raise FleetError(
            "resume needs the settings the run started with; changed: "
            + ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
        )
    store.load(directory)
    restored = intake.restore(saved["cached_frames"])
    if (directory / "accepted_frames.sha256").exists():
        intake.load_digests(directory / "accepted_frames.sha256")
    for device, counts in saved.get("refused", {}).items():
        intake.refused[device].update(counts)
    by_id = {d.device_id: d for d in state.devices.values()}
    missing = sorted(set(saved["devices"]) - set(by_id))
    if missing:
        raise FleetError(f"the checkpoint's devices {missing} are not connected: resume with the same fleet")
    for device, values in saved["devices"].items():
        for key, value in values.items():
            setattr(by_id[device], key, value)
    state.rounds, state.events, state.initial = saved["rounds"], saved["events"], saved["initial"]
    state.stream = StreamTotals(**saved["stream_totals"])
    virtual = saved.get("virtual", {})
    state.curve = list(virtual.get("curve", []))
    state.late_frames = dict(virtual.get("late_frames", {}))
    state.frames_accepted = int(virtual.get("frames_accepted", 0))
    log(INFO, "resumed from round %d of %s: %d cached frames reloaded", saved["round"], directory, restored)
    state.events.append(f"resumed after round {saved['round']}")
    return Restored(int(saved["round"]) + 1, float(saved["train_wall_s"]), float(virtual.get("now", 0.0)))
