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

from mobiflower.clients.runtime import select_tokens
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import dequantize, quantize
from mobiflower.platform.weights import precision_from_fingerprint
from mobiflower.platform.data import LABEL_NAMES, VERBALIZERS, Example, format_prompt
from mobiflower.platform.side_networks import (
    SideNetwork,
    SideNetworkError,
    load_side_network,
    make_side_batch,
    read_side_network_config,
)


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
        self._verbalizers = backbone.verbalizer_ids(VERBALIZERS) if backbone.is_decoder else None

    @classmethod
    def load(cls, side_network: str | Path, model: str | None = None, backbone: Backbone | None = None,
             match_training_precision: bool = True) -> "LocalClassifier":
        """Load the delivered side network and the backbone it was trained on (``model`` ref)."""
        config = read_side_network_config(side_network)
        if backbone is None:
            if model is None:
                model = config.extra.get("model")
            if not model:
                raise SideNetworkError(f"{side_network} does not name its backbone: pass --model")
            precision = precision_from_fingerprint(config.fingerprint)
            backbone = Backbone.load(model, layers=config.layers, weights=None if precision == "fp32" else precision)
        net = load_side_network(side_network, backbone.frozen_head_state(lm_head=config.head == "lm"),
                                fingerprint=backbone.fingerprint)
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

        final = self.backbone.forward_taps(enc["input_ids"], mask, on_layer, layers=self.layers,
                                           need_final=self._verbalizers is not None)
        lengths = mask.sum(dim=1).tolist()
        counts = [1] * len(lengths) if cfg.token_policy == "last" else (
            lengths if cfg.token_policy == "nonpad" else [mask.shape[1]] * len(lengths))
        batch = make_side_batch([rows[layer] for layer in self.layers], counts, lengths, cfg.token_policy,
                                cfg.feature_token)
        batch.backbone = self.backbone_tag
        side = self.net(batch)
        zero_shot = None
        if final is not None:
            zero_shot = self.backbone.zero_shot_logits(final[torch.arange(final.shape[0]), positions], self._verbalizers)
        return side, zero_shot

    def classify(self, texts: Sequence[str], batch_size: int = 16) -> list[dict]:
        """Label and probability for each raw text (the task prompt is applied here)."""
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start:start + batch_size]
            side, _ = self.logits([format_prompt(t) for t in chunk])
            probs = side.softmax(-1)
            for text, p in zip(chunk, probs):
                label = int(p.argmax())
                results.append({"text": text, "label": LABEL_NAMES[label], "probability": float(p[label])})
        return results

    def evaluate(self, examples: Sequence[Example], batch_size: int = 16, progress=None) -> dict[str, float]:
        """Accuracy of the side network and of the zero-shot prompt on labelled examples."""
        correct = zs_correct = 0
        start_t = time.perf_counter()
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            side, zero_shot = self.logits([e.prompt for e in chunk])
            labels = torch.as_tensor([e.label for e in chunk])
            correct += int((side.argmax(-1) == labels).sum())
            if zero_shot is not None:
                zs_correct += int((zero_shot.argmax(-1) == labels).sum())
            if progress is not None:
                progress(len(chunk))
        n = len(examples)
        return {"accuracy": correct / n, "zero_shot_accuracy": zs_correct / n if self._verbalizers else float("nan"),
                "samples": n, "seconds": time.perf_counter() - start_t}
