"""What the strategy takes from a device's replies, checked before it is used.

A device may be buggy or hostile, and its replies steer the run: a profile sizes the side network
and plans the requests, forward metrics feed the accounting, the virtual clock and the bandwidth
policy, evaluation metrics weight the fleet's figures, residuals become gradients. So every value
the strategy reads of a reply is checked here for type, range, size and finiteness, and comes back
as the reply's own dataclass (:class:`~mobiflower.platform.messages.ProfileReply`,
:class:`~mobiflower.platform.messages.ForwardReply` ...) holding checked values only. A reply that
fails raises :class:`ReplyError` naming the message and the field; the strategy marks that request
failed, counts it per device and reason in the run summary, and goes on. Frames themselves are
checked by :class:`~mobiflower.platform.intake.FrameIntake`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from flwr.app import Message, RecordDict

from mobiflower.platform import messages as m
from mobiflower.platform.frames import FrameLimits
from mobiflower.platform.tasks import Task

MAX_SPLIT_SAMPLES = 1 << 20  # samples of one split a device may hold (each is planned into requests)
MAX_SECONDS = 1e6  # a measured time in a reply
MAX_MB = 1e7  # a memory figure in a reply
MAX_ENTRIES = 64  # entries of a reply's metrics record (honest ones hold about ten)
MAX_TEXT = 4096  # characters of a name or path in a reply
MAX_LAYERS = 4096  # blocks of a backbone
MAX_VOCAB = 1 << 22  # rows of a frozen LM head
MAX_LABELS = 1024  # entries of a profile's label shares
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "macro-f1": (0.0, 1.0),
    "token-accuracy": (0.0, 1.0),
    "loss": (0.0, math.inf),  # mean cross-entropy: finite, never negative
    "perplexity": (1.0, math.inf),  # exp of a loss: finite, at least 1
}
"""What each task metric can be, by its meaning (a metric not named here: any finite number)."""
_LIMITS = FrameLimits()
_FROZEN_RANK = {"final_norm.weight": 1, "final_norm.bias": 1, "lm_head.weight": 2}  # frozen head tensors
_FLOATS = ("float16", "float32", "float64")
_EVALUATE_EXTRAS = ("seconds", "rss-mb", "installed")  # passed along to the summary when finite
_RESIDUAL_SLACK = 1e-3  # residuals p - onehot(y) lie in [-1, 1]; float rounding aside
_SHARE_SLACK = 1e-3  # label shares sum to at most 1; float rounding aside
_PERPLEXITY_SLACK = 1e-4  # log(perplexity) is the loss (capped at 700), up to float rounding


class ReplyError(ValueError):
    """A device reply the strategy must not use: ``kind`` of message, the ``field`` at fault, what was wrong."""

    def __init__(self, kind: str, field: str, message: str):
        self.kind, self.field, self.message = kind, field, message
        super().__init__(f"{kind} reply, {field}: {message}")

    @property
    def reason(self) -> str:
        """What the run summary counts it under (from a fixed vocabulary: message kind and field)."""
        return f"{self.kind}: {self.field}"

    def __reduce__(self):
        return (type(self), (self.kind, self.field, self.message))


def _content(reply: Message, kind: str) -> RecordDict:
    if reply.has_error() or not reply.has_content():
        raise ReplyError(kind, "content", "the reply carries no content")
    return reply.content


def _value(record: Any, key: str, kind: str, field: str) -> Any:
    if key not in record:
        raise ReplyError(kind, field, f"the '{key}' entry is missing")
    return record[key]


def _number(
    record: Any,
    key: str,
    kind: str,
    lo: float,
    hi: float,
    *,
    integer: bool = False,
    default: float | None = None,
    nan: bool = False,
) -> float | int:
    """A scalar in ``[lo, hi]`` (an integer where ``integer``); ``default`` when absent, if given."""
    if default is not None and key not in record:
        return default
    value = _value(record, key, kind, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReplyError(kind, key, f"must be a number, got {type(value).__name__}")
    if integer and not (isinstance(value, int) or (math.isfinite(value) and float(value).is_integer())):
        raise ReplyError(kind, key, f"must be a whole number, got {value!r}")
    if nan and isinstance(value, float) and math.isnan(value):
        return value
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ReplyError(kind, key, f"{value!r} is outside [{lo:g}, {hi:g}]")
    return int(value) if integer else float(value)


def _text(record: Any, key: str, kind: str, longest: int = MAX_TEXT, default: str | None = None) -> str:
    if default is not None and key not in record:
        return default
    value = _value(record, key, kind, key)
    if not isinstance(value, str) or not 0 < len(value) <= longest:
        raise ReplyError(kind, key, f"must be a non-empty string of at most {longest} characters")
    return value


def _flag(record: Any, key: str, kind: str, default: bool | None = None) -> bool:
    if default is not None and key not in record:
        return default
    value = _value(record, key, kind, key)
    if not isinstance(value, bool):
        raise ReplyError(kind, key, f"must be true or false, got {type(value).__name__}")
    return value


def _metrics(content: RecordDict, kind: str, lists: tuple[str, ...] = ()) -> Any:
    """The reply's metrics record: at most MAX_ENTRIES entries, each a single number (``lists`` name the
    entries that may be lists, checked by their reader)."""
    stats = content.metric_records.get(m.STATS_KEY)
    if stats is None:
        raise ReplyError(kind, m.STATS_KEY, f"the reply has no '{m.STATS_KEY}' metrics record")
    if len(stats) > MAX_ENTRIES:
        raise ReplyError(kind, m.STATS_KEY, f"holds {len(stats)} entries, more than {MAX_ENTRIES}")
    for key, value in stats.items():
        if isinstance(value, list) and key not in lists:
            raise ReplyError(kind, m.STATS_KEY, f"entry {key[:64]!r} is a list; every entry is one number")
    return stats


# ---- profile ----------------------------------------------------------------------------------
def profile_reply(reply: Message, num_labels: int | None = None) -> m.ProfileReply:
    """A ``query.profile`` reply: the device's checked description and measurements (the entries the
    strategy reads, as plain values), and its checked frozen head state. ``num_labels``: the task's
    label count, which the device's label shares must match (None: any count up to MAX_LABELS)."""
    kind = "profile"
    content = _content(reply, kind)
    desc = content.config_records.get(m.PROFILE_KEY)
    if desc is None:
        raise ReplyError(kind, m.PROFILE_KEY, f"the reply has no '{m.PROFILE_KEY}' config record")
    stats = _metrics(content, kind, lists=("label-shares",))
    num_layers = _number(desc, "num-layers", kind, 1, MAX_LAYERS, integer=True)
    description: dict[str, Any] = {
        "device-id": _text(desc, "device-id", kind, 128),
        "fingerprint": _text(desc, "fingerprint", kind, 1024),
        "model": _text(desc, "model", kind),
        "layers": _layers(desc, kind, int(num_layers)),
        "is-decoder": _flag(desc, "is-decoder", kind),
        "hidden-size": _number(desc, "hidden-size", kind, 1, _LIMITS.max_hidden, integer=True),
        "num-layers": num_layers,
        "norm-eps": _number(desc, "norm-eps", kind, 1e-30, 1.0),
        "activation-cache": _flag(desc, "activation-cache", kind, default=True),
        "state-defense": _text(desc, "state-defense", kind, 128, default="none"),
    }
    measurements: dict[str, Any] = {
        split: _number(stats, split, kind, 0, MAX_SPLIT_SAMPLES, integer=True)
        for split in ("train", "validation", "test")
    }
    measurements["forward-samples-per-s"] = _number(stats, "forward-samples-per-s", kind, 0, 1e9)
    measurements["rss-mb"] = _number(stats, "rss-mb", kind, 0, MAX_MB)
    if "label-shares" in stats:
        measurements["label-shares"] = _shares(stats, kind, num_labels)
    for key, hi in (("load-s", MAX_SECONDS), ("peak-rss-mb", MAX_MB)):
        if key in stats:
            measurements[key] = _number(stats, key, kind, 0, hi)
    for key in ("cpu-count", "threads", "data-empty", "data-refused", "data-truncated"):
        if key in stats:
            measurements[key] = _number(stats, key, kind, 0, 1 << 20, integer=True)
    frozen = _frozen(content, kind, int(description["hidden-size"]))
    return m.ProfileReply(description=description, measurements=measurements, frozen=frozen)


def _shares(stats: Any, kind: str, num_labels: int | None) -> list[float]:
    """The share of each label in the device's training samples: a list of numbers in [0, 1] summing to
    at most 1, one per label of the task (empty: a task without labels, or no training samples)."""
    key = "label-shares"
    value = stats[key]
    if not isinstance(value, list):
        raise ReplyError(kind, key, f"must be a list of numbers, got {type(value).__name__}")
    if len(value) > MAX_LABELS or (value and num_labels is not None and len(value) != num_labels):
        expected = f"{num_labels} (the task's labels)" if num_labels is not None else f"at most {MAX_LABELS}"
        raise ReplyError(kind, key, f"holds {len(value)} shares; {expected} or none are expected")
    shares = [float(v) for v in value]  # Flower's lists hold ints or floats, never bools
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in shares) or sum(shares) > 1.0 + _SHARE_SLACK:
        raise ReplyError(kind, key, "each share must lie in [0, 1] and all of them sum to at most 1")
    return shares


def _layers(desc: Any, kind: str, num_layers: int) -> list[int]:
    value = _value(desc, "layers", kind, "layers")
    if not isinstance(value, list) or not 1 <= len(value) <= _LIMITS.max_layers:
        raise ReplyError(kind, "layers", f"must be a list of 1 to {_LIMITS.max_layers} layer ids")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise ReplyError(kind, "layers", "layer ids must be integers")
    if value != sorted(set(value)) or value[0] < 0 or value[-1] >= num_layers:
        raise ReplyError(
            kind, "layers", f"{value[:8]}... must be strictly increasing ids of the backbone's {num_layers} blocks"
        )
    return list(value)


def _frozen(content: RecordDict, kind: str, hidden: int) -> dict[str, torch.Tensor]:
    """The frozen head state: known tensors only, of the device's width, floating point and finite."""
    record = content.array_records.get(m.FROZEN_KEY)
    if record is None:
        raise ReplyError(kind, m.FROZEN_KEY, f"the reply has no '{m.FROZEN_KEY}' array record")
    for name, array in record.items():
        rank = _FROZEN_RANK.get(name)
        if rank is None:
            raise ReplyError(kind, m.FROZEN_KEY, f"holds {name[:64]!r}; a frozen head is {sorted(_FROZEN_RANK)}")
        shape = tuple(array.shape)
        if (
            array.dtype not in _FLOATS
            or len(shape) != rank
            or shape[-1] != hidden
            or (rank == 2 and not 1 <= shape[0] <= MAX_VOCAB)
        ):
            raise ReplyError(
                kind,
                m.FROZEN_KEY,
                f"{name} is {array.dtype} {list(shape)}; it must be floating point, {rank}-D and {hidden} wide",
            )
    try:
        state = record.to_torch_state_dict()
    except Exception as err:  # noqa: BLE001 - arrays whose bytes do not match their shape and type
        raise ReplyError(kind, m.FROZEN_KEY, f"unreadable ({type(err).__name__}: {err})") from None
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            raise ReplyError(kind, m.FROZEN_KEY, f"{name} holds NaN or infinite values")
    return state


# ---- forward ----------------------------------------------------------------------------------
def forward_reply(reply: Message, samples: int | None = None) -> m.ForwardReply:
    """A ``train.forward`` reply: the frame's bytes and its metrics (every entry; ``samples``,
    ``forward-s`` and ``busy-s`` checked). ``samples``: what the request asked for, which the reply
    must say it forwarded; the frame itself is checked by the intake."""
    kind = "forward"
    if (
        reply.has_error()
        or not reply.has_content()
        or m.FRAME_KEY not in reply.content
        or m.STATS_KEY not in reply.content
    ):
        raise ReplyError(kind, "content", f"a forward reply needs '{m.FRAME_KEY}' and '{m.STATS_KEY}' records")
    stats = _metrics(reply.content, kind)
    for key in ("samples", "forward-s", "busy-s"):
        if key not in stats:
            raise ReplyError(kind, key, f"the '{m.STATS_KEY}' record has no '{key}'")
    clean = dict(stats)
    clean["samples"] = _number(stats, "samples", kind, 1, MAX_SPLIT_SAMPLES, integer=True)
    if samples is not None and clean["samples"] != samples:
        raise ReplyError(kind, "samples", f"the reply says {clean['samples']} samples, the request asked for {samples}")
    for key in ("forward-s", "busy-s"):
        clean[key] = _number(stats, key, kind, 0, MAX_SECONDS)
    record = reply.content.array_records.get(m.FRAME_KEY)
    if record is None:
        raise ReplyError(kind, m.FRAME_KEY, f"the '{m.FRAME_KEY}' record is not an array record")
    try:
        blob = m.frame_bytes(record)
    except ValueError as err:
        raise ReplyError(kind, m.FRAME_KEY, str(err)) from None
    return m.ForwardReply(frame=blob, stats=clean)


# ---- evaluate -----------------------------------------------------------------------------------
def evaluate_reply(reply: Message, task: Task, max_samples: int = MAX_SPLIT_SAMPLES) -> m.EvaluateReply:
    """An ``evaluate`` reply with checked metrics only, whatever the task: each of ``task``'s metrics (the
    run's task, never what the reply says it holds) in its range (:data:`METRIC_RANGES`) and finite, its
    zero-shot figure likewise or NaN (absent: NaN); ``samples`` 1 to ``max_samples`` (what the device holds
    of the split), ``count`` 1 to the most those samples can score (themselves for class targets, their
    tokens up to the task's max length for token targets); peak memory it may add (NaN when absent), and
    the seconds, memory and installed flag it passes along when finite."""
    kind = "evaluate"
    stats = _metrics(_content(reply, kind), kind)
    extra = {k: float(stats[k]) for k in _EVALUATE_EXTRAS if k in stats and math.isfinite(stats[k])}
    samples = int(_number(stats, "samples", kind, 1, max(1, max_samples), integer=True))
    per_sample = 1 if task.targets == "class" else task.max_length
    checked: dict[str, Any] = {
        **extra,
        "samples": samples,
        "count": _number(stats, "count", kind, 1, samples * per_sample, integer=True),
        "peak-rss-mb": _number(stats, "peak-rss-mb", kind, 0.0, MAX_MB, default=math.nan),
    }
    for name in task.metric_names:
        lo, hi = METRIC_RANGES.get(name, (-math.inf, math.inf))
        checked[name] = _number(stats, name, kind, lo, hi)
        zero_shot = f"zero-shot-{name}"
        checked[zero_shot] = _number(stats, zero_shot, kind, lo, hi, default=math.nan, nan=True)
    for prefix in ("", "zero-shot-"):
        _perplexity_is_exp_loss(checked, prefix, kind)
    return m.EvaluateReply(stats=checked)


def _perplexity_is_exp_loss(checked: dict[str, Any], prefix: str, kind: str) -> None:
    """A perplexity must be ``exp`` of the loss beside it (capped at 700 nats, as the scores cap it)."""
    ppl, loss = checked.get(f"{prefix}perplexity"), checked.get(f"{prefix}loss")
    if ppl is None or loss is None or (math.isnan(ppl) and math.isnan(loss)):
        return
    capped = min(loss, 700.0)
    if math.isnan(ppl) != math.isnan(loss) or abs(math.log(ppl) - capped) > _PERPLEXITY_SLACK * max(1.0, capped):
        raise ReplyError(kind, f"{prefix}perplexity", f"{ppl!r} is not exp({prefix}loss {loss!r})")


# ---- residuals (label-private) ------------------------------------------------------------------
def residual_reply(reply: Message, rows: int, classes: int) -> m.ResidualReply:
    """A ``train.residual`` reply's ``p - onehot(y)``: ``[rows, classes]`` float32 in [-1, 1], checked
    before its bytes become an array."""
    kind = "residual"
    record = _content(reply, kind).array_records.get(m.RESIDUAL_KEY)
    if record is None or m.RESIDUAL_KEY not in record:
        raise ReplyError(kind, m.RESIDUAL_KEY, f"the reply has no '{m.RESIDUAL_KEY}' array")
    if len(record) != 1:
        raise ReplyError(kind, m.RESIDUAL_KEY, f"the record holds {len(record)} arrays; one is expected")
    array = record[m.RESIDUAL_KEY]
    if array.dtype not in _FLOATS or tuple(array.shape) != (rows, classes):
        raise ReplyError(
            kind,
            m.RESIDUAL_KEY,
            f"is {array.dtype} {list(array.shape)}; {rows} samples x {classes} classes of floats were asked for",
        )
    try:
        residual = np.asarray(array.numpy(), dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - bytes that do not match the declared shape and type
        raise ReplyError(kind, m.RESIDUAL_KEY, f"unreadable ({type(err).__name__}: {err})") from None
    if residual.shape != (rows, classes) or not np.isfinite(residual).all():
        raise ReplyError(kind, m.RESIDUAL_KEY, "holds NaN or infinite values")
    if np.abs(residual).max(initial=0.0) > 1.0 + _RESIDUAL_SLACK:
        raise ReplyError(kind, m.RESIDUAL_KEY, "holds values outside [-1, 1]; a residual is p - onehot(y)")
    return m.ResidualReply(residual=residual)


# ---- delivery -----------------------------------------------------------------------------------
def delivery_receipt(reply: Message) -> m.DeliveryReceipt:
    """A ``train.deliver`` reply's receipt: the digest of what the device installed, where it saved it."""
    kind = "deliver"
    receipt = _content(reply, kind).config_records.get(m.CONFIG_KEY)
    if receipt is None:
        raise ReplyError(kind, m.CONFIG_KEY, "the device's reply has no receipt of what it installed")
    digest = _text(receipt, "digest", kind, 128)
    path = receipt.get("path", "")
    if not isinstance(path, str) or len(path) > MAX_TEXT:
        raise ReplyError(kind, "path", f"must be a string of at most {MAX_TEXT} characters")
    return m.DeliveryReceipt(digest=digest, path=path)
