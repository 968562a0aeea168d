"""Which forward a prepared copy runs on (lean or transformers), and its tokenizer and empty module tree.

Why: in a Flower deployment every message starts a fresh ClientApp process, and importing
transformers' model code is a large share of its start-up. For the families it covers, the lean
forward (:mod:`mobiflower.platform.lean_llama`, :mod:`mobiflower.platform.lean_opt`: the same module
names and arithmetic) and the lean tokenizer run without importing transformers at all.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from mobiflower.platform.hf_model import BackboneError
from mobiflower.platform.lean_llama import (
    LeanConfig,
    LeanLlamaForCausalLM,
    LeanTokenizer,
    llama_problem,
    read_config,
    tokenizer_problem,
)

FORWARD_IMPLEMENTATIONS = ("auto", "lean", "transformers")
"""How a prepared copy is run: ``lean`` (:mod:`mobiflower.platform.lean_llama` for the llama family,
:mod:`mobiflower.platform.lean_opt` for OPT, no transformers import), ``transformers``, or ``auto``
(lean where it applies, else transformers). The environment variable ``MOBIFLOWER_DEVICE_FORWARD``
sets the default."""

LEAN_MODEL_TYPES = ("llama", "opt")
"""Families with a lean forward: :mod:`mobiflower.platform.lean_llama`, :mod:`mobiflower.platform.lean_opt`."""


def lean_problem(config: dict) -> str | None:
    """Why this ``config.json`` cannot run on the lean forward (None when it can)."""
    model_type = config.get("model_type")
    if model_type not in LEAN_MODEL_TYPES:
        return f"model type {model_type!r} (lean forward: {', '.join(LEAN_MODEL_TYPES)})"
    if model_type == "opt":
        from mobiflower.platform.lean_opt import opt_problem

        return opt_problem(config)
    return llama_problem(config)


def build_lean_model(config: dict | LeanConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The lean module tree of the config's family (:class:`~mobiflower.platform.lean_llama.LeanLlamaForCausalLM`,
    or :class:`~mobiflower.platform.lean_opt.LeanOPTForCausalLM`), uninitialised (build it under
    ``torch.device('meta')`` to allocate nothing before the weights are assigned, or load a state
    dict into it)."""
    config = config if isinstance(config, LeanConfig) else LeanConfig(config)
    problem = lean_problem(vars(config))
    if problem is not None:
        raise ValueError(f"the lean forward cannot run this model: {problem}")
    if config.model_type == "opt":
        from mobiflower.platform.lean_opt import LeanOPTForCausalLM

        model: nn.Module = LeanOPTForCausalLM(config)
    else:
        model = LeanLlamaForCausalLM(config)
    for param in model.parameters():
        if param.dtype != dtype and not param.is_meta:  # (meta parameters are replaced by the checkpoint's)
            param.data = param.data.to(dtype)
    return model


def forward_implementation(folder: str | Path, implementation: str | None = None) -> str:
    """``lean`` or ``transformers``: which forward (and tokenizer) a prepared copy loads with."""
    choice = (implementation or os.environ.get("MOBIFLOWER_DEVICE_FORWARD") or "auto").strip().lower()
    if choice not in FORWARD_IMPLEMENTATIONS:
        raise BackboneError(f"device forward {choice!r} is unknown: choose one of {', '.join(FORWARD_IMPLEMENTATIONS)}")
    if choice == "transformers":
        return choice
    problem = lean_problem(read_config(folder)) or tokenizer_problem(folder)
    if problem is None:
        return "lean"
    if choice == "lean":
        raise BackboneError(f"the lean device forward cannot load {folder}: {problem}")
    return "transformers"


def load_prepared_tokenizer(folder: str | Path, forward: str = "lean"):
    """The tokenizer of a prepared copy: the lean one (``tokenizers`` only) for the lean forward,
    transformers' ``AutoTokenizer`` otherwise. (The device may drop it while it forwards and load
    it again: :meth:`mobiflower.platform.backbone.Backbone.release_tokenizer`.)"""
    if forward == "lean":
        return LeanTokenizer.from_folder(folder)
    from transformers import AutoTokenizer  # only off the lean path: its import is what lean avoids

    return AutoTokenizer.from_pretrained(folder)


def build_empty_model(folder: str | Path, forward: str, causal_lm: bool, dtype: torch.dtype) -> nn.Module:
    """The module tree of the copy at ``folder`` for ``forward``, built on the ``meta`` device: nothing
    allocated, no random init, every tensor waiting to be assigned. ``causal_lm`` asks transformers
    for the model with its LM head (a decoder) rather than the base model."""
    if forward == "lean":
        with torch.device("meta"):
            return build_lean_model(read_config(folder), dtype)
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    config = AutoConfig.from_pretrained(folder)
    auto = AutoModelForCausalLM if causal_lm else AutoModel
    with torch.device("meta"):
        return auto.from_config(config, dtype=dtype)


__all__ = ["FORWARD_IMPLEMENTATIONS", "forward_implementation", "load_prepared_tokenizer", "build_empty_model"]
