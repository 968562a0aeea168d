"""Local inference on the device: frozen backbone + the side network the server delivered.

After training, nothing more is needed from the server. The device taps the same layers it sent
during training, takes the same tokens, and (by default) passes them through the same
quantize/dequantize round trip the server trained on, so the side network sees at inference what
it saw in training. The same forward also yields the backbone's zero-shot prompt answer, read from
just two rows of its LM head.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from mobiflower.clients.runtime import select_tokens
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import dequantize, quantize
from mobiflower.platform.precision import precision_from_fingerprint
from mobiflower.platform.pretrained_tail import is_peft_adapter, lora_deltas, read_peft_adapter, stock_state, tail_cut
from mobiflower.platform.side_networks import (
    SideNetwork,
    SideNetworkConfig,
    SideNetworkError,
    build_side_network,
    load_side_network,
    make_side_batch,
    read_side_network_config,
)
from mobiflower.platform.tasks import Example, task_of_config


class LocalClassifier:
    """Classifies text on the device with backbone + side network alone."""

    def __init__(self, backbone: Backbone, net: SideNetwork, match_training_precision: bool = True):
        cfg = net.config
        if cfg.head != "classification":
            raise SideNetworkError("LocalClassifier needs a side network with a classification head")
        if not cfg.serves(backbone.fingerprint):
            raise SideNetworkError(f"side network trained for {cfg.fingerprint}, backbone is {backbone.fingerprint}")
        self.layers = cfg.layers_for(backbone.fingerprint)  # this backbone's taps, slot by slot
        self.backbone_tag = "" if backbone.fingerprint == cfg.fingerprint else backbone.fingerprint
        self.backbone = backbone
        self.net = net.eval()
        self.match_training_precision = match_training_precision
        self.task = task_of_config(cfg.extra)
        self._verbalizers = backbone.verbalizer_ids(self.task.verbalizers) if backbone.is_decoder else None

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

    def _features(self, rows: torch.Tensor) -> torch.Tensor:
        cfg = self.net.config
        if self.match_training_precision and cfg.bits < 16:
            return dequantize(quantize(rows.float(), cfg.bits, cfg.group_size, cfg.rotation))
        return rows.float()

    @torch.inference_mode()
    def logits(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Side-network logits [n, classes] and zero-shot verbalizer logits [n, 2] (None for encoders)."""
        cfg = self.net.config
        enc = self.backbone.tokenize(prompts)
        mask = enc["attention_mask"]
        positions = self.backbone.feature_positions(mask)
        rows: dict[int, torch.Tensor] = {}

        def on_layer(layer_id: int, hidden: torch.Tensor) -> None:
            rows[layer_id] = self._features(select_tokens(hidden, mask, positions, cfg.token_policy))

        final = self.backbone.forward_taps(
            enc["input_ids"], mask, on_layer, layers=self.layers, need_final=self._verbalizers is not None
        )
        lengths = mask.sum(dim=1).tolist()
        counts = (
            [1] * len(lengths)
            if cfg.token_policy == "last"
            else (lengths if cfg.token_policy == "nonpad" else [mask.shape[1]] * len(lengths))
        )
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

    def classify(self, texts: Sequence[str], batch_size: int = 16) -> list[dict]:
        """Label and probability for each raw text (the task prompt is applied here)."""
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            side, _ = self.logits([self.task.render(t) for t in chunk])
            probs = side.softmax(-1)
            for text, p in zip(chunk, probs):
                label = int(p.argmax())
                results.append({"text": text, "label": self.task.labels[label], "probability": float(p[label])})
        return results

    def evaluate(self, examples: Sequence[Example], batch_size: int = 16, progress=None) -> dict[str, float]:
        """Accuracy of the side network and of the zero-shot prompt on labelled examples."""
        correct = zs_correct = 0
        start_t = time.perf_counter()
        examples = sorted(examples, key=lambda e: len(e.text))  # less padding per batch; accuracy is order-free
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            side, zero_shot = self.logits([self.task.render(e.text) for e in chunk])
            labels = torch.as_tensor([e.label for e in chunk])
            correct += int((side.argmax(-1) == labels).sum())
            if zero_shot is not None:
                zs_correct += int((zero_shot.argmax(-1) == labels).sum())
            if progress is not None:
                progress(len(chunk))
        n = len(examples)
        return {
            "accuracy": correct / n,
            "zero_shot_accuracy": zs_correct / n if self._verbalizers else float("nan"),
            "samples": n,
            "seconds": time.perf_counter() - start_t,
        }


class TailClassifier(LocalClassifier):
    """The device's own backbone with a delivered pretrained-tail adapter on its upper blocks.

    The LoRA weights are applied to the device's blocks ``cut ..`` by forward hooks that add
    ``(alpha / r) x A^T B^T`` to each target projection's output, so it works on every weight
    precision and on the lean forward (a quantized projection is never dequantized whole) and holds
    nothing but the adapter beyond inference itself. By default the cut block's output passes the
    same quantize/dequantize round trip training saw. Call :meth:`close` to take the hooks off.
    """

    def __init__(
        self,
        backbone: Backbone,
        config: SideNetworkConfig,
        tensors: dict[str, torch.Tensor],
        match_training_precision: bool = True,
    ):
        total = int(config.backbone_config["num_hidden_layers"])
        if backbone.num_layers != total or backbone.hidden_size != config.hidden_size:
            raise SideNetworkError(
                f"this adapter runs on blocks {tail_cut(config)}..{total - 1} of a {total}-block "
                f"backbone of width {config.hidden_size}; this device's backbone has "
                f"{backbone.num_layers} blocks of width {backbone.hidden_size}: run it on the "
                "whole model it was trained for"
            )
        deltas, head = lora_deltas(config, tensors)
        self.config = config
        self.task = task_of_config(config.extra)
        self.backbone = backbone
        self.backbone_tag = ""
        self.layers = [total - 1]
        self.match_training_precision = match_training_precision
        self._verbalizers = None  # the adapter changes the final state: no zero-shot answer from it
        self.head = head
        scale = config.lora_alpha / config.lora_rank
        self._hooks = []
        for (block, name), (a, b) in sorted(deltas.items()):
            module = backbone.blocks[block].get_submodule(name)

            def add_delta(_module, inputs, output, a=a, b=b):
                x = inputs[0]
                return output + scale * F.linear(F.linear(x.to(a.dtype), a), b).to(output.dtype)

            self._hooks.append(module.register_forward_hook(add_delta))
        if match_training_precision and config.bits < 16:
            self._hooks.append(backbone.blocks[tail_cut(config) - 1].register_forward_hook(self._round_trip))

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
        if backbone is None:
            model = model or config.extra.get("model")
            if not model:
                raise SideNetworkError(f"{adapter} does not name its backbone: pass --model")
            precision = precision_from_fingerprint(config.fingerprint)
            backbone = Backbone.load(
                model,
                layers=[int(config.backbone_config["num_hidden_layers"]) - 1],
                weights=None if precision in (None, "fp32") else precision,
            )
        return cls(backbone, config, tensors, match_training_precision)

    def _round_trip(self, _module, _inputs, output):
        """The cut block's output as the server saw it: through the codec at the training bit-width."""
        cfg = self.config
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        rows = (
            dequantize(quantize(hidden.reshape(-1, hidden.shape[-1]).float(), cfg.bits, cfg.group_size, cfg.rotation))
            .reshape(hidden.shape)
            .to(hidden.dtype)
        )
        return (rows, *output[1:]) if isinstance(output, (tuple, list)) else rows

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    @torch.inference_mode()
    def logits(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        enc = self.backbone.tokenize(prompts)
        mask = enc["attention_mask"]
        final = self.backbone.forward_taps(
            enc["input_ids"], mask, lambda _layer, _hidden: None, layers=self.layers, need_final=True
        )
        positions = self.backbone.feature_positions(mask)
        feature = final[torch.arange(final.shape[0]), positions].float()
        return F.linear(feature, self.head), None


def installed_classifier(
    backbone: Backbone, config: SideNetworkConfig, state: dict[str, torch.Tensor], match_training_precision: bool = True
) -> LocalClassifier:
    """The classifier a device runs from a sent side network (its config and trainable state)."""
    if config.family == "tail":
        return TailClassifier(
            backbone, config, {k: v.float() for k, v in stock_state(config, state).items()}, match_training_precision
        )
    if not config.serves(backbone.fingerprint):
        raise SideNetworkError(
            f"the side network was trained for {config.fingerprint}, this device runs "
            f"{backbone.fingerprint}: use a side network trained for this backbone"
        )
    frozen = backbone.frozen_head_state(lm_head=config.head == "lm")
    net = build_side_network(config, frozen, {backbone.fingerprint: frozen})
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return LocalClassifier(backbone, net.eval(), match_training_precision)
