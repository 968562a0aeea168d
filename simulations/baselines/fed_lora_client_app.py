"""The federated on-device LoRA baseline as a Flower ClientApp (FlowerTune-style).

Unlike the side-tuning device, this device *trains*: for ``train`` it loads the global PEFT LoRA
adapters (and a classifier's head) it was sent, backpropagates through its own backbone over its
own training partition for ``local-epochs`` and replies with the updated weights, ``num-examples``
(the FedAvg weight) and what it cost (device compute seconds, memory, adapter bytes). For
``evaluate`` it scores the weights it was sent on its own held-out split with the task's metrics
(classification: ``accuracy``, ``macro-f1``; causal-LM: ``perplexity``, ``loss``, ``token-accuracy``,
over the same scored tokens as side-tuning), ``num-examples`` and ``count`` (what the metrics are over:
samples, or scored tokens; the server weights devices by it).

Everything the server decides (LoRA shape, learning rate, local epochs, batch size) arrives in the
message's ``config`` record, so a strategy can vary it per device and per round (a deadline-aware
strategy may give a slow phone fewer epochs). What the device *is* (its backbone, its partition,
its task) comes from the run and node config through :class:`DeviceSetup`, exactly as for the
side-tuning ClientApp, so both methods see the same devices holding the same samples.

The PEFT model (:mod:`mobiflower.simulations.baselines.lora_model`) is cached per process, keyed by backbone and
LoRA shape, never by node: one Ray actor serves many virtual devices, and every message overwrites
all trainable weights.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mobiflower.clients.device_setup import DeviceSetup
from mobiflower.platform.classifier import evaluate_task
from mobiflower.platform.process_memory import current_rss_mb, peak_rss_mb
from mobiflower.simulations.baselines.lora_model import (
    LoraShape,
    load_trainable,
    lora_model,
    samples_digest,
    train_local,
    trainable_state,
)

ARRAYS_KEY = "arrays"  # the adapters + head (FedAvg's default arrayrecord_key)
CONFIG_KEY = "config"  # the request's settings (FedAvg's default configrecord_key)
METRICS_KEY = "metrics"  # the reply's costs and num-examples (FedAvg aggregates the one MetricRecord)
DEVICE_KEY = "device"  # ConfigRecord: which device replied and a digest of the samples it trained on
SPLITS = ("train", "validation", "test")

app = ClientApp()


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of an ``ArrayRecord``'s array data as it travels (no message framing)."""
    return sum(len(a.data) for a in record.values())


def _request(msg: Message, context: Context) -> tuple[DeviceSetup, ConfigRecord, Any, Any]:
    setup = DeviceSetup.from_configs(context.run_config, context.node_config)
    if ARRAYS_KEY not in msg.content:
        raise ValueError(f"a fed-LoRA request needs the adapters in an ArrayRecord named '{ARRAYS_KEY}'")
    cfg = msg.content[CONFIG_KEY] if CONFIG_KEY in msg.content else ConfigRecord()
    torch.set_num_threads(max(1, setup.threads))
    from mobiflower.platform.hf_model import resolve_model

    model, tokenizer = lora_model(
        resolve_model(setup.model), LoraShape.from_config(cfg), int(cfg.get("seed", setup.seed)), setup.task
    )
    load_trainable(model, msg.content[ARRAYS_KEY].to_torch_state_dict())
    return setup, cfg, model, tokenizer


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the sent adapters (+ head) on this device's training partition; reply with the update."""
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
    result = train_local(
        model,
        tokenizer,
        examples,
        task=setup.task,
        lr=float(cfg["lr"]),
        epochs=int(cfg["local-epochs"]),
        batch_size=int(cfg["batch-size"]),
        seed=seed,
    )
    train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    arrays = ArrayRecord(torch_state_dict=trainable_state(model))
    metrics = MetricRecord(
        {
            "num-examples": len(examples),
            "samples-seen": len(examples) * int(cfg["local-epochs"]),
            "train-s": train_s,
            "train-cpu-s": train_cpu_s,
            "load-s": load_s,
            "loss": float(result["loss"]),
            "steps": int(result["steps"]),
            "adapter-bytes": record_bytes(arrays),
            "rss-mb": current_rss_mb(),
            "peak-rss-mb": peak_rss_mb(),
        }
    )
    device = ConfigRecord(
        {"device-id": setup.device_id, "partition-id": setup.partition_id, "samples-digest": samples_digest(examples)}
    )
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: metrics, DEVICE_KEY: device}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the sent adapters (+ head) on this device's own ``split`` (validation unless told) with the
    task's metrics; a device with no samples of the split replies with counts 0 and no metrics."""
    setup, cfg, model, tokenizer = _request(msg, context)
    split = str(cfg.get("split", "validation"))
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {SPLITS}")
    examples = list(getattr(setup.data(), split))
    limit = int(cfg.get("max-samples", 0))
    if limit > 0:
        examples = examples[:limit]
    t0 = time.perf_counter()
    scores = evaluate_task(model, tokenizer, examples, setup.task)
    values = {name: float(v) for name, v in scores.result().items()} if scores.count else {}
    metrics = MetricRecord(
        {
            **values,
            "num-examples": len(examples),
            "count": scores.count,
            "eval-s": time.perf_counter() - t0,
            "peak-rss-mb": peak_rss_mb(),
        }
    )
    device = ConfigRecord({"device-id": setup.device_id, "partition-id": setup.partition_id, "split": split})
    return Message(RecordDict({METRICS_KEY: metrics, DEVICE_KEY: device}), reply_to=msg)


__all__ = ["app", "record_bytes", "ARRAYS_KEY", "CONFIG_KEY", "METRICS_KEY", "DEVICE_KEY"]
