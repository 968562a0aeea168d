"""The forward-only device runtime: a chunk of local samples in, one activation frame out.

The device holds its data and a frozen backbone and never builds an autograd graph: every
forward runs under ``torch.inference_mode``. Each tapped block's output is reduced to the tokens
the loss needs and quantized inside the block's forward hook, so the full-width state of a layer
is dropped as soon as the next block starts, and the forward stops after the last tapped block
(no final norm, no vocabulary logits). A frame carries quantized states, sample ids and the loss
targets the task needs (a class id per sample, or for causal-LM the next token id of every scored
position: those ids are the sample's own text). No raw text is sent, but a server holding the
public weights reads much of the text back from the states: docs/privacy.md gives the measured
figures and the defenses (:mod:`mobiflower.platform.state_defense`) this runtime applies.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch

from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import SUPPORTED_BITS, QuantizedTensor, concatenate, default_group_size, quantize
from mobiflower.platform.frames import TOKEN_POLICIES, Frame, encode_frame
from mobiflower.platform.process_memory import release_free_heap
from mobiflower.platform.state_defense import StateDefense, device_generator, window_mask
from mobiflower.platform.state_defense import apply as defend
from mobiflower.platform.tasks import ClassificationTask, Encoded, Example, Task, encode_samples


@dataclass(frozen=True)
class ForwardConfig:
    """How a device turns samples into a frame (the strategy may change it per request)."""

    bits: int = 8
    group_size: int | None = None  # None: the codec's default for the bit-width (64 at 8 bits, 32 below)
    rotation: str = "hadamard"
    token_policy: str = "last"
    batch_size: int = 16
    targets: str = "task"  # "task" (what the device's task trains on) or "none" (label-private: kept on the device)
    seed: int = 0
    # Memory: at most this many (padded) tokens go through the backbone at once; a batch is
    # forwarded in consecutive pieces, each padded to its own longest text (None: whole batches).
    # Activations and the heap they leave behind grow with it; smaller pieces cost some speed,
    # more in int4 (which dequantizes per piece). RESULTS.md has the measured trade-off.
    # Frames are the same, except that `all` sends each piece's padding.
    max_tokens: int | None = 256
    # what the device does to the states before quantizing them (clipping and noise, a token window):
    # the device's own setting, never the server's request alone (DeviceSetup.defense)
    defense: StateDefense = StateDefense()

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={self.bits} is not supported: choose one of {SUPPORTED_BITS}")
        if self.token_policy not in TOKEN_POLICIES:
            raise ValueError(f"token_policy={self.token_policy!r} is unknown: choose one of {TOKEN_POLICIES}")
        if self.group_size is None:
            object.__setattr__(self, "group_size", default_group_size(self.bits))
        if self.group_size < 1 or self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size={self.group_size} must be a power of two, e.g. 64")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens} must be at least 1 (or None for whole batches)")
        if self.targets not in ("task", "none"):
            raise ValueError(f"targets={self.targets!r} must be 'task' or 'none'")
        if self.defense.window and self.token_policy == "all":
            raise ValueError("state-window sends some real tokens only: it needs token-policy 'nonpad' (or 'last')")


@dataclass
class ForwardStats:
    """What one frame cost the device."""

    samples: int = 0
    tokens_sent: int = 0
    forward_s: float = 0.0
    quantize_s: float = 0.0
    frame_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_tokens(
    hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor, policy: str
) -> torch.Tensor:
    """Rows of ``hidden`` [B, T, d] that ``policy`` sends, sample by sample: [rows, d]."""
    if policy == "last":
        return hidden[torch.arange(hidden.shape[0]), positions]
    if policy == "nonpad":
        return hidden[attention_mask.bool()]
    return hidden.reshape(-1, hidden.shape[-1])


def row_positions(
    attention_mask: torch.Tensor, sent: torch.Tensor, positions: torch.Tensor, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row :func:`select_tokens` picks with the mask ``sent`` (``attention_mask`` or a window of
    it): its position in its sample and its sample's real length, what a defense's kept first and last
    positions are counted from."""
    lengths = attention_mask.sum(dim=1)
    if policy == "last":
        return positions, lengths
    grid = torch.arange(attention_mask.shape[1])[None, :].expand_as(attention_mask)
    per_row = lengths[:, None].expand_as(attention_mask)
    if policy == "nonpad":
        return grid[sent.bool()], per_row[sent.bool()]
    return grid.reshape(-1), per_row.reshape(-1)


def sent_mask(attention_mask: torch.Tensor, policy: str, defense: StateDefense) -> torch.Tensor:
    """The mask [B, T] that :func:`select_tokens` picks a piece's rows with under ``policy``: the device's
    token window (:func:`~mobiflower.platform.state_defense.window_mask`) cuts ``nonpad``'s real tokens;
    ``last`` and ``all`` pick by their own rule from the attention mask."""
    return window_mask(attention_mask, defense) if policy == "nonpad" else attention_mask


def sent_counts(attention_mask: torch.Tensor, sent: torch.Tensor, policy: str) -> list[int]:
    """How many rows each sample of a piece sends (the frame's ``token_counts``), ``sent`` from :func:`sent_mask`."""
    if policy == "last":
        return [1] * len(attention_mask)
    if policy == "nonpad":
        return sent.sum(dim=1).tolist()
    return [attention_mask.shape[1]] * len(attention_mask)


class DeviceRuntime:
    """Forward passes and frame packing for one device's backbone."""

    def __init__(
        self,
        backbone: Backbone,
        config: ForwardConfig | None = None,
        device_id: str = "device-0",
        tokens: dict[str, list[int]] | None = None,
        task: Task | None = None,
    ):
        self.backbone = backbone
        self.config = config or ForwardConfig()
        self.device_id = device_id
        self.task: Task = task or ClassificationTask()
        # token ids by text (Backbone.token_ids): what the device needs of its tokenizer once its
        # data is tokenized; the runtimes of one device (one per message) may share one
        self.tokens: dict[str, list[int]] = tokens if tokens is not None else {}
        for p in backbone.model.parameters():
            assert not p.requires_grad, "the device backbone must be frozen"

    def make_frame(
        self,
        examples: Sequence[Example],
        *,
        layers: Sequence[int] | None = None,
        config: ForwardConfig | None = None,
        meta: dict[str, Any] | None = None,
    ) -> tuple[Frame, ForwardStats]:
        """Forward ``examples`` in batches and pack every tapped layer's selected tokens into one frame
        (samples in order of length)."""
        cfg = config or self.config
        layers = list(layers) if layers is not None else list(self.backbone.layers)
        if not examples:
            raise ValueError("a frame needs at least one sample")
        if cfg.targets == "task" and self.task.targets == "tokens" and cfg.token_policy == "last":
            raise ValueError("next-token targets need token_policy 'nonpad' or 'all', not 'last'")
        parts: dict[int, list[QuantizedTensor]] = {layer: [] for layer in layers}
        token_counts: list[int] = []
        seq_lengths: list[int] = []
        stats = ForwardStats()
        encoded = self.encode_samples(examples)
        # shortest first: a batch is padded to its longest text, so similar lengths together waste fewer
        # forward positions (the frame lists its samples in this order; sample ids say which is which)
        order = sorted(range(len(examples)), key=lambda i: len(encoded[i].ids))
        examples, encoded = [examples[i] for i in order], [encoded[i] for i in order]
        pieces = [
            piece
            for start in range(0, len(examples), cfg.batch_size)
            for piece in self._pieces([e.ids for e in encoded[start : start + cfg.batch_size]], cfg.max_tokens)
        ]
        generator = device_generator() if cfg.defense.noise > 0 else None
        for input_ids, mask in pieces:
            sent = self._forward_piece(input_ids, mask, layers, cfg, parts, stats, generator)
            seq_lengths += mask.sum(dim=1).tolist()
            token_counts += sent_counts(mask, sent, cfg.token_policy)
        if cfg.targets == "task":
            targets: dict[str, Any] = self.task.frame_targets(examples, encoded, token_counts)
        else:
            targets = {"kind": "none"}
        frame = Frame(
            fingerprint=self.backbone.fingerprint,
            layers=layers,
            token_policy=cfg.token_policy,
            sample_ids=[int(e.id) for e in examples],
            token_counts=token_counts,
            seq_lengths=seq_lengths,
            targets=targets,
            activations=[concatenate(parts[layer]) for layer in layers],
            meta={"device_id": self.device_id, **(meta or {})},
        )
        stats.samples = len(examples)
        stats.tokens_sent = sum(token_counts)
        stats.frame_bytes = frame.nbytes()
        return frame, stats

    def _forward_piece(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        layers: Sequence[int],
        cfg: ForwardConfig,
        parts: dict[int, list[QuantizedTensor]],
        stats: ForwardStats,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Forward one piece and quantize each tapped layer's sent rows into ``parts`` (after the device's
        defense: a token window, clipping and noise); returns the mask of the rows sent [B, T]."""
        positions = self.backbone.feature_positions(mask)
        sent = sent_mask(mask, cfg.token_policy, cfg.defense)
        where, lengths = row_positions(mask, sent, positions, cfg.token_policy)
        quantize_s = 0.0

        def on_layer(layer_id: int, hidden: torch.Tensor) -> None:
            nonlocal quantize_s
            t = time.perf_counter()
            rows = select_tokens(hidden, sent, positions, cfg.token_policy).float()
            if cfg.defense.clip > 0:
                rows = defend(rows, cfg.defense, generator, where, lengths)
            parts[layer_id].append(quantize(rows, cfg.bits, cfg.group_size, cfg.rotation, cfg.seed))
            quantize_s += time.perf_counter() - t

        t0 = time.perf_counter()
        self.backbone.forward_taps(input_ids, mask, on_layer, layers=layers)
        if cfg.max_tokens is not None:
            # hand the piece's freed activations back: pieces differ in shape, and a heap that
            # keeps every piece's blocks grows over a frame
            release_free_heap()
        stats.forward_s += time.perf_counter() - t0
        stats.quantize_s += quantize_s
        return sent

    def encode_samples(self, examples: Sequence[Example]) -> list[Encoded]:
        """Each example as the task makes it (:func:`mobiflower.platform.tasks.encode_samples`), from this
        runtime's cache of token ids; texts not seen before are tokenized (loading the tokenizer if it was
        released) and kept."""
        backbone = self.backbone
        return encode_samples(
            self.task,
            examples,
            lambda texts: self._cached_ids(texts, backbone.token_ids, ""),
            lambda texts: self._cached_ids(texts, backbone.segment_ids, "\x00segment:"),
            backbone.chat_renderer,
        )

    def _cached_ids(self, texts: Sequence[str], tokenize, kind: str) -> list[list[int]]:
        """Ids of ``texts`` by ``tokenize``, cached under ``kind + text`` (a prompt truncated as a whole and
        an untruncated segment of the same text are different entries)."""
        cache = self.tokens
        missing = list(dict.fromkeys(t for t in texts if kind + t not in cache))
        if missing:
            cache.update(zip([kind + t for t in missing], tokenize(missing)))
        return [cache[kind + t] for t in texts]

    def pretokenize(self, examples: Sequence[Example], release_tokenizer: bool = True) -> int:
        """Tokenize all of ``examples`` (e.g. the device's whole partition) now, then drop the
        tokenizer; return how many distinct texts are cached.

        Why: a tokenizer is a large set of small heap objects (more while ``tokenizer.json`` is
        parsed), needed only to turn text into ids. A
        device that tokenizes its local data before the backbone's weights are paged in, and
        then lets the tokenizer go, never holds it next to the weights and the activations.
        """
        if examples:
            self.encode_samples(examples)
        if release_tokenizer:
            self.backbone.release_tokenizer()
        return len(self.tokens)

    def _pieces(self, ids: Sequence[list[int]], max_tokens: int | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(input_ids, attention_mask)`` of a batch's ``ids`` in consecutive pieces of at most
        ``max_tokens`` padded tokens (at least one sample each), right-padded to their longest text."""
        lengths = [len(x) for x in ids]
        spans, start = [], 0
        while start < len(ids):
            end, longest = start + 1, lengths[start]
            while end < len(ids) and (
                max_tokens is None or (end + 1 - start) * max(longest, lengths[end]) <= max_tokens
            ):
                longest = max(longest, lengths[end])
                end += 1
            spans.append((start, end, longest))
            start = end
        pieces = []
        for start, end, longest in spans:
            input_ids = torch.full((end - start, longest), self.backbone.pad_token_id, dtype=torch.long)
            mask = torch.zeros((end - start, longest), dtype=torch.long)
            for row, x in enumerate(ids[start:end]):
                input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
                mask[row, : len(x)] = 1
            pieces.append((input_ids, mask))
        return pieces

    def encode(self, frame: Frame) -> bytes:
        return encode_frame(frame)
