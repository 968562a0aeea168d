"""Federated on-device LoRA (FlowerTune-style): Flower's FedAvg over PEFT LoRA adapters (+ head), with accounting.

The baseline mobiflower is measured against: every device backpropagates through its own
backbone (:mod:`mobiflower.simulations.baselines.fed_lora_client_app`), the server averages the trainable tensors
with Flower's own :class:`~flwr.serverapp.strategy.FedAvg` (weighted by ``num-examples``). This
subclass changes no aggregation; it only

* sends the round's learning rate (cosine over rounds, or constant) and the LoRA shape in the
  train config, so devices need nothing but their data and backbone,
* records per round what the harness compares: the task's on-device metrics (classification:
  accuracy and macro-F1, each device weighted by its samples; causal-LM: loss and token accuracy
  weighted by scored tokens, perplexity ``exp`` of the combined loss), bytes up
  and down (the ``ArrayRecord`` sizes that travel), device compute seconds summed and their max
  over devices (what a synchronous round waits for on a virtual clock), and per device the same,
* keeps a linear probe of every client update and of the aggregate: FedAvg is linear, so the
  aggregate's probe must equal the ``num-examples``-weighted mean of the clients' probes, which
  proves from the run record alone that the averaging happened as claimed.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import asdict, dataclass
from logging import INFO, WARNING
from typing import Any, Iterable, Mapping

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from mobiflower.platform.run_config import as_config, typed_fields
from mobiflower.platform.run_summary import metric_key
from mobiflower.platform.tasks import BUNDLED_TASK, Task, combine_metrics

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
METRICS_KEY = "metrics"
DEVICE_KEY = "device"
LR_SCHEDULES = ("cosine", "constant")
EVAL_SPLITS = ("validation", "test")


class FedLoraConfigError(ValueError):
    """The run config does not describe a valid federated LoRA job."""


@dataclass
class FedLoraConfig:
    """The server's settings for one federated LoRA run (run-config keys in kebab case)."""

    num_server_rounds: int = 10  # Flower server rounds: each device trains local-epochs over its data per round
    lr: float = 5e-4  # the single-device LoRA optimum; tune per fleet with simulations.baselines.fed_lora.tune_fed_lora
    lr_schedule: str = "cosine"  # cosine: round t gets lr * (1 + cos(pi (t-1) / num-server-rounds)) / 2
    local_epochs: int = 1
    batch_size: int = 16
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: str = ""  # comma-separated module names; empty: the model type's attention projections
    eval_split: str = "validation"  # scored on devices after every round
    eval_samples: int = 0  # per device per round; 0: the device's whole split
    final_eval: bool = True  # score the final adapters on every device's test split
    devices: int = 0  # wait for this many devices and train on all of them every round; 0: whoever is connected
    seed: int = 0
    request_timeout: float = 3600.0
    run_dir: str = ""

    def __post_init__(self) -> None:
        checks = [
            (self.num_server_rounds >= 1, f"num-server-rounds={self.num_server_rounds} must be at least 1"),
            (self.lr > 0, f"lr={self.lr} must be positive"),
            (self.lr_schedule in LR_SCHEDULES, f"lr-schedule={self.lr_schedule!r} must be one of {LR_SCHEDULES}"),
            (self.local_epochs >= 1, f"local-epochs={self.local_epochs} must be at least 1"),
            (self.batch_size >= 1, f"batch-size={self.batch_size} must be at least 1"),
            (self.lora_r >= 1, f"lora-r={self.lora_r} must be at least 1"),
            (0.0 <= self.lora_dropout < 1.0, f"lora-dropout={self.lora_dropout} must be in [0, 1)"),
            (self.eval_split in EVAL_SPLITS, f"eval-split={self.eval_split!r} must be one of {EVAL_SPLITS}"),
            (self.eval_samples >= 0, f"eval-samples={self.eval_samples} must be >= 0 (0: the whole split)"),
            (self.devices >= 0, f"devices={self.devices} must be >= 0 (0: whoever is connected)"),
            (self.request_timeout > 0, f"request-timeout={self.request_timeout} must be positive"),
        ]
        for ok, why in checks:
            if not ok:
                raise FedLoraConfigError(why)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "FedLoraConfig":
        """Read the keys this class declares (kebab case) and ignore the devices' keys."""
        return cls(**typed_fields(cls, run_config, error=FedLoraConfigError))

    def as_dict(self) -> dict[str, bool | int | float | str]:
        return as_config(self)

    def lr_at(self, server_round: int) -> float:
        """The round's learning rate: cosine from ``lr`` (round 1) towards 0, never reaching it."""
        if self.lr_schedule == "constant":
            return self.lr
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * (server_round - 1) / self.num_server_rounds))

    def device_config(self) -> dict[str, bool | int | float | str]:
        """What a device needs to rebuild the same LoRA model and train it (sent in every request)."""
        return {
            "lora-r": self.lora_r,
            "lora-alpha": self.lora_alpha,
            "lora-dropout": self.lora_dropout,
            "lora-target-modules": self.lora_target_modules,
            "seed": self.seed,
        }


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ``ArrayRecord``'s array data as it travels (no message framing).

    Flower serializes each numpy/torch array in ``.npy`` format, so every tensor costs its
    values plus a small header (128 bytes for these shapes); this counts both.
    """
    return sum(len(a.data) for a in record.values())


def linear_probe(record: ArrayRecord) -> float:
    """A fixed random linear functional of all arrays (float64): FedAvg commutes with it."""
    total = 0.0
    for key in sorted(record.keys()):
        values = np.asarray(record[key].numpy(), dtype=np.float64).ravel()
        weights = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(values.size)
        total += float(values @ weights)
    return total


def _reply_device(reply: Message) -> str:
    content = reply.content
    if DEVICE_KEY in content and "device-id" in content[DEVICE_KEY]:
        return str(content[DEVICE_KEY]["device-id"])
    return f"node-{reply.metadata.src_node_id}"


class FedLoraStrategy(FedAvg):
    """Flower's FedAvg over all devices every round, with per-round and per-device accounting."""

    def __init__(self, config: FedLoraConfig, task: Task = BUNDLED_TASK) -> None:
        nodes = max(1, config.devices)
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=1.0,
            min_train_nodes=nodes,
            min_evaluate_nodes=nodes,
            min_available_nodes=nodes,
            arrayrecord_key=ARRAYS_KEY,
            configrecord_key=CONFIG_KEY,
        )
        self.config = config
        self.task = task  # what the devices train and score (their run config's task keys)
        self.history: dict[int, dict[str, Any]] = {}
        self.devices: dict[str, dict[str, Any]] = {}
        self.failures: list[dict[str, Any]] = []
        self._down_per_node = 0  # adapter bytes sent to each device this round (set by configure_train)
        self._eval_down_per_node = 0

    # ---- accounting helpers ------------------------------------------------------------------

    def _round(self, server_round: int) -> dict[str, Any]:
        return self.history.setdefault(
            server_round,
            {
                "round": server_round,
                "bytes_up": 0,
                "bytes_down": 0,
                "bytes_down_eval": 0,
                "device_compute_s": 0.0,
                "device_compute_max_s": 0.0,
                "devices": {},
            },
        )

    def _device(self, name: str) -> dict[str, Any]:
        return self.devices.setdefault(
            name,
            {
                "bytes_up": 0,
                "bytes_down": 0,
                "bytes_down_eval": 0,
                "device_compute_s": 0.0,
                "rounds_trained": 0,
                "failures": 0,
            },
        )

    def _failed(self, server_round: int, phase: str, replies: Iterable[Message]) -> None:
        for reply in replies:
            if reply.has_error():
                self.failures.append(
                    {
                        "round": server_round,
                        "phase": phase,
                        "node_id": reply.metadata.src_node_id,
                        "reason": reply.error.reason,
                    }
                )
                log(
                    WARNING,
                    "fed-lora round %d %s: node %d failed: %s",
                    server_round,
                    phase,
                    reply.metadata.src_node_id,
                    reply.error.reason,
                )

    # ---- FedAvg hooks ------------------------------------------------------------------------

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["lr"] = self.config.lr_at(server_round)
        config["local-epochs"] = self.config.local_epochs
        config["batch-size"] = self.config.batch_size
        config.update(self.config.device_config())
        messages = list(super().configure_train(server_round, arrays, config, grid))
        rec = self._round(server_round)
        rec.update(
            {
                "lr": config["lr"],
                "t0": time.perf_counter(),
                "nodes": len(messages),
                "global_probe": linear_probe(arrays),
            }
        )
        rec["bytes_down"] += record_bytes(arrays) * len(messages)
        self._down_per_node = record_bytes(arrays)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._failed(server_round, "train", replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        rec = self._round(server_round)
        seconds: list[float] = []
        weights_probes: list[tuple[float, float]] = []
        loss_sum = examples = 0.0
        for reply in replies:
            if reply.has_error():
                continue
            name = _reply_device(reply)
            stats = reply.content[METRICS_KEY]
            up = record_bytes(reply.content[ARRAYS_KEY])
            train_s = float(stats["train-s"])
            n = float(stats["num-examples"])
            probe = linear_probe(reply.content[ARRAYS_KEY])
            rec["devices"][name] = {
                "bytes_up": up,
                "bytes_down": self._down_per_node,
                "train_s": train_s,
                "train_cpu_s": float(stats["train-cpu-s"]),
                "load_s": float(stats["load-s"]),
                "num_examples": int(n),
                "loss": float(stats["loss"]),
                "steps": int(stats["steps"]),
                "peak_rss_mb": float(stats["peak-rss-mb"]),
                "adapter_bytes": int(stats["adapter-bytes"]),
                "probe": probe,
                "samples_digest": str(reply.content[DEVICE_KEY]["samples-digest"]),
                "partition_id": int(reply.content[DEVICE_KEY]["partition-id"]),
            }
            dev = self._device(name)
            dev["bytes_up"] += up
            dev["bytes_down"] += self._down_per_node
            dev["device_compute_s"] += train_s
            dev["rounds_trained"] += 1
            dev["peak_rss_mb"] = max(dev.get("peak_rss_mb", 0.0), float(stats["peak-rss-mb"]))
            dev["num_examples"] = int(n)
            rec["bytes_up"] += up
            seconds.append(train_s)
            weights_probes.append((n, probe))
            loss_sum += n * float(stats["loss"])
            examples += n
        rec["device_compute_s"] = sum(seconds)
        rec["device_compute_max_s"] = max(seconds, default=0.0)
        rec["train_loss"] = loss_sum / examples if examples else None
        rec["aggregated"] = arrays is not None
        if arrays is not None:
            rec["aggregate_probe"] = linear_probe(arrays)
            rec["expected_probe"] = sum(n * p for n, p in weights_probes) / sum(n for n, _ in weights_probes)
        return arrays, metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        config["split"] = self.config.eval_split
        config["max-samples"] = self.config.eval_samples
        config.update(self.config.device_config())
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        rec = self._round(server_round)
        rec["bytes_down_eval"] += record_bytes(arrays) * len(messages)
        self._eval_down_per_node = record_bytes(arrays)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        replies = list(replies)
        self._failed(server_round, "evaluate", replies)
        rec = self._round(server_round)
        split = self.config.eval_split
        metrics = combined_metrics(self.task, replies)
        for reply in replies:
            if not reply.has_error():
                name = _reply_device(reply)
                stats = reply.content[METRICS_KEY]
                own = rec["devices"].setdefault(name, {})
                own.update({f"{split}_{metric_key(m)}": _value(stats, m) for m in self.task.metric_names})
                self._device(name)["bytes_down_eval"] += self._eval_down_per_node
        for m in self.task.metric_names:
            value = None if metrics is None else metrics[m]
            rec[f"{split}_{metric_key(m)}"] = value
            rec[metric_key(m)] = value  # the round's figures under the metric's own name (rec["accuracy"])
        rec["wall_s"] = time.perf_counter() - rec.pop("t0", time.perf_counter())
        primary = None if metrics is None else metrics[self.task.primary]
        log(
            INFO,
            "fed-lora round %d: %s %s %s, %d B up, %d B down, device compute %.1f s (max %.1f s)",
            server_round,
            split,
            self.task.primary,
            "n/a" if primary is None else f"{primary:.4f}",
            rec["bytes_up"],
            rec["bytes_down"],
            rec["device_compute_s"],
            rec["device_compute_max_s"],
        )
        return None if metrics is None else MetricRecord(finite(metrics))

    # ---- after the rounds --------------------------------------------------------------------

    def evaluate_final(self, grid: Grid, arrays: ArrayRecord) -> dict[str, Any]:
        """Score the final adapters on every device's test split (the task's metrics, combined over devices)."""
        config = ConfigRecord({"split": "test", "max-samples": 0, **self.config.device_config()})
        node_ids = list(grid.get_node_ids())
        messages = self._construct_messages(
            RecordDict({ARRAYS_KEY: arrays, CONFIG_KEY: config}), node_ids, MessageType.EVALUATE
        )
        replies = list(grid.send_and_receive(messages, timeout=self.config.request_timeout))
        self._failed(self.config.num_server_rounds + 1, "test", replies)
        per_device = {}
        for reply in replies:
            if not reply.has_error():
                stats = reply.content[METRICS_KEY]
                per_device[_reply_device(reply)] = {
                    **{f"test_{metric_key(m)}": _value(stats, m) for m in self.task.metric_names},
                    "test_samples": int(stats["num-examples"]),
                }
                per_device[_reply_device(reply)]["test_count"] = _count(stats)
                self._device(_reply_device(reply))["bytes_down_eval"] += record_bytes(arrays)
        metrics = combined_metrics(self.task, replies)
        return {
            **{f"test_{metric_key(m)}": None if metrics is None else metrics[m] for m in self.task.metric_names},
            "test_count": sum(_count(r.content[METRICS_KEY]) for r in replies if not r.has_error()),
            "devices": per_device,
            "bytes_down": record_bytes(arrays) * len(node_ids),
        }

    def summary_record(
        self, final: dict[str, Any] | None, arrays: ArrayRecord, trainable: int, wall_s: float
    ) -> dict[str, Any]:
        """Everything ``summary.json`` holds: the harness's figures, per round and per device."""
        rounds = [self.history[r] for r in sorted(self.history)]
        bytes_down_train = sum(r["bytes_down"] for r in rounds)
        bytes_down_eval = sum(r["bytes_down_eval"] for r in rounds) + (final or {}).get("bytes_down", 0)
        devices = {name: dict(d) for name, d in sorted(self.devices.items())}
        for name, d in (final or {}).get("devices", {}).items():
            devices.setdefault(name, {}).update(d)
        return {
            "method": "fed-lora",
            "task": self.task.name,
            # the task's metrics (tuning chooses by the primary one), named as a side-tuning summary names them
            "metrics": {
                "primary": self.task.primary,
                "names": list(self.task.metric_names),
                "higher_is_better": self.task.higher_is_better,
            },
            **self.final_metrics(final, rounds),
            "bytes_up": sum(r["bytes_up"] for r in rounds),
            # Training traffic only (the global adapters each device trains from); evaluation
            # broadcasts are measurement, not method cost, and are listed apart.
            "bytes_down": bytes_down_train,
            "bytes_down_eval": bytes_down_eval,
            # the final adapter sent to every device (here also scored there): the method's delivery
            "bytes_down_delivery": (final or {}).get("bytes_down", 0),
            "device_compute_s": sum(r["device_compute_s"] for r in rounds),
            "device_compute_critical_s": sum(r["device_compute_max_s"] for r in rounds),
            "adapter_bytes": record_bytes(arrays),  # as it travels: each array's .npy bytes (header included)
            "adapter_tensors": len(arrays),
            "trainable_parameters": trainable,
            "rounds": rounds,
            "devices": devices,
            "failures": self.failures,
            "run_wall_s": wall_s,
            "config": asdict(self.config),
        }

    def final_metrics(self, final: dict[str, Any] | None, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        """``final_<metric>`` (the test figure when the final test ran, else the last scored round's) and
        ``final_<eval split>_<metric>`` (the last scored round's) for each of the task's metrics, and which
        split ``final_<metric>`` is (``final_split``; for classification also ``final_accuracy_split``);
        when the final test ran also ``test_<metric>`` and ``test_count`` (samples, or scored tokens), the
        keys a side-tuning summary gives its test figures."""
        split = self.config.eval_split
        out: dict[str, Any] = {}
        for m in self.task.metric_names:
            key = metric_key(m)
            last = next(
                (r.get(f"{split}_{key}") for r in reversed(rounds) if r.get(f"{split}_{key}") is not None), None
            )
            out[f"final_{key}"] = final[f"test_{key}"] if final else last
            out[f"final_{split}_{key}"] = last
            if final:
                out[f"test_{key}"] = final[f"test_{key}"]
        if final:
            out["test_count"] = final["test_count"]
        out["final_split"] = "test" if final else split
        if self.task.name == "classification":
            out["final_accuracy_split"] = out["final_split"]
        return out


def _count(stats: MetricRecord) -> int:
    """What a device's metrics are over (samples, or scored tokens; ``num-examples`` in older replies)."""
    return int(stats["count"]) if "count" in stats else int(stats["num-examples"])


def _value(stats: MetricRecord, name: str) -> float | None:
    return float(stats[name]) if name in stats else None


def finite(metrics: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


def combined_metrics(task: Task, replies: Iterable[Message]) -> dict[str, float] | None:
    """The task's metrics over all devices' replies (:func:`~mobiflower.platform.tasks.combine_metrics`:
    each device weighted by what its metrics are over, ``count``: samples, or scored tokens; older
    replies without it by ``num-examples``); None when no device scored anything."""
    parts = []
    for reply in replies:
        if reply.has_error() or METRICS_KEY not in reply.content:
            continue
        stats = reply.content[METRICS_KEY]
        weight = float(_count(stats))
        if weight > 0:
            parts.append(({m: float(stats[m]) for m in task.metric_names if m in stats}, weight))
    return combine_metrics(task, parts) if parts else None


__all__ = [
    "FedLoraConfig",
    "FedLoraConfigError",
    "FedLoraStrategy",
    "combined_metrics",
    "linear_probe",
    "metric_key",
    "record_bytes",
    "LR_SCHEDULES",
]
