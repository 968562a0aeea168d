"""Text generation on the device: its own backbone + a delivered causal-LM adapter, no server.

The adapter (a pretrained tail trained with the backbone's LM head, delivered as a PEFT folder by
:func:`mobiflower.platform.pretrained_tail.save_peft_adapter`) is applied to the device's upper blocks
by the same forward hooks local evaluation uses (:class:`mobiflower.clients.inference.AdapterHooks`:
LoRA deltas on the target projections of blocks ``cut ..``, and by default the codec round trip on
block ``cut - 1``'s output that training saw). The weights are whatever the device runs: the
checkpoint in float32, or a prepared copy at ``fp32``/``bf16``/``int8``/``int4``
(:mod:`mobiflower.platform.prepared_weights`, memory-mapped, quantized layers dequantized per call).

Which forward: a prepared copy is normally run on the lean llama forward
(:mod:`mobiflower.platform.lean_llama`), which has no KV cache (``past_key_values``): it recomputes
every position of every step. Generation therefore loads the same prepared copy (same tensors, same
quantized layers) on **transformers' own forward** (``load_prepared_backbone(...,
implementation="transformers")``) and decodes with ``model.generate``: a KV cache, greedy or
sampling (temperature, top-p) through ``GenerationConfig``, tokens streamed through a
``TextStreamer``. Importing transformers costs start-up time; a generation session pays it once.

Prompts are tokenized as training encoded a causal-LM sample (no special tokens added; a chat
rendered with the tokenizer's chat template, ending in the assistant's header).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from mobiflower.clients.inference import AdapterHooks
from mobiflower.platform.hf_model import find_blocks, load_hf_model
from mobiflower.platform.precision import normalize_precision, precision_from_fingerprint
from mobiflower.platform.prepared_weights import ensure_prepared, is_prepared_folder, load_prepared_backbone
from mobiflower.platform.pretrained_tail import read_peft_adapter
from mobiflower.platform.side_networks import SideNetworkConfig, SideNetworkError

OnText = Callable[[str], None]
"""Called with each piece of text as soon as it is final (whole words, as transformers' streamer cuts it)."""


@dataclass(frozen=True)
class Generated:
    """What one generation produced: the new text, its token ids, the prompt's length and the time taken."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return len(self.token_ids) / max(self.seconds, 1e-9)


def load_generation_model(ref: str, weights: str | None = None, weights_dir: str | Path | None = None):
    """``(model, tokenizer)``: transformers' causal LM of ``ref`` with its KV cache, from the checkpoint in
    float32 (``weights`` None) or from the prepared copy at ``weights`` (built once if missing; ``ref``
    may be a prepared folder itself), frozen."""
    if weights is None and not is_prepared_folder(ref):
        model, tokenizer = load_hf_model(ref, torch.float32)
    else:
        folder = Path(ref).expanduser() if is_prepared_folder(ref) else ensure_prepared(ref, weights, weights_dir)
        precision = None if weights is None else normalize_precision(weights)
        model, tokenizer, _ = load_prepared_backbone(folder, precision, implementation="transformers")
    if not callable(getattr(model, "generate", None)) or model.get_output_embeddings() is None:
        raise SideNetworkError(f"{ref} is not a causal language model: it cannot generate text")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval().requires_grad_(False), tokenizer


class LocalGenerator:
    """Generates text with the device's backbone and a delivered causal-LM adapter on its upper blocks.

    Build it with :meth:`load`; call :meth:`close` (or use it as a context manager) to take the hooks off.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        config: SideNetworkConfig,
        tensors: Mapping[str, torch.Tensor],
        match_training_precision: bool = True,
    ):
        if config.head != "lm":
            raise SideNetworkError(
                "this adapter classifies text (its head is a classifier): it does not generate; use `mobiflower infer`"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        total = int(model.config.num_hidden_layers)
        blocks = find_blocks(model.base_model, total)
        self.adapter = AdapterHooks(blocks, int(model.config.hidden_size), config, tensors, match_training_precision)

    @classmethod
    def load(
        cls,
        adapter: str | Path,
        model: str | None = None,
        weights: str | None = None,
        match_training_precision: bool = True,
        weights_dir: str | Path | None = None,
    ) -> "LocalGenerator":
        """The adapter folder on ``model`` (default: the model the adapter names) at ``weights`` (default:
        the precision it was trained with; ``fp32``/``bf16``/``int8``/``int4`` use the prepared copy)."""
        config, tensors = read_peft_adapter(adapter)
        if config.head != "lm":
            raise SideNetworkError(
                f"{adapter} is a classification adapter: it classifies text (`mobiflower infer`), it does not generate"
            )
        ref = model or config.extra.get("model")
        if not ref:
            raise SideNetworkError(f"{adapter} does not name its backbone: pass --model")
        if weights is None:
            precision = precision_from_fingerprint(config.fingerprint)
            weights = None if precision in (None, "fp32") else precision
        lm, tokenizer = load_generation_model(str(ref), weights, weights_dir)
        return cls(lm, tokenizer, config, tensors, match_training_precision)

    def __enter__(self) -> "LocalGenerator":
        return self

    def __exit__(self, *_exc) -> None:
        self.close()

    def close(self) -> None:
        self.adapter.remove()

    def prompt_ids(self, prompt: str, chat: bool = False) -> list[int]:
        """The prompt's token ids as training encoded text (no special tokens added); with ``chat`` the
        prompt is a user turn rendered by the tokenizer's chat template, ending in the assistant's header."""
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise SideNetworkError("this model's tokenizer has no chat template: generate without --chat")
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SideNetworkError("the prompt is empty: give some text to continue")
        return list(ids)

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        chat: bool = False,
        on_text: OnText | None = None,
    ) -> Generated:
        """Continue ``prompt`` (see :meth:`generate_ids`)."""
        return self.generate_ids(
            self.prompt_ids(prompt, chat), max_new_tokens, temperature, top_p, seed, on_text=on_text
        )

    def generation_config(self, max_new_tokens: int, temperature: float, top_p: float):
        """Greedy (``temperature`` 0) or sampling at ``temperature`` with nucleus ``top_p`` (no top-k)."""
        from transformers import GenerationConfig

        if max_new_tokens < 1:
            raise SideNetworkError(f"max-new-tokens={max_new_tokens} must be at least 1")
        if temperature < 0 or not 0 < top_p <= 1:
            raise SideNetworkError(f"temperature={temperature} must be >= 0 and top-p={top_p} in (0, 1]")
        settings: dict = {
            "max_new_tokens": int(max_new_tokens),
            "eos_token_id": self.tokenizer.eos_token_id,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            settings.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            settings.update(do_sample=False)
        return GenerationConfig(**settings)

    @torch.inference_mode()
    def generate_ids(
        self,
        input_ids: Sequence[int],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        adapter: bool = True,
        on_text: OnText | None = None,
    ) -> Generated:
        """Up to ``max_new_tokens`` tokens after ``input_ids`` with a KV cache, each piece of text passed to
        ``on_text`` as it is decoded. ``seed`` fixes sampling (the global RNG is left as it was);
        ``adapter=False`` generates with the backbone alone."""
        config = self.generation_config(max_new_tokens, temperature, top_p)
        streamer = _streamer(self.tokenizer, on_text) if on_text is not None else None
        ids = torch.as_tensor([list(input_ids)], dtype=torch.long)
        t0 = time.perf_counter()
        with torch.random.fork_rng(devices=[]), self.adapter.active(adapter):
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer
            )
        new = out[0, ids.shape[1] :].tolist()
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        return Generated(text, new, ids.shape[1], time.perf_counter() - t0)


def _streamer(tokenizer, on_text: OnText):
    """transformers' ``TextStreamer`` (skips the prompt and special tokens) handing its text to ``on_text``."""
    from transformers import TextStreamer

    class CallbackStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                on_text(text)

    return CallbackStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


__all__ = ["Generated", "LocalGenerator", "OnText", "SideNetworkError", "load_generation_model"]
