"""Local inference on the device: frozen backbone + the side network the server delivered.

After training, nothing more is needed from the server. The device encodes its samples exactly as
its forward runtime does for training frames (:meth:`DeviceRuntime.encode_samples`: the task's
prompt or segments, truncation, which tokens the loss scores), taps the same layers it sent during
training, takes the same tokens, and (by default) passes them through the same quantize/dequantize
round trip the server trained on, so the side network sees at inference what it saw in training.

:func:`installed_model` gives the object a device runs for a delivered network: a
:class:`LocalClassifier` (ladder / adapter families), a :class:`TailClassifier` (a pretrained tail
with a classification head) or a :class:`TailLanguageModel` (a pretrained tail with the backbone's
LM head). Each has ``evaluate(examples, batch_size, progress) -> dict`` with the same keys:

* ``metrics``: the task's metrics (accuracy and macro-F1, or perplexity, loss and token accuracy),
* ``zero_shot``: the same metrics of the backbone alone (the verbalizer answer of a decoder's prompt
  for classification; the backbone's own next-token scores on the same tokens for causal-LM; empty
  where there is none: an encoder, or a tail classifier whose forward ends in the adapter),
* ``count``: what a fleet weighs this device's metrics by (samples, or scored tokens),
* ``samples`` and ``seconds``;

and ``close()``, which takes an adapter's hooks off the (possibly shared, cached) backbone.

A pretrained tail's LoRA is applied to the device's own upper blocks by forward hooks
(:class:`AdapterHooks`, shared with on-device generation in :mod:`mobiflower.clients.generation`).
"""

from __future__ import annotations

import hashlib
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mobiflower.clients.runtime import DeviceRuntime, select_tokens, sent_counts
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import dequantize, quantize
from mobiflower.platform.frames import IGNORE_INDEX
from mobiflower.platform.precision import precision_from_fingerprint
from mobiflower.platform.pretrained_tail import is_peft_adapter, lora_deltas, read_peft_adapter, stock_state, tail_cut
from mobiflower.platform.side_factory import build_side_network, load_side_network
from mobiflower.platform.side_networks import (
    SideNetwork,
    SideNetworkConfig,
    SideNetworkError,
    make_side_batch,
    read_side_network_config,
)
from mobiflower.platform.tasks import Encoded, Example, Task, TokenScores, task_of_config, task_of_head

LOGIT_ELEMENTS = 1 << 23
"""At most this many vocabulary logits exist at once (32 MB in float32): a causal-LM's scored positions
go through the LM head in slices of ``LOGIT_ELEMENTS // vocab`` rows, never a whole ``[B, T, vocab]``."""

Progress = Callable[[int], None] | None


def task_of_network(config: SideNetworkConfig) -> Task:
    """The task a delivered network serves: the one its config records, else the one its head implies."""
    task = task_of_config(config.extra)
    if task.head != config.head or task.num_classes != (config.num_classes if config.head != "lm" else 0):
        task = task_of_head(config.head, config.num_classes)
    return task


def delivered_config(path: str | Path) -> SideNetworkConfig:
    """The config of a delivered side network (an adapter folder or a side-network file), weights unread."""
    if is_peft_adapter(path):
        return read_peft_adapter(path)[0]
    return read_side_network_config(path)


def pad_ids(ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of token id lists, right-padded to the longest (as frames are)."""
    longest = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), longest), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(ids), longest), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.as_tensor(list(x), dtype=torch.long)
        mask[row, : len(x)] = 1
    return input_ids, mask


def _batches(encoded: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``encoded`` in batches of similar length (less padding; the metrics are order-free)."""
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].ids))
    for start in range(0, len(order), max(1, batch_size)):
        yield order[start : start + batch_size]


def _result(scores, zero_shot: Mapping[str, float], samples: int, t0: float) -> dict:
    return {
        "metrics": scores.result(),
        "zero_shot": dict(zero_shot),
        "count": int(scores.count),
        "samples": int(samples),
        "seconds": time.perf_counter() - t0,
    }


def _adapter_backbone(config: SideNetworkConfig, source: str | Path, model: str | None) -> Backbone:
    """The backbone an adapter names (or ``model``), at the weight precision it was trained with."""
    model = model or config.extra.get("model")
    if not model:
        raise SideNetworkError(f"{source} does not name its backbone: pass --model")
    precision = precision_from_fingerprint(config.fingerprint)
    return Backbone.load(
        model,
        layers=[int(config.backbone_config["num_hidden_layers"]) - 1],
        weights=None if precision in (None, "fp32") else precision,
    )


class AdapterHooks:
    """A delivered pretrained-tail adapter on a model's own upper blocks, as forward hooks.

    Each LoRA target projection of blocks ``cut ..`` gets ``(alpha / r) x A^T B^T`` added to its
    output, so it works on every weight precision and on the lean or the transformers forward (a
    quantized projection is never dequantized whole) and holds nothing but the adapter beyond
    inference itself. With ``match_training_precision`` (and a tail trained on fewer than 16 bits),
    block ``cut - 1``'s output passes the codec's quantize/dequantize round trip at the training
    bit-width, as the server saw it; the codec quantizes each token's row on its own, so a KV-cached
    decode (one new token at a time) sees the same round trip as a whole-sequence forward.

    ``enabled`` (or :meth:`active`) turns the hooks into no-ops without removing them: the backbone
    alone. :meth:`remove` takes them off.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        hidden_size: int,
        config: SideNetworkConfig,
        tensors: Mapping[str, torch.Tensor],
        match_training_precision: bool = True,
    ):
        total = int(config.backbone_config["num_hidden_layers"])
        if len(blocks) != total or hidden_size != config.hidden_size:
            raise SideNetworkError(
                f"this adapter runs on blocks {tail_cut(config)}..{total - 1} of a {total}-block "
                f"backbone of width {config.hidden_size}; this device's backbone has "
                f"{len(blocks)} blocks of width {hidden_size}: run it on the whole model it was trained for"
            )
        deltas, self.head = lora_deltas(config, tensors)
        self.config = config
        self.enabled = True
        self.handles: list = []
        scale = config.lora_alpha / config.lora_rank
        for (block, name), (a, b) in sorted(deltas.items()):

            def add_delta(_module, inputs, output, a=a.float(), b=b.float()):
                if not self.enabled:
                    return None
                x = inputs[0]
                return output + scale * F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)

            self.handles.append(blocks[block].get_submodule(name).register_forward_hook(add_delta))
        if match_training_precision and config.bits < 16:
            self.handles.append(blocks[tail_cut(config) - 1].register_forward_hook(self._round_trip))

    def _round_trip(self, _module, _inputs, output):
        """The cut block's output as the server saw it: through the codec at the training bit-width."""
        if not self.enabled:
            return None
        cfg = self.config
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        rows = (
            dequantize(quantize(hidden.reshape(-1, hidden.shape[-1]).float(), cfg.bits, cfg.group_size, cfg.rotation))
            .reshape(hidden.shape)
            .to(hidden.dtype)
        )
        return (rows, *output[1:]) if isinstance(output, (tuple, list)) else rows

    @contextmanager
    def active(self, on: bool = True) -> Iterator[None]:
        """Within the block, the adapter is on (``on``) or off (the backbone alone)."""
        before, self.enabled = self.enabled, on
        try:
            yield
        finally:
            self.enabled = before

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class LocalClassifier:
    """Classifies text on the device with backbone + side network alone."""

    def __init__(
        self,
        backbone: Backbone,
        net: SideNetwork,
        match_training_precision: bool = True,
        tokens: dict[str, list[int]] | None = None,
    ):
        cfg = net.config
        if cfg.head != "classification":
            raise SideNetworkError(
                "LocalClassifier needs a side network with a classification head; a causal-LM task runs the "
                "pretrained tail on the device (TailLanguageModel)"
            )
        if not cfg.serves(backbone.fingerprint):
            raise SideNetworkError(f"side network trained for {cfg.fingerprint}, backbone is {backbone.fingerprint}")
        self.layers = cfg.layers_for(backbone.fingerprint)  # this backbone's taps, slot by slot
        self.backbone_tag = "" if backbone.fingerprint == cfg.fingerprint else backbone.fingerprint
        self.backbone = backbone
        self.net = net.eval()
        self.match_training_precision = match_training_precision
        self.task = task_of_network(cfg)
        self._verbalizers = backbone.verbalizer_ids(self.task.verbalizers) if backbone.is_decoder else None
        self._runtime = DeviceRuntime(backbone, task=self.task, tokens=tokens)

    @classmethod
    def load(
        cls,
        side_network: str | Path,
        model: str | None = None,
        backbone: Backbone | None = None,
        match_training_precision: bool = True,
    ) -> "LocalClassifier":
        """Load the delivered side network (a side-network file, or a pretrained tail's PEFT adapter
        folder) and the backbone it was trained on (``model`` ref)."""
        if is_peft_adapter(side_network):
            return TailClassifier.load(side_network, model, backbone, match_training_precision)
        config = read_side_network_config(side_network)
        if backbone is None:
            if model is None:
                model = config.extra.get("model")
            if not model:
                raise SideNetworkError(f"{side_network} does not name its backbone: pass --model")
            precision = precision_from_fingerprint(config.fingerprint)
            backbone = Backbone.load(model, layers=config.layers, weights=None if precision == "fp32" else precision)
        net = load_side_network(
            side_network, backbone.frozen_head_state(lm_head=config.head == "lm"), fingerprint=backbone.fingerprint
        )
        return cls(backbone, net, match_training_precision)

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        """The samples as the device's runtime encodes them for training frames."""
        return self._runtime.encode_samples(examples)

    def _features(self, rows: torch.Tensor) -> torch.Tensor:
        cfg = self.net.config
        if self.match_training_precision and cfg.bits < 16:
            return dequantize(quantize(rows.float(), cfg.bits, cfg.group_size, cfg.rotation))
        return rows.float()

    @torch.inference_mode()
    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg = self.net.config
        positions = self.backbone.feature_positions(mask)
        rows: dict[int, torch.Tensor] = {}

        def on_layer(layer_id: int, hidden: torch.Tensor) -> None:
            rows[layer_id] = self._features(select_tokens(hidden, mask, positions, cfg.token_policy))

        final = self.backbone.forward_taps(
            input_ids, mask, on_layer, layers=self.layers, need_final=self._verbalizers is not None
        )
        lengths = mask.sum(dim=1).tolist()
        # the rows select_tokens picked from the whole mask (no token window: nothing leaves the device)
        counts = sent_counts(mask, mask, cfg.token_policy)
        batch = make_side_batch(
            [rows[layer] for layer in self.layers], counts, lengths, cfg.token_policy, cfg.feature_token
        )
        batch.backbone = self.backbone_tag
        side = self.net(batch)
        zero_shot = None
        if final is not None:
            zero_shot = self.backbone.zero_shot_logits(
                final[torch.arange(final.shape[0]), positions], self._verbalizers
            )
        return side, zero_shot

    def logits(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Side-network logits ``[n, classes]`` and zero-shot verbalizer logits ``[n, classes]`` (None where
        there is no zero-shot answer) of raw sample texts (the task's prompt is applied here)."""
        encoded = self.encode([Example(id=i, text=t) for i, t in enumerate(texts)])
        return self._logits(*pad_ids([e.ids for e in encoded], self.backbone.pad_token_id))

    def classify(self, texts: Sequence[str], batch_size: int = 16) -> list[dict]:
        """Label and probability for each raw text (the task prompt is applied here)."""
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            side, _ = self.logits(chunk)
            probs = side.softmax(-1)
            for text, p in zip(chunk, probs):
                label = int(p.argmax())
                results.append({"text": text, "label": self.task.labels[label], "probability": float(p[label])})
        return results

    def evaluate(self, examples: Sequence[Example], batch_size: int = 16, progress: Progress = None) -> dict:
        """The task's metrics of the side network, and of the zero-shot prompt, on labelled examples."""
        t0 = time.perf_counter()
        encoded = self.encode(examples)
        scores, zero_shot = self.task.scores(), self.task.scores()
        for idx in _batches(encoded, batch_size):
            side, zs = self._logits(*pad_ids([encoded[i].ids for i in idx], self.backbone.pad_token_id))
            labels = torch.as_tensor([examples[i].label for i in idx], dtype=torch.long)
            scores.add(side, labels)
            if zs is not None:
                zero_shot.add(zs, labels)
            if progress is not None:
                progress(len(idx))
        return _result(scores, zero_shot.result() if zero_shot.count else {}, len(examples), t0)

    def close(self) -> None:
        """Nothing to take off (the side network runs beside the backbone, not in it)."""


class TailClassifier(LocalClassifier):
    """The device's own backbone with a delivered pretrained-tail classification adapter on its upper
    blocks (:class:`AdapterHooks`). Call :meth:`close` to take the hooks off."""

    def __init__(
        self,
        backbone: Backbone,
        config: SideNetworkConfig,
        tensors: Mapping[str, torch.Tensor],
        match_training_precision: bool = True,
        tokens: dict[str, list[int]] | None = None,
    ):
        if config.head == "lm":
            raise SideNetworkError(
                "this adapter generates text (a causal-LM tail): run it with TailLanguageModel or "
                "`mobiflower generate`, not as a classifier"
            )
        self.adapter = AdapterHooks(backbone.blocks, backbone.hidden_size, config, tensors, match_training_precision)
        self.config = config
        self.task = task_of_network(config)
        self.backbone = backbone
        self.backbone_tag = ""
        self.layers = [backbone.num_layers - 1]
        self.match_training_precision = match_training_precision
        self._verbalizers = None  # the adapter changes the final state: no zero-shot answer from it
        self.head = self.adapter.head
        self._runtime = DeviceRuntime(backbone, task=self.task, tokens=tokens)

    @classmethod
    def load(
        cls,
        adapter: str | Path,
        model: str | None = None,
        backbone: Backbone | None = None,
        match_training_precision: bool = True,
    ) -> "TailClassifier":
        """The adapter folder :func:`save_peft_adapter` wrote, on ``backbone`` (or ``model``, by default
        the one the adapter names, at the precision it was trained with)."""
        config, tensors = read_peft_adapter(adapter)
        if config.head == "lm":
            raise SideNetworkError(
                f"{adapter} is a causal-LM adapter: it generates text (`mobiflower generate`), it does not classify"
            )
        return cls(backbone or _adapter_backbone(config, adapter, model), config, tensors, match_training_precision)

    def close(self) -> None:
        self.adapter.remove()

    @torch.inference_mode()
    def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        final = self.backbone.forward_taps(input_ids, mask, _ignore, layers=self.layers, need_final=True)
        positions = self.backbone.feature_positions(mask)
        feature = final[torch.arange(final.shape[0]), positions].float()
        return F.linear(feature, self.head), None


def _ignore(_layer: int, _hidden: torch.Tensor) -> None:
    pass


_ZERO_SHOT: dict[tuple, dict[str, float]] = {}
"""The backbone's own causal-LM scores by (fingerprint, samples): a device evaluates the same held-out
samples every round, and the backbone alone does not change (bounded; per process)."""
_ZERO_SHOT_KEEP = 16


def _samples_digest(encoded: Sequence[Encoded]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for e in encoded:
        h.update(repr((e.ids, e.scored)).encode())
    return h.hexdigest()


class TailLanguageModel:
    """The device's own backbone with a delivered causal-LM adapter (pretrained tail, head ``lm``) on its
    upper blocks: scores its own text (perplexity, loss, token accuracy); generation is
    :class:`mobiflower.clients.generation.LocalGenerator`. Call :meth:`close` to take the hooks off.

    The backbone's LM head is applied to the scored positions only, a slice of rows at a time
    (:data:`LOGIT_ELEMENTS`). Its zero-shot scores (the backbone alone, the adapter's hooks turned off)
    are a second forward over the same samples, computed once per process and set of samples.
    """

    def __init__(
        self,
        backbone: Backbone,
        config: SideNetworkConfig,
        tensors: Mapping[str, torch.Tensor],
        match_training_precision: bool = True,
        tokens: dict[str, list[int]] | None = None,
    ):
        if config.head != "lm":
            raise SideNetworkError("this adapter classifies (its head is a classifier): run it with TailClassifier")
        if not backbone.is_decoder:
            raise SideNetworkError("a causal-LM adapter needs a decoder backbone with an LM head")
        self.adapter = AdapterHooks(backbone.blocks, backbone.hidden_size, config, tensors, match_training_precision)
        self.config = config
        self.task = task_of_network(config)
        self.backbone = backbone
        self.match_training_precision = match_training_precision
        self._runtime = DeviceRuntime(backbone, task=self.task, tokens=tokens)

    @classmethod
    def load(
        cls,
        adapter: str | Path,
        model: str | None = None,
        backbone: Backbone | None = None,
        match_training_precision: bool = True,
    ) -> "TailLanguageModel":
        """The adapter folder :func:`save_peft_adapter` wrote for a causal-LM tail, on ``backbone`` (or
        ``model``, by default the one the adapter names, at the precision it was trained with)."""
        config, tensors = read_peft_adapter(adapter)
        if config.head != "lm":
            raise SideNetworkError(f"{adapter} is a classification adapter: it classifies (`mobiflower infer`)")
        return cls(backbone or _adapter_backbone(config, adapter, model), config, tensors, match_training_precision)

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        """The samples as the device's runtime encodes them for training frames (ids and scored tokens)."""
        return self._runtime.encode_samples(examples)

    def close(self) -> None:
        self.adapter.remove()

    def _batch(self, encoded: Sequence[Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, mask, targets)``: targets ``[B, T]`` are each position's next token where the loss
        scores it, else -100 (as a frame's token targets)."""
        input_ids, mask = pad_ids([e.ids for e in encoded], self.backbone.pad_token_id)
        targets = torch.as_tensor([e.next_token_targets(input_ids.shape[1]) for e in encoded], dtype=torch.long)
        return input_ids, mask, targets

    @torch.inference_mode()
    def _scored(self, encoded: Sequence[Encoded], adapter: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(logits [n, vocab], targets [n])`` of the scored positions, a slice of rows at a time."""
        input_ids, mask, targets = self._batch(encoded)
        with self.adapter.active(adapter):
            final = self.backbone.forward_taps(
                input_ids, mask, _ignore, layers=[self.backbone.num_layers - 1], need_final=True
            )
        keep = targets != IGNORE_INDEX
        rows, wanted = final[keep], targets[keep]
        del final
        head = self.backbone.model.get_output_embeddings()
        vocab = int(getattr(head, "out_features", 0) or head.weight.shape[0])
        step = max(1, LOGIT_ELEMENTS // vocab)
        for start in range(0, rows.shape[0], step):
            yield head(rows[start : start + step]), wanted[start : start + step]

    def scored_logits(self, examples: Sequence[Example], adapter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """All scored positions' logits ``[N, vocab]`` and targets ``[N]``, samples in the given order (for
        checks on a few samples: it holds every row's logits at once)."""
        parts = list(self._scored(self.encode(examples), adapter))
        if not parts:
            return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def evaluate(
        self, examples: Sequence[Example], batch_size: int = 16, progress: Progress = None, zero_shot: bool = True
    ) -> dict:
        """Perplexity, loss and token accuracy over the scored tokens, with the adapter and (``zero_shot``)
        of the backbone alone; ``count`` is the number of scored tokens."""
        t0 = time.perf_counter()
        encoded = self.encode(examples)
        key = (self.backbone.fingerprint, _samples_digest(encoded))
        known = _ZERO_SHOT.get(key) if zero_shot else None
        scores = TokenScores()
        base = TokenScores() if zero_shot and known is None else None
        for idx in _batches(encoded, batch_size):
            chunk = [encoded[i] for i in idx]
            for logits, targets in self._scored(chunk, adapter=True):
                scores.add(logits, targets)
            if base is not None:
                for logits, targets in self._scored(chunk, adapter=False):
                    base.add(logits, targets)
            if progress is not None:
                progress(len(idx))
        if base is not None:
            known = base.result()
            if base.count:
                while len(_ZERO_SHOT) >= _ZERO_SHOT_KEEP:
                    _ZERO_SHOT.pop(next(iter(_ZERO_SHOT)))
                _ZERO_SHOT[key] = known
        return _result(scores, known if known and math.isfinite(known["loss"]) else {}, len(examples), t0)


DeviceModel = LocalClassifier | TailLanguageModel
"""What a device runs for a delivered side network (:func:`installed_model`)."""


def installed_model(
    backbone: Backbone,
    config: SideNetworkConfig,
    state: Mapping[str, torch.Tensor],
    match_training_precision: bool = True,
    tokens: dict[str, list[int]] | None = None,
) -> DeviceModel:
    """The model a device runs from a sent side network (its config and trainable state): a classifier, or
    for a causal-LM tail a :class:`TailLanguageModel`. ``tokens`` is the device's cache of token ids
    (:class:`DeviceRuntime`'s): samples tokenized for training frames are not tokenized again."""
    if config.family == "tail":
        tensors = {k: v.float() for k, v in stock_state(config, state).items()}
        kind = TailLanguageModel if config.head == "lm" else TailClassifier
        return kind(backbone, config, tensors, match_training_precision, tokens=tokens)
    if not config.serves(backbone.fingerprint):
        raise SideNetworkError(
            f"the side network was trained for {config.fingerprint}, this device runs "
            f"{backbone.fingerprint}: use a side network trained for this backbone"
        )
    frozen = backbone.frozen_head_state(lm_head=config.head == "lm")
    net = build_side_network(config, frozen, {backbone.fingerprint: frozen})
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return LocalClassifier(backbone, net.eval(), match_training_precision, tokens=tokens)


def load_local_model(
    side_network: str | Path,
    model: str | None = None,
    backbone: Backbone | None = None,
    match_training_precision: bool = True,
) -> DeviceModel:
    """A delivered side network (file or adapter folder) on its backbone, whichever task it serves."""
    if is_peft_adapter(side_network) and delivered_config(side_network).head == "lm":
        return TailLanguageModel.load(side_network, model, backbone, match_training_precision)
    return LocalClassifier.load(side_network, model, backbone, match_training_precision)


__all__ = [
    "LOGIT_ELEMENTS",
    "AdapterHooks",
    "DeviceModel",
    "LocalClassifier",
    "TailClassifier",
    "TailLanguageModel",
    "delivered_config",
    "installed_model",
    "load_local_model",
    "pad_ids",
    "task_of_network",
]
