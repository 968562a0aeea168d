"""What a fleet device is, from Flower's run config and node config: its backbone and its data.

Both the ClientApp and the benchmarks build a device from the same two dictionaries: the run
config (``[tool.flwr.app.config]`` plus ``-c`` overrides, the same on every node) and the node
config (``partition-id`` / ``num-partitions``, set by the simulation engine or by
``flower-supernode --node-config``). Backbones and data are cached per process, keyed by what
defines them and never by node: in a simulation one Ray actor serves many virtual devices, and in
a deployment each message starts a fresh process that loads the memory-mapped backbone again.

Where a device's samples come from (docs/concepts.md §8):

* a real device names its own file in its node config (``data="/data/mine.jsonl"``, plus column
  keys): it reads only that file and splits its own validation and test by seeded fractions;
  ``partition-id`` is not needed;
* a simulated device takes its share of the run config's ``data`` by ``partitioning`` (flwr-datasets:
  ``iid``, ``dirichlet`` over labels, ``natural``: one device per user) and splits it the same way;
* the bundled Rotten Tomatoes job (the default) shares its fixed train / validation / test pools
  (``train-samples`` ...) across the fleet, so its figures stay comparable with earlier runs.

A device's prepared samples are also kept on its own disk (under ``MOBIFLOWER_HOME``, keyed by what
defines them and the files' sizes and times): a deployment's next message, a fresh process, reads
them back instead of importing ``datasets`` and splitting again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from mobiflower.clients.partitions import natural_partition, partition, share_of_pools
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.data import (
    SCHEMES,
    DataError,
    Example,
    NoTrainingData,
    Splits,
    split_own,
    task_samples,
    users_by_size,
)
from mobiflower.platform.run_config import typed_fields
from mobiflower.platform.state_defense import StateDefense, device_defense, run_config_defaults
from mobiflower.platform.tasks import Task, TaskConfig
from mobiflower.platform.user_data import BAD_ROWS, BUNDLED, BUNDLED_RT, Columns, ReadCounts, UserData

_BACKBONES: dict[tuple, Backbone] = {}
_SPLITS: dict[tuple, Splits] = {}
_DEVICE_DATA: dict[tuple, tuple[Splits, "DataReport"]] = {}
_READ: dict[tuple, UserData] = {}
_PARTS: dict[tuple, list] = {}
_TOKENS: dict[tuple, tuple[dict[str, list[int]], set]] = {}
_TRUNCATED: dict[tuple, int] = {}
_PREPARED_VERSION = 2  # bump when a split changes: prepared copies on disk are then made again

device_share = share_of_pools  # a device's share of the bundled job's pools (the name benches use)


class DeviceSetupError(ValueError):
    """The run config or node config does not describe a usable device."""


# the run-config key of each field the run config sets (the same on every device)
RUN_CONFIG_KEYS = {
    "model": "model",
    "weights": "weight-precision",
    "num_taps": "num-taps",
    "data_source": "data",
    "text_column": "text-column",
    "label_column": "label-column",
    "prompt_column": "prompt-column",
    "completion_column": "completion-column",
    "messages_column": "messages-column",
    "user_column": "user-column",
    "bad_rows": "bad-rows",
    "train_samples": "train-samples",
    "validation_samples": "validation-samples",
    "test_samples": "test-samples",
    "validation_fraction": "validation-fraction",
    "test_fraction": "test-fraction",
    "partitioning": "partitioning",
    "dirichlet_alpha": "dirichlet-alpha",
    "seed": "seed",
    "threads": "device-threads",
}
_DATA_FIELDS = ("data_source", *(f"{c}_column" for c in Columns.__dataclass_fields__), "bad_rows")
NODE_CONFIG_FIELDS = (
    "partition_id",
    "num_partitions",
    "weights",
    "backbone_layers",
    "max_tokens",
    "device_name",
    *_DATA_FIELDS,
    "validation_fraction",
    "test_fraction",
)
NODE_CONFIG_KEYS = {"device_name": "device-id", "data_source": "data", "weights": "weight-precision"}


@dataclass(frozen=True)
class DataReport:
    """What a device's data is and what became of it: what the profile and the run summary record.

    ``read`` counts rows (read, kept, empty texts skipped, refused) of this device's own data (its own
    file, its own user) when ``read_scope`` is ``device``, else of the whole data set its share came
    from; the bundled pools have none. ``truncated`` (samples longer than ``max-length`` tokens, cut to
    it) is known once :meth:`DeviceSetup.runtime` has tokenized the samples. ``problem`` says why the
    device cannot take part (no training samples), else is empty. :meth:`as_dict` is what may leave the
    device: counts, the scheme and seed, never a text, a label value or where its own file lives."""

    device_id: str
    source: str
    scheme: str
    seed: int
    train: int
    validation: int
    test: int
    split: dict[str, float] = field(default_factory=dict)  # the fractions, or the bundled pools' sizes
    user: str = ""
    read: ReadCounts | None = None
    read_scope: str = ""
    unassigned: int = 0  # natural: samples of the data set no device holds (no user, or beyond the N users)
    truncated: int | None = None
    problem: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device-id": self.device_id,
            "source": self.source,
            "scheme": self.scheme,
            "seed": self.seed,
            **self.split,
            "train": self.train,
            "validation": self.validation,
            "test": self.test,
        }
        if self.user:
            out["user"] = self.user
        if self.read is not None:
            out.update({"read-scope": self.read_scope, **{f"read-{k}": v for k, v in self.read.as_dict().items()}})
        if self.scheme == "natural":
            out["unassigned"] = self.unassigned
        if self.truncated is not None:
            out["truncated"] = self.truncated
        if self.problem:
            out["problem"] = self.problem
        return out


@dataclass(frozen=True)
class DeviceSetup:
    """One device: which backbone it runs and which samples it holds."""

    model: str = "smollm2-135m"
    weights: str = "fp32"
    num_taps: int = 8
    data_source: str = (
        BUNDLED_RT  # run/node config `data`: bundled:rotten-tomatoes, bundled:convention-speeches, or a file or folder
    )
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    user_column: str = "user"
    bad_rows: str = "refuse"  # a row that cannot be a sample: "refuse" (stop, naming it) or "skip" (count it)
    train_samples: int = 2000  # the bundled Rotten Tomatoes job's pools, shared across the fleet
    validation_samples: int = 500
    test_samples: int = 1000
    validation_fraction: float = 0.1  # any other data: each device's own held-out shares
    test_fraction: float = 0.1
    partitioning: str = "iid"  # iid, dirichlet (over labels) or natural (one device per user)
    dirichlet_alpha: float = 0.1
    seed: int = 0
    partition_id: int = 0
    num_partitions: int = 1
    threads: int = 1
    backbone_layers: int = 0  # > 0: run only the model's first N blocks (a layer-truncated backbone)
    # most padded tokens one forward pass runs: the device's activation memory (node config
    # ``max-tokens``; 0 = whole request batches); see ForwardConfig.max_tokens
    max_tokens: int = ForwardConfig.max_tokens or 0
    device_name: str = ""  # node config ``device-id``: how this device is named in the run
    own_data: bool = False  # the node config names this device's own data: no partition, no partition-id
    task_config: TaskConfig = field(default_factory=TaskConfig)  # the run config's task keys
    # what the device does to the states it sends: the run config's ``state-*`` keys, made stronger by the
    # node config's (a device that insists on a defense gets it whatever the server asks)
    defense: StateDefense = field(default_factory=StateDefense)

    @classmethod
    def from_configs(cls, run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> "DeviceSetup":
        own_data = bool(str(node_config.get("data") or "").strip())
        if not own_data and ("partition-id" not in node_config or "num-partitions" not in node_config):
            raise DeviceSetupError(
                "this node has no data: start the SuperNode with --node-config 'data=\"/path/to/own.jsonl\"' "
                "(its own file), or 'partition-id=<i> num-partitions=<n>' for a share of the run's data "
                "(the simulation engine sets both itself)"
            )
        shared = typed_fields(cls, run_config, keys=RUN_CONFIG_KEYS, only=RUN_CONFIG_KEYS, error=DeviceSetupError)
        # a device's own node config: its partition or its own data, and it may choose its weight precision (a
        # phone with little memory), run fewer blocks or cap its forward's tokens (an empty value leaves the run's)
        own = typed_fields(cls, node_config, keys=NODE_CONFIG_KEYS, only=NODE_CONFIG_FIELDS, error=DeviceSetupError)
        own = {k: v for k, v in own.items() if v != ""}
        setup = cls(
            **{**shared, **own},
            own_data=own_data,
            task_config=TaskConfig.from_run_config(run_config),
            defense=device_defense(run_config, node_config),
        )
        if not own_data and not 0 <= setup.partition_id < setup.num_partitions:
            raise DeviceSetupError(
                f"partition-id={setup.partition_id} must be in [0, num-partitions={setup.num_partitions})"
            )
        setup._check_data()
        if setup.defense.window and setup.task.targets == "tokens":
            raise DeviceSetupError(
                f"state-window={setup.defense.window} sends the states of a few tokens only, and task "
                f"{setup.task_config.task!r} scores every token: use state-clip and state-noise for this task"
            )
        for key, value in (("num-taps", setup.num_taps), ("device-threads", setup.threads)):
            if value < 1:
                raise DeviceSetupError(f"{key}={value} must be at least 1")
        from mobiflower.platform.precision import WeightPrecisionError, normalize_precision

        try:
            setup = dataclasses.replace(setup, weights=normalize_precision(setup.weights))
        except WeightPrecisionError as exc:
            raise DeviceSetupError(f"weight-precision={setup.weights!r}: {exc}") from None
        if setup.max_tokens < 0:
            raise DeviceSetupError(f"max-tokens={setup.max_tokens} must be >= 1 (0 = whole batches)")
        if setup.backbone_layers < 0:
            raise DeviceSetupError(f"backbone-layers={setup.backbone_layers} must be >= 1 (0 = the whole model)")
        return setup

    def _check_data(self) -> None:
        """The data keys, before any file is read (a missing file is a :class:`DataError`)."""
        if self.partitioning not in SCHEMES:
            raise DeviceSetupError(f"partitioning={self.partitioning!r} must be one of {', '.join(SCHEMES)}")
        if self.bad_rows not in BAD_ROWS:
            raise DeviceSetupError(f"bad-rows={self.bad_rows!r} must be one of {', '.join(BAD_ROWS)}")
        if not (0 <= self.validation_fraction < 1 and 0 <= self.test_fraction < 1):
            raise DeviceSetupError("validation-fraction and test-fraction must each be in [0, 1)")
        if self.validation_fraction + self.test_fraction >= 1:
            raise DeviceSetupError("validation-fraction + test-fraction must be below 1 (something must be trained on)")
        if self.data_source.startswith("bundled:") and self.data_source not in BUNDLED:
            raise DeviceSetupError(
                f"data={self.data_source!r} is not a bundled set: use a path or one of {', '.join(BUNDLED)}"
            )
        if not self.data_source.startswith("bundled:") and not Path(self.data_source).expanduser().exists():
            where = "this node's node config" if self.own_data else "the run config"
            raise DataError(f"data={self.data_source!r} (from {where}): no such file or folder; check the path")
        if self.data_source == BUNDLED_RT and self.partitioning == "natural" and not self.own_data:
            raise DeviceSetupError(
                "partitioning='natural' needs a user per sample and the bundled Rotten Tomatoes corpus has none: "
                "use iid or dirichlet, or data with a user column (e.g. bundled:convention-speeches)"
            )

    @property
    def task(self) -> Task:
        return self.task_config.build()

    @property
    def columns(self) -> Columns:
        return Columns(*(getattr(self, f"{name}_column") for name in Columns.__dataclass_fields__))

    @property
    def scheme(self) -> str:
        """How this device got its samples: ``own-file``, or the simulation's partitioning."""
        return "own-file" if self.own_data else self.partitioning

    @property
    def device_id(self) -> str:
        if self.device_name:
            return self.device_name
        if self.own_data:
            return Path(self.data_source).stem or "device"
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
        cache holding all of this device's samples. The first call tokenizes them all (counting the
        samples longer than ``max-length``) and then drops the tokenizer, before the forward pages the
        weights in, so the device never holds tokenizer, weights and activations at once."""
        backbone = self.backbone()
        key = (self.model, self.weights, self.num_taps, self.backbone_layers)
        cache, done = _TOKENS.setdefault(key, ({}, set()))
        config = dataclasses.replace(
            config or ForwardConfig(), max_tokens=self.max_tokens or None, defense=self.defense
        )
        runtime = DeviceRuntime(backbone, config, device_id=self.device_id, tokens=cache, task=self.task)
        data_key = (self._data_key(), self.task_config)
        if data_key not in done:
            data = self.data()
            examples = list(data.train) + list(data.validation) + list(data.test)
            _TRUNCATED[data_key] = count_truncated(runtime, examples)
            runtime.pretokenize(examples)  # every id is cached by now: this only lets the tokenizer go
            done.add(data_key)
        return runtime

    def _data_key(self) -> tuple:
        """Everything that defines this device's samples (not its backbone)."""
        names = (
            [*_DATA_FIELDS, "validation_fraction", "test_fraction", "partitioning", "dirichlet_alpha", "seed"]
            + ["train_samples", "validation_samples", "test_samples", "partition_id", "num_partitions", "own_data"]
            + ["device_name"]
        )
        task = self.task_config
        return (
            *(getattr(self, name) for name in names),
            task.task,
            task.label_names if task.task != "causal-lm" else (),
        )

    def data(self) -> Splits:
        """This device's train / validation / test samples (deterministic from the configs); a device whose
        share holds no training sample raises :class:`NoTrainingData` (its report says why)."""
        splits, report = self._prepared()
        if report.problem:
            raise NoTrainingData(report.problem)
        return splits

    def data_report(self) -> DataReport:
        """What the summary records of this device's data (see :class:`DataReport`); never raises for a
        device without training samples (``problem`` says so), only for data that cannot be read."""
        report = self._prepared()[1]
        truncated = _TRUNCATED.get((self._data_key(), self.task_config))
        return dataclasses.replace(report, truncated=truncated)

    def fleet_users(self) -> list[tuple[str, int]]:
        """The users of the run's data and their sample counts, most first: a natural partition's devices
        (the fleet size a simulation with ``partitioning = natural`` takes when none is given)."""
        return users_by_size(_read(self).examples)

    def _prepared(self) -> tuple[Splits, DataReport]:
        key = self._data_key()
        if key not in _DEVICE_DATA:
            _DEVICE_DATA[key] = load_prepared(self) or save_prepared(self, prepare(self))
        return _DEVICE_DATA[key]


# ---- a device's samples, by where they come from -------------------------------------------------------
def prepare(setup: DeviceSetup) -> tuple[Splits, DataReport]:
    """The device's samples and their report: its own file, its share of the bundled pools, or its
    share of a data set."""
    if setup.own_data:
        read = _read(setup)
        splits = split_own(read.examples, setup.validation_fraction, setup.test_fraction, setup.seed)
        return splits, _report(setup, splits, read=read.counts(), read_scope="device")
    if setup.data_source == BUNDLED_RT:
        pools_key = (setup.train_samples, setup.validation_samples, setup.test_samples, setup.seed)
        if pools_key not in _SPLITS:
            _SPLITS[pools_key] = task_samples(*pools_key)
        args = (setup.partition_id, setup.num_partitions, setup.partitioning, setup.dirichlet_alpha, setup.seed)
        splits = share_of_pools(_SPLITS[pools_key], *args)
        sizes = {"train-samples": setup.train_samples, "validation-samples": setup.validation_samples}
        return splits, _report(setup, splits, split={**sizes, "test-samples": setup.test_samples})
    return _simulated_share(setup)


def _simulated_share(setup: DeviceSetup) -> tuple[Splits, DataReport]:
    """A simulated device's share of the run's data set, split into its own train / validation / test."""
    read = _read(setup)
    key = (_read_key(setup), setup.partitioning, setup.dirichlet_alpha, setup.seed, setup.num_partitions)
    if key not in _PARTS:
        if setup.partitioning == "natural":
            _PARTS[key] = natural_partition(read.examples, setup.num_partitions)
        else:
            shares = partition(
                read.examples, setup.num_partitions, setup.partitioning, setup.dirichlet_alpha, setup.seed
            )
            _PARTS[key] = [("", share) for share in shares]
    user, mine = _PARTS[key][setup.partition_id]
    seed = setup.seed + 7919 * (setup.partition_id + 1)  # each device's own split draw, reproducible
    splits = split_own(mine, setup.validation_fraction, setup.test_fraction, seed)
    if setup.partitioning != "natural":
        return splits, _report(setup, splits, read=read.counts(), read_scope="data set")
    held = sum(len(share) for _, share in _PARTS[key])
    unassigned = len(read.examples) - held
    return splits, _report(
        setup, splits, user=user, read=read.counts({user}), read_scope="device", unassigned=unassigned
    )


def _report(setup: DeviceSetup, splits: Splits, **extra) -> DataReport:
    if "split" not in extra:
        extra["split"] = {"validation-fraction": setup.validation_fraction, "test-fraction": setup.test_fraction}
    if setup.partitioning == "dirichlet" and not setup.own_data:
        extra["split"] = {"dirichlet-alpha": setup.dirichlet_alpha, **extra["split"]}
    problem = ""
    if not splits.train:
        held = len(splits.validation) + len(splits.test)
        problem = (
            f"{setup.device_id} has no training samples in {_source_name(setup)} ({held} held out): it is left "
            "out of the run; give it more rows, or (simulation) fewer devices or a larger dirichlet-alpha"
        )
    return DataReport(
        device_id=setup.device_id,
        source=_source_name(setup),
        scheme=setup.scheme,
        seed=setup.seed,
        train=len(splits.train),
        validation=len(splits.validation),
        test=len(splits.test),
        problem=problem,
        **extra,
    )


def _source_name(setup: DeviceSetup) -> str:
    """The data a report names: the run's data key, or only that a device read its own file (where that
    file lives stays on the device)."""
    return "own data (node config)" if setup.own_data else f"data={setup.data_source!r}"


def _read_key(setup: DeviceSetup) -> tuple:
    task = setup.task_config
    return (
        setup.data_source,
        setup.columns,
        setup.bad_rows,
        task.task,
        task.label_names if task.task != "causal-lm" else (),
    )


def _read(setup: DeviceSetup) -> UserData:
    """The run's (or this node's) data as samples, read once per process."""
    from mobiflower.platform.user_data import read_user_data

    key = _read_key(setup)
    if key not in _READ:
        _READ[key] = read_user_data(setup.data_source, setup.task, setup.columns, setup.bad_rows)
    return _READ[key]


def count_truncated(runtime: DeviceRuntime, examples: list[Example]) -> int:
    """How many samples the task cuts to ``max-length`` tokens: encoded with one token more allowed, a
    truncated sample is the one that uses it. Tokenizes into the runtime's shared cache (so this is the
    device's one tokenization, not a second one)."""
    task = runtime.task
    longer = dataclasses.replace(task, max_length=task.max_length + 1)
    probe = DeviceRuntime(runtime.backbone, runtime.config, runtime.device_id, tokens=runtime.tokens, task=longer)
    return sum(1 for enc in probe.encode_samples(examples) if len(enc.ids) > task.max_length)


# ---- prepared samples on the device's own disk ---------------------------------------------------------
def prepared_path(setup: DeviceSetup) -> Path:
    """Where this device's prepared samples are kept: named by a digest of what defines them, the source
    files' sizes and modification times included (an edited file is read again)."""
    from mobiflower.platform.assets import corpus_path, home, speeches_path

    source = {BUNDLED_RT: corpus_path(), "bundled:convention-speeches": speeches_path()}.get(setup.data_source)
    paths = [source] if source else _files_of(setup.data_source)
    stamps = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file()]
    blob = repr((_PREPARED_VERSION, setup._data_key(), stamps)).encode()
    return home() / "prepared-data" / f"{hashlib.sha256(blob).hexdigest()[:32]}.json"


def _files_of(data: str) -> list[Path]:
    path = Path(data).expanduser()
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def save_prepared(setup: DeviceSetup, prepared: tuple[Splits, DataReport]) -> tuple[Splits, DataReport]:
    splits, report = prepared
    payload = {
        "splits": {name: [_example_json(e) for e in getattr(splits, name)] for name in ("train", "validation", "test")},
        "report": dataclasses.asdict(report),
    }
    try:
        path = prepared_path(setup)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(payload, ensure_ascii=False))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only home only costs the next process the split
    return prepared


def load_prepared(setup: DeviceSetup) -> tuple[Splits, DataReport] | None:
    """The prepared samples another process of this device saved, or None."""
    try:
        payload = json.loads(prepared_path(setup).read_text(encoding="utf-8"))
        splits = Splits(*(_example_of(payload["splits"][n]) for n in ("train", "validation", "test")))
        fields = payload["report"]
        read = ReadCounts(**fields.pop("read")) if fields.get("read") else None
        return splits, DataReport(**{**fields, "read": read})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _example_json(e: Example) -> dict[str, Any]:
    out = {k: v for k, v in dataclasses.asdict(e).items() if v not in ("", -1, (), [])}
    return {"id": e.id, **out}


def _example_of(rows: list[dict[str, Any]]) -> list[Example]:
    return [Example(**{**r, "messages": tuple(tuple(m) for m in r.get("messages", ()))}) for r in rows]


def examples_at(examples: list[Example], offset: int, count: int) -> list[Example]:
    """``count`` samples from ``offset`` in the device's order, wrapping around (a new epoch)."""
    if not examples:
        raise DeviceSetupError("this device holds no samples of the requested split")
    return [examples[(offset + i) % len(examples)] for i in range(count)]


def device_run_config(names: Iterable[str] | None = None) -> dict[str, Any]:
    """The run-config keys a device reads (those of fields ``names``, or all), with their defaults: what
    an app that runs this device declares in ``[tool.flwr.app.config]``."""
    device = DeviceSetup()
    config = {key: getattr(device, name) for name, key in RUN_CONFIG_KEYS.items() if names is None or name in names}
    return config | (run_config_defaults() if names is None else {})
