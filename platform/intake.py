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
from pathlib import Path
from typing import Iterable

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
                 limits: FrameLimits = FrameLimits(), persist_dir: str | Path | None = None,
                 label_private: bool = False):
        self.store = store
        self.label_private = label_private
        self.owner: dict[int, str] = {}  # sample id -> the device whose frame brought it (label-private residuals)
        self.persist_dir = Path(persist_dir) if persist_dir else None
        self.side_config = side_config
        self.limits = limits
        self.digests: set[bytes] = set()
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.refused: dict[str, Counter] = defaultdict(Counter)
        self.accepted: Counter = Counter()
        self.accepted_samples: Counter = Counter()
        self.uncached: set[str] = set()  # devices that opted out of the activation cache: trained on, never kept

    def new_pass(self, devices: Iterable[str] | None = None) -> None:
        """Devices send every sample again (no activation cache, or these devices opted out of it):
        forget which of their samples arrived."""
        if devices is None:
            self.seen.clear()
        for device in devices or ():
            self.seen.pop(device, None)

    def _refuse(self, device: str, reason: str, field: str, message: str) -> IntakeResult:
        self.refused[device][reason] += 1
        return IntakeResult(False, reason, field, message)

    def offer(self, device: str, blob: bytes) -> IntakeResult:
        """Take one encoded frame from ``device``: train on it, or refuse it with the reason."""
        digest = hashlib.sha256(blob).digest()
        if digest in self.digests:
            return self._refuse(device, "replayed frame", "frame", "these exact bytes were already taken")
        try:
            frame = decode_frame(blob, limits=self.limits, expected_fingerprint=None if self.side_config.backbones
                                 else self.side_config.fingerprint)
        except FrameError as err:
            return self._refuse(device, f"invalid {err.field}", err.field, str(err))
        cfg = self.side_config
        if not cfg.serves(frame.fingerprint):  # a heterogeneous fleet: one of the network's backbones
            return self._refuse(device, "invalid fingerprint", "fingerprint",
                                f"frame comes from backbone {frame.fingerprint!r}; the side network trains on "
                                f"{[cfg.fingerprint, *sorted(cfg.backbones)]}")
        if frame.num_samples == 0:
            return self._refuse(device, "empty frame", "sample_ids", "the frame holds no samples")
        if frame.token_policy != "last" and min(frame.token_counts) < 1:
            return self._refuse(device, "sample without tokens", "token_counts",
                                f"sample #{list(frame.token_counts).index(min(frame.token_counts))} sends no token")
        if not cfg.accepts_layers(frame.layers, frame.fingerprint):
            return self._refuse(device, "wrong layers", "layers",
                                f"frame taps {frame.layers}, the side network needs {cfg.layers_for(frame.fingerprint)} "
                                f"or a prefix of them")
        if frame.hidden_size != cfg.hidden_size:
            return self._refuse(device, "wrong width", "activations",
                                f"frame width {frame.hidden_size}, the side network's is {cfg.hidden_size}")
        if frame.token_policy != cfg.token_policy:
            return self._refuse(device, "wrong token policy", "token_policy",
                                f"frame sends {frame.token_policy!r} tokens, the side network trains on "
                                f"{cfg.token_policy!r}")
        kind = frame.targets.get("kind")
        if self.label_private:
            if kind != "none":
                return self._refuse(device, "labels in a label-private run", "targets",
                                    f"the frame carries targets of kind {kind!r}; in a label-private run labels "
                                    f"stay on the device (targets kind 'none')")
            claimed = {i: self.owner[i] for i in frame.sample_ids if self.owner.get(i, device) != device}
            if claimed:
                sample_id, other = next(iter(claimed.items()))
                return self._refuse(device, "sample ids of another device", "sample_ids",
                                    f"{len(claimed)} sample id(s) already came from another device, e.g. {sample_id} "
                                    f"from {other}: residuals for them would be asked of the wrong device")
        elif kind == "none" and cfg.head == "classification":
            return self._refuse(device, "labels withheld", "targets",
                                "the device sends no labels (it is label-private): run with label-private = true")
        elif cfg.head == "classification" and (kind != "class" or frame.targets.get("num_classes") != cfg.num_classes):
            return self._refuse(device, "wrong targets", "targets",
                                f"the side network classifies into {cfg.num_classes} classes; the frame has "
                                f"kind {kind!r} with {frame.targets.get('num_classes')} classes")
        repeated = self.seen[device].intersection(frame.sample_ids)
        if repeated:
            return self._refuse(device, "repeated samples", "sample_ids",
                                f"{len(repeated)} sample(s) already arrived from {device} in this pass, "
                                f"e.g. id {min(repeated)}")
        frame.meta["device_id"] = device  # the sender as the server knows it, not as the frame claims
        if self.label_private:
            self.claim(device, frame.sample_ids)
        stats = self.store.ingest(device, frame, keep=device not in self.uncached)
        self.accepted_samples[device] += frame.num_samples
        if self.persist_dir is not None and stats.get("cached"):
            self._persist(device, blob)
        self.digests.add(digest)
        self.seen[device].update(frame.sample_ids)
        self.accepted[device] += 1
        return IntakeResult(True, stats=stats)

    def claim(self, device: str, sample_ids) -> None:
        """Record which device a frame's samples came from (before training on it asks for residuals)."""
        for sample_id in sample_ids:
            self.owner[int(sample_id)] = device

    # ---- the activation cache on disk, for resuming -----------------------------------------
    def _persist(self, device: str, blob: bytes) -> None:
        """Keep a cached frame's bytes (in arrival order per trainer) so a resumed run gets its cache back."""
        folder = self.persist_dir / self.store.trainer_key(device)
        folder.mkdir(parents=True, exist_ok=True)
        index = len(self.store.trainer_for(device).cache.frames) - 1
        tmp = folder / f"{index:07d}.{device}.part"
        tmp.write_bytes(blob)
        tmp.replace(folder / f"{index:07d}.{device}.frame")

    def cached_counts(self) -> dict[str, int]:
        """Frames in each trainer's cache: what a checkpoint must restore."""
        return {key: counts["frames"] for key, counts in self.store.cache_counts().items()}

    def restore(self, counts: dict[str, int]) -> int:
        """Reload the first ``counts[key]`` persisted frames of each trainer into its cache (no training)."""
        if self.persist_dir is None:
            return 0
        restored = 0
        for key, count in counts.items():
            trainer = self.store.trainers[key]
            files = sorted((self.persist_dir / key).glob("*.frame"))[:count]
            if len(files) < count:
                raise FileNotFoundError(f"the checkpoint expects {count} cached frames for {key}, "
                                        f"{self.persist_dir / key} holds {len(files)}")
            trainer.cache.frames.clear()
            trainer.cache.nbytes = 0
            for path in files:
                device = path.name.split(".")[1]
                blob = path.read_bytes()
                frame = decode_frame(blob, limits=self.limits, expected_fingerprint=None if self.side_config.backbones
                                     else self.side_config.fingerprint)
                frame.meta["device_id"] = device
                trainer.cache.add(trainer.decode(frame))
                if self.label_private:
                    self.claim(device, frame.sample_ids)
                self.accepted_samples[device] += frame.num_samples
                self.digests.add(hashlib.sha256(blob).digest())
                self.seen[device].update(frame.sample_ids)
                restored += 1
            for path in sorted((self.persist_dir / key).glob("*.frame"))[count:]:
                path.unlink()  # frames of an interrupted round: they come again when it is redone
        return restored

    def report(self) -> dict[str, dict[str, int]]:
        """Refusals per device and reason (only devices with any)."""
        return {device: dict(counts) for device, counts in self.refused.items() if counts}
