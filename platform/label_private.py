"""Label-private side-tuning for classification: labels stay out of the frames (what residuals reveal, below).

In a label-private run a device's frames carry no targets (``{"kind": "none"}``). To take a
training step the server runs the side network forward, sends each device the predicted class
probabilities ``p`` of its own samples in the batch (``train.residual``), and the device answers
with the residual ``r = p - onehot(y)``: exactly the gradient of the mean cross-entropy with
respect to the logits, times the batch size. The server backpropagates ``r`` through the side
network (``(logits * r).sum() / n``), so training is the same as with labels; only the labels
themselves stay on the device.

What this protects, stated plainly: the server knows ``p``, and for softmax cross-entropy ``r``
has exactly one negative entry, at the label. A residual therefore reveals the label it was
computed from to a curious server. The formal protection is ``label-epsilon``: with
``epsilon > 0`` each device answers for a randomized-response label ``y~`` instead of ``y``
(kept with probability ``e^eps / (e^eps + K - 1)``, else one of the other ``K - 1`` classes
uniformly), which makes every residual it sends ``epsilon``-label-differentially private. The
noisy label of a sample is fixed for the whole run (a keyed hash of the sample id under a secret
derived from the device's own data, which the server never sees), so repeating queries over
epochs cannot average the noise away. ``epsilon = 0`` means no noise: labels stay off the wire
and out of the server's storage, but each residual still determines its label.

Everything here is plain numpy so the device side needs no server code.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Iterable, Sequence

import numpy as np


class ResidualError(ValueError):
    """A residual request a device cannot answer (unknown samples, malformed probabilities)."""


def device_secret(samples: Iterable[tuple[int, str, int]]) -> bytes:
    """A key only this device can compute: a digest of its own (id, text, label) training samples."""
    h = hashlib.sha256(b"mobiflower-label-secret")
    for sample_id, text, label in samples:
        h.update(f"{int(sample_id)}\x1f{label}\x1f".encode())
        h.update(text.encode())
    return h.digest()


def keep_probability(epsilon: float, num_classes: int) -> float:
    """Randomized response: the chance a sample keeps its true label (1 without noise)."""
    if epsilon <= 0:
        return 1.0
    return math.exp(epsilon) / (math.exp(epsilon) + num_classes - 1)


def noisy_label(label: int, sample_id: int, num_classes: int, epsilon: float, secret: bytes) -> int:
    """The label a device answers for: the true one, or (with ``epsilon`` > 0) a randomized response
    fixed per sample by a keyed hash, so every epoch's residual uses the same one."""
    if epsilon <= 0:
        return int(label)
    digest = hmac.new(secret, f"rr:{int(sample_id)}".encode(), hashlib.sha256).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < keep_probability(epsilon, num_classes):
        return int(label)
    others = [c for c in range(num_classes) if c != label]
    return others[int.from_bytes(digest[8:16], "big") % len(others)]


def check_probabilities(probs: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """The server's predicted probabilities, validated: ``[n, num_classes]``, finite, rows summing to 1."""
    probs = np.asarray(probs)
    if probs.dtype.kind != "f":
        raise ResidualError(f"probabilities must be floating point, got dtype {probs.dtype}")
    if probs.shape != (n, num_classes):
        raise ResidualError(
            f"probabilities have shape {tuple(probs.shape)}; {n} samples x {num_classes} classes were asked for"
        )
    if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1).any():
        raise ResidualError("probabilities must be finite and in [0, 1]")
    if n and np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise ResidualError("each sample's probabilities must sum to 1")
    return probs.astype(np.float32)


def residuals(
    probs: np.ndarray, labels: Sequence[int], sample_ids: Sequence[int], num_classes: int, epsilon: float, secret: bytes
) -> np.ndarray:
    """``p - onehot(y~)`` per sample: the cross-entropy gradient the server backpropagates."""
    probs = check_probabilities(probs, len(labels), num_classes)
    out = probs.copy()
    for row, (label, sample_id) in enumerate(zip(labels, sample_ids)):
        out[row, noisy_label(label, sample_id, num_classes, epsilon, secret)] -= 1.0
    return out


def label_from_residual(residual: np.ndarray) -> np.ndarray:
    """What a curious server reads from residuals: the class of each row's only negative entry.

    Equal to the (noisy) label the device answered for; the tests use it to show what
    ``label-epsilon`` does and does not hide.
    """
    return np.asarray(residual).argmin(axis=1)
