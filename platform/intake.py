"""The server's front door for frames: validate, fit, de-duplicate, then train; count every refusal.

Every frame a device sends passes here before it can touch a side network. A frame is refused
whole, with the reason, when it does not decode (:class:`FrameError` names the field: truncation,
unknown version, sizes that disagree or exceed :class:`FrameLimits`, header content beyond its
bounds, a key given twice, NaN/Inf scales, labels out of range, duplicated sample ids inside the
frame, ...), when it does not fit the side network it would train (fingerprint, tapped layers,
width, token policy, a sample longer than a run's sequences, targets its head cannot train on:
class labels for a classifier with its number of classes, token ids inside the frozen LM head's
vocabulary), when it is a replay of a frame already taken (same bytes; the digests of accepted
frames go into checkpoints, so this holds across a resume), or when it repeats samples the device
already delivered in this pass. Every check runs before anything is kept, and nothing but a
refusal leaves :meth:`FrameIntake.offer`: whatever else goes wrong is a counted refusal too.

A refused frame changes nothing: no weight, optimizer moment, cache entry or counter of the
store moves (the tests check this by digest). Refusals are counted per device and per reason,
reasons from a fixed vocabulary (a name a frame makes up never becomes a counter of its own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np

from mobiflower.platform.codec import default_group_size, expected_nbytes
from mobiflower.platform.frames import FIELD_NAMES, IGNORE_INDEX, Frame, FrameError, FrameLimits, decode_frame
from mobiflower.platform.side_networks import SideNetworkConfig
from mobiflower.platform.side_store import SideNetworkStore

# The most tokens one sample of a run may carry: twice the devices' longest input (Backbone's
# max_length, 256). Longer samples are refused: a pretrained tail attends over each sample whole.
SEQUENCE_TOKENS = 512
_DIGEST_BYTES = 32  # sha256


def run_limits(config: SideNetworkConfig, samples: int, sequence_tokens: int = SEQUENCE_TOKENS) -> FrameLimits:
    """The bounds a run's frames keep: ``samples`` (what one request asks for), the network's taps and
    width, ``sequence_tokens`` per sample, and the bytes such a frame takes at the network's bit-width
    and the codec's group size for it (an honest frame is never larger; adapted frames are smaller)."""
    samples = max(1, int(samples))
    tokens = samples * sequence_tokens
    rows = samples if config.token_policy == "last" else tokens
    packed, scales = expected_nbytes((rows, config.hidden_size), config.bits, default_group_size(config.bits))
    limits = FrameLimits(
        max_samples=samples, max_layers=len(config.layers), max_hidden=config.hidden_size, max_tokens=tokens
    )
    framing = 12  # magic, header length and checksum
    return dataclasses.replace(
        limits, max_bytes=len(config.layers) * (packed + scales) + limits.max_header_bytes + framing
    )


class Refusal(Exception):
    """A frame the intake will not take: the counted ``reason``, the ``field`` at fault, what was wrong."""

    def __init__(self, reason: str, field: str, message: str):
        super().__init__(f"{reason} ({field}): {message}")
        self.reason, self.field, self.message = reason, field, message


def _reason(field: str) -> str:
    """The counted reason for a decode error at ``field``: the field's name where the frame format
    defines it, else its top-level field, else ``invalid header``."""
    name = re.sub(r"\[\d+\]", "[i]", field)
    for candidate in (name, name.removesuffix("[i]"), re.match(r"[a-z_]*", field).group()):
        if candidate in FIELD_NAMES:
            return f"invalid {candidate}"
    return "invalid header"


def _buffer(blob: object) -> memoryview:
    """The bytes of a frame as a flat view (what decode_frame takes); anything else is refused."""
    if isinstance(blob, np.ndarray):
        if blob.dtype not in (np.uint8, np.int8) or not blob.flags.c_contiguous:
            raise Refusal("invalid data", "data", f"expected a contiguous uint8 array, got {blob.dtype}")
        return memoryview(blob.reshape(-1)).cast("B")
    if isinstance(blob, (bytes, bytearray)):
        return memoryview(blob)
    if isinstance(blob, memoryview) and blob.contiguous:
        return blob.cast("B") if (blob.format, blob.ndim) != ("B", 1) else blob
    raise Refusal("invalid data", "data", f"expected the frame's bytes, got {type(blob).__name__}")


@dataclass
class IntakeResult:
    """What became of one frame: trained on, or refused (``reason`` and the ``field`` at fault)."""

    accepted: bool
    reason: str = ""
    field: str = ""
    message: str = ""
    stats: dict[str, float] = dataclasses.field(default_factory=dict)


def check_targets(cfg: SideNetworkConfig, frame: Frame, vocab_size: int | None, label_private: bool) -> None:
    """The targets are what the side network's head trains on (the loss would fail on others)."""
    targets = frame.targets
    kind = targets.get("kind")
    if label_private:
        if kind != "none":
            raise Refusal(
                "labels in a label-private run",
                "targets",
                f"the frame carries targets of kind {kind!r}; in a label-private run labels stay on "
                f"the device (targets kind 'none')",
            )
    elif kind == "none" and cfg.head == "classification":
        raise Refusal(
            "labels withheld",
            "targets",
            "the device sends no labels (it is label-private): run with label-private = true",
        )
    elif cfg.head == "classification" and (kind != "class" or targets.get("num_classes") != cfg.num_classes):
        raise Refusal(
            "wrong targets",
            "targets",
            f"the side network classifies into {cfg.num_classes} classes; the frame has kind {kind!r} "
            f"with {targets.get('num_classes')} classes",
        )
    elif cfg.head == "lm":
        if kind != "tokens":
            raise Refusal(
                "wrong targets",
                "targets",
                f"the side network trains the backbone's frozen LM head on token targets; the frame has kind {kind!r}",
            )
        values = np.asarray(targets["values"], dtype=np.int64)
        if not (values != IGNORE_INDEX).any():
            raise Refusal(
                "nothing to score",
                "targets.values",
                "every token target is -100 (ignored): the frame gives the loss nothing to learn from",
            )
        bad = values >= vocab_size
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise Refusal(
                "token outside the vocabulary",
                "targets.values",
                f"token target {int(values[j])} at row {j} is outside the LM head's vocabulary of {vocab_size}",
            )


class SampleOwners(Mapping[int, str]):
    """Which device's frame brought each sample id: label-private residuals are asked of that device.

    The frame intake records claims; everyone else (the residual requests) only reads it, as a mapping.
    """

    def __init__(self) -> None:
        self._owner: dict[int, str] = {}

    def __getitem__(self, sample_id: int) -> str:
        return self._owner[sample_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._owner)

    def __len__(self) -> int:
        return len(self._owner)

    def claim(self, device: str, sample_ids: Iterable[int]) -> None:
        """Record that these samples came from ``device``."""
        for sample_id in sample_ids:
            self._owner[int(sample_id)] = device

    def release(self, sample_ids: Iterable[int]) -> None:
        """Forget these samples' claims (their frame was not kept after all)."""
        for sample_id in sample_ids:
            self._owner.pop(int(sample_id), None)


class FrameIntake:
    """Decodes and checks frames for a :class:`SideNetworkStore`, and keeps the refusal counts."""

    def __init__(
        self,
        store: SideNetworkStore,
        side_config: SideNetworkConfig,
        limits: FrameLimits = FrameLimits(),
        persist_dir: str | Path | None = None,
        label_private: bool = False,
        vocab_size: int | None = None,
        sequence_tokens: int = SEQUENCE_TOKENS,
        uncached: Iterable[str] = (),
        owners: SampleOwners | None = None,
    ):
        """``vocab_size``: the frozen LM head's vocabulary (read from the store's network when None);
        ``uncached``: devices that opted out of the activation cache (their frames are trained on, never
        kept); ``owners``: where label-private runs record which device brought each sample (shared
        with whoever asks the devices for residuals)."""
        self.store = store
        self.label_private = label_private
        self.owners = owners if owners is not None else SampleOwners()
        self.persist_dir = Path(persist_dir) if persist_dir else None
        self.side_config = side_config
        self.limits = limits
        self.sequence_tokens = sequence_tokens
        self.vocab_size = vocab_size
        if side_config.head == "lm" and vocab_size is None:
            net = store.network_for(next(iter(store.device_samples)))
            weight = net.head.weight if net.head is not None else net.lm_head  # a tail keeps its LM head as a buffer
            self.vocab_size = int(weight.shape[0])
        self.digests: set[bytes] = set()  # every accepted frame's, cached or not (kept in checkpoints)
        self.seen: dict[str, set[int]] = defaultdict(set)
        self.refused: dict[str, Counter] = defaultdict(Counter)
        self.accepted: Counter = Counter()
        self.accepted_samples: Counter = Counter()
        self.uncached = frozenset(uncached)

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

    def offer(self, device: str, blob: object) -> IntakeResult:
        """Take one encoded frame from ``device``: train on it, or refuse it with the reason.

        Never raises: a frame that fails any check, and anything that goes wrong while checking
        it, is a counted refusal that leaves the store as it was."""
        try:
            frame, digest = self._admit(device, blob)
        except Refusal as refusal:
            return self._refuse(device, refusal.reason, refusal.field, refusal.message)
        except Exception as err:  # noqa: BLE001 - nothing but a refusal leaves offer
            return self._refuse(
                device, "unexpected error", "frame", f"checking the frame raised {type(err).__name__}: {err}"
            )
        try:
            stats = self._train(device, frame, blob)
        except Exception as err:  # noqa: BLE001 - a frame that passed every check: the server's failure
            return self._refuse(
                device,
                "training failed",
                "frame",
                f"the side network's trainer raised {type(err).__name__}: {err} (the frame is "
                f"not kept; steps it took before that stay)",
            )
        self.digests.add(digest)
        self.seen[device].update(frame.sample_ids)
        self.accepted[device] += 1
        return IntakeResult(True, stats=stats)

    def inspect(self, blob: object, limits: FrameLimits | None = None) -> Frame:
        """Decode ``blob`` and check it fits the side network (all but what depends on earlier frames);
        raises :class:`Refusal`. Frames kept for evaluation pass here too."""
        cfg = self.side_config
        try:
            frame = decode_frame(
                _buffer(blob),
                limits=limits or self.limits,
                expected_fingerprint=None if cfg.backbones else cfg.fingerprint,
            )
        except FrameError as err:
            raise Refusal(_reason(err.field), err.field, str(err)) from None
        if not cfg.serves(frame.fingerprint):  # a heterogeneous fleet: one of the network's backbones
            raise Refusal(
                "invalid fingerprint",
                "fingerprint",
                f"frame comes from backbone {frame.fingerprint!r}; the side network trains on "
                f"{[cfg.fingerprint, *sorted(cfg.backbones)]}",
            )
        if frame.num_samples == 0:
            raise Refusal("empty frame", "sample_ids", "the frame holds no samples")
        if frame.token_policy != "last" and min(frame.token_counts) < 1:
            raise Refusal(
                "sample without tokens",
                "token_counts",
                f"sample #{list(frame.token_counts).index(min(frame.token_counts))} sends no token",
            )
        if frame.token_policy != "last" and max(frame.token_counts) > self.sequence_tokens:
            j = list(frame.token_counts).index(max(frame.token_counts))
            raise Refusal(
                "sample too long",
                "token_counts",
                f"sample #{j} sends {frame.token_counts[j]} tokens, more than the "
                f"{self.sequence_tokens} a sample of this run may have",
            )
        if not cfg.accepts_layers(frame.layers, frame.fingerprint):
            raise Refusal(
                "wrong layers",
                "layers",
                f"frame taps {frame.layers}, the side network needs {cfg.layers_for(frame.fingerprint)} "
                f"or a prefix of them",
            )
        if frame.hidden_size != cfg.hidden_size:
            raise Refusal(
                "wrong width",
                "activations",
                f"frame width {frame.hidden_size}, the side network's is {cfg.hidden_size}",
            )
        if frame.token_policy != cfg.token_policy:
            raise Refusal(
                "wrong token policy",
                "token_policy",
                f"frame sends {frame.token_policy!r} tokens, the side network trains on {cfg.token_policy!r}",
            )
        check_targets(self.side_config, frame, self.vocab_size, self.label_private)
        return frame

    def _admit(self, device: str, blob: object) -> tuple[Frame, bytes]:
        """Every check, in order: the sender, the frame, a replay, then what depends on earlier frames."""
        if device not in self.store.device_samples:
            raise Refusal(
                "unknown device",
                "device",
                f"{device!r} has no side network in this run; it serves {len(self.store.device_samples)} known devices",
            )
        frame = self.inspect(blob)
        digest = hashlib.sha256(_buffer(blob)).digest()
        if digest in self.digests:
            raise Refusal("replayed frame", "frame", "these exact bytes were already taken")
        if self.label_private:
            claimed = {i: self.owners[i] for i in frame.sample_ids if self.owners.get(i, device) != device}
            if claimed:
                sample_id, other = next(iter(claimed.items()))
                raise Refusal(
                    "sample ids of another device",
                    "sample_ids",
                    f"{len(claimed)} sample id(s) already came from another device, e.g. {sample_id} "
                    f"from {other}: residuals for them would be asked of the wrong device",
                )
        repeated = self.seen[device].intersection(frame.sample_ids)
        if repeated:
            raise Refusal(
                "repeated samples",
                "sample_ids",
                f"{len(repeated)} sample(s) already arrived from {device} in this pass, e.g. id {min(repeated)}",
            )
        return frame, digest

    def _train(self, device: str, frame: Frame, blob: object) -> dict[str, float]:
        """Keep and train on an admitted frame; a failure takes back this frame's claims."""
        frame.meta["device_id"] = device  # the sender as the server knows it, not as the frame claims
        fresh = [int(i) for i in frame.sample_ids if int(i) not in self.owners] if self.label_private else []
        if self.label_private:
            self.owners.claim(device, frame.sample_ids)
        try:
            stats = self.store.ingest(device, frame, keep=device not in self.uncached)
        except Exception:
            self.owners.release(fresh)
            raise
        self.accepted_samples[device] += frame.num_samples
        if self.persist_dir is not None and stats.get("cached"):
            self._persist(device, _buffer(blob))
        return stats

    # ---- the activation cache on disk, for resuming -----------------------------------------
    def _persist(self, device: str, blob: bytes | memoryview) -> None:
        """Keep a cached frame's bytes (in arrival order per trainer) so a resumed run gets its cache back."""
        folder = self.persist_dir / self.store.trainer_key(device)
        folder.mkdir(parents=True, exist_ok=True)
        index = len(self.store.trainer_for(device).cache) - 1
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
                raise FileNotFoundError(
                    f"the checkpoint expects {count} cached frames for {key}, "
                    f"{self.persist_dir / key} holds {len(files)}"
                )
            trainer.cache.truncate(0)
            for path in files:
                device = path.name.split(".")[1]
                blob = path.read_bytes()
                frame = decode_frame(
                    blob,
                    limits=self.limits,
                    expected_fingerprint=None if self.side_config.backbones else self.side_config.fingerprint,
                )
                frame.meta["device_id"] = device
                trainer.cache.add(trainer.decode(frame))
                if self.label_private:
                    self.owners.claim(device, frame.sample_ids)
                self.accepted_samples[device] += frame.num_samples
                self.digests.add(hashlib.sha256(blob).digest())
                self.seen[device].update(frame.sample_ids)
                restored += 1
            for path in sorted((self.persist_dir / key).glob("*.frame"))[count:]:
                path.unlink()  # frames of an interrupted round: they come again when it is redone
        return restored

    def save_digests(self, path: str | Path) -> Path:
        """The digest of every frame accepted so far, cached or not (a checkpoint keeps them: a resumed run
        refuses a replay of any frame it took before)."""
        path = Path(path)
        path.write_bytes(b"".join(sorted(self.digests)))
        return path

    def load_digests(self, path: str | Path) -> int:
        """Add :meth:`save_digests`'s digests to the replay check; returns how many the file holds."""
        data = Path(path).read_bytes()
        if len(data) % _DIGEST_BYTES:
            raise ValueError(
                f"{path} holds {len(data)} bytes, not whole {_DIGEST_BYTES}-byte frame digests: "
                f"the checkpoint is damaged"
            )
        self.digests.update(data[i : i + _DIGEST_BYTES] for i in range(0, len(data), _DIGEST_BYTES))
        return len(data) // _DIGEST_BYTES

    def report(self) -> dict[str, dict[str, int]]:
        """Refusals per device and reason (only devices with any)."""
        return {device: dict(counts) for device, counts in self.refused.items() if counts}
