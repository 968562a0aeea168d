"""The federated on-device LoRA baseline as a Flower ClientApp (FlowerTune-style).

Unlike the side-tuning device, this device *trains*: for ``train`` it loads the global PEFT LoRA
adapters and classification head it was sent, backpropagates through its own backbone over its
own training partition for ``local-epochs`` and replies with the updated weights, ``num-examples``
(the FedAvg weight) and what it cost (device compute seconds, memory, adapter bytes). For
``evaluate`` it scores the weights it was sent on its own held-out split.

Everything the server decides (LoRA shape, learning rate, local epochs, batch size) arrives in the
message's ``config`` record, so a strategy can vary it per device and per round (a deadline-aware
strategy may give a slow phone fewer epochs). What the device *is* (its backbone, its partition)
comes from the run and node config through :class:`DeviceSetup`, exactly as for the side-tuning
ClientApp, so both methods see the same devices holding the same samples.

The PEFT model is cached per process, keyed by backbone and LoRA shape, never by node: one Ray
actor serves many virtual devices, and every message overwrites all trainable weights.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mobiflower.clients.device_setup import DeviceSetup
from mobiflower.platform.data import Example
from mobiflower.platform.process_memory import current_rss_mb, peak_rss_mb

# The on-device training helpers are the single-device LoRA baseline's, so both baselines train
# the same model the same way (see the report: they belong in a Flower-free core module).
from mobiflower.simulations.baselines import (build_classifier, classifier_accuracy, encode, load_tokenizer,
                                              make_optimizer)

ARRAYS_KEY = "arrays"  # the adapters + head (FedAvg's default arrayrecord_key)
CONFIG_KEY = "config"  # the request's settings (FedAvg's default configrecord_key)
METRICS_KEY = "metrics"  # the reply's costs and num-examples (FedAvg aggregates the one MetricRecord)
DEVICE_KEY = "device"  # ConfigRecord: which device replied and a digest of the samples it trained on
SPLITS = ("train", "validation", "test")

app = ClientApp()


@dataclass(frozen=True)
class LoraShape:
    """What fixes the names and shapes of the trainable tensors; server and devices must agree."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ()  # empty: the usual attention projections of the model type
    max_length: int = 256

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LoraShape":
        targets = str(cfg.get("lora-targets", "") or "")
        return cls(r=int(cfg.get("lora-r", cls.r)), alpha=int(cfg.get("lora-alpha", cls.alpha)),
                   dropout=float(cfg.get("lora-dropout", cls.dropout)),
                   targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
                   max_length=int(cfg.get("max-length", cls.max_length)))


_MODELS: dict[tuple, tuple[Any, Any]] = {}


def lora_model(model_path: str, shape: LoraShape, seed: int = 0):
    """This process's (PEFT model, tokenizer) for a backbone and LoRA shape, built once per process."""
    key = (model_path, shape, seed)
    if key not in _MODELS:
        tokenizer = load_tokenizer(model_path)
        model = build_classifier(model_path, "lora", tokenizer, seed=seed, lora_r=shape.r, lora_alpha=shape.alpha,
                                 lora_dropout=shape.dropout, lora_targets=shape.targets or None)
        _MODELS.clear()  # one backbone resident at a time: a device holds one model
        _MODELS[key] = (model, tokenizer)
    return _MODELS[key]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors that travel: every trainable parameter (LoRA A/B and the classification head)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, record: ArrayRecord) -> None:
    """Overwrite every trainable parameter from ``record``; refuse a record that does not match exactly."""
    state = record.to_torch_state_dict()
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(f"the sent adapter does not fit this device's LoRA model ({len(missing)} tensors missing, "
                         f"e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}): server and devices must "
                         "use the same model, lora-r and lora-targets")
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(f"tensor {name} has shape {tuple(state[name].shape)}, this device's model expects "
                                 f"{tuple(param.shape)}: check lora-r and the model")
            param.copy_(state[name])


def train_local(model, tokenizer, examples: Sequence[Example], *, lr: float, epochs: int, batch_size: int,
                max_length: int, seed: int) -> dict[str, float]:
    """Local training as the single-device LoRA baseline does it, with a fresh AdamW per round
    (a device keeps no optimizer state between rounds) and a constant learning rate within the
    round (the strategy schedules it across rounds). Returns the mean loss and the step count."""
    if not examples:
        raise ValueError("this device holds no training samples: lower num-partitions or raise train-samples")
    optimizer = make_optimizer(model, "lora", lr)
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(seed)  # dropout
    model.train()
    losses: list[float] = []
    for epoch in range(epochs):
        order = list(examples)
        random.Random(seed * 1000003 + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            enc = encode(tokenizer, [e.prompt for e in batch], max_length)
            labels = torch.tensor([int(e.label) for e in batch])
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    return {"loss": sum(losses) / len(losses) if losses else math.nan, "steps": len(losses)}


def samples_digest(examples: Sequence[Example]) -> str:
    """A short digest of a set of sample ids (proves which partition a device trained on)."""
    return hashlib.sha256(",".join(str(i) for i in sorted(e.id for e in examples)).encode()).hexdigest()[:16]


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ``ArrayRecord``'s array data as it travels (no message framing)."""
    return sum(len(a.data) for a in record.values())


def _request(msg: Message, context: Context) -> tuple[DeviceSetup, ConfigRecord, Any, Any]:
    setup = DeviceSetup.from_configs(context.run_config, context.node_config)
    if ARRAYS_KEY not in msg.content:
        raise ValueError(f"a fed-LoRA request needs the adapters in an ArrayRecord named '{ARRAYS_KEY}'")
    cfg = msg.content[CONFIG_KEY] if CONFIG_KEY in msg.content else ConfigRecord()
    torch.set_num_threads(max(1, setup.threads))
    from mobiflower.platform.assets import resolve_model

    model, tokenizer = lora_model(resolve_model(setup.model), LoraShape.from_config(cfg),
                                  int(cfg.get("seed", setup.seed)))
    load_trainable(model, msg.content[ARRAYS_KEY])
    return setup, cfg, model, tokenizer


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the sent adapters + head on this device's training partition; reply with the update."""
    t_load = time.perf_counter()
    setup, cfg, model, tokenizer = _request(msg, context)
    load_s = time.perf_counter() - t_load
    for key in ("lr", "local-epochs", "batch-size"):
        if key not in cfg:
            raise ValueError(f"a fed-LoRA train request needs '{key}' in its config record")
    examples = setup.data().train
    server_round = int(cfg.get("server-round", 1))
    seed = int(cfg.get("seed", setup.seed)) * 7919 + server_round * 131 + setup.partition_id
    t0, c0 = time.perf_counter(), time.process_time()
    result = train_local(model, tokenizer, examples, lr=float(cfg["lr"]), epochs=int(cfg["local-epochs"]),
                         batch_size=int(cfg["batch-size"]), max_length=LoraShape.from_config(cfg).max_length,
                         seed=seed)
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    arrays = ArrayRecord(torch_state_dict=trainable_state(model))
    metrics = MetricRecord({
        "num-examples": len(examples), "samples-seen": len(examples) * int(cfg["local-epochs"]),
        "train-s": train_s, "train-cpu-s": train_cpu_s, "load-s": load_s, "loss": float(result["loss"]),
        "steps": int(result["steps"]), "adapter-bytes": record_bytes(arrays), "rss-mb": current_rss_mb(),
        "peak-rss-mb": peak_rss_mb()})
    device = ConfigRecord({"device-id": setup.device_id, "partition-id": setup.partition_id,
                           "samples-digest": samples_digest(examples)})
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics, DEVICE_KEY: device}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the sent adapters + head on this device's own ``split`` (validation unless told)."""
    setup, cfg, model, tokenizer = _request(msg, context)
    split = str(cfg.get("split", "validation"))
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
    examples = list(getattr(setup.data(), split))
    limit = int(cfg.get("max-samples", 0))
    if limit > 0:
        examples = examples[:limit]
    t0 = time.perf_counter()
    accuracy = classifier_accuracy(model, tokenizer, examples, LoraShape.from_config(cfg).max_length) if examples else 0.0
    metrics = MetricRecord({"accuracy": float(accuracy), "num-examples": len(examples),
                            "eval-s": time.perf_counter() - t0, "peak-rss-mb": peak_rss_mb()})
    device = ConfigRecord({"device-id": setup.device_id, "partition-id": setup.partition_id, "split": split})
    return Message(RecordDict({METRICS_KEY: metrics, DEVICE_KEY: device}), reply_to=msg)


__all__ = ["app", "LoraShape", "lora_model", "trainable_state", "load_trainable", "train_local", "samples_digest",
           "record_bytes", "ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "DEVICE_KEY"]
