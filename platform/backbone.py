"""The frozen backbone: load any transformers model, tap chosen layers, fingerprint it.

The device never trains the backbone, so it is loaded in eval mode with ``requires_grad=False``
and only ever run under ``torch.inference_mode``. Tapping uses forward hooks on the model's
block list: a hook sees each tapped block's output the moment it exists, so the caller can pick
the tokens it needs and quantize them right away, and the forward can stop after the last tapped
block (no final norm, no vocabulary logits) when the caller does not need the final state.

Layer ids are 0-based block indices: layer ``i`` is the output of block ``i`` (before any final
norm). The default taps are evenly spaced and always include the last block.
"""

from __future__ import annotations

import gc
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from mobiflower.platform.device_forward import load_prepared_tokenizer
from mobiflower.platform.hf_model import BackboneError, find_blocks, load_hf_model, weights_digest
from mobiflower.platform.precision import DEFAULT_INT4_GROUP_SIZE, PRECISION_DTYPE_NAMES, normalize_precision
from mobiflower.platform.prepared_weights import is_prepared_folder, load_backbone_weights
from mobiflower.platform.process_memory import release_free_heap
from mobiflower.platform.quantized_layers import QuantizedLinear
from mobiflower.platform.tasks import chat_renderer

_FINAL_NORM_NAMES = ("norm", "final_layer_norm", "ln_f", "decoder.final_layer_norm", "final_layernorm")

LayerHook = Callable[[int, torch.Tensor], None]
"""Called as ``hook(layer_id, hidden)`` with the block output ``[batch, tokens, hidden]``."""


class _StopForward(Exception):
    """Raised by the last tap's hook to skip the blocks after it."""


def evenly_spaced_layers(num_layers: int, count: int) -> list[int]:
    """``count`` block ids spread evenly over ``num_layers`` blocks, ending at the last block."""
    if not 1 <= count <= num_layers:
        raise BackboneError(f"cannot tap {count} layers of a {num_layers}-layer model: choose 1..{num_layers}")
    step = num_layers / count
    return sorted({round(step * (i + 1)) - 1 for i in range(count)})


def truncate_blocks(model: nn.Module, keep: int) -> None:
    """Keep only the first ``keep`` transformer blocks: a layer-truncated backbone of the same family
    (a smaller device's model in a heterogeneous fleet). Its fingerprint says ``L<keep>``."""
    config = model.config
    total = int(config.num_hidden_layers)
    if not 1 <= keep <= total:
        raise BackboneError(f"backbone-layers={keep}: a {total}-layer model can keep 1 to {total} blocks")
    if keep == total:
        return
    blocks = find_blocks(model.base_model, total)
    del blocks[keep:]
    config.num_hidden_layers = keep
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:keep]


def _find_final_norm(base: nn.Module) -> nn.Module:
    for name in _FINAL_NORM_NAMES:
        module = base
        for part in name.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module):
            return module
    return nn.Identity()


@dataclass(frozen=True)
class BackboneIdentity:
    """What a frame's activations depend on: architecture, width, depth, precision and weights."""

    model_type: str
    hidden_size: int
    num_layers: int
    dtype: str  # the weight precision: float32, bfloat16, int8, int4
    digest: str

    @property
    def fingerprint(self) -> str:
        return f"{self.model_type}-d{self.hidden_size}-L{self.num_layers}-{self.dtype}-{self.digest}"

    @property
    def precision(self) -> str:
        """``fp32``, ``bf16``, ``int8`` or ``int4`` (torch's dtype name for anything else)."""
        return {"float32": "fp32", "bfloat16": "bf16"}.get(self.dtype, self.dtype)


class Backbone:
    """A frozen transformers model with layer taps. Build it with :meth:`load`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        layers: Sequence[int] | None = None,
        num_taps: int = 8,
        max_length: int = 256,
        name: str = "",
        precision: str | None = None,
        digest: str | None = None,
        weights_path: str | None = None,
        keep_layers: int = 0,
        tokenizer_loader: Callable[[], object] | None = None,
    ):
        if keep_layers:
            truncate_blocks(model, keep_layers)
        self.model = model.eval().requires_grad_(False)
        self._tokenizer = self._configure_tokenizer(tokenizer)
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer_lock = threading.Lock()
        self.name = name or getattr(model.config, "_name_or_path", "")
        config = model.config
        self.model_type = str(config.model_type)
        self.is_decoder = (
            not getattr(config, "is_encoder_decoder", False)
            and self.model_type != "bert"
            and hasattr(model, "get_output_embeddings")
            and model.get_output_embeddings() is not None
        )
        self.base = model.base_model
        self.num_layers = int(config.num_hidden_layers)
        self.hidden_size = int(config.hidden_size)
        self.blocks = find_blocks(self.base, self.num_layers)
        self.final_norm = _find_final_norm(self.base)
        self.layers = self._check_layers(
            layers if layers is not None else evenly_spaced_layers(self.num_layers, min(num_taps, self.num_layers))
        )
        self.max_length = max_length
        if precision is None:  # no weights precision given: the dtype the weights are in
            dtype_name = str(next(model.parameters()).dtype).removeprefix("torch.")
        else:
            dtype_name = PRECISION_DTYPE_NAMES[normalize_precision(precision)]
        self.identity = BackboneIdentity(
            self.model_type,
            self.hidden_size,
            self.num_layers,
            dtype_name,
            digest if digest is not None else weights_digest(model),
        )
        self.weights_path = weights_path

    def _configure_tokenizer(self, tokenizer):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"  # real tokens first: the last real token is at length - 1
        tokenizer.truncation_side = "left"  # keep the prompt's tail, where the task is stated
        self.pad_token_id = int(tokenizer.pad_token_id)  # known without the tokenizer once it is dropped
        return tokenizer

    @property
    def tokenizer(self):
        """The tokenizer (loaded again if :meth:`release_tokenizer` dropped it)."""
        tokenizer = self._tokenizer
        if tokenizer is None:
            with self._tokenizer_lock:
                if self._tokenizer is None:
                    self._tokenizer = self._configure_tokenizer(self._tokenizer_loader())
                tokenizer = self._tokenizer
        return tokenizer

    def release_tokenizer(self) -> bool:
        """Drop the tokenizer and hand its memory back, if it can be loaded again (prepared copies).

        Why: a tokenizer is a large set of small heap objects, needed only to turn text into ids
        (:meth:`mobiflower.clients.runtime.DeviceRuntime.pretokenize` drops it once the device's
        data is tokenized). Loading it again, for a text not seen before, is quick (lean
        tokenizer). Returns whether it was released.
        """
        if self._tokenizer_loader is None:
            return False
        with self._tokenizer_lock:
            if self._tokenizer is None:
                return True
            self._tokenizer = None
        gc.collect()
        release_free_heap()
        return True

    @classmethod
    def load(
        cls,
        ref: str,
        layers: Sequence[int] | None = None,
        num_taps: int = 8,
        dtype: torch.dtype = torch.float32,
        max_length: int = 256,
        weights: str | None = None,
        weights_dir: str | None = None,
        group_size: int | None = None,
        keep_layers: int = 0,
    ) -> "Backbone":
        """Load ``ref`` (``smollm2-135m``, a local folder or a Hugging Face model id) frozen.

        ``weights`` (``fp32``, ``bf16``, ``int8``, ``int4``) loads the prepared, memory-mapped copy
        of ``ref`` at that precision (:mod:`mobiflower.platform.prepared_weights`), building it once under
        ``weights_dir`` (default ``$MOBIFLOWER_HOME/models``) if it is missing or stale; ``dtype``
        is then ignored. ``ref`` may also be a prepared copy's folder. Otherwise the checkpoint is
        loaded through transformers in ``dtype``. ``keep_layers`` (> 0) keeps only the first blocks
        (:func:`truncate_blocks`): a layer-truncated backbone of the same family.
        """
        if weights is not None or is_prepared_folder(ref):
            model, tokenizer, manifest = load_backbone_weights(
                ref, weights, cache_dir=weights_dir, group_size=group_size or DEFAULT_INT4_GROUP_SIZE
            )
            folder, forward = manifest["path"], manifest["forward"]
            return cls(
                model,
                tokenizer,
                layers=layers,
                num_taps=num_taps,
                max_length=max_length,
                name=ref,
                precision=manifest["precision"],
                digest=manifest["digest"],
                weights_path=manifest["path"],
                keep_layers=keep_layers,
                tokenizer_loader=lambda: load_prepared_tokenizer(folder, forward),
            )
        model, tokenizer = load_hf_model(ref, dtype)
        return cls(
            model, tokenizer, layers=layers, num_taps=num_taps, max_length=max_length, name=ref, keep_layers=keep_layers
        )

    def _check_layers(self, layers: Sequence[int]) -> list[int]:
        layers = [int(i) for i in layers]
        if not layers or layers != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= self.num_layers:
            raise BackboneError(
                f"tapped layers {layers} must be strictly increasing block ids in "
                f"0..{self.num_layers - 1} (this model has {self.num_layers} blocks): choose layers "
                f"(or a tail-cut of at most {self.num_layers - 1}) within it"
            )
        return layers

    @property
    def fingerprint(self) -> str:
        return self.identity.fingerprint

    @property
    def precision(self) -> str:
        """The weight precision: ``fp32``, ``bf16``, ``int8`` or ``int4``."""
        return self.identity.precision

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Right-padded to the longest text of this batch (dynamic padding), truncated on the left."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids, truncated as :meth:`tokenize` truncates them, unpadded (pad with
        :attr:`pad_token_id` on the right to get :meth:`tokenize`'s rows)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def segment_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text's ids with no special tokens and no truncation: the pieces a causal-LM sample is
        joined from (:func:`mobiflower.platform.tasks.join_segments` cuts the whole)."""
        return self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]

    def chat_renderer(self):
        """The tokenizer's chat template as ``(messages, add_generation_prompt) -> text`` (None: it has
        none). Rendered by transformers' own ``apply_chat_template`` (loaded from the model folder)."""
        from transformers import AutoTokenizer  # only for chat samples: the lean path never needs it

        folder = Path(self.weights_path or getattr(self.model, "name_or_path", "") or self.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder.parent if folder.is_file() else folder))
        except (OSError, ValueError):
            return None
        return chat_renderer(tokenizer)

    def feature_positions(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """Index of the token a classifier reads: the last real token (decoders) or the first (encoders)."""
        if not self.is_decoder:
            return torch.zeros(attention_mask.shape[0], dtype=torch.long)
        return attention_mask.sum(dim=1).long() - 1

    def forward_taps(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        on_layer: LayerHook,
        layers: Sequence[int] | None = None,
        need_final: bool = False,
    ) -> torch.Tensor | None:
        """Run the backbone, calling ``on_layer`` for each tapped block; no grads, no logits.

        Returns the final hidden state (after the final norm) when ``need_final``; otherwise the
        forward stops right after the last tapped block.
        """
        layers = self._check_layers(layers) if layers is not None else self.layers
        last = layers[-1]
        handles = []

        def make_hook(layer_id: int):
            def hook(_module, _inputs, output):
                hidden = output[0] if isinstance(output, (tuple, list)) else output
                on_layer(layer_id, hidden)
                if layer_id == last and not need_final:
                    raise _StopForward

            return hook

        for layer_id in layers:
            handles.append(self.blocks[layer_id].register_forward_hook(make_hook(layer_id)))
        try:
            with torch.inference_mode():
                out = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            return out.last_hidden_state
        except _StopForward:
            return None
        finally:
            for handle in handles:
                handle.remove()

    def frozen_head_state(self, lm_head: bool = True) -> dict[str, torch.Tensor]:
        """The frozen final norm and LM head the server needs (never the whole backbone), in float32.

        ``lm_head=False`` leaves out the LM head (vocabulary x hidden: the largest tensor of a small
        model, and with memory-mapped weights reading it pages it all in); a classification side
        network needs only the final norm.
        """
        state = {f"final_norm.{k}": v.detach().float().clone() for k, v in self.final_norm.state_dict().items()}
        if self.is_decoder and lm_head:
            state["lm_head.weight"] = self.model.get_output_embeddings().weight.detach().float().clone()
        return state

    def verbalizer_ids(self, words: Sequence[str]) -> list[int]:
        """First token id of each verbalizer word, for zero-shot scoring."""
        ids = []
        for word in words:
            tokens = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise BackboneError(f"verbalizer {word!r} tokenizes to nothing")
            ids.append(tokens[0])
        return ids

    def zero_shot_logits(self, final_hidden: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits of ``token_ids`` from final states ``[n, hidden]``: only those rows of the head."""
        if not self.is_decoder:
            raise BackboneError("zero-shot prompting needs a decoder (causal LM) backbone")
        head = self.model.get_output_embeddings()
        if hasattr(head, "dequantize_rows"):  # a quantized head: dequantize just these rows
            weight = head.dequantize_rows(list(token_ids), final_hidden.dtype)
        else:
            weight = head.weight[list(token_ids)]
        bias = head.bias[list(token_ids)] if getattr(head, "bias", None) is not None else None
        return torch.nn.functional.linear(final_hidden, weight, bias)

    def describe(self) -> dict:
        quantized = sum(
            m.in_features * m.out_features + (m.out_features if m.bias is not None else 0)
            for m in self.model.modules()
            if isinstance(m, QuantizedLinear)
        )
        return {
            "name": self.name,
            "fingerprint": self.fingerprint,
            "precision": self.precision,
            "layers": self.layers,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "parameters": sum(p.numel() for p in self.model.parameters()) + quantized,
        }

    def __repr__(self) -> str:
        return f"Backbone({json.dumps(self.describe())})"
