"""The pretrained-tail side network: the backbone's own upper blocks, with PEFT LoRA, on the server.

The device forwards its frozen blocks below a *cut* and sends the output of block ``cut - 1`` for
every real token (token policy ``nonpad``). The server holds a copy of blocks ``cut ..`` and the
final norm, loaded from the same public weights, wraps them with PEFT LoRA and trains the LoRA
weights plus, for classification, a linear head on the last real token; for causal-LM the tail ends
in the backbone's frozen LM head (public weights too, tied to the embeddings in SmolLM2), scored on
the positions the frame's targets name. Unlike the ladder and adapter families it
starts from pretrained knowledge (DESIGN.md section 1).

What travels and what is saved is only the trainable part (LoRA A/B and the head): the frozen
blocks are the public weights, which the server loads itself and the device already has. The
delivered form is a PEFT adapter for the stock ``AutoModelForSequenceClassification`` (layer
indices of the whole model, the head as ``score``), or for ``AutoModelForCausalLM`` (LoRA only):
:func:`save_peft_adapter`.

Flower-free, like the rest of the core; the device uses only the export helpers and
:func:`lora_deltas` (its local inference applies the adapter to its own upper blocks).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mobiflower.platform.frames import IGNORE_INDEX
from mobiflower.platform.side_networks import SideBatch, SideNetworkConfig, SideNetworkError

TAIL_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "smollm3")
DEFAULT_LORA_TARGETS = ("q_proj", "v_proj")
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix of the stock sequence classifier's modules
HEAD_FILE = "mobiflower_tail.json"  # beside the PEFT files: what mobiflower needs to run the adapter
LM_HEAD_KEY = "lm_head.weight"  # the public weights' output embeddings, for a causal-LM tail


def tail_cut(config: SideNetworkConfig) -> int:
    """The first block the server runs (the device sends the output of block ``cut - 1``)."""
    return config.layers[0] + 1


def _total_layers(config: SideNetworkConfig) -> int:
    return int(config.backbone_config["num_hidden_layers"])


def check_tail_config(config: SideNetworkConfig) -> None:
    """Refuse a tail configuration that cannot be built, saying what to change."""
    model_type = config.backbone_config.get("model_type")
    if model_type not in TAIL_MODEL_TYPES:
        raise SideNetworkError(
            f"the pretrained tail runs llama-family backbones {TAIL_MODEL_TYPES}, not "
            f"{model_type!r}: use family 'ladder' or 'adapter' for this model"
        )
    if len(config.layers) != 1:
        raise SideNetworkError(
            f"the pretrained tail reads one cut layer, got taps {config.layers}: set the cut "
            "(tail-cut) instead of num-taps / layers"
        )
    total = _total_layers(config)
    if not 1 <= tail_cut(config) < total:
        raise SideNetworkError(
            f"cut {tail_cut(config)} leaves no block for the server of a {total}-block backbone: "
            f"choose a cut in 1..{total - 1}"
        )
    if config.token_policy not in ("nonpad", "all"):
        raise SideNetworkError("the pretrained tail's attention reads every real token: use token policy 'nonpad'")
    if config.lora_rank < 1 or config.lora_alpha <= 0:
        raise SideNetworkError(f"LoRA rank {config.lora_rank} and alpha {config.lora_alpha} must be positive")


def tail_weights(model: nn.Module, cut: int, lm_head: bool = False) -> dict[str, torch.Tensor]:
    """The public weights the server's tail needs: blocks ``cut ..`` and the final norm, keyed as in the
    base model (``layers.15.self_attn.q_proj.weight``, ``norm.weight``), plus ``lm_head.weight`` (the
    output embeddings) when ``lm_head``; float32, no copies kept alive of the rest of ``model``. (Stored
    in bfloat16 for a bf16-autocast server they trained slower in a
    whole run here, though faster in isolation: RESULTS.md.)"""
    base = model.base_model
    keep = {}
    for name, tensor in base.state_dict().items():
        if name.startswith("layers."):
            if int(name.split(".")[1]) >= cut:
                keep[name] = tensor.detach().float().clone()
        elif name.startswith("norm."):
            keep[name] = tensor.detach().float().clone()
    if lm_head:
        keep[LM_HEAD_KEY] = model.get_output_embeddings().weight.detach().float().clone()
    if not any(k.startswith("norm.") for k in keep):
        raise SideNetworkError(
            f"{type(base).__name__} has no final norm named 'norm': the pretrained tail runs "
            f"llama-family backbones {TAIL_MODEL_TYPES}: use family 'ladder' or 'adapter' for this model"
        )
    return keep


@dataclass
class PublicTail:
    """What the server loads of the public backbone for a tail: its config, the tail's weights, and the
    fingerprint of the public weights in float32 (a device's frames are checked against it)."""

    ref: str
    cut: int
    backbone_config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    fingerprint: str

    def check_device(self, fingerprint: str) -> None:
        """Refuse a device whose backbone is not these public weights (at any precision), or is too
        shallow to forward up to the cut; the message says what to change."""
        check_device_fingerprint(self, fingerprint)


def default_cut(num_layers: int) -> int:
    """Where the tail starts when no cut is given: half the blocks on the device, half on the server."""
    return max(1, num_layers // 2)


def resolve_cut(ref: str, cut: int = 0) -> int:
    """``cut``, or (0) :func:`default_cut` of model ``ref``'s depth, read from its config alone."""
    if cut:
        return cut
    from transformers import AutoConfig

    from mobiflower.platform.hf_model import resolve_model

    return default_cut(int(AutoConfig.from_pretrained(resolve_model(ref)).num_hidden_layers))


def load_tail_weights(ref: str, cut: int = 0, lm_head: bool = False) -> PublicTail:
    """The public checkpoint of ``ref`` (the bundled name, a folder or a hub id) in float32: the tail's
    blocks ``cut ..`` (0: :func:`default_cut`), the final norm (and with ``lm_head`` the LM head), the
    backbone config and the weights' fingerprint."""
    from mobiflower.platform.backbone import BackboneIdentity
    from mobiflower.platform.hf_model import load_hf_model, weights_digest

    model, _ = load_hf_model(ref, torch.float32)
    config = json.loads(json.dumps(model.config.to_dict(), default=str))  # as it reads back from any JSON
    total = int(config["num_hidden_layers"])
    cut = cut or default_cut(total)
    if not 1 <= cut < total:
        raise SideNetworkError(
            f"tail cut {cut} leaves no block for the server of the {total}-block {ref}: choose a cut in 1..{total - 1}"
        )
    identity = BackboneIdentity(
        str(config["model_type"]), int(config["hidden_size"]), total, "float32", weights_digest(model)
    )
    weights = tail_weights(model, cut, lm_head)
    del model
    return PublicTail(ref, cut, config, weights, identity.fingerprint)


def _fingerprint_parts(fingerprint: str) -> tuple[str, str, int, str, str]:
    """``llama-d576-L30-float32-<digest>`` -> (model type, width, depth, dtype, digest)."""
    parts = str(fingerprint).split("-")
    if len(parts) < 5 or not parts[-4].startswith("d") or not parts[-3].startswith("L"):
        raise SideNetworkError(f"{fingerprint!r} is not a backbone fingerprint")
    try:
        depth = int(parts[-3][1:])
    except ValueError:
        raise SideNetworkError(f"{fingerprint!r} is not a backbone fingerprint") from None
    return "-".join(parts[:-4]), parts[-4][1:], depth, parts[-2], parts[-1]


def check_device_fingerprint(public: PublicTail, fingerprint: str) -> None:
    """A device may feed the tail when it runs the same public weights (any precision: the digest of
    the prepared copy at its precision) and has at least ``cut`` blocks."""
    model_type, width, depth, dtype, digest = _fingerprint_parts(fingerprint)
    p_type, p_width, p_depth, _, p_digest = _fingerprint_parts(public.fingerprint)
    if (model_type, width) != (p_type, p_width):
        raise SideNetworkError(
            f"device backbone {fingerprint} is not {public.ref} ({public.fingerprint}): every "
            "device of a pretrained-tail run must run that model (at any precision)"
        )
    if depth < public.cut:
        raise SideNetworkError(
            f"device backbone {fingerprint} has {depth} blocks, fewer than the tail cut "
            f"{public.cut}: lower tail-cut to at most {depth}, or use family 'ladder'"
        )
    if digest == p_digest:
        return
    from mobiflower.platform.precision import precision_from_fingerprint
    from mobiflower.platform.prepared_weights import ensure_prepared, read_manifest

    precision = precision_from_fingerprint(fingerprint)  # a prepared copy's digest is taken at its precision
    if precision is not None:
        manifest = read_manifest(ensure_prepared(public.ref, precision))
        if manifest and manifest.get("digest") == digest:
            return
    raise SideNetworkError(
        f"device backbone {fingerprint} does not carry the public weights of {public.ref} "
        f"({public.fingerprint}): the server's tail must start from the device's own weights; "
        "give the server the device's model"
    )


def _tail_base(config: SideNetworkConfig, frozen: Mapping[str, torch.Tensor]) -> nn.Module:
    """The upper blocks as a transformers base model of ``total - cut`` blocks, its weights assigned from
    ``frozen`` without copies (networks of one fleet share them), no vocabulary embedding."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel

    cut, total = tail_cut(config), _total_layers(config)
    values = dict(config.backbone_config)
    model_type = values.pop("model_type")
    hf_config = AutoConfig.for_model(
        model_type,
        **{
            k: v
            for k, v in values.items()
            if k not in ("architectures", "transformers_version", "_name_or_path", "auto_map")
        },
    )
    hf_config.num_hidden_layers = total - cut
    if isinstance(getattr(hf_config, "layer_types", None), list):
        hf_config.layer_types = hf_config.layer_types[cut:]
    hf_config.vocab_size, hf_config.pad_token_id, hf_config.tie_word_embeddings = 1, None, False
    with init_empty_weights(include_buffers=False):
        base = AutoModel.from_config(hf_config)
    state = {}
    for name, tensor in frozen.items():
        if name.startswith("layers."):
            index, rest = name.split(".", 2)[1:]
            state[f"layers.{int(index) - cut}.{rest}"] = tensor
        elif name.startswith("norm."):
            state[name] = tensor
    base.set_input_embeddings(nn.Embedding(1, int(hf_config.hidden_size)))
    result = base.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not k.startswith("embed_tokens.")]
    if missing or result.unexpected_keys:
        raise SideNetworkError(
            f"the tail weights do not fit blocks {cut}..{total - 1} of this backbone "
            f"({len(missing)} missing, e.g. {missing[:1]}; {len(result.unexpected_keys)} unexpected, "
            f"e.g. {result.unexpected_keys[:1]}): load them with load_tail_weights(ref, cut)"
        )
    return base.eval().requires_grad_(False)


class PretrainedTailNetwork(nn.Module):
    """Blocks ``cut ..`` of the backbone with PEFT LoRA, the frozen final norm, and a linear head
    (classification) or the frozen LM head (causal-LM).

    Its ``state_dict`` holds the trainable tensors only (LoRA A/B, ``head.weight``): checkpoints, tail
    averages, FedAvg and delivery move those; the frozen blocks and LM head come from the public weights.
    """

    def __init__(self, config: SideNetworkConfig, frozen: Mapping[str, torch.Tensor]):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        check_tail_config(config)
        self.config = config
        base = _tail_base(config, frozen)
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            bias="none",
        )
        self.tail = get_peft_model(base, lora)
        if config.head == "lm":
            if LM_HEAD_KEY not in frozen:
                raise SideNetworkError(
                    "a causal-LM tail needs the backbone's LM head: load the public weights with "
                    "load_tail_weights(ref, cut, lm_head=True)"
                )
            self.head = None
            self.register_buffer("lm_head", frozen[LM_HEAD_KEY], persistent=False)  # shared, never copied
        else:
            self.head = nn.Linear(config.hidden_size, config.num_classes, bias=False)
        self._trainable = {n for n, p in self.named_parameters() if p.requires_grad}

    def check(self, batch: SideBatch) -> None:
        if len(batch.states) != 1:
            raise SideNetworkError(
                f"the pretrained tail reads one cut layer {self.config.layers}, got {len(batch.states)} tapped layers"
            )
        if batch.states[0].shape[-1] != self.config.hidden_size:
            raise SideNetworkError(
                f"cut state width {batch.states[0].shape[-1]} != the tail's {self.config.hidden_size}"
            )

    def forward(self, batch: SideBatch) -> torch.Tensor:
        self.check(batch)
        out = self.tail(inputs_embeds=batch.states[0], attention_mask=batch.mask.long(), use_cache=False)
        hidden = out.last_hidden_state
        if self.head is None:  # causal-LM: vocabulary logits of the scored positions only ([N, vocab])
            if batch.targets is not None:
                hidden = hidden[batch.targets != IGNORE_INDEX]
            return F.linear(hidden, self.lm_head.to(hidden.dtype))
        feature = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.feature_index]
        return self.head(feature)

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):  # noqa: D102
        full = super().state_dict(*args, prefix=prefix, keep_vars=keep_vars)
        kept = OrderedDict((k, v) for k, v in full.items() if k[len(prefix) :] in self._trainable)
        if destination is not None:
            destination.update(kept)
            return destination
        return kept

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):  # noqa: D102
        unexpected = sorted(set(state_dict) - self._trainable)
        missing = sorted(self._trainable - set(state_dict))
        if unexpected or (strict and missing):
            raise SideNetworkError(
                f"the state does not fit this pretrained tail ({len(missing)} missing, e.g. "
                f"{missing[:1]}; {len(unexpected)} unexpected, e.g. {unexpected[:1]}): it was "
                "trained with another cut, rank or LoRA targets"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)


# ---- delivery: the PEFT adapter for the stock model ----------------------------------------------
def _stock_key(name: str, cut: int) -> str:
    """A trainable tensor's name in PEFT's adapter file of the stock sequence classifier."""
    if name == "head.weight":
        return PEFT_PREFIX + "score.weight"
    # tail.base_model.model.layers.{i}.self_attn.q_proj.lora_A.default.weight
    rest = name.removeprefix("tail.base_model.model.")
    parts = rest.split(".")
    if parts[0] != "layers" or parts[-2] != "default":
        raise SideNetworkError(f"unexpected tail tensor {name!r}")
    parts[1] = str(int(parts[1]) + cut)
    del parts[-2]
    return PEFT_PREFIX + "model." + ".".join(parts)


def stock_state(config: SideNetworkConfig, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tail's trainable state under the stock model's PEFT names (what :func:`lora_deltas` reads)."""
    cut = tail_cut(config)
    return {_stock_key(k, cut): v for k, v in state.items()}


def save_peft_adapter(
    config: SideNetworkConfig,
    state: Mapping[str, torch.Tensor],
    directory: str | Path,
    base_model: str = "",
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the trained tail as a PEFT adapter folder for ``AutoModelForSequenceClassification`` (head
    ``classification``) or ``AutoModelForCausalLM`` (head ``lm``).

    ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA on blocks ``cut ..`` with the whole
    model's layer indices, a classifier's head as ``score``) load with ``PeftModel.from_pretrained`` onto
    the stock transformers model; ``mobiflower_tail.json`` adds the side-network config. ``dtype`` (fp16 by
    default) is what travels: the adapter is tiny, and half precision halves it again.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    from mobiflower.platform.atomic import atomic_directory

    check_tail_config(config)
    cut, total = tail_cut(config), _total_layers(config)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in stock_state(config, state).items()}
    lora = LoraConfig(
        task_type="CAUSAL_LM" if config.head == "lm" else "SEQ_CLS",
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets),
        layers_to_transform=list(range(cut, total)),
        layers_pattern="layers",
        bias="none",
        base_model_name_or_path=base_model or str(config.extra.get("model", "")),
    )
    with atomic_directory(directory) as tmp:
        lora.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"))
        (tmp / HEAD_FILE).write_text(json.dumps({"side_network": json.loads(config.to_json())}, indent=1))
    return Path(directory)


def is_peft_adapter(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / "adapter_config.json").exists() and (path / HEAD_FILE).exists()


def read_peft_adapter(directory: str | Path) -> tuple[SideNetworkConfig, dict[str, torch.Tensor]]:
    """The side-network config and the adapter's tensors (stock names, float32) of :func:`save_peft_adapter`."""
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_peft_adapter(directory):
        raise SideNetworkError(
            f"{directory} is not a delivered pretrained-tail adapter (adapter_config.json and {HEAD_FILE} expected)"
        )
    meta = json.loads((directory / HEAD_FILE).read_text())
    config = SideNetworkConfig(**meta["side_network"])
    tensors = {k: v.float() for k, v in load_file(str(directory / "adapter_model.safetensors")).items()}
    return config, tensors


def lora_deltas(
    config: SideNetworkConfig, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]], torch.Tensor | None]:
    """From an adapter's stock-named tensors: ``{(block, 'self_attn.q_proj'): (A, B)}`` and the head weight
    (None for a causal-LM adapter: its head is the backbone's own LM head).

    What a device needs to apply the adapter to its own upper blocks (any weight precision):
    ``y = base(x) + (alpha / r) * x A^T B^T``.
    """
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    head = None
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name == "score.weight":
            head = tensor
            continue
        parts = name.removeprefix("model.").split(".")
        if parts[0] != "layers" or parts[-2] not in ("lora_A", "lora_B"):
            raise SideNetworkError(f"unexpected adapter tensor {key!r}")
        module = ".".join(parts[2:-2])
        pairs.setdefault((int(parts[1]), module), {})[parts[-2]] = tensor
    if head is None and config.head != "lm":
        raise SideNetworkError("the adapter has no head ('score.weight'): was it written by save_peft_adapter?")
    out = {}
    for where, pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise SideNetworkError(f"block {where[0]} {where[1]} lacks lora_A or lora_B")
        out[where] = (pair["lora_A"], pair["lora_B"])
    return out, head
