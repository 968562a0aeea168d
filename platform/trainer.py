"""The server trainer: side networks learn by backprop from the activation frames devices send.

Frames land one at a time; the trainer takes a pass over each as it arrives and keeps it in a
bounded activation cache (the backbone is frozen, so a sample's activations never change and
later epochs need no device work). It trains on the dequantized frames, exactly what the codec
delivered. AdamW with warm-up and linear or cosine decay, gradient clipping, evaluation on
held-out frames, and checkpoints of side network + optimizer + schedule as safetensors + JSON
written atomically. ``export`` writes the side network alone, for a device to download.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgpack
import torch
from safetensors.torch import load_file, save_file

from mobiflower.platform.atomic import atomic_directory, atomic_file
from mobiflower.platform.codec import dequantize
from mobiflower.platform.frames import IGNORE_INDEX, Frame, decode_frame, encode_frame
from mobiflower.platform.optimizer_state import (
    flatten_optimizer,
    param_groups,
    rng_state_from_json,
    rng_state_to_json,
    unflatten_optimizer,
)
from mobiflower.platform.side_networks import (
    SideBatch,
    SideNetwork,
    SideNetworkConfig,
    SideNetworkError,
    make_side_batch,
    save_side_network,
    side_network_loss,
    update_digest,
)
from mobiflower.platform.tasks import ClassScores, TokenScores


@dataclass
class TrainConfig:
    """Optimisation settings of a side network."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    epochs: int = 10
    batch_size: int = 32
    warmup_frac: float = 0.05
    schedule: str = "linear"  # "linear", "cosine" or "constant" after warm-up
    clip_norm: float = 1.0
    seed: int = 0
    device: str = "auto"  # "auto" = CUDA when present, else CPU
    cache_bytes: int = 2 << 30  # bound of the activation cache (quantized payload and header content kept)
    average_epochs: int = 5  # deliver the mean of the last k epochs' weights (tail averaging); 0 = the last
    # "bf16": forward and backward under bfloat16 autocast (weights, optimizer and gradients stay fp32);
    # faster where the CPU has native bf16 (the pretrained tail's default there)
    mixed_precision: str = "none"

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("none", "bf16"):
            raise ValueError(f"mixed_precision={self.mixed_precision!r} must be 'none' or 'bf16'")
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule={self.schedule!r} must be 'linear', 'cosine' or 'constant'")
        if self.lr <= 0 or self.epochs < 1 or self.batch_size < 1:
            raise ValueError("lr must be > 0, epochs and batch_size at least 1")

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


class DecodedFrame:
    """A frame's activations dequantized once, with per-sample row offsets for batching."""

    def __init__(self, frame: Frame, feature_token: str = "last", backbone: str = ""):
        self.frame = frame
        self.backbone = backbone  # the frame's fingerprint when it is not the network's first backbone
        self.rows = [dequantize(q) for q in frame.activations]
        counts = torch.as_tensor(frame.token_counts)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
        self.feature_token = feature_token
        kind = frame.targets.get("kind")
        self.targets = (
            torch.as_tensor(frame.targets["values"], dtype=torch.long) if kind in ("class", "tokens") else None
        )
        self.per_token_targets = kind == "tokens"
        self.resident_bytes = frame.kept_nbytes() + sum(r.numel() * r.element_size() for r in self.rows)

    def __len__(self) -> int:
        return self.frame.num_samples

    def batch(self, idx: Sequence[int]) -> SideBatch:
        f = self.frame
        if f.token_policy == "last":
            index = torch.as_tensor(list(idx), dtype=torch.long)
            rows = [r[index] for r in self.rows]
            row_index = index
        else:
            row_index = torch.cat([torch.arange(self.offsets[i], self.offsets[i + 1]) for i in idx])
            rows = [r[row_index] for r in self.rows]
        targets = None
        if self.targets is not None:
            targets = self.targets[row_index] if self.per_token_targets else self.targets[torch.as_tensor(list(idx))]
        batch = make_side_batch(
            rows,
            [f.token_counts[i] for i in idx],
            [f.seq_lengths[i] for i in idx],
            f.token_policy,
            self.feature_token,
            targets,
            [f.sample_ids[i] for i in idx],
            per_token_targets=self.per_token_targets,
        )
        batch.backbone = self.backbone
        return batch


class ActivationCache:
    """Frames kept for later epochs, bounded by what keeping them holds: the quantized payload and the
    header's content (:meth:`Frame.kept_nbytes`), so free-form header content cannot go uncounted.

    Changed only through its methods: what it holds and the bytes it counts always agree.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._frames: list[DecodedFrame] = []
        self._nbytes = 0
        self._rejected = 0

    def add(self, decoded: DecodedFrame) -> bool:
        """Keep a frame if it fits the budget; a frame that does not is counted as rejected."""
        size = decoded.frame.kept_nbytes()
        if self._nbytes + size > self.max_bytes:
            self._rejected += 1
            return False
        self._frames.append(decoded)
        self._nbytes += size
        return True

    def truncate(self, count: int) -> None:
        """Keep only the first ``count`` frames (a frame that failed to train leaves again)."""
        for decoded in self._frames[count:]:
            self._nbytes -= decoded.frame.kept_nbytes()
        del self._frames[count:]

    def replace(self, frames: Iterable[DecodedFrame], rejected: int | None = None) -> None:
        """Hold these frames instead (a checkpoint's or a page's), and, given, its rejected count."""
        self.truncate(0)
        for decoded in frames:
            self.add(decoded)
        if rejected is not None:
            self._rejected = int(rejected)

    @property
    def frames(self) -> tuple[DecodedFrame, ...]:
        """The kept frames, in arrival order."""
        return tuple(self._frames)

    @property
    def nbytes(self) -> int:
        """Bytes the kept frames count against ``max_bytes``."""
        return self._nbytes

    @property
    def rejected(self) -> int:
        """Frames that did not fit the budget."""
        return self._rejected

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def num_samples(self) -> int:
        return sum(len(f) for f in self._frames)

    def resident_bytes(self) -> int:
        """Memory the cache holds: each frame's quantized payload and its dequantized rows."""
        return sum(f.resident_bytes for f in self._frames)


def _lr_lambda(total: int, warmup: int, schedule: str):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant" or total <= warmup:
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def chunk_sizes(samples: int, chunk_size: int) -> list[int]:
    """The frame sizes of ``samples`` sent in chunks of ``chunk_size`` (the last one may be short)."""
    full, rest = divmod(samples, max(1, chunk_size))
    return [chunk_size] * full + ([rest] if rest else [])


def planned_steps(frame_sizes: Sequence[int], batch_size: int, epochs: int, cached: bool = True) -> int:
    """Optimizer steps of a run, so the learning-rate schedule ends exactly at its last step.

    The streamed first epoch trains frame by frame (each frame ends in a partial batch); later
    epochs batch across the whole activation cache, or stream again when nothing is cached.
    """
    streamed = sum(math.ceil(n / batch_size) for n in frame_sizes)
    later = math.ceil(sum(frame_sizes) / batch_size) if cached else streamed
    return streamed + max(0, epochs - 1) * later


class SideTrainer:
    """Trains one side network from frames."""

    def __init__(
        self,
        net: SideNetwork,
        config: TrainConfig | None = None,
        total_steps: int | None = None,
        residuals: Callable[[list[int], torch.Tensor], Any] | None = None,
    ):
        """``residuals``: label-private runs only, (sample ids, predicted probabilities [n, K]) ->
        residuals p - onehot(y) from the devices, NaN rows where a device did not answer (see
        :meth:`_residual_objective`)."""
        self.config = config or TrainConfig()
        self.device = self.config.resolve_device()
        self.net = net.to(self.device)
        torch.manual_seed(self.config.seed)
        self.rng = random.Random(self.config.seed)
        decay = [p for n, p in net.named_parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for n, p in net.named_parameters() if p.requires_grad and p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.config.lr,
        )
        self.total_steps = total_steps or 1000
        warmup = int(self.config.warmup_frac * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(self.total_steps, warmup, self.config.schedule)
        )
        self.step = 0
        self.cache = ActivationCache(self.config.cache_bytes)
        self.train_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.average: dict[str, torch.Tensor] | None = None
        self.averaged = 0
        self.residuals = residuals
        self.skipped_steps = 0
        self._static_bytes: int | None = None

    # ---- data -------------------------------------------------------------------------------
    def check_frame(self, frame: Frame) -> None:
        check_frame(self.net.config, frame)

    def decode(self, frame: Frame) -> DecodedFrame:
        return decode_for(self.net.config, frame)

    def _minibatches(self, frames: Sequence[DecodedFrame], shuffle: bool) -> Iterator[tuple[DecodedFrame, list[int]]]:
        bs = self.config.batch_size
        for frame in self.rng.sample(list(frames), len(frames)) if shuffle else frames:
            order = list(range(len(frame)))
            if shuffle:
                self.rng.shuffle(order)
            batches = [order[start : start + bs] for start in range(0, len(order), bs)]
            if shuffle and frame.frame.token_policy != "last":  # similar lengths together: less padding
                batches = _grouped_by_length(
                    order, [frame.frame.token_counts[i] for i in range(len(frame))], bs, self.rng
                )
            yield from ((frame, idx) for idx in batches)

    def _epoch_batches(self, frames: Sequence[DecodedFrame]) -> Iterator[SideBatch | list[SideBatch]]:
        """Minibatches drawn across all frames in a random order.

        Frames that tap a prefix of the layers (a device that stopped its forward early), or come from
        another backbone of a heterogeneous fleet, cannot share a tensor with the others: a minibatch
        that mixes them comes as one part per (backbone, depth),
        which :meth:`train_batch` takes in one optimizer step (so the step count, and with it the
        learning-rate schedule, does not depend on how the fleet adapted).
        """
        pairs = [(f, i) for f in frames for i in range(len(f))]
        self.rng.shuffle(pairs)
        bs = self.config.batch_size
        if any(f.frame.token_policy != "last" for f in frames):  # token-level frames: similar lengths together
            minibatches = _grouped_by_length(
                list(range(len(pairs))), [f.frame.token_counts[i] for f, i in pairs], bs, self.rng
            )
        else:
            minibatches = [list(range(start, min(start + bs, len(pairs)))) for start in range(0, len(pairs), bs)]
        for members in minibatches:
            chunk = [pairs[j] for j in members]
            by_depth: dict[tuple[str, int], dict[int, tuple[DecodedFrame, list[int]]]] = {}
            for f, i in chunk:
                by_depth.setdefault((f.backbone, -len(f.rows)), {}).setdefault(id(f), (f, []))[1].append(i)
            depths = []
            for _, groups in sorted(by_depth.items()):
                parts = [f.batch(idx) for f, idx in groups.values()]
                depths.append(parts[0] if len(parts) == 1 else _concat_batches(parts))
            yield depths[0] if len(depths) == 1 else depths

    # ---- training ---------------------------------------------------------------------------
    def train_batch(self, batch: SideBatch | Sequence[SideBatch]) -> float:
        """One optimizer step; the batch's loss (NaN in a label-private step: the server has no labels).

        A minibatch whose samples tap different numbers of layers comes as parts, one per depth: each
        part's loss is weighted by its share of the samples and the gradients add up before the one
        step, so it is the same step a single tensor would give. A part that scores no token (a prompt
        whose completion max-length cut away) has no loss to take: it is left out."""
        parts = [p for p in ([batch] if isinstance(batch, SideBatch) else batch) if not _scores_nothing(p.targets)]
        total = sum(len(p) for p in parts)
        self.net.train()
        self.optimizer.zero_grad(set_to_none=True)
        losses: list[tuple[float, int]] = []
        for part in parts:
            part = part.to(self.device)
            with self._autocast():
                logits = self.net(part).float()
            if part.targets is None and self.residuals is not None:
                loss = self._residual_objective(logits, part)
                if loss is None:
                    continue
                value = float("nan")
            else:
                loss = side_network_loss(logits, part)
                value = float(loss.detach())
            (loss * (len(part) / total) if len(parts) > 1 else loss).backward()
            losses.append((value, len(part)))
        if not losses:
            return float("nan")
        value = sum(v * n for v, n in losses) / sum(n for _, n in losses)
        if self.config.clip_norm:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.config.clip_norm)
        self.optimizer.step()
        if self.step < self.total_steps:
            self.scheduler.step()
        self.step += 1
        return value

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.mixed_precision == "bf16")

    def _residual_objective(self, logits: torch.Tensor, batch: SideBatch) -> torch.Tensor | None:
        """Label-private: :func:`residual_surrogate` of the devices' residuals for this batch's samples;
        a batch nobody answered takes no step (counted in ``skipped_steps``)."""
        probs = logits.detach().float().softmax(-1).cpu()
        loss = residual_surrogate(logits, torch.as_tensor(self.residuals(list(batch.sample_ids), probs)))
        self.skipped_steps += loss is None
        return loss

    def ingest(self, frame: Frame, train: bool = True, keep: bool = True) -> dict[str, float]:
        """A frame landed: cache it (unless ``keep`` is False: its device opted out of the activation
        cache) and (by default) take one pass over its samples."""
        decoded = self.decode(frame)
        cached = self.cache.add(decoded) if keep else False
        stats = {"samples": len(decoded), "cached": float(cached), "loss": float("nan"), "seconds": 0.0}
        if train:
            t = time.perf_counter()
            losses = [self.train_batch(decoded.batch(idx)) for _, idx in self._minibatches([decoded], shuffle=True)]
            stats["seconds"] = time.perf_counter() - t
            self.train_seconds += stats["seconds"]
            stats["loss"] = _mean(losses)
            self.optimizer.zero_grad(set_to_none=True)  # gradients are not needed between passes: free them
        return stats

    def train_epoch(self) -> dict[str, float]:
        """One pass over every cached sample, shuffled across frames."""
        if not self.cache.frames:
            raise SideNetworkError("the activation cache is empty: ingest frames before training epochs")
        t = time.perf_counter()
        losses = [self.train_batch(b) for b in self._epoch_batches(self.cache.frames)]
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t
        self.train_seconds += seconds
        return {"loss": _mean(losses), "seconds": seconds, "samples": self.cache.num_samples}

    def averaging(self, epoch: int) -> bool:
        """Whether the weights after ``epoch`` (1-based) belong to the delivered tail average."""
        k = self.config.average_epochs
        return k > 0 and epoch > self.config.epochs - k

    @torch.no_grad()
    def update_average(self) -> None:
        """Add the current weights to the running mean of the last epochs' weights.

        Averaging the end-of-epoch weights of the final epochs (Polyak / SWA tail averaging) gives a
        network less tied to the last few minibatches than the last weights are; with streamed
        frames landing in whatever order the fleet produces them, it keeps runs comparable.
        """
        state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.averaged += 1
        if self.average is None:
            self.average = state
            return
        for key, value in state.items():
            if value.is_floating_point():
                self.average[key] += (value - self.average[key]) / self.averaged

    def use_average(self) -> bool:
        """Load the tail average into the network (if one was taken); True when it was."""
        if self.average is None:
            return False
        self.net.load_state_dict(self.average)
        return True

    def evaluate(self, frames: Sequence[Frame | DecodedFrame]) -> dict[str, float]:
        """Accuracy (classification) or token accuracy and loss (LM) on held-out frames."""
        decoded = [f if isinstance(f, DecodedFrame) else self.decode(f) for f in frames]
        return evaluate_network(self.net, decoded, self.device, self.config.batch_size, self.config.mixed_precision)

    # ---- persistence ------------------------------------------------------------------------
    def state_digest(self) -> str:
        """A digest of side-network and optimizer tensors (to prove a state unchanged)."""
        h = hashlib.sha256()
        update_digest(h, self.net.state_dict())
        update_digest(h, flatten_optimizer(self.optimizer))
        return h.hexdigest()

    def resident_bytes(self) -> int:
        """Memory this trainer holds now: weights, gradients, optimizer moments, tail average and cache."""
        tensors = [p for p in self.net.parameters()] + [b for b in self.net.buffers()]
        tensors += [p.grad for p in self.net.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        tensors += list((self.average or {}).values())
        return sum(t.numel() * t.element_size() for t in tensors) + self.cache.resident_bytes()

    def footprint_bytes(self) -> int:
        """The most this trainer holds while it trains, whether or not it has trained yet.

        Weights and buffers, plus for every trainable weight its gradient, two AdamW moments and a
        tail-average copy, plus the cache: a bound a memory budget can plan with before the
        optimizer state or the average exist (:meth:`resident_bytes` is what is held now).
        """
        if self._static_bytes is None:  # the network's shape never changes: measure it once
            trainable = sum(p.numel() * p.element_size() for p in self.net.parameters() if p.requires_grad)
            state = sum(t.numel() * t.element_size() for t in self.net.state_dict().values())
            self._static_bytes = state * 2 + trainable * 3
        return self._static_bytes + self.cache.resident_bytes()

    def save_cache(self, path: str | Path) -> Path:
        """The activation cache as its frames' encoded bytes (compact: the quantized payload)."""
        path = Path(path)
        blobs = [encode_frame(f.frame) for f in self.cache.frames]
        with atomic_file(path) as tmp:
            tmp.write_bytes(msgpack.packb({"rejected": self.cache.rejected, "frames": blobs}, use_bin_type=True))
        return path

    def load_cache(self, path: str | Path) -> int:
        """Refill the activation cache from :meth:`save_cache`'s file; returns the frames loaded."""
        saved = msgpack.unpackb(Path(path).read_bytes(), raw=False)
        self.cache.replace((self.decode(decode_frame(blob)) for blob in saved["frames"]), saved["rejected"])
        return len(self.cache)

    def save_checkpoint(self, directory: str | Path, extra: dict[str, Any] | None = None, rng: bool = True) -> Path:
        """Side network + optimizer + schedule, written to a temp folder and renamed into place.

        ``rng=False`` leaves out the process-wide torch RNG state (paging a trainer out must not
        rewind the generator every other trainer shares when it is paged back in)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            save_side_network(self.net, tmp / "side_network.safetensors")
            save_file(flatten_optimizer(self.optimizer), str(tmp / "optimizer.safetensors"))
            meta = {
                "step": self.step,
                "total_steps": self.total_steps,
                "scheduler": self.scheduler.state_dict(),
                "train": asdict(self.config),
                "param_groups": param_groups(self.optimizer),
                "train_seconds": self.train_seconds,
                "history": self.history,
                "extra": extra or {},
            }
            meta["rng"] = rng_state_to_json(
                self.rng.getstate()
            )  # the shuffles of later epochs continue where they were
            meta["averaged"] = self.averaged
            extra_tensors = {"torch_rng": torch.get_rng_state()} if rng else {}
            if rng and self.device.type == "cuda":  # dropout on the GPU draws from the CUDA generator
                extra_tensors["cuda_rng"] = torch.cuda.get_rng_state(self.device)
            if self.average is not None:
                extra_tensors.update({f"average.{k}": v.detach().cpu().contiguous() for k, v in self.average.items()})
            save_file(extra_tensors, str(tmp / "state.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(meta, default=str))
        return directory

    def load_checkpoint(self, directory: str | Path) -> dict[str, Any]:
        """Restore :meth:`save_checkpoint`'s folder (the torch RNG too, when it was saved)."""
        directory = Path(directory)
        self.net.load_state_dict(load_file(str(directory / "side_network.safetensors")))
        meta = json.loads((directory / "trainer.json").read_text())
        flat = load_file(str(directory / "optimizer.safetensors"))
        self.optimizer.load_state_dict(unflatten_optimizer(flat, meta["param_groups"]))
        self.scheduler.load_state_dict(meta["scheduler"])
        self.step, self.total_steps = meta["step"], meta["total_steps"]
        self.train_seconds, self.history = meta["train_seconds"], meta["history"]
        if "rng" in meta:
            self.rng.setstate(rng_state_from_json(meta["rng"]))
        state_path = directory / "state.safetensors"
        if state_path.exists():
            tensors = load_file(str(state_path))
            torch_rng = tensors.pop("torch_rng", None)
            if torch_rng is not None:
                torch.set_rng_state(torch_rng)
            cuda_rng = tensors.pop("cuda_rng", None)
            if cuda_rng is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(cuda_rng, self.device)
            average = {k.removeprefix("average."): v.to(self.device) for k, v in tensors.items()}
            self.average, self.averaged = (average or None), int(meta.get("averaged", 0))
        return meta.get("extra", {})

    def export(self, path: str | Path) -> Path:
        """The side network alone, for a device to run locally."""
        return save_side_network(self.net, path)


def residual_surrogate(logits: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor | None:
    """A surrogate loss whose gradient is the mean cross-entropy's, from residuals ``p - onehot(y)``.

    The devices answer the residuals for their own samples (:mod:`mobiflower.platform.label_private`);
    ``sum(logits * r) / n`` then backpropagates exactly what ``cross_entropy(logits, y)`` would. Rows
    no device answered (NaN) are left out; None when no row was answered.
    """
    r = residuals.float()
    valid = torch.isfinite(r).all(dim=1)
    if not bool(valid.any()):
        return None
    r = torch.where(valid[:, None], r, torch.zeros_like(r)).to(logits.device, logits.dtype)
    return (logits * r).sum() / valid.sum()


def check_frame(config: SideNetworkConfig, frame: Frame) -> None:
    """Refuse a frame that cannot feed a side network of ``config`` (backbone, layers, width)."""
    if not config.serves(frame.fingerprint):
        raise SideNetworkError(
            f"frame from backbone {frame.fingerprint} cannot train a side network for "
            f"{config.fingerprint}" + (f" and {sorted(config.backbones)}" if config.backbones else "")
        )
    if not config.accepts_layers(frame.layers, frame.fingerprint):
        raise SideNetworkError(
            f"frame taps layers {frame.layers}, the side network needs "
            f"{config.layers_for(frame.fingerprint)} or a prefix of them"
        )
    if frame.hidden_size != config.hidden_size:
        raise SideNetworkError(f"frame width {frame.hidden_size} != side network width {config.hidden_size}")


def decode_for(config: SideNetworkConfig, frame: Frame) -> DecodedFrame:
    """A checked frame, dequantized for a side network of ``config``."""
    check_frame(config, frame)
    return DecodedFrame(
        frame, config.feature_token, "" if frame.fingerprint == config.fingerprint else frame.fingerprint
    )


@torch.no_grad()
def evaluate_network(
    net: SideNetwork,
    frames: Sequence[DecodedFrame],
    device: torch.device | str = "cpu",
    batch_size: int = 32,
    mixed_precision: str = "none",
) -> dict[str, float]:
    """The task's metrics of ``net`` on held-out frames (accuracy and macro-F1 for a classifier;
    perplexity, loss and token accuracy for an LM head) and ``count``: samples, or scored tokens."""
    device = torch.device(device)
    net.eval()
    scores: ClassScores | TokenScores | None = None
    for decoded in frames:
        for start in range(0, len(decoded), batch_size):
            idx = list(range(start, min(start + batch_size, len(decoded))))
            batch = decoded.batch(idx).to(device)
            if batch.targets is None:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
                logits = net(batch).float()
            if scores is None:
                lm = net.config.head == "lm"
                scores = TokenScores() if lm else ClassScores(net.config.num_classes)
            scores.add(logits, batch.targets)
    if scores is None or scores.count == 0:
        raise SideNetworkError("nothing to evaluate: the frames hold no labelled samples")
    return {**scores.result(), "count": scores.count}


def _grouped_by_length(
    order: list[int], lengths: Sequence[int], batch_size: int, rng: random.Random, window: int = 32
) -> list[list[int]]:
    """Minibatches of ``order`` (already shuffled) whose samples have similar token counts.

    Why: a minibatch of token-level states is padded to its longest sample, and the pretrained tail
    runs its blocks over every padded position. Within windows of ``window`` batches the samples are
    sorted by length and cut into batches, whose order is then shuffled (``group_by_length`` in
    Hugging Face's Trainer does the same). ``lengths`` is indexed like ``order``'s values.
    """
    batches: list[list[int]] = []
    span = batch_size * window
    for start in range(0, len(order), span):
        part = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [part[k : k + batch_size] for k in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _mean(values: Sequence[float]) -> float:
    """The mean of the steps' losses that were taken (NaN: a step without a loss; all NaN: NaN)."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def _scores_nothing(targets: torch.Tensor | None) -> bool:
    """Token targets with no scored position (all ``-100``): a minibatch of them has no loss to take."""
    return targets is not None and targets.dim() == 2 and not bool((targets != IGNORE_INDEX).any())


def _concat_batches(parts: Sequence[SideBatch]) -> SideBatch:
    width = max(p.mask.shape[1] for p in parts)

    def pad(t: torch.Tensor, value: float = 0) -> torch.Tensor:
        extra = width - t.shape[1]
        if extra == 0:
            return t
        shape = list(t.shape)
        shape[1] = extra
        return torch.cat([t, t.new_full(shape, value)], dim=1)

    states = [torch.cat([pad(p.states[i]) for p in parts]) for i in range(len(parts[0].states))]
    mask = torch.cat([pad(p.mask, False) for p in parts])
    feature = torch.cat([p.feature_index for p in parts])
    targets = None
    if parts[0].targets is not None:
        targets = torch.cat([pad(p.targets, -100) if p.targets.dim() == 2 else p.targets for p in parts])
    return SideBatch(states, mask, feature, targets, [s for p in parts for s in p.sample_ids], parts[0].backbone)
