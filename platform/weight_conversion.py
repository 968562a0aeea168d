"""Convert a frozen model's weights to a device precision in place, and count what they take.

Conversion reads every fp32 weight once, so a device does not convert at start-up: it loads the
prepared copy (:mod:`mobiflower.platform.prepared_weights`) that this conversion wrote once.
"""

from __future__ import annotations

import torch
from torch import nn

from mobiflower.platform.hf_model import find_blocks
from mobiflower.platform.precision import DEFAULT_INT4_GROUP_SIZE, WeightPrecisionError, normalize_precision
from mobiflower.platform.quantized_layers import Int4Linear, Int8Embedding, Int8Linear, QuantizedLinear


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 ``Conv1D`` (a linear layer with a transposed weight ``[in, out]``)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def _linear_weight(module: nn.Module) -> torch.Tensor:
    return module.weight.t() if _is_conv1d(module) else module.weight


def block_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every linear layer inside the model's transformer blocks."""
    config = model.config
    blocks = find_blocks(model.base_model, int(config.num_hidden_layers))
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for block in blocks:
        for module in block.modules():
            if isinstance(module, (nn.Linear, QuantizedLinear)) or _is_conv1d(module):
                found.append((names[id(module)], module))
    return found


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model``, replacing what was there."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def quantize_backbone_weights(
    model: nn.Module, precision: str, group_size: int = DEFAULT_INT4_GROUP_SIZE, embeddings: bool = True
) -> nn.Module:
    """Convert a frozen model in place to ``precision`` and return it.

    ``fp32``/``bf16`` cast every parameter (buffers such as rotary frequencies keep their
    precision, as transformers does when it loads a model in bf16); ``int8``/``int4`` replace the
    linear layers of the transformer blocks by :class:`Int8Linear`/:class:`Int4Linear`, and
    (``embeddings``) the token embedding table by an :class:`Int8Embedding` (per-row int8 in both
    modes: the residual stream starts there), with a tied LM head becoming an int8 view of the
    same rows. Position embeddings, norms and an untied LM head stay as they are.

    The replaced fp32 modules are dropped: nothing in the model references them afterwards. But a
    model whose weights are memory-mapped from a file keeps the pages this conversion read
    resident until the mapping goes, so a device loads the prepared copy
    (:func:`prepare_quantized_backbone`) rather than quantizing at start-up.
    """
    precision = normalize_precision(precision)
    if precision in ("fp32", "bf16"):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        for param in model.parameters():
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        return model
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    for name, module in block_linears(model):
        if isinstance(module, QuantizedLinear):
            raise WeightPrecisionError(
                f"{name} is already quantized ({module.precision}): quantize the fp32 checkpoint instead"
            )
        weight, bias = _linear_weight(module), getattr(module, "bias", None)
        if precision == "int8":
            new = Int8Linear.from_float(weight, bias)
        else:
            if weight.shape[1] % group_size:
                raise WeightPrecisionError(
                    f"int4 group_size {group_size} does not divide {name}'s "
                    f"{weight.shape[1]} inputs: choose a group size that does (e.g. 32)"
                )
            new = Int4Linear.from_float(weight, bias, group_size)
        set_module(model, name, new)
        del module, weight, bias
    if embeddings:
        _quantize_embeddings(model)
    model.requires_grad_(False)
    return model


def _quantize_embeddings(model: nn.Module) -> None:
    """The input embedding to :class:`Int8Embedding`, and a tied LM head to an int8 view of it."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(emb, nn.Embedding):
        return
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = (
        isinstance(head, nn.Linear)
        and head.weight.data_ptr() == emb.weight.data_ptr()
        and head.weight.shape == emb.weight.shape
    )
    names = {id(m): n for n, m in model.named_modules()}
    table = Int8Embedding.from_float(emb)
    set_module(model, names[id(emb)], table)
    if tied:
        set_module(model, names[id(head)], Int8Linear.sharing(table, head.bias))


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of the weights by kind: quantized block layers, and everything else (parameters + buffers)."""
    seen: set[int] = set()
    quantized = other = 0
    q_ids = {id(t) for m in model.modules() if isinstance(m, (QuantizedLinear, Int8Embedding)) for t in m.buffers()}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        if id(t) in q_ids:
            quantized += t.numel() * t.element_size()
        else:
            other += t.numel() * t.element_size()
    return {"quantized": quantized, "other": other, "total": quantized + other}


__all__ = ["block_linears", "quantize_backbone_weights", "set_module", "weight_bytes"]
