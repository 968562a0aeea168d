"""The Flower message vocabulary between the side-tuning ServerApp and the device ClientApps.

One place names every message type and record key both sides use, and converts what travels:
an activation frame is one zero-copy ``uint8`` array in an ``ArrayRecord`` (chunked by Flower, no
2 GB limit, unlike ``ConfigRecord`` bytes); a side network is its ``state_dict`` in an
``ArrayRecord`` plus its :class:`SideNetworkConfig` as JSON in a ``ConfigRecord``. This module
speaks Flower, so the Flower-free core (codec, frames, side networks, trainer) never imports it.

Message types (``MessageType.<kind>.<action>``):

* ``query.profile``: the device describes itself (backbone fingerprint, tapped layers, width,
  data sizes, measured forward speed, memory) and sends the frozen state its head needs.
* ``train.forward``: forward ``samples`` of a split from ``offset`` and reply with one frame.
* ``evaluate``: score a side network (or the installed one) on a held-out split on the device.
* ``train.deliver``: install the final side network on the device for local inference.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord

from mobiflower.platform.side_networks import SideNetwork, SideNetworkConfig, build_side_network, update_digest

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
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in net.state_dict().items()}
    return ArrayRecord(torch_state_dict=state), ConfigRecord({"json": net.config.to_json()})


def records_digest(weights: ArrayRecord, config: ConfigRecord) -> str:
    """A short digest of a sent side network (its config and weights as they travel): the server's and
    the device's agree when a delivery arrived intact."""
    h = hashlib.sha256(str(config["json"]).encode())
    update_digest(h, weights.to_torch_state_dict())
    return h.hexdigest()[:16]


def network_from_records(weights: ArrayRecord, config: ConfigRecord,
                         frozen: Mapping[str, torch.Tensor] | None = None, fingerprint: str = "") -> SideNetwork:
    """Rebuild a side network sent by :func:`network_records` (eval mode); ``frozen`` is the frozen
    head state of the receiving device's backbone (``fingerprint``, one of the network's backbones).
    A pretrained tail needs its upper blocks: the device runs it with
    :class:`mobiflower.clients.inference.TailClassifier` instead."""
    frozen = dict(frozen or {})
    net = build_side_network(SideNetworkConfig.from_json(str(config["json"])), frozen,
                             {fingerprint: frozen} if fingerprint else None)
    net.load_state_dict({k: v.float() if v.is_floating_point() else v
                         for k, v in weights.to_torch_state_dict().items()})
    return net.eval()


def array_bytes(record: ArrayRecord) -> int:
    """Serialized bytes of an ``ArrayRecord``'s arrays (their data as it travels, no message framing)."""
    return sum(len(a.data) for a in record.values())


def metrics(values: Mapping[str, Any]) -> MetricRecord:
    """A ``MetricRecord`` from plain numbers (numpy scalars and bools converted, None dropped)."""
    out: dict[str, int | float] = {}
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (bool, np.bool_)):
            out[key] = int(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        else:
            out[key] = float(value)
    return MetricRecord(out)


def config_json(record: ConfigRecord, key: str = "json") -> Any:
    return json.loads(str(record[key]))
