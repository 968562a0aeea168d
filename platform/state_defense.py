"""Defenses a device applies to the states it is about to quantize and send (docs/privacy.md).

Why: the server holds the public backbone, and a decoder's hidden states are (nearly) injective in
their input tokens, so the states a frame carries let a curious server read back much of the text
(``mobiflower bench privacy`` measures how much). A device that does not trust the server can make
its frames carry less, at a measured price in accuracy:

* ``clip`` + ``noise``: every sent row (one token's state) is scaled down to an L2 norm of at most
  ``clip``, then Gaussian noise of standard deviation ``noise * clip`` is added to each coordinate.
  What that guarantees, stated plainly: each row alone is a Gaussian mechanism of sensitivity
  ``2 * clip`` (any two clipped rows differ by at most that), i.e. ``mu``-Gaussian-DP with
  ``mu = 2 / noise`` against an adversary who knows every other row (:func:`privacy_loss`). The
  rows of one text are not independent (each depends on the tokens before it) and a text sends
  many of them, so for the noise levels a task survives (``mu`` in the tens) this is no
  meaningful formal guarantee; the protection that remains is the one the bench measures against
  its attacks, nothing more.
* ``keep_first``: the first positions of each sample are sent unchanged. In a decoder they depend
  only on the first tokens, which a classification template fixes (the bundled one starts with
  ``Review:``), so they hold nothing private; and position 0 is the upper blocks' attention sink,
  whose state is an outlier that clipping would flatten (in SmolLM2-135M at block 14 its norm is
  about 22,000 against a median row's 160). A task whose first token is private (causal-LM on raw
  text) should set it to 0.
* ``keep_last``: the last positions of each sample are sent unchanged too. A classification
  template's suffix (the bundled one's ``\nSentiment (positive or negative):`` is 8 tokens) is public
  text, but its states summarise the sample (the blocks below the cut have attended to it): what
  they reveal is measured as a bag of words, not per position.
* ``window``: send only the first ``keep_first`` and the last ``window`` real tokens of each sample
  instead of all of them (token policy ``nonpad``). The last positions of a classification prompt
  are the template's suffix: their states still summarise the text (the blocks below the cut have
  attended to it), but no position of the text itself is sent.

The noise must come from a generator the server cannot reproduce: :func:`device_generator` seeds one
from the operating system, never from a run-config seed.

Run-config keys (also read from a device's node config, where they can only make the defense
stronger, :func:`device_defense`): ``state-clip``, ``state-noise``, ``state-keep-first``,
``state-keep-last``, ``state-window``. Flower-free.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch

from mobiflower.platform.run_config import typed_fields

DEFENSE_KEYS = {
    "clip": "state-clip",
    "noise": "state-noise",
    "keep_first": "state-keep-first",
    "keep_last": "state-keep-last",
    "window": "state-window",
}
"""Each :class:`StateDefense` field's run-config (and node-config) key."""


class DefenseError(ValueError):
    """A defense setting that cannot work; the message names the key and what to set."""


@dataclass(frozen=True)
class StateDefense:
    """What a device does to its sent states before quantizing them (all zero: nothing)."""

    clip: float = 0.0  # max L2 norm of a sent row (0: no clipping)
    noise: float = 0.0  # Gaussian noise std per coordinate, as a multiple of ``clip`` (needs clip > 0)
    keep_first: int = 1  # the first positions of each sample are sent unchanged (template / attention sink)
    keep_last: int = 0  # the last positions of each sample are sent unchanged (the template's suffix)
    window: int = 0  # > 0: send only the first ``keep_first`` and the last ``window`` real tokens

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 0 or not math.isfinite(getattr(self, f.name)):
                raise DefenseError(f"{DEFENSE_KEYS[f.name]}={getattr(self, f.name)} must be a finite number >= 0")
        if self.noise > 0 and self.clip <= 0:
            raise DefenseError(
                f"state-noise={self.noise} is a multiple of the clip norm: set state-clip > 0 too "
                "(e.g. the median norm of the sent states, which `mobiflower bench privacy` prints)"
            )

    @property
    def active(self) -> bool:
        """Whether the defense changes anything the device sends."""
        return self.clip > 0 or self.window > 0

    @property
    def sigma(self) -> float:
        """The noise's standard deviation per coordinate, in the states' units."""
        return self.noise * self.clip

    def describe(self) -> str:
        """A short label, e.g. ``clip 160 noise 0.1`` or ``window 8``."""
        parts = []
        if self.clip > 0:
            parts.append(f"clip {self.clip:g}" + (f" noise {self.noise:g}" if self.noise else ""))
        if self.window:
            parts.append(f"window {self.window}")
        if self.active and self.keep_first != 1:
            parts.append(f"keep-first {self.keep_first}")
        if self.clip > 0 and self.keep_last:
            parts.append(f"keep-last {self.keep_last}")
        return ", ".join(parts) or "none"


def run_config_defaults() -> dict[str, Any]:
    """Each defense key with its default: what an app that runs devices declares."""
    return {key: getattr(StateDefense(), name) for name, key in DEFENSE_KEYS.items()}


def from_config(config: Mapping[str, Any]) -> StateDefense:
    """The defense a run config (or a node config) asks for; keys it does not set keep their defaults."""
    return StateDefense(**typed_fields(StateDefense, config, keys=DEFENSE_KEYS, error=DefenseError))


def device_defense(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> StateDefense:
    """The defense a device applies: the server's run config, made stronger field by field by the
    device's own node config (a smaller positive clip, more noise, fewer kept first positions, a
    smaller positive window). A device that sets a defense gets at least that, whatever the server asks."""
    server, device = from_config(run_config), from_config(node_config)

    def smaller_positive(a: float, b: float) -> float:
        return min(x for x in (a, b) if x > 0) if a > 0 or b > 0 else 0

    keep_first, keep_last = server.keep_first, server.keep_last
    if DEFENSE_KEYS["keep_first"] in node_config:
        keep_first = min(keep_first, device.keep_first)
    if DEFENSE_KEYS["keep_last"] in node_config:
        keep_last = min(keep_last, device.keep_last)
    return StateDefense(
        clip=smaller_positive(server.clip, device.clip),
        noise=max(server.noise, device.noise),
        keep_first=keep_first,
        keep_last=keep_last,
        window=int(smaller_positive(server.window, device.window)),
    )


def device_generator() -> torch.Generator:
    """A generator seeded from the operating system: the server cannot replay the noise and subtract it."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def apply(
    rows: torch.Tensor,
    defense: StateDefense,
    generator: torch.Generator | None = None,
    positions: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """``rows`` [n, d] as the device sends them under ``defense``: clipped to ``defense.clip`` in L2
    norm, plus Gaussian noise of std ``defense.sigma`` per coordinate (float32, a new tensor).

    ``positions`` [n] (each row's position in its sample) exempts rows at positions below
    ``defense.keep_first``, and with ``lengths`` [n] (the real length of each row's sample) rows among
    the last ``defense.keep_last``; without them every row is defended. ``generator`` draws the noise
    (use :func:`device_generator` on a device; a seeded one only in tests and benchmarks)."""
    out = rows.float().clone()
    if defense.clip <= 0:
        return out
    chosen = torch.ones(len(out), dtype=torch.bool, device=out.device)
    if positions is not None:
        positions = positions.to(out.device)
        chosen = positions >= defense.keep_first
        if lengths is not None and defense.keep_last > 0:
            chosen &= positions < lengths.to(out.device) - defense.keep_last
    x = out[chosen]
    norms = x.norm(dim=1, keepdim=True)
    x = x * torch.clamp(defense.clip / norms.clamp_min(1e-12), max=1.0)
    if defense.noise > 0:
        noise = torch.randn(x.shape, generator=generator, dtype=torch.float32, device="cpu").to(x.device)
        x = x + defense.sigma * noise
    out[chosen] = x
    return out


def window_mask(attention_mask: torch.Tensor, defense: StateDefense) -> torch.Tensor:
    """The attention mask [B, T] (right-padded) cut to the rows the device sends under ``defense``: the
    first ``keep_first`` and the last ``window`` real tokens of each sample (all of them without a
    window). Select the rows with it (token policy ``nonpad``); its row sums are the token counts."""
    mask = attention_mask.bool()
    if defense.window <= 0:
        return mask
    lengths = mask.sum(dim=1, keepdim=True)
    position = torch.arange(mask.shape[1], device=mask.device)[None, :]
    keep = (position < defense.keep_first) | (position >= lengths - defense.window)
    return mask & keep


def privacy_loss(defense: StateDefense, delta: float = 1e-5) -> dict[str, float | None]:
    """What clipping and noise guarantee for one sent row on its own: ``mu`` (Gaussian DP, sensitivity
    ``2 * clip``) and the ``epsilon`` at ``delta`` it implies; None where there is no noise."""
    if defense.noise <= 0:
        return {"mu": None, "epsilon": None, "delta": delta}
    mu = 2.0 / defense.noise
    return {"mu": mu, "epsilon": _gaussian_epsilon(mu, delta), "delta": delta}


def _gaussian_epsilon(mu: float, delta: float) -> float:
    """The smallest epsilon with ``delta(epsilon) <= delta`` for a mu-GDP mechanism (Dong, Roth and Su
    2019: ``delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``), by bisection."""

    def delta_of(eps: float) -> float:
        a = torch.special.log_ndtr(torch.tensor(-eps / mu + mu / 2, dtype=torch.float64))
        b = torch.special.log_ndtr(torch.tensor(-eps / mu - mu / 2, dtype=torch.float64))
        return float(torch.exp(a) - torch.exp(b + eps))

    lo, hi = 0.0, 1.0
    while delta_of(hi) > delta:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if delta_of(mid) > delta else (lo, mid)
    return hi


__all__ = [
    "DEFENSE_KEYS",
    "DefenseError",
    "StateDefense",
    "apply",
    "device_defense",
    "device_generator",
    "from_config",
    "privacy_loss",
    "window_mask",
]
