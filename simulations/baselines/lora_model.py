"""The federated LoRA baseline's on-device model: a PEFT LoRA model for the task, what travels, local training.

Flower-free, so the ServerApp (initial adapters) and the ClientApp (training) share it without the
ServerApp importing the ClientApp module: in a simulation both run in one process, and flwr's (1.41-1.42)
``load_app`` takes a module from ``sys.modules`` even while another thread is still importing it
(``partially initialized module ... has no attribute 'app'``).

The model, optimizer, tokenization and loss are the single-device LoRA baseline's
(:mod:`mobiflower.platform.classifier`), so both baselines train the same model the same way, for the
run's task (:class:`~mobiflower.platform.tasks.TaskConfig`): a sequence classifier with the task's
labels (adapters + head travel), or the causal LM (adapters travel; next-token loss on the scored tokens).
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from mobiflower.platform.classifier import build_classifier, load_tokenizer, make_optimizer, train_step
from mobiflower.platform.tasks import BUNDLED_TASK, Example, Task


@dataclass(frozen=True)
class LoraShape:
    """What fixes the names and shapes of the trainable tensors; server and devices must agree."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ()  # empty: the usual attention projections of the model type

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "LoraShape":
        targets = str(cfg.get("lora-target-modules", "") or "")
        return cls(
            r=int(cfg.get("lora-r", cls.r)),
            alpha=int(cfg.get("lora-alpha", cls.alpha)),
            dropout=float(cfg.get("lora-dropout", cls.dropout)),
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
        )


_MODELS: dict[tuple, tuple[Any, Any]] = {}


def lora_model(model_path: str, shape: LoraShape, seed: int = 0, task: Task = BUNDLED_TASK):
    """This process's (PEFT model, tokenizer) for a backbone, LoRA shape and task, built once per process."""
    key = (model_path, shape, seed, task)
    if key not in _MODELS:
        tokenizer = load_tokenizer(model_path)
        model = build_classifier(
            model_path,
            "lora",
            tokenizer,
            task=task,
            seed=seed,
            lora_r=shape.r,
            lora_alpha=shape.alpha,
            lora_dropout=shape.dropout,
            lora_targets=shape.targets or None,
        )
        _MODELS.clear()  # one backbone resident at a time: a device holds one model
        _MODELS[key] = (model, tokenizer)
    return _MODELS[key]


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The tensors that travel: every trainable parameter (LoRA A/B, and a classifier's head)."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable(model, state: Mapping[str, torch.Tensor]) -> None:
    """Overwrite every trainable parameter from ``state``; refuse a state that does not match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or extra:
        raise ValueError(
            f"the sent adapter does not fit this device's LoRA model ({len(missing)} tensors missing, "
            f"e.g. {missing[:1]}; {len(extra)} unexpected, e.g. {extra[:1]}): server and devices must "
            "use the same model, lora-r, lora-target-modules and task (labels)"
        )
    with torch.no_grad():
        for name, param in params.items():
            if tuple(state[name].shape) != tuple(param.shape):
                raise ValueError(
                    f"tensor {name} has shape {tuple(state[name].shape)}, this device's model expects "
                    f"{tuple(param.shape)}: check lora-r and the model"
                )
            param.copy_(state[name])


def train_local(
    model,
    tokenizer,
    examples: Sequence[Example],
    *,
    task: Task = BUNDLED_TASK,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """Local training as the single-device LoRA baseline does it, with a fresh AdamW per round
    (a device keeps no optimizer state between rounds) and a constant learning rate within the
    round (the strategy schedules it across rounds). Returns the mean loss (over steps that scored a
    token) and the step count."""
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
            batch = order[start : start + batch_size]
            losses.append(train_step(model, tokenizer, batch, params, optimizer, task=task))
    scored = [x for x in losses if math.isfinite(x)]
    return {"loss": sum(scored) / len(scored) if scored else math.nan, "steps": len(losses)}


def samples_digest(examples: Sequence[Example]) -> str:
    """A short digest of a set of sample ids (proves which partition a device trained on)."""
    return hashlib.sha256(",".join(str(i) for i in sorted(e.id for e in examples)).encode()).hexdigest()[:16]


__all__ = ["LoraShape", "lora_model", "trainable_state", "load_trainable", "train_local", "samples_digest"]
