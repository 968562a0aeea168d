"""Sequence classifiers trained on the device: tokenizer setup, LoRA or full models, optimizer, accuracy.

What the on-device baselines share: the single-device LoRA / full fine-tuning baselines
(:mod:`mobiflower.simulations.baselines.on_device`), the device cost benchmark, and the federated LoRA
device (:mod:`mobiflower.simulations.baselines.lora_model`). Tokenization matches
:meth:`Backbone.tokenize <mobiflower.platform.backbone.Backbone.tokenize>` (right padding, dynamic
padding per batch, truncation on the left). Heavy imports (torch, transformers, peft) happen inside
the functions, so importing this module is cheap. No Flower here.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

from mobiflower.platform.tasks import BUNDLED_TASK

DEFAULT_WEIGHT_DECAY = {"lora": 0.0, "full": 0.01}
EVAL_BATCH_SIZE = 32

_LORA_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
}


def quiet_transformers() -> None:
    """No download bars and no 'newly initialized weights' notices (the head is meant to be new)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_tokenizer(path: str):
    """The tokenizer set up exactly like :class:`Backbone`: pad = eos if missing, right pad, left truncate."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    tokenizer.truncation_side = "left"
    return tokenizer


def encode(tokenizer, texts: Sequence[str], max_length: int = 256) -> dict:
    """Right-padded to the longest text of this batch, truncated on the left (as Backbone.tokenize)."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def lora_targets_for(model_type: str, explicit: Sequence[str] | None = None) -> list[str]:
    """LoRA target module names: ``explicit`` if given, else the usual attention projections."""
    if explicit:
        return list(explicit)
    if model_type in _LORA_TARGETS:
        return list(_LORA_TARGETS[model_type])
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as mapping

    if model_type in mapping:
        return list(mapping[model_type])
    raise ValueError(f"no default LoRA targets for model type {model_type!r}: pass lora_targets")


def build_classifier(
    path: str,
    method: str,
    tokenizer,
    *,
    seed: int = 0,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] | None = None,
):
    """``AutoModelForSequenceClassification`` (2 labels) ready to train: LoRA-wrapped or fully trainable."""
    import torch
    from transformers import AutoModelForSequenceClassification

    quiet_transformers()
    torch.manual_seed(seed)  # the new classification head starts the same on every run
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_targets_for(model.config.model_type, lora_targets),
        )
        with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 API deprecated for v6
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
            model = get_peft_model(model, lora)
    elif method == "full":
        model.requires_grad_(True)
    else:
        raise ValueError(f"build_classifier needs method 'lora' or 'full', got {method!r}")
    model.train()
    return model


def make_optimizer(model, method: str, lr: float):
    """AdamW over the trainable parameters; weight decay (full: 0.01) skips biases and norm weights."""
    import torch

    decay, no_decay = [], []
    for _name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": DEFAULT_WEIGHT_DECAY[method]},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def classifier_accuracy(
    model, tokenizer, examples: Sequence, max_length: int = 256, batch_size: int = EVAL_BATCH_SIZE
) -> float:
    """Accuracy of a sequence classifier on ``examples`` (inference mode, batches of ``batch_size``)."""
    import torch

    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    # Sorting by length wastes less padding; accuracy does not depend on the order.
    ordered = sorted(examples, key=lambda e: len(e.text))
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(ordered), batch_size):
            batch = ordered[start : start + batch_size]
            enc = encode(tokenizer, [BUNDLED_TASK.render(e.text) for e in batch], max_length)
            logits = model(**enc).logits
            labels = torch.tensor([int(e.label) for e in batch])
            correct += int((logits.argmax(dim=-1) == labels).sum())
    model.train(was_training)
    return correct / len(examples)


def train_step(model, tokenizer, batch: Sequence, params, optimizer, max_length: int = 256, scheduler=None) -> float:
    """One supervised step on ``batch``: forward with labels, backward, clip at 1.0, step; the loss."""
    import torch

    enc = encode(tokenizer, [BUNDLED_TASK.render(e.text) for e in batch], max_length)
    labels = torch.tensor([int(e.label) for e in batch])
    loss = model(**enc, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
