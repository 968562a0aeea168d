"""Bandwidth adaptation: per device, the frame fidelity that lets it finish streaming by the deadline.

A device's streaming time is its forward compute plus its uploads. Two knobs trade fidelity for
time: the **bit-width** of the activations (8 -> 4 -> 2 halves the bytes each step) and the
**number of tapped layers**, counted from the bottom (the side network reads a prefix of its
layers; the device stops its forward after the last one it taps, so fewer taps also save compute).
The token policy stays the run's: it is part of what the side network was built to read.

:class:`FramePolicy` keeps, per device, running estimates from what was observed (compute seconds
per sample at full depth, bytes per sample per tapped layer per bit, uplink bytes per second) and,
for each next request, picks the highest-fidelity choice whose estimated time for the device's
remaining samples fits in the time left before the deadline. Fidelity order: more tapped layers
first, then more bits (4-bit activations cost little accuracy; skipping upper layers costs more).
Every change of choice is logged with its reason.

The deadline of the streaming round is set once every device has been observed: what the median
device needs to stream all its samples at full fidelity (or ``deadline-s`` when the run gives it).
The slow half of the fleet adapts to finish with the median device; nobody is asked to go faster
than that, and nothing is dropped: a device that cannot make the deadline even at the cheapest
choice streams at the cheapest choice and its late frames are trained on when they land.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True, order=True)
class FrameChoice:
    """What a device sends: ``taps`` = how many of the side network's layers (from the bottom), at ``bits``."""

    taps: int
    bits: int

    def describe(self, layers: Sequence[int]) -> str:
        return f"{self.bits}-bit, {self.taps}/{len(layers)} layers (up to block {layers[self.taps - 1]})"


@dataclass
class DeviceEstimate:
    """Running estimates for one device, from the frames it sent (exponentially weighted)."""

    compute_s_per_sample: float = math.nan  # at full depth
    bytes_per_sample_tap_bit: float = math.nan
    upload_bytes_per_s: float = math.nan
    observed: int = 0

    def update(self, compute: float, per_tap_bit: float, rate: float, weight: float = 0.5) -> None:
        def mix(old: float, new: float) -> float:
            return new if math.isnan(old) else (1 - weight) * old + weight * new

        self.compute_s_per_sample = mix(self.compute_s_per_sample, compute)
        self.bytes_per_sample_tap_bit = mix(self.bytes_per_sample_tap_bit, per_tap_bit)
        if math.isfinite(rate):
            self.upload_bytes_per_s = mix(self.upload_bytes_per_s, rate)
        self.observed += 1


@dataclass
class Decision:
    """One logged change of a device's choice."""

    device: str
    at_s: float  # seconds into the round (virtual in a fleet simulation)
    choice: FrameChoice
    reason: str

    def as_dict(self, layers: Sequence[int]) -> dict:
        return {
            "at_s": round(self.at_s, 3),
            "bits": self.choice.bits,
            "taps": self.choice.taps,
            "layers": list(layers[: self.choice.taps]),
            "reason": self.reason,
        }


@dataclass
class FramePolicy:
    """Chooses each device's bit-width and tapped-layer prefix to meet the streaming deadline."""

    layers: Sequence[int]  # the side network's tapped layers (block ids, increasing)
    full_bits: int = 8
    min_bits: int = 4
    min_taps: int = 0  # 0: half of the tapped layers, rounded up
    deadline_s: float = 0.0  # 0: set from the fleet once every device was observed (the median device)
    estimates: dict[str, DeviceEstimate] = field(default_factory=dict)
    current: dict[str, FrameChoice] = field(default_factory=dict)
    decisions: list[Decision] = field(default_factory=list)
    deadline_reason: str = ""
    layers_of: dict[str, list[int]] = field(default_factory=dict)  # a device on another backbone: its own taps

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a frame policy needs the side network's tapped layers")
        n = len(self.layers)
        if not 0 <= self.min_taps <= n:
            raise ValueError(f"adapt-min-taps={self.min_taps} must be between 0 and the {n} tapped layers")
        self.min_taps = self.min_taps or math.ceil(n / 2)
        bits = [b for b in (8, 4, 2) if self.min_bits <= b <= self.full_bits]
        if not bits:
            raise ValueError(f"adapt-min-bits={self.min_bits} must be 2, 4 or 8 and at most bits={self.full_bits}")
        self.choices = [FrameChoice(t, b) for t in range(n, self.min_taps - 1, -1) for b in bits]  # best first
        self.full = self.choices[0]
        self._fixed_deadline = self.deadline_s > 0
        if self._fixed_deadline:
            self.deadline_reason = f"deadline-s={self.deadline_s:g} from the run config"

    def depth(self, taps: int, device: str = "") -> float:
        """Share of the full forward a device computes when it taps the lowest ``taps`` layers."""
        layers = self.layers_of.get(device, self.layers)
        return (layers[taps - 1] + 1) / (layers[-1] + 1)

    def choice(self, device: str) -> FrameChoice:
        return self.current.get(device, self.full)

    def observe(
        self,
        device: str,
        choice: FrameChoice,
        samples: int,
        compute_s: float,
        upload_s: float,
        frame_bytes: int,
        latency_s: float = 0.0,
    ) -> None:
        """A frame landed: ``compute_s`` on the device, ``upload_s`` to send its ``frame_bytes``."""
        if samples < 1:
            return
        transfer = upload_s - latency_s
        rate = frame_bytes / transfer if transfer > 0 else math.nan
        self.estimates.setdefault(device, DeviceEstimate()).update(
            compute_s / samples / self.depth(choice.taps, device),
            frame_bytes / samples / (choice.taps * choice.bits),
            rate,
        )

    def seed(self, device: str, compute_s_per_sample: float) -> None:
        """A first compute estimate before any frame (the device's profile probe: a measured forward of
        a few samples at full depth), so the first requests can already be adapted. The uplink is
        unknown until a frame has been sent; until then only compute is counted."""
        if compute_s_per_sample > 0 and math.isfinite(compute_s_per_sample):
            est = self.estimates.setdefault(device, DeviceEstimate())
            est.compute_s_per_sample = compute_s_per_sample
            est.observed = max(est.observed, 1)

    def seconds_per_sample(self, device: str, choice: FrameChoice) -> float:
        est = self.estimates[device]
        known = math.isfinite(est.upload_bytes_per_s) and math.isfinite(est.bytes_per_sample_tap_bit)
        upload = est.bytes_per_sample_tap_bit * choice.taps * choice.bits / est.upload_bytes_per_s if known else 0.0
        return est.compute_s_per_sample * self.depth(choice.taps, device) + upload

    def set_deadline(self, remaining: dict[str, int]) -> None:
        """Once every device was observed: the median device's time for all its samples at full fidelity."""
        if self._fixed_deadline or self.deadline_s > 0 or not remaining:
            return
        if any(self.estimates.get(d, DeviceEstimate()).observed == 0 for d in remaining):
            return
        need = {d: n * self.seconds_per_sample(d, self.full) for d, n in remaining.items()}
        self.deadline_s = statistics.median(need.values())
        self.deadline_reason = (
            f"the median device's estimated time for its samples at full fidelity "
            f"({', '.join(f'{d} {s:.1f} s' for d, s in sorted(need.items()))})"
        )

    def decide(self, device: str, remaining_samples: int, elapsed_s: float) -> FrameChoice:
        """The choice for ``device``'s next request; a change is logged in ``decisions`` with its reason."""
        old = self.choice(device)
        if self.deadline_s <= 0 or device not in self.estimates or remaining_samples <= 0:
            return old
        left = self.deadline_s - elapsed_s
        layers = self.layers_of.get(device, self.layers)
        pick, reason = None, ""
        for c in self.choices:
            need = remaining_samples * self.seconds_per_sample(device, c)
            if need <= left:
                pick = c
                reason = (
                    f"{remaining_samples} samples left need {need:.1f} s at {c.describe(layers)}, "
                    f"{left:.1f} s left before the {self.deadline_s:.1f} s deadline"
                )
                break
        if pick is None:
            pick = self.choices[-1]
            need = remaining_samples * self.seconds_per_sample(device, pick)
            reason = (
                f"cannot make the {self.deadline_s:.1f} s deadline ({left:.1f} s left, {need:.1f} s needed "
                f"even at {pick.describe(layers)}): cheapest choice, late frames still trained"
            )
        if pick != old:
            self.current[device] = pick
            self.decisions.append(Decision(device, elapsed_s, pick, reason))
        return pick
