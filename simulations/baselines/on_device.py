"""On-device baselines in the same harness as side-tuning: zero-shot, LoRA and full fine-tuning, for any task.

Every later comparison needs the same model, the same samples and the same budget as the
side-tuning run (``mobiflower local``), but trained ON the device (backprop through the backbone).
So this module takes its samples from :func:`~mobiflower.platform.data.task_samples` with the same
arguments (or the samples it is given), the task from the same run-config keys
(:class:`~mobiflower.platform.tasks.TaskConfig`: ``task``, ``labels``, ``prompt-template``,
``max-length``), encodes every sample as the side-tuning device does
(:func:`~mobiflower.platform.classifier.encode_examples`: the same token ids, the same scored tokens),
and returns a dict with the keys ``mobiflower local --out`` writes (:func:`result_keys`).

* ``zero-shot``: classification: the causal LM's next-token logits of the labels' first tokens at the
  last real token (:meth:`Backbone.zero_shot_logits`), no training; causal-LM: the backbone's own
  perplexity on the scored tokens.
* ``lora``: PEFT LoRA on ``AutoModelForSequenceClassification`` (task ``SEQ_CLS``: the adapters and the
  classification head ``score`` are trained) or on ``AutoModelForCausalLM`` (``CAUSAL_LM``: the adapters,
  next-token loss on the scored tokens).
* ``full``: every parameter of the same model is trained.

Training: AdamW (weight decay 0.0 for LoRA, 0.01 for full fine-tuning, never on biases and norm
weights), optional linear warm-up then linear decay to 0 over all steps, gradient clipping at 1.0,
shuffled per epoch with the seed. Tuning picks the learning rate and epochs by the task's primary
metric on validation (accuracy: highest; perplexity: lowest). Heavy imports (torch, transformers,
peft) happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mobiflower.platform.classifier import (  # noqa: F401  (re-exported: the baselines' public helpers)
    DEFAULT_WEIGHT_DECAY,
    EVAL_BATCH_SIZE,
    build_classifier,
    classifier_accuracy,
    count_trainable,
    encode,
    encode_examples,
    evaluate_task,
    load_tokenizer,
    lora_targets_for,
    make_optimizer,
    quiet_transformers,
    train_step,
)
from mobiflower.platform.process_memory import current_rss_mb, peak_rss_mb  # noqa: F401  (re-exported)
from mobiflower.platform.run_summary import metric_key
from mobiflower.platform.tasks import BUNDLED_TASK, DEFAULT_LABELS, DEFAULT_TEMPLATE, Task, TaskConfig

METHODS = ("lora", "full", "zero-shot")
DEFAULT_LR = {"lora": 5e-4, "full": 2e-5}

_COMMON_KEYS = (
    "method",
    "task",
    "metrics",
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


def result_keys(task: Task) -> tuple[str, ...]:
    """The keys of :func:`run_baseline`'s result for ``task``: ``test_<m>``, ``zero_shot_<m>`` and
    ``validation_<m>`` for each of the task's metrics (classification: ``accuracy``, ``macro_f1``;
    causal-LM: ``perplexity``, ``loss``, ``token_accuracy``), ``test_count`` / ``validation_count`` (what
    the metrics are over: samples, or scored tokens), ``task`` and ``metrics`` (``primary``, ``names``,
    ``higher_is_better``: as a side-tuning summary names them), and the run's cost and settings."""
    names = [metric_key(m) for m in task.metric_names]
    keys = [f"{split}_{m}" for split in ("test", "zero_shot", "validation") for m in names]
    return (*keys, "test_count", "validation_count", *_COMMON_KEYS)


RESULT_KEYS = result_keys(BUNDLED_TASK)
"""The keys of :func:`run_baseline`'s result for the bundled job (the keys ``mobiflower local --out`` writes)."""


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
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] | None = None  # None: q_proj/v_proj (llama, qwen2, opt), c_attn (gpt2)
    max_length: int = 256  # the task's max-length: tokens per sample
    threads: int | None = None
    # Tuning on validation (the default for `mobiflower local --baseline`): every learning rate of ``lrs``
    # trains ``epochs`` epochs (linear decay over all of them); after each epoch the task's primary metric
    # is taken on validation, and the (lr, epoch) with the best one is what is scored on test. Empty:
    # ``lr`` alone, and the last epoch.
    lrs: tuple[float, ...] = ()
    # LoRA only: start from these trainable tensors (safetensors, e.g. a federated LoRA run's
    # ``adapter.safetensors``) instead of a fresh adapter: federated LoRA then a local fine-tune per user,
    # the usual personalized-FL baseline. None: a fresh adapter.
    init_adapter: str | None = None
    # the task (the run config's task keys, as TaskConfig reads them)
    task: str = "classification"
    labels: str = DEFAULT_LABELS
    prompt_template: str = DEFAULT_TEMPLATE

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
        if self.init_adapter is not None and self.method != "lora":
            raise ValueError(f"init_adapter starts LoRA from given adapters: method={self.method!r} has none")
        self.lrs = tuple(float(lr) for lr in self.lrs)
        if any(not lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs={self.lrs}: every learning rate must be positive")
        self.task_config.build()  # a misconfigured task fails here (TaskError, a ValueError)

    @classmethod
    def with_task(cls, method: str, run_config: Mapping[str, Any], **fields: Any) -> "BaselineConfig":
        """A config whose task keys come from a run config (``task``, ``labels``, ``prompt-template``,
        ``max-length``), the other fields as given."""
        keys = TaskConfig.from_run_config(run_config)
        return cls(
            method,
            **fields,
            task=keys.task,
            labels=keys.labels,
            prompt_template=keys.prompt_template,
            max_length=keys.max_length,
        )

    @property
    def task_config(self) -> TaskConfig:
        return TaskConfig(self.task, self.labels, self.prompt_template, self.max_length)

    @property
    def resolved_lr(self) -> float | None:
        if self.method == "zero-shot":
            return None
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]


def lora_fields(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The LoRA shape a benchmark's ``-c`` keys give (``lora-r``, ``lora-alpha``, ``lora-target-modules``) as
    :class:`BaselineConfig` fields, only for the keys present: so that a baseline's LoRA gets the same shape as
    the tail's when a comparison sets one, and its own defaults otherwise."""
    fields: dict[str, Any] = {}
    if "lora-r" in run_config:
        fields["lora_r"] = int(run_config["lora-r"])
    if "lora-alpha" in run_config:
        fields["lora_alpha"] = float(run_config["lora-alpha"])
    if "lora-target-modules" in run_config:
        fields["lora_targets"] = tuple(
            t.strip() for t in str(run_config["lora-target-modules"]).split(",") if t.strip()
        )
    return fields


def _linear_schedule(total: int, warmup: int):
    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return fn


def rank_value(task: Task, value: float | None) -> float:
    """A metric value of the task's primary metric as "higher is better" (missing or NaN: the worst)."""
    if value is None or not math.isfinite(float(value)):
        return -math.inf
    return float(value) if task.higher_is_better else -float(value)


def zero_shot_accuracy(backbone, examples: Sequence, batch_size: int = EVAL_BATCH_SIZE, task: Task = BUNDLED_TASK):
    """Prompted classification: argmax over the labels' first-token logits at the last real token; the
    task's scores (``.result()``: accuracy and macro-F1)."""
    import torch

    scores = task.scores()
    if not examples:
        return scores
    ids = backbone.verbalizer_ids(task.verbalizers)
    ordered = sorted(examples, key=lambda e: len(e.text))
    for start in range(0, len(ordered), batch_size):
        batch = ordered[start : start + batch_size]
        enc = backbone.tokenize([task.render(e.text) for e in batch])
        mask = enc["attention_mask"]
        final = backbone.forward_taps(
            enc["input_ids"], mask, lambda _layer, _hidden: None, layers=[backbone.num_layers - 1], need_final=True
        )
        positions = backbone.feature_positions(mask)
        with torch.inference_mode():
            logits = backbone.zero_shot_logits(final[torch.arange(len(batch)), positions], ids)
        scores.add(logits, torch.tensor([int(e.label) for e in batch]))
    return scores


_ZERO_SHOT_CACHE: dict[tuple, Any] = {}


def zero_shot_scores(model: str, path: str, task: Task, examples: Sequence):
    """The untouched backbone's scores on ``examples`` (None: an encoder, no prompted classification),
    computed once per (model, weights, task, samples) in this process. Classification: prompted with the
    labels' first tokens; causal-LM: the backbone's own next-token loss on the same scored tokens."""
    key = (model, path, _mtime(path), task, tuple(examples))
    if key not in _ZERO_SHOT_CACHE:
        if task.name == "classification":
            from mobiflower.platform.backbone import Backbone

            backbone = Backbone.load(model, num_taps=1, max_length=task.max_length)
            if not backbone.is_decoder:
                return None  # an encoder has no next-token head: no prompted baseline
            _ZERO_SHOT_CACHE[key] = zero_shot_accuracy(backbone, examples, task=task)
        else:
            import torch
            from transformers import AutoModelForCausalLM

            quiet_transformers()
            lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            _ZERO_SHOT_CACHE[key] = evaluate_task(lm, load_tokenizer(path), examples, task)
    return _ZERO_SHOT_CACHE[key]


def _mtime(path: str) -> float:
    try:
        return max((p.stat().st_mtime for p in Path(path).glob("*.safetensors")), default=0.0)
    except OSError:
        return 0.0


def _named(prefix: str, scores, task: Task) -> dict[str, Any]:
    """``{prefix_<metric>: value}`` of a task's scores (None: every metric None), plus what they are over,
    ``prefix_count`` (samples, or scored tokens; not for zero-shot: the same as test's)."""
    values = scores.result() if scores is not None else {}
    out: dict[str, Any] = {f"{prefix}_{metric_key(m)}": values.get(m) for m in task.metric_names}
    if prefix != "zero_shot":
        out[f"{prefix}_count"] = scores.count if scores is not None else 0
    return out


# ------------------------------------------------------------------------------------------


def run_baseline(config: BaselineConfig, progress: bool = True, splits=None) -> dict:
    """Train (or just prompt) ``config.method`` on the device's own CPU and score it for the config's task.

    ``splits`` (train / validation / test :class:`Example` lists): the samples to use; default the
    bundled samples :func:`~mobiflower.platform.data.task_samples` draws with the config's counts and
    seed. Returns the :func:`result_keys` dict: the task's metrics on validation and test, the untouched
    backbone's on the same test samples (``zero_shot_<metric>``), 32 bits (nothing is quantized), 0 bytes
    sent (on-device training sends nothing), the trainable parameter count, training seconds
    (``train_s``; ``s_per_sample`` = ``train_s`` / samples seen over all epochs) and this process's peak RSS.
    """
    import gc

    import torch

    from mobiflower.platform.data import task_samples
    from mobiflower.platform.hf_model import resolve_model

    if config.threads:
        torch.set_num_threads(config.threads)
    quiet_transformers()
    task = config.task_config.build()
    path = resolve_model(config.model)
    if splits is None:
        splits = task_samples(config.train_samples, config.validation_samples, config.test_samples, config.seed)
    if config.method == "zero-shot":
        return _zero_shot_result(config, task, path, splits)

    zero_shot = zero_shot_scores(config.model, path, task, splits.test)
    gc.collect()
    tokenizer = load_tokenizer(path)
    best, trials, train_s = _tune(config, task, path, tokenizer, splits, progress)
    model = best["model"]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in best["state"]:
                param.copy_(best["state"][name])
    test = evaluate_task(model, tokenizer, splits.test, task)
    metrics = {**_named("test", test, task), **_named("zero_shot", zero_shot, task)}
    metrics.update({k: v for k, v in best.items() if k.startswith("validation_")})
    grid = config.lrs or (config.resolved_lr,)
    result = _result(
        config,
        task,
        metrics,
        splits,
        trainable=best["trainable"],
        train_s=train_s,
        samples_seen=len(splits.train) * config.epochs * len(grid),
        lr=best["lr"],
        epochs=best["epoch"],
    )
    if config.lrs:
        result["tuning"] = {
            "grid": {"lrs": list(config.lrs), "epochs": list(range(1, config.epochs + 1))},
            "trials": trials,
            "selected": {"lr": best["lr"], "epochs": best["epoch"]},
            "rule": f"{'highest' if task.higher_is_better else 'lowest'} validation {task.primary} "
            "(ties: fewer epochs); test scored once, on it",
        }
    return result


def _zero_shot_result(config: BaselineConfig, task: Task, path: str, splits) -> dict[str, Any]:
    """The untouched backbone's figures: its test scores are both ``test_<m>`` and ``zero_shot_<m>``."""
    validation = zero_shot_scores(config.model, path, task, splits.validation)
    test = zero_shot_scores(config.model, path, task, splits.test)
    metrics = {**_named("test", test, task), **_named("zero_shot", test, task)}
    metrics.update(_named("validation", validation, task))
    return _result(config, task, metrics, splits, trainable=0, train_s=0.0, samples_seen=0, lr=None, epochs=0)


def _tune(config: BaselineConfig, task: Task, path: str, tokenizer, splits, progress: bool):
    """Every learning rate of the grid (or the one lr); the best (lr, epoch) by the task's primary metric
    on validation (untuned: the last epoch) with its model and weights, all trials, training seconds."""
    import gc

    key = f"validation_{metric_key(task.primary)}"
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    train_s = 0.0
    for lr in config.lrs or (config.resolved_lr,):
        model, trial, state, seconds = _train_trial(
            config, task, path, tokenizer, splits, lr, progress, select=bool(config.lrs)
        )
        train_s += seconds
        trials += trial
        # tuned: the best epoch on validation; untuned: the last epoch, as trained
        top = max(trial, key=lambda t: (rank_value(task, t[key]), -t["epoch"])) if config.lrs else trial[-1]
        if best is None or rank_value(task, top[key]) > rank_value(task, best[key]):
            best = {**top, "state": state, "model": model, "trainable": count_trainable(model)}
        else:
            del model
        gc.collect()
    assert best is not None
    return best, trials, train_s


def _start_training(config: BaselineConfig, task: Task, path: str, tokenizer, lr: float, samples: int):
    """The model to train at ``lr``, its optimizer, the linear schedule over all epochs, the trainable
    parameters and the step count."""
    import torch

    model = build_classifier(
        path,
        config.method,
        tokenizer,
        task=task,
        seed=config.train_seed,
        lora_r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        lora_targets=config.lora_targets,
    )
    if config.init_adapter:
        from safetensors.torch import load_file

        from mobiflower.simulations.baselines.lora_model import load_trainable

        load_trainable(model, load_file(config.init_adapter))  # refuses an adapter of another shape
    optimizer = make_optimizer(model, config.method, lr)
    total = math.ceil(samples / config.batch_size) * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _linear_schedule(total, round(config.warmup_frac * total)))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, optimizer, scheduler, params, total


def _train_trial(
    config: BaselineConfig, task: Task, path: str, tokenizer, splits, lr: float, progress: bool, select: bool
):
    """Train ``config.method`` at ``lr`` for ``config.epochs`` epochs; the validation metrics after each
    epoch, and the trainable weights after the best one by the task's primary metric (``select``) or the last."""
    import torch
    from tqdm.auto import tqdm

    train = list(splits.train)
    model, optimizer, scheduler, params, total = _start_training(config, task, path, tokenizer, lr, len(train))
    bar = tqdm(
        total=total,
        desc=f"{config.method} lr {lr:g} ({Path(str(config.model)).name})",
        unit="step",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    key = f"validation_{metric_key(task.primary)}"
    torch.manual_seed(config.train_seed)  # dropout
    model.train()
    trials: list[dict[str, Any]] = []
    state, seconds = None, 0.0
    for epoch in range(config.epochs):
        t0 = time.perf_counter()
        order = list(train)
        random.Random(config.train_seed * 1000003 + epoch).shuffle(order)
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = train_step(model, tokenizer, batch, params, optimizer, scheduler=scheduler, task=task)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch + 1)
        seconds += time.perf_counter() - t0
        validation = _named("validation", evaluate_task(model, tokenizer, splits.validation, task), task)
        if (
            state is None
            or not select
            or rank_value(task, validation[key]) > max(rank_value(task, t[key]) for t in trials)
        ):
            state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        trials.append({"lr": lr, "epoch": epoch + 1, **validation, "loss": loss})
        if progress:
            bar.write(f"[{config.method}] lr {lr:g} epoch {epoch + 1}: validation {task.primary} {validation[key]:.4f}")
    bar.close()
    return model, trials, state, seconds


def _result(
    config: BaselineConfig,
    task: Task,
    metrics: dict[str, Any],
    splits,
    *,
    trainable: int,
    train_s: float,
    samples_seen: int,
    lr: float | None,
    epochs: int,
) -> dict[str, Any]:
    return {
        "method": config.method,
        "task": task.name,
        # the task's metrics (tuning chose by the primary one), named as a side-tuning summary names them
        "metrics": {
            "primary": task.primary,
            "names": list(task.metric_names),
            "higher_is_better": task.higher_is_better,
        },
        **metrics,
        "bits": 32,
        "token_policy": None,
        "train_samples": len(splits.train),
        "bytes_sent": 0,
        "trainable_parameters": trainable,
        "train_s": train_s,
        "s_per_sample": train_s / samples_seen if samples_seen else 0.0,
        "peak_rss_mb": peak_rss_mb(),
        "lr": lr,
        "epochs": epochs,
        "model": config.model,
        # also written by `mobiflower local`, for side-by-side tables
        "validation_samples": len(splits.validation),
        "test_samples": len(splits.test),
        "bytes_per_sample": 0.0,
        "config": asdict(config),
    }


__all__ = [
    "BaselineConfig",
    "lora_fields",
    "run_baseline",
    "RESULT_KEYS",
    "result_keys",
    "metric_key",
    "METHODS",
    "zero_shot_accuracy",
    "zero_shot_scores",
    "evaluate_task",
    "encode_examples",
    "classifier_accuracy",
    "build_classifier",
    "load_tokenizer",
    "encode",
    "make_optimizer",
    "lora_targets_for",
    "peak_rss_mb",
    "current_rss_mb",
]
