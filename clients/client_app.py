"""The device as a Flower ClientApp: profile, forward-only frames, on-device evaluation, delivery.

A device never trains. For ``train.forward`` it runs its frozen backbone over a chunk of its own
samples and replies with one activation frame; for ``evaluate`` it scores a side network (sent
along, or the one installed by ``train.deliver``) on its own held-out samples with backbone + side
network; ``train.deliver`` installs the final side network (in ``context.state``, and as a file
when the node config names a ``side-network-dir``) for local inference after the run.

The backbone and the data are cached per process (:mod:`mobiflower.clients.device_setup`). The
data cursor lives in ``context.state``; a request may pin its ``offset`` explicitly, which the
strategy does because the simulation engine can run two messages for one node at once, each
with its own copy of the context.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message
from flwr.clientapp import ClientApp

from mobiflower.clients.device_setup import DeviceSetup, examples_at
from mobiflower.clients.inference import installed_model
from mobiflower.clients.runtime import ForwardConfig
from mobiflower.platform import messages as m
from mobiflower.platform.data import DataError
from mobiflower.platform.precision import normalize_precision
from mobiflower.platform.pretrained_tail import save_peft_adapter
from mobiflower.platform.process_memory import current_rss_mb, peak_rss_mb
from mobiflower.platform.run_config import flag
from mobiflower.platform.side_networks import SideNetworkConfig, save_side_network


def capture_replies(msg: Message, context: Context, call_next) -> Message:
    """Audit mod: with run config ``capture-dir`` set, write every reply exactly as it leaves the device.

    The capture is Flower's own serialization of the reply (every object Flower pushes for it:
    message, records, arrays), so a scan of it sees all the device ever sends. Off by default.
    """
    reply = call_next(msg, context)
    folder = str(context.run_config.get("capture-dir", "") or "")
    if folder:
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        target = Path(folder) / f"partition-{context.node_config.get('partition-id', 'x')}"
        target.mkdir(parents=True, exist_ok=True)
        blob = b"".join(obj.deflate() for obj in get_all_nested_objects(reply).values())
        name = f"{time.time_ns()}-{msg.metadata.message_type.replace('.', '-')}.bin"
        (target / name).write_bytes(blob)
    return reply


app = ClientApp(mods=[capture_replies])

CURSOR_KEY = "mobiflower-cursor"  # ConfigRecord in context.state: {"train": next offset, "forwarded": count}
INSTALLED_KEY = "mobiflower-installed"  # the delivered side network (weights) in context.state
INSTALLED_CONFIG_KEY = "mobiflower-installed-config"
SPLITS = ("train", "validation", "test")


def _setup(context: Context, msg: Message | None = None) -> DeviceSetup:
    """This device's setup. In a simulated heterogeneous fleet the server's fleet model says which
    backbone a device runs (request keys ``model`` / ``backbone-layers`` / ``weights``, its ``weight-precision``); a real
    device's own node config (``--node-config 'backbone-layers=15 weight-precision="int8"'``) always wins."""
    setup = DeviceSetup.from_configs(context.run_config, context.node_config)
    choice = m.backbone_choice(msg.content if msg is not None and msg.has_content() else None)
    if choice.backbone_layers and "backbone-layers" not in context.node_config:
        setup = dataclasses.replace(setup, backbone_layers=choice.backbone_layers)
    if choice.model and "model" not in context.node_config:
        setup = dataclasses.replace(setup, model=choice.model)
    if choice.weights and "weight-precision" not in context.node_config:
        setup = dataclasses.replace(setup, weights=normalize_precision(choice.weights))
    return setup


def _split(setup: DeviceSetup, name: str):
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}: use one of {SPLITS}")
    return getattr(setup.data(), name)


def _memory_mb() -> tuple[float, float]:
    return current_rss_mb(), peak_rss_mb()


def label_shares(num_classes: int, train: list) -> list[float]:
    """The share of the training samples per label (empty for a task without labels: causal-LM)."""
    counts = [0] * num_classes
    for e in train:
        if 0 <= e.label < num_classes:
            counts[e.label] += 1
    return [c / max(1, len(train)) for c in counts]


def data_counts(report) -> dict[str, int]:
    """What reading this device's data left out or cut, as profile measurements (counts only)."""
    read = report.read.as_dict() if report.read is not None and report.read_scope == "device" else {}
    return {
        "data-empty": int(read.get("empty", 0)),
        "data-refused": int(read.get("refused", 0)),
        "data-truncated": int(report.truncated or 0),
    }


@app.query("profile")
def profile(msg: Message, context: Context) -> Message:
    """Describe this device: backbone, data sizes (and what reading its data skipped), measured forward
    speed and memory. A device whose data gives it no training sample says why and is left out."""
    setup = _setup(context, msg)
    report = setup.data_report()
    if report.problem:
        raise DataError(f"{setup.device_id} takes no part in this run: {report.problem}")
    t0 = time.perf_counter()
    backbone = setup.backbone()
    load_s = time.perf_counter() - t0
    data = setup.data()
    probe = m.ProfileRequest.from_content(msg.content).probe_samples
    runtime = setup.runtime(ForwardConfig(batch_size=max(1, probe), token_policy=setup.task.token_policy))
    report = setup.data_report()  # now with the samples the tokenizer truncated
    speed = 0.0
    if probe > 0 and data.train:
        _, stats = runtime.make_frame(examples_at(data.train, 0, probe))
        speed = probe / max(stats.forward_s + stats.quantize_s, 1e-9)
    rss, peak = _memory_mb()
    cfg = backbone.model.config
    description = {
        "device-id": setup.device_id,
        "fingerprint": backbone.fingerprint,
        "model": setup.model,
        "layers": [int(x) for x in backbone.layers],
        "is-decoder": bool(backbone.is_decoder),
        "hidden-size": int(backbone.hidden_size),
        "num-layers": int(backbone.num_layers),
        "norm-eps": float(getattr(cfg, "rms_norm_eps", None) or getattr(cfg, "layer_norm_eps", None) or 1e-5),
        # a device may opt out of the server's activation cache (--node-config 'activation-cache=false'):
        # the server then trains on its frames once and keeps none; it forwards again every round
        "activation-cache": flag(context.node_config.get("activation-cache", True)),
        # what this device does to the states it sends (its node config can only make it stronger)
        "state-defense": setup.defense.describe(),
    }
    measurements = {
        "train": len(data.train),
        "validation": len(data.validation),
        "test": len(data.test),
        "label-shares": label_shares(setup.task.num_classes, data.train),
        **data_counts(report),
        "forward-samples-per-s": speed,
        "load-s": load_s,
        "rss-mb": rss,
        "peak-rss-mb": peak,
        "cpu-count": os.cpu_count() or 1,
        "threads": torch.get_num_threads(),
    }
    frozen = {k: v.contiguous() for k, v in backbone.frozen_head_state(lm_head=False).items()}
    return Message(m.ProfileReply(description, measurements, frozen).to_content(), reply_to=msg)


@app.train("forward")
def forward(msg: Message, context: Context) -> Message:
    """Forward a chunk of this device's samples and reply with one activation frame."""
    setup = _setup(context, msg)
    request = m.ForwardRequest.from_content(msg.content)
    split = request.split
    examples = _split(setup, split)
    cursor = context.state.config_records.get(CURSOR_KEY, ConfigRecord({"train": 0, "forwarded": 0}))
    offset = request.offset if request.offset is not None else int(cursor["train"] if split == "train" else 0)
    count = request.samples
    if count < 1:
        raise ValueError(f"samples={count}: a forward request needs at least one sample")
    forward_config = ForwardConfig(
        bits=request.bits,
        group_size=request.group_size,
        rotation=request.rotation,
        token_policy=request.token_policy,
        batch_size=request.batch_size,
        seed=request.codec_seed,
        targets="none" if _label_private(context) else "task",
    )
    layers = list(request.layers) if request.layers is not None else None
    runtime = setup.runtime(forward_config)
    t0 = time.perf_counter()
    chunk = examples_at(examples, offset, count)
    frame, stats = runtime.make_frame(
        chunk, layers=layers, meta={"split": split, "offset": offset, "request": request.request_id}
    )
    blob = runtime.encode(frame)
    busy_s = time.perf_counter() - t0
    if split == "train":
        cursor = ConfigRecord(
            {"train": (offset + count) % len(examples), "forwarded": int(cursor["forwarded"]) + count}
        )
        context.state.config_records[CURSOR_KEY] = cursor
    rss, peak = _memory_mb()
    cost = {
        "forward-s": stats.forward_s,
        "quantize-s": stats.quantize_s,
        "busy-s": busy_s,
        "frame-bytes": len(blob),
        "samples": stats.samples,
        "tokens": stats.tokens_sent,
        "offset": offset,
        "rss-mb": rss,
        "peak-rss-mb": peak,
    }
    return Message(m.ForwardReply(blob, cost).to_content(), reply_to=msg)


def _label_private(context: Context) -> bool:
    """Labels stay on this device when the run asks for it, or when this device's own node config does
    (``--node-config 'label-private=true'``), whatever the server asks."""
    return flag(context.run_config.get("label-private", False)) or flag(context.node_config.get("label-private", False))


def _label_epsilon(context: Context) -> float:
    """The device's randomized-response epsilon: its node config's, else the run's (0 = none)."""
    return float(context.node_config.get("label-epsilon", context.run_config.get("label-epsilon", 0.0)))


_OWN_LABELS: dict[int, tuple[list, dict[int, int], bytes]] = {}


def _own_labels(train: list) -> tuple[dict[int, int], bytes]:
    """{sample id: label} of this device's training split and its label secret, computed once per
    process and split (the split object is cached by DeviceSetup), not once per residual request."""
    from mobiflower.platform import label_private as lp

    entry = _OWN_LABELS.get(id(train))
    if entry is None or entry[0] is not train:
        entry = (train, {e.id: e.label for e in train}, lp.device_secret((e.id, e.text, e.label) for e in train))
        _OWN_LABELS[id(train)] = entry
    return entry[1], entry[2]


@app.train("residual")
def residual(msg: Message, context: Context) -> Message:
    """Label-private training step: the server's predicted probabilities for some of this device's
    samples in, ``p - onehot(y)`` out (:mod:`mobiflower.platform.label_private`)."""
    from mobiflower.platform import label_private as lp

    setup = _setup(context, msg)
    request = m.ResidualRequest.from_content(msg.content)
    ids = list(request.sample_ids)
    labels, secret = _own_labels(setup.data().train)
    unknown = [i for i in ids if i not in labels]
    if unknown:
        raise lp.ResidualError(f"{len(unknown)} sample id(s) are not this device's training samples, e.g. {unknown[0]}")
    r = lp.residuals(request.probs, [labels[i] for i in ids], ids, request.num_classes, _label_epsilon(context), secret)
    return Message(m.ResidualReply(r).to_content(), reply_to=msg)


def _installed(context: Context):
    if INSTALLED_KEY not in context.state.array_records:
        raise ValueError("no side network is installed on this device: deliver one first (train.deliver)")
    return context.state.array_records[INSTALLED_KEY], context.state.config_records[INSTALLED_CONFIG_KEY]


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score a side network on this device's own held-out split with backbone + side network."""
    setup = _setup(context, msg)
    request = m.EvaluateRequest.from_content(msg.content)
    examples = _split(setup, request.split)
    if request.max_samples:
        examples = examples[: request.max_samples]
    if request.network is not None:
        weights, net_config = request.network
        source = "sent"
    else:
        weights, net_config = _installed(context)
        source = "installed"
    model = installed_model(
        setup.backbone(),
        SideNetworkConfig.from_json(str(net_config["json"])),
        weights.to_torch_state_dict(),
        tokens=setup.runtime().tokens,  # this device's samples, tokenized once per process
    )
    try:
        result = model.evaluate(examples, batch_size=request.batch_size)
    finally:
        model.close()  # an adapter's hooks come off the cached backbone
    stats = evaluate_stats(result, model.task.metric_names)
    rss, peak = _memory_mb()
    stats.update({"rss-mb": rss, "peak-rss-mb": peak, "installed": source == "installed"})
    return Message(m.EvaluateReply(stats).to_content(), reply_to=msg)


def evaluate_stats(result: dict, metric_names: tuple[str, ...]) -> dict:
    """An evaluation's reply stats: each task metric, ``zero-shot-<metric>`` (NaN where the backbone alone
    gives none), ``count`` (what the fleet weighs this device by: samples or scored tokens), samples, seconds."""
    stats = {name: float(result["metrics"].get(name, math.nan)) for name in metric_names}
    stats.update({f"zero-shot-{name}": float(result["zero_shot"].get(name, math.nan)) for name in metric_names})
    stats.update({"count": int(result["count"]), "samples": int(result["samples"]), "seconds": result["seconds"]})
    return stats


@app.train("deliver")
def deliver(msg: Message, context: Context) -> Message:
    """Install the final side network on this device (context.state, and a file if configured)."""
    setup = _setup(context, msg)
    weights, net_config = m.DeliverRequest.from_content(msg.content).network
    config, state = SideNetworkConfig.from_json(str(net_config["json"])), weights.to_torch_state_dict()
    model = installed_model(setup.backbone(), config, state)  # refuses a network for another backbone
    model.close()
    context.state.array_records[INSTALLED_KEY] = weights
    context.state.config_records[INSTALLED_CONFIG_KEY] = net_config
    path = ""
    folder = context.node_config.get("side-network-dir") or context.run_config.get("delivery-dir") or ""
    if folder and config.family == "tail":  # a PEFT adapter folder for the stock model
        path = str(save_peft_adapter(config, state, Path(str(folder)) / setup.device_id))
    elif folder:
        path = str(
            save_side_network(
                model.net,
                Path(str(folder)) / f"{setup.device_id}.safetensors",
                extra={"device_id": setup.device_id},
            )
        )
    receipt = m.DeliveryReceipt(
        digest=m.records_digest(weights, net_config),
        path=path,
        device_id=setup.device_id,
        parameters=sum(v.numel() for v in state.values()),
    )
    return Message(receipt.to_content(), reply_to=msg)
