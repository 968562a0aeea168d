"""On-device baselines in the same harness as side-tuning: zero-shot, LoRA and full fine-tuning.

Every later comparison needs the same model, the same samples and the same budget as the
side-tuning run (``mobiflower local``), but trained ON the device (backprop through the backbone).
So this module takes its samples from :func:`~mobiflower.platform.data.task_samples` with the same
arguments, the prompt from :attr:`Example.prompt`, and tokenizes like
:meth:`Backbone.tokenize <mobiflower.platform.backbone.Backbone.tokenize>` (right padding, dynamic
padding per batch, truncation on the left), and returns a dict with the same keys that
``mobiflower local --out`` writes.

* ``zero-shot``: the causal LM's next-token logits of the two verbalizers' first tokens at the last
  real token (:meth:`Backbone.zero_shot_logits`), no training.
* ``lora``: PEFT LoRA (task ``SEQ_CLS``) on ``AutoModelForSequenceClassification``; the adapters and
  the classification head (``score``, kept trainable by PEFT for SEQ_CLS) are trained.
* ``full``: every parameter of ``AutoModelForSequenceClassification`` is trained.

Training: AdamW (weight decay 0.0 for LoRA, 0.01 for full fine-tuning, never on biases and norm
weights), optional linear warm-up then linear decay to 0 over all steps, gradient clipping at 1.0,
shuffled per epoch with the seed. Heavy imports (torch, transformers, peft) happen inside the
functions, so importing this module is cheap.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mobiflower.platform.classifier import (  # noqa: F401  (re-exported: the baselines' public helpers)
    DEFAULT_WEIGHT_DECAY,
    EVAL_BATCH_SIZE,
    build_classifier,
    classifier_accuracy,
    count_trainable,
    encode,
    load_tokenizer,
    lora_targets_for,
    make_optimizer,
    quiet_transformers,
    train_step,
)
from mobiflower.platform.process_memory import current_rss_mb, peak_rss_mb  # noqa: F401  (re-exported)

METHODS = ("lora", "full", "zero-shot")
DEFAULT_LR = {"lora": 5e-4, "full": 2e-5}

RESULT_KEYS = (
    "method",
    "test_accuracy",
    "zero_shot_accuracy",
    "validation_accuracy",
    "bits",
    "token_policy",
    "train_samples",
    "bytes_sent",
    "trainable_parameters",
    "train_s",
    "s_per_sample",
    "peak_rss_mb",
    "lr",
    "epochs",
    "model",
)
"""The keys of :func:`run_baseline`'s result (the same keys ``mobiflower local --out`` writes)."""


@dataclass
class BaselineConfig:
    """One on-device baseline run; sample counts and seed must match the side-tuning run compared."""

    method: str  # "lora" | "full" | "zero-shot"
    model: str = "smollm2-135m"
    train_samples: int = 2000
    validation_samples: int = 500
    test_samples: int = 1000
    seed: int = 0  # the data split (and everything else unless train_seed is given)
    train_seed: int | None = None  # LoRA's initial weights, dropout and batch order; None: seed
    lr: float | None = None  # default: lora 5e-4, full 2e-5
    epochs: int = 1
    batch_size: int = 16
    warmup_frac: float = 0.0  # linear warm-up over this fraction of the steps, then linear decay to 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None  # None: q_proj/v_proj (llama, qwen2, opt), c_attn (gpt2)
    max_length: int = 256
    threads: int | None = None
    # Tuning on validation (the default for `mobiflower local --baseline`): every learning rate of ``lrs``
    # trains ``epochs`` epochs (linear decay over all of them); after each epoch the validation accuracy
    # is taken, and the (lr, epoch) with the best one is what is scored on test. Empty: ``lr`` alone, and
    # the last epoch.
    lrs: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is unknown: choose one of {', '.join(METHODS)}")
        if self.epochs < 1:
            raise ValueError(f"epochs={self.epochs} must be at least 1")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError(f"warmup_frac={self.warmup_frac} must be in [0, 1)")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be at least 1")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)
        if self.train_seed is None:
            self.train_seed = self.seed
        self.lrs = tuple(float(lr) for lr in self.lrs)
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs={self.lrs}: every learning rate must be positive")

    @property
    def resolved_lr(self) -> float | None:
        if self.method == "zero-shot":
            return None
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def _linear_schedule(total: int, warmup: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return fn


def zero_shot_accuracy(backbone, examples: Sequence, batch_size: int = EVAL_BATCH_SIZE) -> float:
    """Prompted accuracy: argmax over the verbalizers' first-token logits at the last real token."""
    import torch

    from mobiflower.platform.tasks import BUNDLED_TASK

    if not examples:
        return float("nan")
    ids = backbone.verbalizer_ids(BUNDLED_TASK.verbalizers)
    ordered = sorted(examples, key=lambda e: len(e.text))
    correct = 0
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        enc = backbone.tokenize([BUNDLED_TASK.render(e.text) for e in batch])
        mask = enc["attention_mask"]
        final = backbone.forward_taps(
            enc["input_ids"], mask, lambda _layer, _hidden: None, layers=[backbone.num_layers - 1], need_final=True
        )
        positions = backbone.feature_positions(mask)
        with torch.inference_mode():
            logits = backbone.zero_shot_logits(final[torch.arange(len(batch)), positions], ids)
        labels = torch.tensor([int(e.label) for e in batch])
        correct += int((logits.argmax(dim=-1) == labels).sum())
    return correct / len(examples)


_ZERO_SHOT_CACHE: dict[tuple, float] = {}


def _zero_shot_cached(model: str, path: str, examples: Sequence, max_length: int) -> float | None:
    """Zero-shot test accuracy, computed once per (model, samples, max_length) in this process."""
    key = (model, path, _mtime(path), tuple(e.id for e in examples), max_length)
    if key not in _ZERO_SHOT_CACHE:
        from mobiflower.platform.backbone import Backbone

        backbone = Backbone.load(model, num_taps=1, max_length=max_length)
        if not backbone.is_decoder:
            return None  # an encoder has no next-token head: no prompted baseline
        _ZERO_SHOT_CACHE[key] = zero_shot_accuracy(backbone, examples)
        del backbone
    return _ZERO_SHOT_CACHE[key]


def _mtime(path: str) -> float:
    try:
        return max((p.stat().st_mtime for p in Path(path).glob("*.safetensors")), default=0.0)
    except OSError:
        return 0.0


# ------------------------------------------------------------------------------------------


def run_baseline(config: BaselineConfig, progress: bool = True) -> dict:
    """Train (or just prompt) ``config.method`` on the device's own CPU and score it.

    Returns the :data:`RESULT_KEYS` dict: accuracies on validation and test, the zero-shot
    accuracy of the untouched backbone on the same test samples, 32 bits (nothing is quantized),
    0 bytes sent (on-device training sends nothing), the trainable parameter count, training
    seconds (``train_s``; ``s_per_sample`` = ``train_s`` / samples seen over all epochs) and this
    process's peak RSS.
    """
    import gc

    import torch

    from mobiflower.platform.assets import resolve_model
    from mobiflower.platform.data import task_samples

    if config.threads:
        torch.set_num_threads(config.threads)
    quiet_transformers()
    path = resolve_model(config.model)
    splits = task_samples(config.train_samples, config.validation_samples, config.test_samples, config.seed)
    lr = config.resolved_lr

    if config.method == "zero-shot":
        from mobiflower.platform.backbone import Backbone

        backbone = Backbone.load(config.model, num_taps=1, max_length=config.max_length)
        validation = zero_shot_accuracy(backbone, splits.validation)
        key = (config.model, path, _mtime(path), tuple(e.id for e in splits.test), config.max_length)
        test = _ZERO_SHOT_CACHE.get(key)
        if test is None:
            test = _ZERO_SHOT_CACHE[key] = zero_shot_accuracy(backbone, splits.test)
        del backbone
        return _result(
            config,
            test_accuracy=test,
            zero_shot=test,
            validation=validation,
            trainable=0,
            train_s=0.0,
            samples_seen=0,
            lr=None,
            epochs=0,
        )

    zero_shot = _zero_shot_cached(config.model, path, splits.test, config.max_length)
    gc.collect()

    tokenizer = load_tokenizer(path)
    grid = config.lrs or (lr,)
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    train_s = 0.0
    for trial_lr in grid:
        model, trial, state, seconds = _train_trial(
            config, path, tokenizer, splits, trial_lr, progress, select=bool(config.lrs)
        )
        train_s += seconds
        trials += trial
        # tuned: the best epoch on validation; untuned: the last epoch, as trained
        top = max(trial, key=lambda t: (t["validation_accuracy"], -t["epoch"])) if config.lrs else trial[-1]
        if best is None or top["validation_accuracy"] > best["validation_accuracy"]:
            best = {**top, "state": state, "model": model, "trainable": count_trainable(model)}
        else:
            del model
        gc.collect()
    assert best is not None
    model = best["model"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in best["state"]:
                param.copy_(best["state"][name])
    test = classifier_accuracy(model, tokenizer, splits.test, config.max_length)
    result = _result(
        config,
        test_accuracy=test,
        zero_shot=zero_shot,
        validation=best["validation_accuracy"],
        trainable=best["trainable"],
        train_s=train_s,
        samples_seen=len(splits.train) * config.epochs * len(grid),
        lr=best["lr"],
        epochs=best["epoch"],
        train_samples=len(splits.train),
    )
    if config.lrs:
        result["tuning"] = {
            "grid": {"lrs": list(config.lrs), "epochs": list(range(1, config.epochs + 1))},
            "trials": trials,
            "selected": {"lr": best["lr"], "epochs": best["epoch"]},
            "rule": "highest validation accuracy (ties: fewer epochs); test scored once, on it",
        }
    return result


def _train_trial(config: BaselineConfig, path: str, tokenizer, splits, lr: float, progress: bool, select: bool):
    """Train ``config.method`` at ``lr`` for ``config.epochs`` epochs; the validation accuracy after each
    epoch, and the trainable weights after the best one (``select``) or the last."""
    import torch
    from tqdm.auto import tqdm

    model = build_classifier(
        path,
        config.method,
        tokenizer,
        seed=config.train_seed,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_targets=config.lora_targets,
    )
    optimizer = make_optimizer(model, config.method, lr)
    train = list(splits.train)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = round(config.warmup_frac * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(total, warmup))
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(
        total=total,
        desc=f"{config.method} lr {lr:g} ({Path(str(config.model)).name})",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    torch.manual_seed(config.train_seed)  # dropout
    model.train()
    trials, state, seconds = [], None, 0.0
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        order = list(train)
        random.Random(config.train_seed * 1000003 + epoch).shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = train_step(model, tokenizer, batch, params, optimizer, config.max_length, scheduler)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
        seconds += time.perf_counter() - t0
        validation = classifier_accuracy(model, tokenizer, splits.validation, config.max_length)
        if state is None or not select or validation > max(t["validation_accuracy"] for t in trials):
            state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trials.append({"lr": lr, "epoch": epoch + 1, "validation_accuracy": validation, "loss": loss})
        if progress:
            bar.write(f"[{config.method}] lr {lr:g} epoch {epoch + 1}: validation accuracy {validation:.4f}")
    bar.close()
    return model, trials, state, seconds


def _result(
    config: BaselineConfig,
    *,
    test_accuracy: float,
    zero_shot: float | None,
    validation: float,
    trainable: int,
    train_s: float,
    samples_seen: int,
    lr: float | None,
    epochs: int,
    train_samples: int | None = None,
) -> dict[str, Any]:
    return {
        "method": config.method,
        "test_accuracy": test_accuracy,
        "zero_shot_accuracy": zero_shot,
        "validation_accuracy": validation,
        "bits": 32,
        "token_policy": None,
        "train_samples": config.train_samples if train_samples is None else train_samples,
        "bytes_sent": 0,
        "trainable_parameters": trainable,
        "train_s": train_s,
        "s_per_sample": train_s / samples_seen if samples_seen else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "lr": lr,
        "epochs": epochs,
        "model": config.model,
        # also written by `mobiflower local`, for side-by-side tables
        "validation_samples": config.validation_samples,
        "test_samples": config.test_samples,
        "bytes_per_sample": 0.0,
        "config": asdict(config),
    }


__all__ = [
    "BaselineConfig",
    "run_baseline",
    "RESULT_KEYS",
    "METHODS",
    "zero_shot_accuracy",
    "classifier_accuracy",
    "build_classifier",
    "load_tokenizer",
    "encode",
    "make_optimizer",
    "lora_targets_for",
    "peak_rss_mb",
    "current_rss_mb",
]
