"""Models trained on the device for a task: tokenizer setup, LoRA or full models, optimizer, loss and metrics.

What the on-device baselines share: the single-device LoRA / full fine-tuning baselines
(:mod:`mobiflower.simulations.baselines.on_device`), the device cost benchmark, and the federated LoRA
device (:mod:`mobiflower.simulations.baselines.lora_model`). Every function takes the task
(:mod:`mobiflower.platform.tasks`), default the bundled sentiment job:

* ``classification``: ``AutoModelForSequenceClassification`` with the task's labels; the prompt is the
  task's template, tokenized like :meth:`Backbone.token_ids <mobiflower.platform.backbone.Backbone.token_ids>`
  (truncated on the left to the task's max length); loss cross-entropy; metrics accuracy and macro-F1.
* ``causal-lm``: ``AutoModelForCausalLM``; a sample is the task's segments, each tokenized without
  special tokens and joined by :func:`~mobiflower.platform.tasks.join_segments`, exactly as the
  side-tuning device encodes it (:meth:`DeviceRuntime.encode_samples
  <mobiflower.clients.runtime.DeviceRuntime.encode_samples>`). Labels are transformers' causal-LM labels
  (``labels[j] = ids[j]`` where token ``j`` is scored, else -100); shifted by one they are the side-tuning
  frame's next-token targets (:meth:`Encoded.next_token_targets`). The LM head runs on the scored
  positions only (the loss equals transformers' own ``labels`` loss, with fewer logits in memory).
  Metrics perplexity, loss and token accuracy over the scored tokens.

Batches are right-padded to their longest sample. Heavy imports (torch, transformers, peft) happen
inside the functions, so importing this module is cheap. No Flower here.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

from mobiflower.platform.hf_quiet import quiet_transformers
from mobiflower.platform.tasks import (
    BUNDLED_TASK,
    Encoded,
    Example,
    Task,
    TaskError,
    chat_renderer,
    encode_samples,
)

DEFAULT_WEIGHT_DECAY = {"lora": 0.0, "full": 0.01}
EVAL_BATCH_SIZE = 32
HEAD_ROWS = 512  # scored positions per LM-head call when scoring (bounds the logits held at once)
IGNORE_INDEX = -100

_LORA_TARGETS = {
    "llama": ("q_proj", "v_proj"),
    "qwen2": ("q_proj", "v_proj"),
    "qwen3": ("q_proj", "v_proj"),
    "mistral": ("q_proj", "v_proj"),
    "opt": ("q_proj", "v_proj"),
    "gpt2": ("c_attn",),
    "bert": ("query", "value"),
}


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


def _task(task: Task | None, max_length: int) -> Task:
    """The task given, or the bundled job's at ``max_length`` (callers from before tasks)."""
    return task if task is not None else dataclasses.replace(BUNDLED_TASK, max_length=max_length)


def encode_examples(tokenizer, task: Task, examples: Sequence[Example]) -> list[Encoded]:
    """Each example as the side-tuning device encodes it for ``task`` (same ids, same scored tokens)."""
    for example in examples:
        task.check(example)
    return encode_samples(
        task,
        examples,
        lambda texts: tokenizer(texts, truncation=True, max_length=task.max_length)["input_ids"],
        lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"],
        lambda: chat_renderer(tokenizer),
    )


def collate(encoded: Sequence[Encoded], examples: Sequence[Example], task: Task, pad_id: int) -> dict:
    """``input_ids`` and ``attention_mask`` right-padded to the longest sample, and ``labels``: class ids
    ``[B]``, or causal-LM labels ``[B, T]`` (the token where it is scored, else -100)."""
    import torch

    length = max(len(e.ids) for e in encoded)
    input_ids = torch.full((len(encoded), length), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(encoded), length), dtype=torch.long)
    labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
    for row, enc in enumerate(encoded):
        ids = torch.tensor(enc.ids, dtype=torch.long)
        input_ids[row, : len(enc.ids)] = ids
        mask[row, : len(enc.ids)] = 1
        if task.name != "classification":
            scored = torch.tensor(enc.scored, dtype=torch.bool)
            labels[row, : len(enc.ids)] = torch.where(scored, ids, torch.full_like(ids, IGNORE_INDEX))
    if task.name == "classification":
        labels = torch.tensor([int(e.label) for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def next_token_targets(labels):
    """Causal-LM labels ``[B, T]`` shifted by one: position ``j``'s target is ``labels[:, j + 1]`` (what
    transformers' loss does inside; :meth:`Encoded.next_token_targets` gives the same per sample)."""
    import torch

    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def lm_parts(model):
    """``(body, head)`` of a causal LM, PEFT-wrapped or not: the transformer up to its final norm (LoRA
    layers included) and the LM head."""
    causal = model.get_base_model() if hasattr(model, "get_base_model") else model
    return causal.base_model, causal.get_output_embeddings()


def scored_hidden(model, batch: dict):
    """The final hidden states at the scored positions ``[N, d]`` and the next-token targets ``[B, T]``."""
    body, _ = lm_parts(model)
    targets = next_token_targets(batch["labels"])
    hidden = body(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return hidden.last_hidden_state[targets != IGNORE_INDEX], targets


def task_logits(model, batch: dict, task: Task):
    """``(logits, targets)`` that :func:`~mobiflower.platform.tasks.task_loss` and the task's scores take:
    class logits ``[B, C]`` and class ids, or LM logits of the scored positions ``[N, vocab]`` and the
    next-token targets ``[B, T]``."""
    if task.name == "classification":
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits, batch["labels"]
    hidden, targets = scored_hidden(model, batch)
    return lm_parts(model)[1](hidden), targets


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


def _load_for_task(path: str, task: Task, tokenizer):
    """The transformers model ``task`` trains: a sequence classifier with its labels, or the causal LM."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from mobiflower.platform.hf_model import DECODER_TYPES

    if task.name == "classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=task.num_classes, dtype=torch.float32
        )
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, "SEQ_CLS"
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type not in DECODER_TYPES:
        raise TaskError(f"task=causal-lm needs a decoder (causal LM) model; {path} is a {model_type!r}")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), "CAUSAL_LM"


def build_classifier(
    path: str,
    method: str,
    tokenizer,
    *,
    task: Task = BUNDLED_TASK,
    seed: int = 0,
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_targets: Sequence[str] | None = None,
):
    """The model ``task`` trains (:func:`_load_for_task`), LoRA-wrapped (PEFT ``SEQ_CLS``: adapters and
    the new head; ``CAUSAL_LM``: adapters only, the LM head frozen) or fully trainable."""
    if method not in ("lora", "full"):
        raise ValueError(f"build_classifier needs method 'lora' or 'full', got {method!r}")
    import torch

    quiet_transformers()
    torch.manual_seed(seed)  # a new classification head starts the same on every run
    model, task_type = _load_for_task(path, task, tokenizer)
    if method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        lora = LoraConfig(
            task_type=TaskType[task_type],
            r=lora_r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            target_modules=lora_targets_for(model.config.model_type, lora_targets),
        )
        with warnings.catch_warnings():  # peft 0.21 calls a transformers 5 API deprecated for v6
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*gradient_checkpointing.*")
            model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
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


def evaluate_task(model, tokenizer, examples: Sequence[Example], task: Task, batch_size: int = EVAL_BATCH_SIZE):
    """The task's scores of ``model`` on ``examples`` (inference mode, batches of ``batch_size`` in order of
    length): a :class:`ClassScores` or :class:`TokenScores`; ``.result()`` the metrics, ``.count`` what
    they are over (samples, or scored tokens)."""
    import torch

    scores = task.scores()
    if not examples:
        return scores
    encoded = encode_examples(tokenizer, task, examples)
    order = sorted(range(len(examples)), key=lambda i: len(encoded[i].ids))  # less padding
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = collate([encoded[i] for i in rows], [examples[i] for i in rows], task, tokenizer.pad_token_id)
            if task.name == "classification":
                scores.add(*task_logits(model, batch, task))
                continue
            hidden, targets = scored_hidden(model, batch)
            scored = targets[targets != IGNORE_INDEX]
            head = lm_parts(model)[1]
            for at in range(0, len(scored), HEAD_ROWS):  # the vocabulary logits of a few rows at a time
                scores.add(head(hidden[at : at + HEAD_ROWS]), scored[at : at + HEAD_ROWS].unsqueeze(0))
    model.train(was_training)
    return scores


def classifier_accuracy(
    model, tokenizer, examples: Sequence, max_length: int = 256, batch_size: int = EVAL_BATCH_SIZE
) -> float:
    """Accuracy of a sequence classifier of the bundled job on ``examples`` (NaN for none)."""
    return evaluate_task(model, tokenizer, examples, _task(None, max_length), batch_size).result()["accuracy"]


def train_step(
    model,
    tokenizer,
    batch: Sequence[Example],
    params,
    optimizer,
    max_length: int = 256,
    scheduler=None,
    task: Task | None = None,
) -> float:
    """One supervised step on ``batch`` for ``task`` (default: the bundled job at ``max_length``): the
    task's loss, backward, clip at 1.0, step; the loss."""
    import torch

    from mobiflower.platform.tasks import task_loss

    task = _task(task, max_length)
    tensors = collate(encode_examples(tokenizer, task, batch), batch, task, tokenizer.pad_token_id)
    logits, targets = task_logits(model, tensors, task)
    if not logits.shape[0]:  # no scored token in the batch (completions cut off by max-length): no step
        loss = torch.tensor(float("nan"))
    else:
        loss = task_loss(logits, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
