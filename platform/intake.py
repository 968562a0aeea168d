"""The server's front door for frames: validate, de-duplicate, then train; count every refusal.

Every frame a device sends passes here before it can touch a side network. A frame is refused
whole, with the reason, when it does not decode (:class:`FrameError` names the field: truncation,
unknown version, sizes that disagree or exceed :class:`FrameLimits`, NaN/Inf scales, labels out
of range, duplicated sample ids inside the frame, ...), when it does not fit the side network it
would train (fingerprint, tapped layers, width, number of classes), when it is a replay of a
frame already taken (same bytes), or when it repeats samples the device already delivered in this
pass. A refused frame changes nothing: no weight, optimizer moment, cache entry or counter of the
store moves (the tests check this by digest). Refusals are counted per device and per reason.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
import dataclasses
from dataclasses import dataclass

from mobiflower.platform.frames import FrameError, FrameLimits, decode_frame
from mobiflower.platform.side_networks import SideNetworkConfig
from mobiflower.platform.side_store import SideNetworkStore


@dataclass
class IntakeResult:
    """What became of one frame: trained on, or refused (``reason`` and the ``field`` at fault)."""

    accepted: bool
    reason: str = ""
    field: str = ""
    message: str = ""
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


class FrameIntake:
    """Decodes and checks frames for a :class:`SideNetworkStore`, and keeps the refusal counts."""

    def __init__(self, store: SideNetworkStore, side_config: SideNetworkConfig,
                 limits: FrameLimits = FrameLimits()):
        self.store = store
        self.side_config = side_config
        self.limits = limits
        self.digests: set[bytes] = set()
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.refused: dict[str, Counter] = defaultdict(Counter)
        self.accepted: Counter = Counter()

    def new_pass(self) -> None:
        """Devices send every sample again (no activation cache): forget which samples arrived."""
        self.seen.clear()

    def _refuse(self, device: str, reason: str, field: str, message: str) -> IntakeResult:
        self.refused[device][reason] += 1
        return IntakeResult(False, reason, field, message)

    def offer(self, device: str, blob: bytes) -> IntakeResult:
        """Take one encoded frame from ``device``: train on it, or refuse it with the reason."""
        digest = hashlib.sha256(blob).digest()
        if digest in self.digests:
            return self._refuse(device, "replayed frame", "frame", "these exact bytes were already taken")
        try:
            frame = decode_frame(blob, expected_fingerprint=self.side_config.fingerprint, limits=self.limits)
        except FrameError as err:
            return self._refuse(device, f"invalid {err.field}", err.field, str(err))
        cfg = self.side_config
        if list(frame.layers) != list(cfg.layers):
            return self._refuse(device, "wrong layers", "layers",
                                f"frame taps {frame.layers}, the side network needs {cfg.layers}")
        if frame.hidden_size != cfg.hidden_size:
            return self._refuse(device, "wrong width", "activations",
                                f"frame width {frame.hidden_size}, the side network's is {cfg.hidden_size}")
        if frame.token_policy != cfg.token_policy:
            return self._refuse(device, "wrong token policy", "token_policy",
                                f"frame sends {frame.token_policy!r} tokens, the side network trains on "
                                f"{cfg.token_policy!r}")
        kind = frame.targets.get("kind")
        if cfg.head == "classification" and (kind != "class" or frame.targets.get("num_classes") != cfg.num_classes):
            return self._refuse(device, "wrong targets", "targets",
                                f"the side network classifies into {cfg.num_classes} classes; the frame has "
                                f"kind {kind!r} with {frame.targets.get('num_classes')} classes")
        repeated = self.seen[device].intersection(frame.sample_ids)
        if repeated:
            return self._refuse(device, "repeated samples", "sample_ids",
                                f"{len(repeated)} sample(s) already arrived from {device} in this pass, "
                                f"e.g. id {min(repeated)}")
        stats = self.store.ingest(device, frame)
        self.digests.add(digest)
        self.seen[device].update(frame.sample_ids)
        self.accepted[device] += 1
        return IntakeResult(True, stats=stats)

    def report(self) -> dict[str, dict[str, int]]:
        """Refusals per device and reason (only devices with any)."""
        return {device: dict(counts) for device, counts in self.refused.items() if counts}
