"""The Flower message vocabulary between the side-tuning ServerApp and the device ClientApps.

One place names every message type and record key both sides use, and converts what travels:
an activation frame is one zero-copy ``uint8`` array in an ``ArrayRecord`` (chunked by Flower, no
2 GB limit, unlike ``ConfigRecord`` bytes); a side network is its ``state_dict`` in an
``ArrayRecord`` plus its :class:`SideNetworkConfig` as JSON in a ``ConfigRecord``. This module
speaks Flower, so the Flower-free core (codec, frames, side networks, trainer) never imports it.

Message types (``MessageType.<kind>.<action>``), each request a dataclass both sides read and write
through (``to_content`` / ``from_content``), so a key and its default are written once:

* ``query.profile`` (:class:`ProfileRequest`): the device describes itself (backbone fingerprint,
  tapped layers, width, data sizes, measured forward speed, memory) and sends the frozen state its
  head needs.
* ``train.forward`` (:class:`ForwardRequest`): forward ``samples`` of a split from ``offset`` and
  reply with one frame.
* ``train.residual`` (:class:`ResidualRequest`): label-private training, ``p - onehot(y)`` for
  some of the device's samples.
* ``evaluate`` (:class:`EvaluateRequest`): score a side network (or the installed one) on a
  held-out split on the device.
* ``train.deliver`` (:class:`DeliverRequest`): install the final side network on the device for
  local inference.

Replies are dataclasses too (:class:`ProfileReply`, :class:`ForwardReply`, :class:`ResidualReply`,
:class:`EvaluateReply`, :class:`DeliveryReceipt`): the device writes them with ``to_content``; the
server reads them through :mod:`mobiflower.strategies.reply_checks`, which checks every value
before it is used (a device may lie).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetwork, SideNetworkConfig, update_digest

PROFILE = "query.profile"
FORWARD = "train.forward"
EVALUATE = "evaluate"
DELIVER = "train.deliver"
RESIDUAL = "train.residual"  # label-private: predicted probabilities in, p - onehot(y) out

FRAME_KEY = "frame"  # ArrayRecord holding the encoded frame (one uint8 array)
FRAME_ARRAY = "frame"
STATS_KEY = "stats"  # MetricRecord of what a reply cost the device
CONFIG_KEY = "config"  # ConfigRecord of a request's parameters
NETWORK_KEY = "side-network"  # ArrayRecord of a side network's state_dict
NETWORK_CONFIG_KEY = "side-network-config"  # ConfigRecord {"json": SideNetworkConfig JSON}
FROZEN_KEY = "frozen"  # ArrayRecord of the backbone's frozen head state (profile reply)
RAW_STYPE = "raw"  # the frame's bytes as they are (Flower's default numpy serialization would add a header)
PROFILE_KEY = "profile"  # ConfigRecord of the device's description (profile reply)
PROBS_KEY = "probs"  # ArrayRecord {"probs": [n, classes] float32} of a residual request
RESIDUAL_KEY = "residual"  # ArrayRecord {"residual": [n, classes] float32} of a residual reply


def frame_record(blob: bytes) -> ArrayRecord:
    """One encoded frame as a single ``uint8`` array, without copying it."""
    return ArrayRecord({FRAME_ARRAY: Array(dtype="uint8", shape=(len(blob),), stype=RAW_STYPE, data=blob)})


def frame_bytes(record: ArrayRecord) -> bytes:
    """The encoded frame carried by :func:`frame_record` (what ``decode_frame`` validates)."""
    if FRAME_ARRAY not in record:
        raise ValueError(f"the reply's '{FRAME_KEY}' record has no '{FRAME_ARRAY}' array")
    if len(record) != 1:
        raise ValueError(f"the reply's '{FRAME_KEY}' record holds {len(record)} arrays; a frame travels alone")
    array = record[FRAME_ARRAY]
    if array.dtype != "uint8" or len(array.shape) != 1 or array.stype != RAW_STYPE:
        raise ValueError(f"a frame travels as a raw 1-D uint8 array, got {array.stype} {array.dtype} {array.shape}")
    return bytes(array.data)


def network_records(net: SideNetwork, dtype: torch.dtype | None = torch.float16) -> tuple[ArrayRecord, ConfigRecord]:
    """A side network as (weights, config) records: what a device needs to rebuild it. Floating-point
    tensors travel in ``dtype`` (half precision by default: half the bytes down; None keeps them)."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    return ArrayRecord(torch_state_dict=state), ConfigRecord({"json": net.config.to_json()})


def records_digest(weights: ArrayRecord, config: ConfigRecord) -> str:
    """A short digest of a sent side network (its config and weights as they travel): the server's and
    the device's agree when a delivery arrived intact."""
    h = hashlib.sha256(str(config["json"]).encode())
    update_digest(h, weights.to_torch_state_dict())
    return h.hexdigest()[:16]


def network_from_records(
    weights: ArrayRecord, config: ConfigRecord, frozen: Mapping[str, torch.Tensor] | None = None, fingerprint: str = ""
) -> SideNetwork:
    """Rebuild a side network sent by :func:`network_records` (eval mode); ``frozen`` is the frozen
    head state of the receiving device's backbone (``fingerprint``, one of the network's backbones).
    A pretrained tail needs its upper blocks: the device runs it with
    :class:`mobiflower.clients.inference.TailClassifier` instead."""
    frozen = dict(frozen or {})
    net = build_side_network(
        SideNetworkConfig.from_json(str(config["json"])), frozen, {fingerprint: frozen} if fingerprint else None
    )
    net.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in weights.to_torch_state_dict().items()}
    )
    return net.eval()


def array_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of an ``ArrayRecord``'s arrays (their data as it travels, no message framing)."""
    return sum(len(a.data) for a in record.values())


def metrics(values: Mapping[str, Any]) -> MetricRecord:
    """A ``MetricRecord`` from plain numbers (numpy scalars and bools converted, None dropped); a list or
    tuple of numbers (a profile's label shares) travels as a list of floats."""
    out: dict[str, int | float | list[float]] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, np.ndarray)):
            out[key] = [float(v) for v in value]
        elif isinstance(value, (bool, np.bool_)):
            out[key] = int(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        else:
            out[key] = float(value)
    return MetricRecord(out)


# ---- requests ------------------------------------------------------------------------------------
_REQUEST_ID = re.compile(r"r(\d+)-o(\d+)-a(\d+)")


@dataclass(frozen=True)
class BackboneChoice:
    """The backbone a simulated fleet's model gives a device (request keys ``model``,
    ``backbone-layers``, ``weights``); empty fields leave the device's own. A real device's node
    config always wins over them."""

    model: str = ""
    backbone_layers: int = 0
    weights: str = ""

    def to_config(self) -> dict[str, str | int]:
        """The request keys of the fields that are set (none for the device's own backbone)."""
        keys = (("model", self.model), ("backbone-layers", self.backbone_layers), ("weights", self.weights))
        return {k: v for k, v in keys if v}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "BackboneChoice":
        return cls(
            model=str(config.get("model", "") or ""),
            backbone_layers=int(config.get("backbone-layers", 0) or 0),
            weights=str(config.get("weights", "") or ""),
        )


class Request(ABC):
    """What every request has: its message type, its record content, and a Flower message carrying it."""

    message_type: ClassVar[str]

    @abstractmethod
    def to_content(self) -> RecordDict:
        """The request's records, as they travel."""

    def to_message(self, node_id: int, ttl: float, group_id: str = "") -> Message:
        return Message(
            self.to_content(), dst_node_id=node_id, message_type=self.message_type, group_id=group_id, ttl=ttl
        )


def _config_of(content: RecordDict) -> ConfigRecord:
    return content.config_records.get(CONFIG_KEY) or ConfigRecord()


@dataclass(frozen=True)
class ProfileRequest(Request):
    """``query.profile``: describe yourself; ``probe_samples`` are forwarded once to measure speed."""

    message_type: ClassVar[str] = PROFILE
    probe_samples: int = 8
    backbone: BackboneChoice = BackboneChoice()

    def to_content(self) -> RecordDict:
        return RecordDict(
            {CONFIG_KEY: ConfigRecord({"probe-samples": self.probe_samples, **self.backbone.to_config()})}
        )

    @classmethod
    def from_content(cls, content: RecordDict) -> "ProfileRequest":
        config = _config_of(content)
        return cls(
            probe_samples=int(config.get("probe-samples", cls.probe_samples)),
            backbone=BackboneChoice.from_config(config),
        )


@dataclass(frozen=True)
class ForwardRequest(Request):
    """``train.forward``: forward ``samples`` of ``split`` from ``offset`` and reply with one frame.

    ``round`` and ``attempt`` name the request (:attr:`request_id`, which the frame carries back); a
    retry is ``dataclasses.replace(request, attempt=request.attempt + 1)``. ``offset`` None: the
    device's own cursor (the strategy always pins it). ``layers`` None: every tapped layer.
    """

    message_type: ClassVar[str] = FORWARD
    samples: int = 64
    offset: int | None = None
    split: str = "train"
    round: int = 0
    attempt: int = 0
    bits: int = 8
    layers: tuple[int, ...] | None = None
    token_policy: str = "last"
    batch_size: int = 16
    group_size: int | None = None  # None: the codec's default for the bit-width
    rotation: str = "hadamard"
    codec_seed: int = 0
    backbone: BackboneChoice = BackboneChoice()

    @property
    def request_id(self) -> str:
        return f"r{self.round}-o{self.offset}-a{self.attempt}"

    def retry(self) -> "ForwardRequest":
        return dataclasses.replace(self, attempt=self.attempt + 1)

    def to_content(self) -> RecordDict:
        config: dict[str, Any] = {"split": self.split}
        if self.offset is not None:
            config["offset"] = self.offset
        config.update(
            {
                "samples": self.samples,
                "bits": self.bits,
                "token-policy": self.token_policy,
                "batch-size": self.batch_size,
            }
        )
        if self.layers is not None:
            config["layers"] = list(self.layers)
        config["request"] = self.request_id
        if self.group_size is not None:
            config["group-size"] = self.group_size
        if self.rotation != ForwardRequest.rotation:
            config["rotation"] = self.rotation
        if self.codec_seed != ForwardRequest.codec_seed:
            config["codec-seed"] = self.codec_seed
        config.update(self.backbone.to_config())
        return RecordDict({CONFIG_KEY: ConfigRecord(config)})

    @classmethod
    def from_content(cls, content: RecordDict) -> "ForwardRequest":
        config = _config_of(content)
        named = _REQUEST_ID.fullmatch(str(config.get("request", "r0-o0-a0")))
        if named is None:
            raise ValueError(f"request={config.get('request')!r} is not a request id 'r<round>-o<offset>-a<attempt>'")
        return cls(
            samples=int(config.get("samples", cls.samples)),
            offset=int(config["offset"]) if "offset" in config else None,
            split=str(config.get("split", cls.split)),
            round=int(named[1]),
            attempt=int(named[3]),
            bits=int(config.get("bits", cls.bits)),
            layers=tuple(int(x) for x in config["layers"]) if "layers" in config else None,
            token_policy=str(config.get("token-policy", cls.token_policy)),
            batch_size=int(config.get("batch-size", cls.batch_size)),
            group_size=int(config["group-size"]) if "group-size" in config else None,
            rotation=str(config.get("rotation", cls.rotation)),
            codec_seed=int(config.get("codec-seed", cls.codec_seed)),
            backbone=BackboneChoice.from_config(config),
        )


@dataclass(frozen=True)
class ResidualRequest(Request):
    """``train.residual`` (label-private): the server's predicted probabilities ``probs``
    ``[samples, num_classes]`` for ``sample_ids`` of the device's training samples."""

    message_type: ClassVar[str] = RESIDUAL
    sample_ids: tuple[int, ...] = ()
    num_classes: int = 2
    probs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    backbone: BackboneChoice = BackboneChoice()

    def to_content(self) -> RecordDict:
        config = ConfigRecord(
            {
                "sample-ids": [int(i) for i in self.sample_ids],
                "num-classes": self.num_classes,
                **self.backbone.to_config(),
            }
        )
        return RecordDict({CONFIG_KEY: config, PROBS_KEY: ArrayRecord({PROBS_KEY: Array(self.probs)})})

    @classmethod
    def from_content(cls, content: RecordDict) -> "ResidualRequest":
        config = content[CONFIG_KEY]
        return cls(
            sample_ids=tuple(int(i) for i in config["sample-ids"]),
            num_classes=int(config["num-classes"]),
            probs=content[PROBS_KEY][PROBS_KEY].numpy(),
            backbone=BackboneChoice.from_config(config),
        )


@dataclass(frozen=True)
class EvaluateRequest(Request):
    """``evaluate``: score ``network`` (weights and config records; None: the installed one) on the
    device's ``split``, at most ``max_samples`` of it (0 = all). ``installed`` says which the server
    meant; None leaves it out."""

    message_type: ClassVar[str] = EVALUATE
    split: str = "validation"
    max_samples: int | None = None
    installed: bool | None = None
    batch_size: int | None = None  # None: the device's default (16)
    network: tuple[ArrayRecord, ConfigRecord] | None = None
    backbone: BackboneChoice = BackboneChoice()

    def to_content(self) -> RecordDict:
        config: dict[str, Any] = {"split": self.split}
        for key, value in (
            ("max-samples", self.max_samples),
            ("installed", self.installed),
            ("batch-size", self.batch_size),
        ):
            if value is not None:
                config[key] = value
        content = RecordDict({CONFIG_KEY: ConfigRecord({**config, **self.backbone.to_config()})})
        if self.network is not None:
            content[NETWORK_KEY], content[NETWORK_CONFIG_KEY] = self.network
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> "EvaluateRequest":
        config = _config_of(content)
        network = (content[NETWORK_KEY], content[NETWORK_CONFIG_KEY]) if NETWORK_KEY in content else None
        return cls(
            split=str(config.get("split", cls.split)),
            max_samples=int(config.get("max-samples", 0)),
            installed=bool(config["installed"]) if "installed" in config else None,
            batch_size=int(config.get("batch-size", 16)),
            network=network,
            backbone=BackboneChoice.from_config(config),
        )


@dataclass(frozen=True)
class DeliverRequest(Request):
    """``train.deliver``: install ``network`` (weights and config records) for local inference."""

    message_type: ClassVar[str] = DELIVER
    network: tuple[ArrayRecord, ConfigRecord] = field(default_factory=lambda: (ArrayRecord(), ConfigRecord()))
    backbone: BackboneChoice = BackboneChoice()

    def to_content(self) -> RecordDict:
        content = RecordDict({NETWORK_KEY: self.network[0], NETWORK_CONFIG_KEY: self.network[1]})
        if self.backbone.to_config():
            content[CONFIG_KEY] = ConfigRecord(self.backbone.to_config())
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> "DeliverRequest":
        return cls(
            network=(content[NETWORK_KEY], content[NETWORK_CONFIG_KEY]),
            backbone=BackboneChoice.from_config(_config_of(content)),
        )


def backbone_choice(content: RecordDict | None) -> BackboneChoice:
    """The backbone keys any request carries (what the device's setup reads before its handler runs)."""
    return BackboneChoice.from_config(_config_of(content)) if content is not None else BackboneChoice()


# ---- replies (written by the device; the server reads them through strategies.reply_checks) -------------
@dataclass(frozen=True)
class ProfileReply:
    """``query.profile``'s answer: the device's ``description`` (backbone, taps, width ...), its
    ``measurements`` (data sizes, forward speed, memory) and its backbone's ``frozen`` head state."""

    description: Mapping[str, Any]
    measurements: Mapping[str, Any]
    frozen: Mapping[str, torch.Tensor]

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                PROFILE_KEY: ConfigRecord(dict(self.description)),
                STATS_KEY: metrics(self.measurements),
                FROZEN_KEY: ArrayRecord(torch_state_dict=dict(self.frozen)),
            }
        )

    @property
    def device_id(self) -> str:
        return str(self.description["device-id"])

    @property
    def fingerprint(self) -> str:
        return str(self.description["fingerprint"])

    def profile(self) -> dict[str, Any]:
        """The description and the measurements in one dict (what the server keeps of a device)."""
        return {**self.description, **self.measurements}


@dataclass(frozen=True)
class ForwardReply:
    """``train.forward``'s answer: one encoded frame and what it cost the device."""

    frame: bytes
    stats: Mapping[str, Any]

    def to_content(self) -> RecordDict:
        return RecordDict({FRAME_KEY: frame_record(self.frame), STATS_KEY: metrics(self.stats)})

    @property
    def samples(self) -> int:
        return int(self.stats["samples"])

    @property
    def forward_s(self) -> float:
        """The backbone's forward alone."""
        return float(self.stats["forward-s"])

    @property
    def busy_s(self) -> float:
        """What the chunk took the device: its forward, quantization and encoding."""
        return float(self.stats["busy-s"])


@dataclass(frozen=True)
class ResidualReply:
    """``train.residual``'s answer: ``p - onehot(y)`` per requested sample."""

    residual: np.ndarray

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                RESIDUAL_KEY: ArrayRecord({RESIDUAL_KEY: Array(self.residual)}),
                STATS_KEY: metrics({"samples": len(self.residual)}),
            }
        )


@dataclass(frozen=True)
class EvaluateReply:
    """``evaluate``'s answer, the same for every task: for each of the task's metrics ``m`` (named by the
    task: ``accuracy``, ``macro-f1``; ``perplexity``, ``loss``, ``token-accuracy``) its value under ``m``
    and the zero-shot backbone's under ``zero-shot-<m>`` (NaN: none); ``count``, what the metrics are
    averaged over (samples, or scored tokens: a fleet weighs its devices by it); ``samples``, ``seconds``,
    ``rss-mb``, ``peak-rss-mb`` and ``installed`` (which network was scored)."""

    stats: Mapping[str, Any]

    def to_content(self) -> RecordDict:
        return RecordDict({STATS_KEY: metrics(self.stats)})

    def metric(self, name: str) -> float:
        """The scored network's value of the task metric ``name``."""
        return float(self.stats[name])

    def zero_shot(self, name: str) -> float:
        """The zero-shot backbone's value of the task metric ``name`` (NaN when the device has none)."""
        return float(self.stats.get(f"zero-shot-{name}", float("nan")))

    @property
    def count(self) -> int:
        return int(self.stats["count"])

    @property
    def samples(self) -> int:
        return int(self.stats["samples"])


@dataclass(frozen=True)
class DeliveryReceipt:
    """``train.deliver``'s answer: the digest of what the device installed (:func:`records_digest`),
    where it saved it (empty: kept in memory only), the device and the network's parameter count."""

    digest: str
    path: str = ""
    device_id: str = ""
    parameters: int = 0

    def to_content(self) -> RecordDict:
        return RecordDict(
            {
                STATS_KEY: metrics({"parameters": self.parameters}),
                CONFIG_KEY: ConfigRecord({"digest": self.digest, "path": self.path, "device-id": self.device_id}),
            }
        )
