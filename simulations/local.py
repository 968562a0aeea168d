"""``mobiflower local``: one device and the server as two OS processes on one machine.

The device process (``clients/local_device.py``) forwards its private samples and streams
encoded activation frames over a pipe; this process is the server: it decodes and validates each
frame as it lands, trains the side network on it (while the device already forwards the next
chunk), keeps it in the activation cache, trains the remaining epochs from the cache, and
delivers the final side network (or, with ``select="best-val"``, the epoch with the best
validation accuracy; with a few hundred validation samples that choice is noisy, so it is not the
default) to the device, which scores its own test samples with backbone + side network alone. No Flower yet: this is the
method's core, measured.
"""

from __future__ import annotations

import copy
import json
import math
import multiprocessing as mp
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from mobiflower.clients.local_device import LocalDeviceConfig, run_device
from mobiflower.clients.runtime import ForwardConfig
from mobiflower.platform.codec import default_group_size
from mobiflower.platform.frames import decode_frame
from mobiflower.platform.precision import bf16_native, normalize_precision
from mobiflower.platform.pretrained_tail import load_tail_weights, save_peft_adapter
from mobiflower.platform.side_networks import SideNetworkConfig, build_side_network
from mobiflower.platform.trainer import SideTrainer, TrainConfig, chunk_sizes, planned_steps
from mobiflower.strategies.config import FAMILY_SETTINGS

# What each side-network family trains best with: the fleet's settings (strategies.config), one
# device's epochs being the fleet's rounds; a field left None takes its family's value.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    family: {
        "token_policy": "nonpad" if family == "tail" else "last",
        "epochs": s["rounds"],
        "average_epochs": s["average-epochs"],
        "lr": s["lr"],
        "weight_decay": s["weight-decay"],
        "batch_size": s["batch-size"],
        "bits": s["bits"],
        "mixed_precision": "auto" if family == "tail" else "none",
    }
    for family, s in FAMILY_SETTINGS.items()
}
# One device has no fleet round budget to fit: the tail trains two epochs here (over three training seeds
# a two-epoch schedule ended higher on validation than a one-epoch one; RESULTS.md, "One device").
FAMILY_DEFAULTS["tail"]["epochs"] = 2


@dataclass
class LocalRunConfig:
    """One side-tuning run of a single device against the server."""

    model: str = "smollm2-135m"
    weights: str = "fp32"  # device backbone weight precision: fp32 (as loaded), bf16, int8, int4
    train_samples: int = 2000
    validation_samples: int = 500
    test_samples: int = 1000
    seed: int = 0  # the data split (and everything else unless train_seed is given)
    train_seed: int | None = None  # the side network's initial weights and batch order; None: seed
    bits: int | None = None  # None: the family's (4 for the tail's all-token frames, 8 for ladder / adapter)
    group_size: int | None = None  # None: 64 at 8 bits, 32 at 4 and 2 bits
    rotation: str = "hadamard"
    token_policy: str | None = None  # None: the family's ("nonpad" for the tail, else "last")
    num_taps: int = 8
    layers: tuple[int, ...] | None = None
    family: str = "tail"
    reduction: int = 8
    dropout: float = 0.3
    tail_cut: int = 0  # tail: the device forwards blocks 0..cut-1, the server trains blocks cut.. (0 = half)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    epochs: int | None = None
    average_epochs: int | None = None  # deliver the mean weights of the last k epochs (0 = the last epoch's)
    lr: float | None = None
    weight_decay: float | None = None
    select: str = "last"  # deliver the last epoch's side network, or the one with the "best-val" accuracy
    batch_size: int | None = None
    mixed_precision: str | None = (
        None  # server training: "none", "bf16", or "auto" (bf16 where the CPU has it natively)
    )
    device_batch_size: int = 16
    chunk_size: int = 128
    device_threads: int = max(1, os.cpu_count() or 1)
    server_threads: int = 1
    workdir: str = "runs/local"
    match_precision: bool = True
    train: TrainConfig = field(init=False)

    def __post_init__(self) -> None:
        if self.family not in FAMILY_DEFAULTS:
            raise ValueError(f"family={self.family!r} is unknown: choose one of {sorted(FAMILY_DEFAULTS)}")
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.family == "tail":
            if self.token_policy == "last":
                raise ValueError(
                    "the pretrained tail reads every real token of the cut layer: use token policy "
                    "'nonpad' (the default for family 'tail')"
                )
            if self.tail_cut < 0:
                raise ValueError(f"tail_cut={self.tail_cut} must be >= 0 (0 = half the blocks)")
        if self.mixed_precision == "auto":
            self.mixed_precision = "bf16" if (bf16_native() or torch.cuda.is_available()) else "none"
        self.weights = normalize_precision(self.weights)
        if self.group_size is None:
            self.group_size = default_group_size(self.bits)
        self.forward = ForwardConfig(
            bits=self.bits,
            group_size=self.group_size,
            rotation=self.rotation,
            token_policy=self.token_policy,
            batch_size=self.device_batch_size,
            seed=self.seed,
        )
        if self.train_seed is None:
            self.train_seed = self.seed
        self.train = TrainConfig(
            lr=self.lr,
            weight_decay=self.weight_decay,
            epochs=self.epochs,
            batch_size=self.batch_size,
            seed=self.train_seed,
            average_epochs=self.average_epochs,
            mixed_precision=self.mixed_precision,
        )
        if self.select not in ("last", "best-val"):
            raise ValueError(f"select={self.select!r} must be 'last' or 'best-val'")
        for name in ("train_samples", "validation_samples", "test_samples", "chunk_size", "epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


class DeviceFailed(RuntimeError):
    """The device process reported an error or died."""


def _recv(conn, process) -> Any:
    while not conn.poll(0.5):
        if not process.is_alive():
            raise DeviceFailed(f"the device process exited with code {process.exitcode} without a reply")
    message = conn.recv()
    if isinstance(message, dict) and message.get("type") == "error":
        raise DeviceFailed(f"the device failed: {message['error']}\n{message.get('traceback', '')}")
    return message


def run_local(config: LocalRunConfig, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run the device and the server, return (and optionally write) the measured figures."""
    if config.family == "tail":  # the device taps the cut block: known from the model's depth
        config.tail_cut = config.tail_cut or _default_cut(config.model)
        config.layers = (config.tail_cut - 1,)
    torch.set_num_threads(config.server_threads)
    workdir = Path(config.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    server_conn, device_conn = ctx.Pipe()
    device_config = LocalDeviceConfig(
        model=config.model,
        weights=None if config.weights == "fp32" else config.weights,
        layers=config.layers,
        num_taps=config.num_taps,
        forward=config.forward,
        train_samples=config.train_samples,
        validation_samples=config.validation_samples,
        test_samples=config.test_samples,
        chunk_size=config.chunk_size,
        seed=config.seed,
        threads=config.device_threads,
        mobiflower_home=os.environ.get("MOBIFLOWER_HOME"),
    )
    wall0 = time.perf_counter()
    device = ctx.Process(target=run_device, args=(device_conn, device_config), name="mobiflower-device", daemon=True)
    device.start()
    device_conn.close()
    log = (lambda msg: tqdm.write(msg, file=sys.stderr)) if progress else (lambda msg: None)
    try:
        return _serve(config, server_conn, device, workdir, out, wall0, log, progress)
    finally:
        server_conn.close()
        device.join(timeout=10)
        if device.is_alive():
            device.terminate()


def _serve(
    config: LocalRunConfig, conn, device, workdir: Path, out: str | None, wall0: float, log, progress: bool
) -> dict[str, Any]:
    hello = _recv(conn, device)
    log(
        f"[server] device ready: {hello['fingerprint']}, taps {hello['layers']}, backbone loaded in "
        f"{hello['load_s']:.1f} s"
    )
    tail = {}
    frozen = {k: torch.from_numpy(v) for k, v in hello["frozen"].items()}
    if config.family == "tail":  # the server loads the public weights of blocks cut.. itself
        public = load_tail_weights(config.model, config.tail_cut)
        public.check_device(hello["fingerprint"])
        frozen = public.weights
        tail = {
            "backbone_config": public.backbone_config,
            "lora_rank": config.lora_rank,
            "lora_alpha": config.lora_alpha,
            "lora_targets": list(config.lora_targets),
        }
        log(
            f"[server] public weights of blocks {config.tail_cut}..{public.backbone_config['num_hidden_layers'] - 1} "
            f"loaded ({public.fingerprint})"
        )
    side_config = SideNetworkConfig(
        hidden_size=hello["hidden_size"],
        layers=list(hello["layers"]),
        fingerprint=hello["fingerprint"],
        family=config.family,
        reduction=config.reduction,
        dropout=config.dropout,
        norm_eps=hello["norm_eps"],
        feature_token="last" if hello["is_decoder"] else "first",
        bits=config.bits,
        group_size=config.group_size,
        rotation=config.rotation,
        token_policy=config.token_policy,
        extra={"model": config.model},
        **tail,
    )
    torch.manual_seed(config.train_seed)  # the side network's initial weights are part of the training seed
    net = build_side_network(side_config, frozen)
    total_steps = planned_steps(chunk_sizes(hello["train"], config.chunk_size), config.batch_size, config.epochs)
    trainer = SideTrainer(net, config.train, total_steps=total_steps)
    log(
        f"[server] {config.family} side network, {net.num_trainable():,} trainable parameters, "
        f"training on {trainer.device}"
    )

    n_chunks = math.ceil(hello["train"] / config.chunk_size) + math.ceil(hello["validation"] / config.chunk_size)
    bar = tqdm(
        total=hello["train"] + hello["validation"],
        desc="frames received",
        unit="sample",
        disable=not progress,
        file=sys.stderr,
    )
    bytes_sent = forward_s = quantize_s = 0.0
    val_frames = []
    first_loss = None
    for _ in range(n_chunks):
        header = _recv(conn, device)
        blob = conn.recv_bytes()
        frame = decode_frame(blob, expected_fingerprint=side_config.fingerprint)
        bytes_sent += len(blob)
        forward_s += header["stats"]["forward_s"]
        quantize_s += header["stats"]["quantize_s"]
        if header["split"] == "train":
            stats = trainer.ingest(frame)
            first_loss = stats["loss"] if first_loss is None else first_loss
            bar.set_postfix(loss=f"{stats['loss']:.3f}", kb_per_sample=f"{len(blob) / frame.num_samples / 1024:.2f}")
        else:
            val_frames.append(trainer.decode(frame))
        bar.update(frame.num_samples)
    bar.close()
    sent = _recv(conn, device)
    device_peak_rss = sent["peak_rss_mb"]
    streaming_wall = time.perf_counter() - wall0

    # Epoch 1 was the streaming pass; the rest come from the activation cache (no device work).
    history = []
    val = trainer.evaluate(val_frames)
    history.append({"epoch": 1, "loss": first_loss, "validation_accuracy": val["accuracy"]})
    keep_best = config.select == "best-val"  # "last" needs no snapshots: the final weights are delivered
    best = {
        "accuracy": val["accuracy"],
        "epoch": 1,
        "state": copy.deepcopy(trainer.net.state_dict()) if keep_best else None,
    }
    if trainer.averaging(1):
        trainer.update_average()
    log(f"[server] epoch 1 (streamed): validation accuracy {val['accuracy']:.4f}")
    for epoch in range(2, config.epochs + 1):
        stats = trainer.train_epoch()
        val = trainer.evaluate(val_frames)
        if trainer.averaging(epoch):
            trainer.update_average()
        history.append({"epoch": epoch, "loss": stats["loss"], "validation_accuracy": val["accuracy"]})
        log(f"[server] epoch {epoch}: loss {stats['loss']:.4f}, validation accuracy {val['accuracy']:.4f}")
        if val["accuracy"] > best["accuracy"] or not keep_best:
            best = {
                "accuracy": val["accuracy"],
                "epoch": epoch,
                "state": copy.deepcopy(trainer.net.state_dict()) if keep_best else None,
            }
    trainer.history = history
    trainer.save_checkpoint(workdir / "checkpoint", extra={"best_epoch": best["epoch"]})  # the last epoch's state
    if best["state"] is not None:
        trainer.net.load_state_dict(best["state"])
    elif trainer.use_average():
        log(f"[server] delivering the mean of the last {trainer.averaged} epochs' weights (tail averaging)")
    if config.family == "tail":  # a PEFT adapter for the stock model, fp16
        export = save_peft_adapter(side_config, trainer.net.state_dict(), workdir / "adapter", config.model)
    else:
        export = trainer.export(workdir / "side_network.safetensors")
    log(
        f"[server] delivering the epoch-{best['epoch']} side network (validation accuracy {best['accuracy']:.4f}, "
        f"{_size(export) / 1024:.0f} KiB) to the device for local inference"
    )
    conn.send({"type": "deliver", "path": str(export.resolve()), "match_precision": config.match_precision})

    test_bar = tqdm(
        total=hello["test"], desc="device test inference", unit="sample", disable=not progress, file=sys.stderr
    )
    while True:
        message = _recv(conn, device)
        if message["type"] == "progress":
            test_bar.n = message["done"]
            test_bar.refresh()
            continue
        break
    test_bar.close()
    result = {
        "method": "mobiflower",
        "model": config.model,
        "weights": config.weights,
        "fingerprint": side_config.fingerprint,
        "family": config.family,
        "test_accuracy": message["accuracy"],
        "zero_shot_accuracy": message["zero_shot_accuracy"],
        "validation_accuracy": best["accuracy"],
        "best_epoch": best["epoch"],
        "bits": config.bits,
        "token_policy": config.token_policy,
        "layers": side_config.layers,
        "train_samples": hello["train"],
        "validation_samples": hello["validation"],
        "test_samples": hello["test"],
        "bytes_sent": int(bytes_sent),
        "bytes_per_sample": bytes_sent / (hello["train"] + hello["validation"]),
        "device_forward_s": forward_s,
        "device_quantize_s": quantize_s,
        "device_s_per_sample": forward_s / (hello["train"] + hello["validation"]),
        "device_peak_rss_mb": device_peak_rss,
        "device_backbone_load_s": hello["load_s"],
        "server_train_s": trainer.train_seconds,
        "streaming_wall_s": streaming_wall,
        "wall_s": time.perf_counter() - wall0,
        "trainable_parameters": net.num_trainable(),
        "side_network": str(export),
        "delivery_bytes": _size(export),
        "history": history,
        "config": {k: v for k, v in asdict(config).items() if k != "train"},
    }
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=str))
    return result


def _default_cut(model: str) -> int:
    from mobiflower.platform.pretrained_tail import resolve_cut

    try:
        return resolve_cut(model)
    except (OSError, ValueError) as err:
        raise DeviceFailed(f"cannot load model {model!r}: {err}") from err


def _size(path: Path) -> int:
    """Bytes of a delivered file, or of every file in a delivered folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def format_summary(result: dict[str, Any]) -> str:
    """The closing lines of a run: accuracy beside zero-shot, then what it cost."""
    lines = [f"method            {result['method']}" + (f" ({result.get('family')})" if result.get("family") else "")]
    zero_shot = result.get("zero_shot_accuracy")
    measured = zero_shot is not None and zero_shot == zero_shot  # NaN: the tail's forward cannot give it
    lines.append(
        f"test accuracy     {result['test_accuracy']:.4f}   "
        + (f"(zero-shot prompt {zero_shot:.4f})" if measured else "(zero-shot prompt: `--baseline zero-shot`)")
    )
    if result.get("bits") is not None and result.get("method") == "mobiflower":
        lines.append(
            f"wire              {result['bits']}-bit, token policy '{result['token_policy']}', "
            f"{result['bytes_sent'] / 2**20:.2f} MiB sent ({result['bytes_per_sample']:.0f} B/sample)"
        )
        lines.append(
            f"device            {result['device_s_per_sample'] * 1000:.1f} ms/sample forward+pack, "
            f"peak RSS {result['device_peak_rss_mb']:.0f} MB"
        )
        lines.append(
            f"server            {result['server_train_s']:.1f} s training, best epoch {result['best_epoch']} "
            f"(validation {result['validation_accuracy']:.4f})"
        )
        lines.append(f"wall time         {result['wall_s']:.1f} s")
    else:
        for key in ("train_s", "s_per_sample", "peak_rss_mb", "trainable_parameters"):
            if key in result:
                lines.append(f"{key:<18}{result[key]}")
    return "\n".join(lines)
