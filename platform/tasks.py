"""What the fleet fine-tunes *for*: a task says what a sample becomes on the device, what a frame carries,
which head ends the side network, the loss, the metrics and what inference returns.

Two tasks (docs/concepts.md §8; docs/tasks-and-data.md):

* ``classification``: a prompt template with a ``{text}`` slot, any number of named labels; a frame
  carries one class id per sample; the side network ends in a trainable classification head; the loss
  is cross-entropy; metrics accuracy and macro-F1; inference returns a label.
* ``causal-lm``: next-token loss on every real token of a text, or on the completion's tokens only
  when a sample has a prompt and a completion (the prompt is still forwarded: its states feed the
  tail's attention), or on the assistant turns of a chat (a list of messages, rendered with the
  tokenizer's chat template); a frame carries the next token id of every sent position (``-100``
  where the loss skips it); the side network ends in the backbone's frozen final norm and LM head;
  metrics mean token cross-entropy, perplexity and next-token top-1 accuracy over scored tokens;
  inference generates text.

Everything else in the pipeline asks the task instead of assuming one of them. Flower-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mobiflower.platform.frames import IGNORE_INDEX
from mobiflower.platform.run_config import typed_fields

TASKS = ("classification", "causal-lm")
DEFAULT_TEMPLATE = "Review: {text}\nSentiment (positive or negative):"
"""The bundled sentiment job's prompt: zero-shot, side-tuning and baselines all see it."""
DEFAULT_LABELS = "negative,positive"


class TaskError(ValueError):
    """A task is misconfigured, or a sample does not fit it; the message says what to change."""


@dataclass(frozen=True)
class Example:
    """One sample of a device's data, as the task reads it. ``id`` is stable (frames name samples by it).

    Classification reads ``text`` and ``label`` (an index into the task's labels). Causal-LM reads
    ``messages`` (chat) if given, else ``prompt`` + ``completion`` if a completion is given, else
    ``text``. ``user`` is who wrote it (natural partitioning: one device per user)."""

    id: int
    text: str = ""
    label: int = -1
    prompt: str = ""
    completion: str = ""
    messages: tuple[tuple[str, str], ...] = ()
    user: str = ""


@dataclass(frozen=True)
class TaskConfig:
    """The run-config keys of the task (the same on the server and on every device)."""

    task: str = "classification"
    labels: str = DEFAULT_LABELS  # classification: label names, comma-separated, in label-id order
    prompt_template: str = DEFAULT_TEMPLATE  # classification: the prompt, with a {text} slot
    max_length: int = 256  # tokens per sample the device forwards (longer samples are truncated)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> "TaskConfig":
        return cls(**typed_fields(cls, run_config, error=TaskError))

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise TaskError(f"task={self.task!r} is unknown: use one of {', '.join(TASKS)}")
        if self.max_length < 2:
            raise TaskError(f"max-length={self.max_length} must be at least 2 tokens")
        if self.task == "classification":
            names = self.label_names
            if len(names) < 2 or len(set(names)) != len(names) or not all(names):
                raise TaskError(
                    f"labels={self.labels!r} must name at least two distinct labels, comma-separated "
                    '(e.g. labels = "negative,positive")'
                )
            if "{text}" not in self.prompt_template:
                raise TaskError(f"prompt-template={self.prompt_template!r} needs a {{text}} slot for the sample's text")

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.labels.split(","))

    def build(self) -> "Task":
        if self.task == "classification":
            return ClassificationTask(self.label_names, self.prompt_template, self.max_length)
        return CausalLMTask(self.max_length)


# ---- what a sample becomes on the device ---------------------------------------------------------
Segment = tuple[str, bool]
"""A piece of a sample's text and whether the loss scores its tokens."""
ChatRenderer = Callable[[Sequence[tuple[str, str]], bool], str]
"""``(messages, add_generation_prompt) -> text``: the tokenizer's chat template."""


@dataclass(frozen=True)
class Encoded:
    """A sample's token ids (truncated to the task's max length) and, for causal-LM, which of them the
    loss predicts (``scored[j]``: token ``j`` is a target, predicted from position ``j - 1``)."""

    ids: list[int]
    scored: list[bool] = field(default_factory=list)

    def next_token_targets(self, count: int) -> list[int]:
        """The target of each of the first ``count`` positions: the next token where it is scored,
        else ``-100`` (also past the sample's end: padding sent under token policy ``all``)."""
        n = len(self.ids)
        return [self.ids[j + 1] if j + 1 < n and self.scored[j + 1] else IGNORE_INDEX for j in range(count)]


def join_segments(pieces: Sequence[tuple[list[int], bool]], max_length: int) -> Encoded:
    """Token ids of consecutive segments, concatenated and cut to ``max_length`` (the start is kept)."""
    ids: list[int] = []
    scored: list[bool] = []
    for piece, is_scored in pieces:
        ids += list(piece)
        scored += [is_scored] * len(piece)
    return Encoded(ids[:max_length], scored[:max_length])


def chat_segments(messages: Sequence[tuple[str, str]], render: ChatRenderer) -> list[Segment]:
    """A chat as segments: each assistant turn's content (up to the next turn) is scored, everything
    else (system and user turns, the template's role headers) is context. Rendered prefix by prefix
    with the template, so its own markup lands where it would for the whole chat."""
    segments: list[Segment] = []
    done = ""
    for i, (role, _content) in enumerate(messages):
        if role == "assistant":
            header = render(messages[:i], True)
            if not header.startswith(done):
                raise TaskError("the chat template does not render a chat's turns as prefixes of the whole chat")
            segments.append((header[len(done) :], False))
            done = header
        full = render(messages[: i + 1], False)
        if not full.startswith(done):
            raise TaskError("the chat template does not render a chat's turns as prefixes of the whole chat")
        segments.append((full[len(done) :], role == "assistant"))
        done = full
    return [s for s in segments if s[0]]


def chat_renderer(tokenizer) -> ChatRenderer | None:
    """A transformers tokenizer's chat template as a :data:`ChatRenderer` (None: it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: Sequence[tuple[str, str]], add_generation_prompt: bool) -> str:
        chat = [{"role": role, "content": content} for role, content in messages]
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)

    return render


def encode_samples(
    task: "Task",
    examples: Sequence[Example],
    prompt_ids: Callable[[list[str]], list[list[int]]],
    segment_ids: Callable[[list[str]], list[list[int]]],
    render_chat: Callable[[], ChatRenderer | None] = lambda: None,
) -> list[Encoded]:
    """Each example as ``task`` makes it: token ids and (causal-LM) which the loss scores. The one encoding
    the device's frames, its own evaluation and the on-device baselines share, whatever tokenizer call
    they pass: ``prompt_ids`` (a classification prompt, special tokens as the tokenizer adds them; the
    last ``max_length`` kept, where the task is stated), ``segment_ids`` (no special tokens, untruncated;
    the joined sample is cut to ``max_length`` from its start) and ``render_chat`` (asked only for chats)."""
    if task.name == "classification":
        ids = prompt_ids([task.render(e.text) for e in examples])
        return [Encoded(list(x[-task.max_length :])) for x in ids]
    render = render_chat() if any(e.messages for e in examples) else None
    segments = [task.segments(e, render) for e in examples]
    ids = segment_ids([text for segs in segments for text, _ in segs])
    out, at = [], 0
    for segs in segments:
        out.append(join_segments([(ids[at + i], scored) for i, (_, scored) in enumerate(segs)], task.max_length))
        at += len(segs)
    return out


# ---- the tasks -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassificationTask:
    """A label per sample from a prompt with the sample's text in it."""

    labels: tuple[str, ...] = tuple(DEFAULT_LABELS.split(","))
    template: str = DEFAULT_TEMPLATE
    max_length: int = 256
    name: str = "classification"
    head: str = "classification"  # the side network's head (SideNetworkConfig.head)
    targets: str = "class"  # what a frame carries (targets.kind)
    token_policy: str = "last"  # the fewest tokens the loss needs (the tail sends every real token anyway)
    metric_names: tuple[str, ...] = ("accuracy", "macro-f1")
    primary: str = "accuracy"  # the metric progress lines, curves and comparisons use (higher is better)
    higher_is_better: bool = True

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def verbalizers(self) -> tuple[str, ...]:
        """Continuations whose next-token logits give the zero-shot prediction (`` negative``...)."""
        return tuple(" " + name for name in self.labels)

    def render(self, text: str) -> str:
        return self.template.format(text=text.strip())

    def segments(self, example: Example, render_chat: ChatRenderer | None = None) -> list[Segment]:
        return [(self.render(example.text), False)]

    def check(self, example: Example) -> None:
        if not 0 <= example.label < self.num_classes:
            raise TaskError(
                f"sample {example.id} has label {example.label}, outside the task's {self.num_classes} labels "
                f"{list(self.labels)}"
            )

    def frame_targets(self, examples: Sequence[Example], encoded: Sequence[Encoded], counts: Sequence[int]) -> dict:
        return {"kind": "class", "values": [int(e.label) for e in examples], "num_classes": self.num_classes}

    def scores(self) -> "ClassScores":
        return ClassScores(self.num_classes)


@dataclass(frozen=True)
class CausalLMTask:
    """Next-token prediction on a text, a completion, or a chat's assistant turns."""

    max_length: int = 256
    name: str = "causal-lm"
    head: str = "lm"
    targets: str = "tokens"
    token_policy: str = "nonpad"
    metric_names: tuple[str, ...] = ("perplexity", "loss", "token-accuracy")
    primary: str = "perplexity"
    higher_is_better: bool = False
    labels: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return 0

    def segments(self, example: Example, render_chat: ChatRenderer | None = None) -> list[Segment]:
        if example.messages:
            if render_chat is None:
                raise TaskError("a chat sample needs the tokenizer's chat template, and this tokenizer has none")
            return chat_segments(example.messages, render_chat)
        if example.completion:
            return [(example.prompt, False), (example.completion, True)]
        return [(example.text, True)]

    def check(self, example: Example) -> None:
        if not (example.messages or example.completion or example.text.strip()):
            raise TaskError(f"sample {example.id} has no text to learn from")
        if example.messages and not any(role == "assistant" for role, _ in example.messages):
            raise TaskError(f"chat sample {example.id} has no assistant turn for the loss to score")

    def frame_targets(self, examples: Sequence[Example], encoded: Sequence[Encoded], counts: Sequence[int]) -> dict:
        """One target per sent token (``counts[i]`` of sample ``i``): its next token, or -100."""
        values: list[int] = []
        for enc, count in zip(encoded, counts):
            values += enc.next_token_targets(count)
        return {"kind": "tokens", "values": values}

    def scores(self) -> "TokenScores":
        return TokenScores()


Task = ClassificationTask | CausalLMTask
BUNDLED_TASK = ClassificationTask()
"""The bundled sentiment job's task (the run config's defaults)."""


def task_of_config(extra: Mapping[str, Any]) -> Task:
    """The task a side network was trained for, from its config's ``extra["task"]`` (run-config keys);
    the bundled job's task for a network saved before tasks were recorded."""
    keys = extra.get("task") if isinstance(extra, Mapping) else None
    return TaskConfig.from_run_config(keys).build() if isinstance(keys, Mapping) else BUNDLED_TASK


def task_of_head(head: str, num_classes: int) -> Task:
    """The task a side network's head serves (what a delivered network or adapter says it does)."""
    if head == "lm":
        return CausalLMTask()
    return ClassificationTask(labels=tuple(f"label-{i}" for i in range(num_classes)))


# ---- loss and metrics ------------------------------------------------------------------------------
def scored_targets(targets: torch.Tensor) -> torch.Tensor:
    """The targets an LM loss scores (``[B, T]`` with -100 where skipped), flattened in row order."""
    return targets[targets != IGNORE_INDEX]


def task_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy: ``logits [B, classes]`` against class ids ``[B]``, or LM logits of the scored
    positions ``[N, vocab]`` against ``[B, T]`` next-token targets (-100 skipped), or full LM logits
    ``[B, T, vocab]`` against the same."""
    if logits.dim() == 2 and targets.dim() == 1:
        return F.cross_entropy(logits, targets)
    if logits.dim() == 3:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    scored = scored_targets(targets)
    if scored.numel() != logits.shape[0]:
        raise TaskError(f"{logits.shape[0]} scored logits for {scored.numel()} scored targets")
    return F.cross_entropy(logits, scored)


class ClassScores:
    """Accuracy and macro-F1 from a confusion matrix (rows: true label, columns: predicted)."""

    def __init__(self, num_classes: int):
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        pred = logits.argmax(-1).cpu()
        k = self.confusion.shape[0]
        self.confusion += torch.bincount(targets.cpu() * k + pred, minlength=k * k).view(k, k)

    @property
    def count(self) -> int:
        return int(self.confusion.sum())

    def result(self) -> dict[str, float]:
        c = self.confusion.double()
        n = float(c.sum())
        tp = c.diag()
        precision = tp / c.sum(0).clamp(min=1)
        recall = tp / c.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros_like(tp))
        present = (c.sum(1) + c.sum(0)) > 0  # labels neither held nor predicted do not count
        return {
            "accuracy": float(tp.sum() / n) if n else math.nan,
            "macro-f1": float(f1[present].mean()) if n and present.any() else math.nan,
        }


class TokenScores:
    """Mean token cross-entropy, perplexity and next-token top-1 accuracy over scored tokens."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = 0
        self.tokens = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """``logits`` of the scored positions ``[N, vocab]`` (or ``[B, T, vocab]``), ``targets [B, T]``."""
        if logits.dim() == 3:
            logits = logits[targets != IGNORE_INDEX]
        scored = scored_targets(targets).to(logits.device)
        self.loss_sum += float(F.cross_entropy(logits.float(), scored, reduction="sum"))
        self.correct += int((logits.argmax(-1) == scored).sum())
        self.tokens += int(scored.numel())

    @property
    def count(self) -> int:
        return self.tokens

    def result(self) -> dict[str, float]:
        if not self.tokens:
            return {"perplexity": math.nan, "loss": math.nan, "token-accuracy": math.nan}
        loss = self.loss_sum / self.tokens
        return {"perplexity": math.exp(min(loss, 700.0)), "loss": loss, "token-accuracy": self.correct / self.tokens}


def combine_metrics(task: Task, parts: Sequence[tuple[Mapping[str, float], float]]) -> dict[str, float]:
    """A fleet's metrics from its devices' ``(metrics, count)``: each metric weighted by its device's count
    (samples, or scored tokens); a causal-LM's perplexity is ``exp`` of the combined loss, not a mean of
    perplexities. Devices without a metric (NaN) are left out of it."""
    out: dict[str, float] = {}
    for name in task.metric_names:
        if name == "perplexity":
            continue
        rows = [(float(m[name]), w) for m, w in parts if name in m and math.isfinite(float(m[name])) and w > 0]
        total = sum(w for _, w in rows)
        out[name] = sum(v * w for v, w in rows) / total if total else math.nan
    if "perplexity" in task.metric_names:
        out["perplexity"] = math.exp(min(out["loss"], 700.0)) if math.isfinite(out.get("loss", math.nan)) else math.nan
    return {name: out[name] for name in task.metric_names}


__all__ = [
    "TASKS",
    "DEFAULT_TEMPLATE",
    "TaskError",
    "Example",
    "TaskConfig",
    "Encoded",
    "join_segments",
    "chat_segments",
    "chat_renderer",
    "encode_samples",
    "ClassificationTask",
    "CausalLMTask",
    "Task",
    "BUNDLED_TASK",
    "task_of_config",
    "task_of_head",
    "task_loss",
    "scored_targets",
    "ClassScores",
    "TokenScores",
    "combine_metrics",
]
