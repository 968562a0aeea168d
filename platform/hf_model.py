"""A Hugging Face model as the backbone sees it: resolve its reference, load its pretrained weights, find
its block list, digest its weights.

Why a module of its own: both the backbone (:mod:`mobiflower.platform.backbone`) and the weight
conversion and prepared copies beneath it (:mod:`mobiflower.platform.weight_conversion`,
:mod:`mobiflower.platform.prepared_weights`) need these, and the backbone builds on those modules,
so they sit below all of them.
"""

from __future__ import annotations

import hashlib
import logging
import sys

import torch
from torch import nn

from mobiflower.platform.assets import BUNDLED_MODEL, resolve_bundled_model
from mobiflower.platform.shapes import SHAPES, materialize_shape, shape_dir

DECODER_TYPES = ("llama", "opt", "gpt2", "qwen2", "qwen3", "mistral", "gemma", "phi3", "smollm3")


def resolve_model(ref: str, materialize: bool = True) -> str:
    """Map a model reference to what transformers loads: the bundled alias, a shipped shape
    (:mod:`mobiflower.platform.shapes`: its random-weight checkpoint, built once unless
    ``materialize`` is False), a folder, or a hub id."""
    if ref in SHAPES:
        return str(
            materialize_shape(ref, log=lambda m: print(m, file=sys.stderr, flush=True))
            if materialize
            else shape_dir(ref)
        )
    if ref == BUNDLED_MODEL:
        return str(resolve_bundled_model())
    return ref


class BackboneError(ValueError):
    """The model or the tap selection cannot be used; the message says what to change."""


def find_blocks(base: nn.Module, num_layers: int) -> nn.ModuleList:
    """The model's list of transformer blocks (the first ModuleList as long as the model is deep)."""
    for module in base.modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            return module
    raise BackboneError(f"could not find the {num_layers} transformer blocks of {type(base).__name__}")


def _state_leaves(name: str, value) -> list[tuple[str, object]]:
    """The leaves of one ``state_dict`` entry: tensors, or the repr of a plain value (a dtype, None).

    Quantized modules may store packed-params objects or ``(weight, bias)`` tuples (torch.ao's
    dynamic ``Linear``) instead of tensors; those are opened into the tensors they hold.
    """
    if isinstance(value, torch.Tensor):
        return [(name, value)]
    if isinstance(value, (tuple, list)):
        return [leaf for i, item in enumerate(value) for leaf in _state_leaves(f"{name}.{i}", item)]
    for opener in ("_weight_bias", "unpack"):  # a packed-params object (e.g. a ScriptObject)
        fn = getattr(value, opener, None)
        if callable(fn):
            try:
                return _state_leaves(name, fn())
            except Exception:  # noqa: BLE001 - try the next way to open it
                continue
    return [(name, repr(value))]


def weights_digest(model: nn.Module, sample: int = 65536) -> str:
    """A stable digest of the weights: names, shapes, dtypes and a strided sample of every tensor.

    Hashing every byte of a model would slow every device start; a strided sample of up to
    ``sample`` values per tensor tells different checkpoints apart just as well.
    Quantized layers are digested through their stored tensors (int8 / packed uint8 values and
    their scales; a torch.ao packed-params object through the tensors it unpacks to). A backbone
    loaded from a prepared copy (:mod:`mobiflower.platform.prepared_weights`) takes the digest recorded
    when the copy was made, so that the start does not read (and page in) every weight.
    """
    h = hashlib.blake2b(digest_size=8)
    for entry, value in sorted(model.state_dict().items()):
        for name, tensor in _state_leaves(entry, value):
            if not isinstance(tensor, torch.Tensor):
                h.update(f"{name}={tensor}".encode())
                continue
            if tensor.is_quantized:  # a torch.ao quantized tensor: its quantization parameters, then its values
                if tensor.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                    h.update(f"{name}.q:{tensor.q_scale()}:{tensor.q_zero_point()}".encode())
                else:
                    h.update(tensor.q_per_channel_scales().to(torch.float64).numpy().tobytes())
                    h.update(tensor.q_per_channel_zero_points().to(torch.float64).numpy().tobytes())
                tensor = tensor.int_repr()
            flat = tensor.detach().reshape(-1)
            if flat.numel() > sample:
                flat = flat[:: flat.numel() // sample][:sample]
            h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            h.update(flat.to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def load_hf_model(ref: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` of ``ref`` through transformers: a causal LM for decoders, else the base model."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    path = resolve_model(ref)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise BackboneError(
            f"cannot load model {ref!r}: {err}. Pass `smollm2-135m` (after "
            "`mobiflower assets`), a local model folder, or a Hugging Face model id."
        ) from err
    auto = AutoModelForCausalLM if config.model_type in DECODER_TYPES else AutoModel
    return auto.from_pretrained(path, dtype=dtype), AutoTokenizer.from_pretrained(path)
