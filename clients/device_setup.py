"""What a fleet device is, from Flower's run config and node config: its backbone and its data.

Both the ClientApp and the benchmarks build a device from the same two dictionaries: the run
config (``[tool.flwr.app.config]`` plus ``-c`` overrides, the same on every node) and the node
config (``partition-id`` / ``num-partitions``, set by the simulation engine or by
``flower-supernode --node-config``). Backbones and data are cached per process, keyed by what
defines them and never by node: in a simulation one Ray actor serves many virtual devices, and in
a deployment each message starts a fresh process that loads the memory-mapped backbone again.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.data import Example, Splits, partition, partition_like, task_samples
from mobiflower.platform.run_config import typed_fields
from mobiflower.platform.tasks import Task, TaskConfig

_BACKBONES: dict[tuple, Backbone] = {}
_SPLITS: dict[tuple, Splits] = {}
_DEVICE_DATA: dict[tuple, Splits] = {}
_TOKENS: dict[tuple, tuple[dict[str, list[int]], set]] = {}


class DeviceSetupError(ValueError):
    """The run config or node config does not describe a usable device."""


# the run-config key of each field the run config sets (the same on every device)
RUN_CONFIG_KEYS = {
    "model": "model",
    "weights": "weights",
    "num_taps": "num-taps",
    "train_samples": "train-samples",
    "validation_samples": "validation-samples",
    "test_samples": "test-samples",
    "partitioning": "partitioning",
    "dirichlet_alpha": "dirichlet-alpha",
    "seed": "seed",
    "threads": "device-threads",
}
NODE_CONFIG_FIELDS = ("partition_id", "num_partitions", "weights", "backbone_layers", "max_tokens")


@dataclass(frozen=True)
class DeviceSetup:
    """One device: which backbone it runs and which share of the task's samples it holds."""

    model: str = "smollm2-135m"
    weights: str = "fp32"
    num_taps: int = 8
    train_samples: int = 2000
    validation_samples: int = 500
    test_samples: int = 1000
    partitioning: str = "iid"
    dirichlet_alpha: float = 0.1
    seed: int = 0
    partition_id: int = 0
    num_partitions: int = 1
    threads: int = 1
    backbone_layers: int = 0  # > 0: run only the model's first N blocks (a layer-truncated backbone)
    # most padded tokens one forward pass runs: the device's activation memory (node config
    # ``max-tokens``; 0 = whole request batches); see ForwardConfig.max_tokens
    max_tokens: int = ForwardConfig.max_tokens or 0
    task_config: TaskConfig = field(default_factory=TaskConfig)  # the run config's task keys

    @classmethod
    def from_configs(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> "DeviceSetup":
        if "partition-id" not in node_config or "num-partitions" not in node_config:
            raise DeviceSetupError(
                "this node has no partition: start the SuperNode with --node-config "
                "'partition-id=<i> num-partitions=<n>' (the simulation engine sets both itself)"
            )
        shared = typed_fields(cls, run_config, keys=RUN_CONFIG_KEYS, only=RUN_CONFIG_KEYS, error=DeviceSetupError)
        # a device's own node config: its partition, and it may choose its weight precision (a phone with
        # little memory), run fewer blocks or cap its forward's tokens (an empty value leaves the run's)
        own = typed_fields(cls, node_config, only=NODE_CONFIG_FIELDS, error=DeviceSetupError)
        own = {k: v for k, v in own.items() if v != ""}
        setup = cls(**{**shared, **own}, task_config=TaskConfig.from_run_config(run_config))
        if not 0 <= setup.partition_id < setup.num_partitions:
            raise DeviceSetupError(
                f"partition-id={setup.partition_id} must be in [0, num-partitions={setup.num_partitions})"
            )
        if setup.partitioning not in ("iid", "dirichlet"):
            raise DeviceSetupError(f"partitioning={setup.partitioning!r} must be 'iid' or 'dirichlet'")
        for key, value in (("num-taps", setup.num_taps), ("device-threads", setup.threads)):
            if value < 1:
                raise DeviceSetupError(f"{key}={value} must be at least 1")
        from mobiflower.platform.precision import WeightPrecisionError, normalize_precision

        try:
            setup = dataclasses.replace(setup, weights=normalize_precision(setup.weights))
        except WeightPrecisionError as exc:
            raise DeviceSetupError(f"weights={setup.weights!r}: {exc}") from None
        if setup.max_tokens < 0:
            raise DeviceSetupError(f"max-tokens={setup.max_tokens} must be >= 1 (0 = whole batches)")
        if setup.backbone_layers < 0:
            raise DeviceSetupError(f"backbone-layers={setup.backbone_layers} must be >= 1 (0 = the whole model)")
        return setup

    @property
    def task(self) -> Task:
        return self.task_config.build()

    @property
    def device_id(self) -> str:
        return f"device-{self.partition_id}"

    def backbone(self) -> Backbone:
        """This process's backbone for the setup's model (loaded once per process)."""
        key = (self.model, self.weights, self.num_taps, self.backbone_layers)
        if key not in _BACKBONES:
            torch.set_num_threads(max(1, self.threads))
            _BACKBONES[key] = Backbone.load(
                self.model,
                num_taps=self.num_taps,
                weights=None if self.weights == "fp32" else self.weights,
                keep_layers=self.backbone_layers,
            )
        return _BACKBONES[key]

    def runtime(self, config: ForwardConfig | None = None) -> DeviceRuntime:
        """A forward runtime on this process's backbone whose token ids come from a per-process
        cache holding all of this device's samples. The first call tokenizes them all and then
        drops the tokenizer (:meth:`DeviceRuntime.pretokenize`), before the forward pages the
        weights in, so the device never holds tokenizer, weights and activations at once."""
        backbone = self.backbone()
        key = (self.model, self.weights, self.num_taps, self.backbone_layers)
        cache, done = _TOKENS.setdefault(key, ({}, set()))
        config = dataclasses.replace(config or ForwardConfig(), max_tokens=self.max_tokens or None)
        runtime = DeviceRuntime(backbone, config, device_id=self.device_id, tokens=cache, task=self.task)
        data_key = (self._data_key(), self.task_config)
        if data_key not in done:
            data = self.data()
            runtime.pretokenize(list(data.train) + list(data.validation) + list(data.test))
            done.add(data_key)
        return runtime

    def _data_key(self) -> tuple:
        return (
            self.train_samples,
            self.validation_samples,
            self.test_samples,
            self.partitioning,
            self.dirichlet_alpha,
            self.seed,
            self.partition_id,
            self.num_partitions,
        )

    def data(self) -> Splits:
        """This device's train / validation / test samples (deterministic from the run config)."""
        key = self._data_key()
        if key not in _DEVICE_DATA:
            split_key = (self.train_samples, self.validation_samples, self.test_samples, self.seed)
            if split_key not in _SPLITS:
                _SPLITS[split_key] = task_samples(
                    self.train_samples, self.validation_samples, self.test_samples, self.seed
                )
            _DEVICE_DATA[key] = device_share(
                _SPLITS[split_key],
                self.partition_id,
                self.num_partitions,
                self.partitioning,
                self.dirichlet_alpha,
                self.seed,
            )
        return _DEVICE_DATA[key]


def device_share(
    splits: Splits, partition_id: int, num_partitions: int, scheme: str, alpha: float, seed: int
) -> Splits:
    """Device ``partition_id``'s share: its training samples, and held-out samples with its label mix."""
    train_parts = partition(splits.train, num_partitions, scheme, alpha, seed)
    if scheme == "iid":
        val_parts = partition(splits.validation, num_partitions, "iid", seed=seed + 1)
        test_parts = partition(splits.test, num_partitions, "iid", seed=seed + 2)
    else:
        val_parts = partition_like(splits.validation, train_parts, seed=seed + 1)
        test_parts = partition_like(splits.test, train_parts, seed=seed + 2)
    train = list(train_parts[partition_id])
    random.Random(seed * 1009 + partition_id).shuffle(train)  # chunks mix labels: streamed batches are not one-class
    return Splits(train=train, validation=list(val_parts[partition_id]), test=list(test_parts[partition_id]))


def examples_at(examples: list[Example], offset: int, count: int) -> list[Example]:
    """``count`` samples from ``offset`` in the device's order, wrapping around (a new epoch)."""
    if not examples:
        raise DeviceSetupError("this device holds no samples of the requested split")
    return [examples[(offset + i) % len(examples)] for i in range(count)]


def device_run_config(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The run-config keys a device reads (those of fields ``names``, or all), with their defaults: what
    an app that runs this device declares in ``[tool.flwr.app.config]``."""
    device = DeviceSetup()
    return {key: getattr(device, name) for name, key in RUN_CONFIG_KEYS.items() if names is None or name in names}
