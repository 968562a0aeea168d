"""The server's side networks for a fleet: one shared, one per device, or a shared trunk with personal heads.

``mode`` decides which :class:`SideTrainer` a device's frames train:

* ``shared``: one side network trained on every device's frames.
* ``per-device``: one side network per device, trained on that device's frames only; the
  strategy may replace them all by their sample-weighted average (FedAvg) every k rounds.
* ``hybrid``: the shared network is the trunk; each device also gets a personal copy whose head
  alone is fine-tuned on that device's cached activations (trunk frozen), starting from its
  previous personal head (a causal-LM tail's personal part is its whole LoRA, restarted from the
  shared one). Personal heads need the activation cache (they train from it); given a device's
  held-out frames, its personal epochs stop where they score best.

The store knows nothing of Flower: frames in, side networks out, checkpoints on disk.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors.torch import load_file, save_file

from mobiflower.platform.frames import Frame
from mobiflower.platform.side_networks import SideNetwork, SideNetworkError, update_digest
from mobiflower.platform.side_pager import PagedTrainers
from mobiflower.platform.trainer import SideTrainer, TrainConfig, chunk_sizes, planned_steps

MODES = ("shared", "per-device", "hybrid")
SHARED = "shared"


@dataclass
class StoreConfig:
    mode: str = "shared"
    personal_epochs: int = 3  # hybrid: head-only epochs over a device's cache per personalisation
    personal_lr: float = 1e-3
    personal_parts: tuple[str, ...] = ("head.",)  # parameter-name prefixes that are personal in hybrid mode
    # hybrid: each personalisation starts from the current shared network (a causal-LM tail, whose personal
    # part is its whole LoRA: a copy of the shared LoRA fine-tuned on the device's own frames), instead of
    # keeping what the personal part learned before
    personal_restart: bool = False
    memory_budget_mb: float = (
        0.0  # per-device mode: resident side networks beyond this are paged to disk; 0 = all in memory
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise SideNetworkError(f"side-network mode {self.mode!r} is unknown: choose one of {MODES}")
        if self.memory_budget_mb < 0:
            raise SideNetworkError(
                f"side-memory-mb={self.memory_budget_mb} must be >= 0 (0 keeps every side network in memory)"
            )


def copy_network(net: SideNetwork) -> SideNetwork:
    """A deep copy of ``net`` whose frozen parameters (a pretrained tail's public blocks) are shared with
    it, not copied: many device networks then hold one copy of the backbone's upper blocks."""
    return copy.deepcopy(net, memo={id(p): p for p in net.parameters() if not p.requires_grad})


def personal_train_config(train: TrainConfig, store: StoreConfig) -> TrainConfig:
    """The trainer config of a hybrid device's personal fine-tune: ``personal-lr`` at a constant rate for
    ``personal-epochs``, its whole cache held."""
    return replace(
        train,
        lr=store.personal_lr,
        epochs=store.personal_epochs,
        schedule="constant",
        warmup_frac=0.0,
        cache_bytes=1 << 62,
    )


def train_personal(
    trainer: SideTrainer,
    personal_state: Callable[[SideNetwork], dict[str, torch.Tensor]],
    score: Callable[[SideNetwork], float | None] | None,
) -> tuple[float, int]:
    """A personal fine-tune: ``trainer.config.epochs`` epochs over its cache; with ``score`` (lower is
    better), the network ends as after the best-scoring epoch count, 0 (as it started) included, ties
    to the fewer. Returns the last epoch's loss and the count kept."""
    net, epochs = trainer.net, trainer.config.epochs
    best = None if score is None else score(net)
    kept, best_state = (0, personal_state(net)) if best is not None else (epochs, None)
    loss = 0.0
    for epoch in range(1, epochs + 1):
        loss = trainer.train_epoch()["loss"]
        current = None if best is None else score(net)
        if current is not None and current < best:
            best, kept, best_state = current, epoch, personal_state(net)
    if best_state is not None:
        net.load_state_dict(best_state, strict=False)
    return loss, kept


class SideNetworkStore:
    """Trainers keyed by ``shared`` or a device id, plus hybrid personal networks."""

    def __init__(
        self,
        config: StoreConfig,
        make_net: Callable[[], SideNetwork],
        train: TrainConfig,
        device_samples: Mapping[str, int],
        chunk_size: int,
        page_dir: str | Path | None = None,
        residuals: Callable[[list[int], torch.Tensor], Any] | None = None,
    ):
        self.config = config
        self.train_config = train
        self.device_samples = dict(device_samples)
        if not self.device_samples:
            raise SideNetworkError("a side-network store needs at least one device")
        self.trainers: Mapping[str, SideTrainer]
        self.personal: dict[str, SideNetwork] = {}
        self.personal_epochs_kept: dict[str, int] = {}  # hybrid: personal epochs each device's network kept
        self.personal_seconds = 0.0

        def steps(devices: list[str]) -> int:
            frames = [size for d in devices for size in chunk_sizes(self.device_samples[d], chunk_size)]
            return planned_steps(frames, train.batch_size, train.epochs, cached=train.cache_bytes > 0)

        if config.mode == "per-device":
            template = make_net()  # every device starts from the same weights, so FedAvg averages like with like

            def build(device: str) -> SideTrainer:
                return SideTrainer(copy_network(template), train, total_steps=steps([device]), residuals=residuals)

            self.trainers = PagedTrainers(
                list(self.device_samples), build, budget_bytes=int(config.memory_budget_mb * 2**20), directory=page_dir
            )
            torch.manual_seed(train.seed)  # where building the trainers left the generator before paging existed
        else:
            shared = SideTrainer(make_net(), train, total_steps=steps(list(self.device_samples)), residuals=residuals)
            self.trainers = {SHARED: shared}
        if residuals is not None and config.mode == "hybrid":
            raise SideNetworkError(
                "hybrid mode fine-tunes personal heads on the server, which needs labels: use "
                "mode 'shared' or 'per-device' in a label-private run"
            )
        if config.mode == "hybrid" and train.cache_bytes <= 0:
            raise SideNetworkError(
                "hybrid mode fine-tunes personal heads from the activation cache: turn the "
                "cache on (activation-cache = true) or use mode 'shared' / 'per-device'"
            )

    # ---- training ---------------------------------------------------------------------------
    def trainer_key(self, device: str) -> str:
        """Which trainer ``device``'s frames train: its own (per-device mode) or the shared one."""
        return device if self.config.mode == "per-device" else SHARED

    def trainer_for(self, device: str) -> SideTrainer:
        if self.config.mode == "per-device":
            if device not in self.trainers:
                raise SideNetworkError(
                    f"no side network for device {device!r}: known devices are {sorted(self.trainers)}"
                )
            return self.trainers[device]
        return self.trainers[SHARED]

    def ingest(self, device: str, frame: Frame, keep: bool = True) -> dict[str, float]:
        """A device's frame landed: cache it (``keep``) and take one training pass over it.

        If training on it fails, the frame leaves the cache again: later epochs would fail on it too."""
        trainer = self.trainer_for(device)
        kept = len(trainer.cache)
        try:
            stats = trainer.ingest(frame, keep=keep)
        except BaseException:
            trainer.cache.truncate(kept)
            raise
        if isinstance(self.trainers, PagedTrainers):
            self.trainers.settle()  # its cache grew: page others out if the budget no longer holds
        return stats

    def cache_counts(self) -> dict[str, dict[str, int]]:
        """Each trainer's cached frames and cache refusals (a paged store answers without paging in)."""
        if isinstance(self.trainers, PagedTrainers):
            return self.trainers.cache_counts()
        return {k: {"frames": len(t.cache), "rejected": t.cache.rejected} for k, t in self.trainers.items()}

    def paging(self) -> dict[str, float] | None:
        """Per-device mode: the paging figures (budget, peak resident MB, page-ins and -outs)."""
        return self.trainers.stats() if isinstance(self.trainers, PagedTrainers) else None

    def average_networks(self, weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
        """Per-device mode: the ``weights``-weighted mean of the devices' networks (FedAvg), one at a time.

        Streams over the devices, so it holds one network besides the running sum however many
        are paged out (Flower's ``aggregate_arrayrecords`` needs them all in memory at once).
        """
        if self.config.mode != "per-device":
            raise SideNetworkError("averaging device networks needs per-device mode")
        total = float(sum(weights.values()))
        if total <= 0:
            raise SideNetworkError("FedAvg needs at least one device that trained on a sample")
        acc: dict[str, torch.Tensor] = {}
        dtypes: dict[str, torch.dtype] = {}
        for device, weight in weights.items():
            state = self.trainers[device].net.state_dict()
            for key, value in state.items():
                term = value.detach().to("cpu", torch.float64) * (float(weight) / total)
                acc[key] = acc[key] + term if key in acc else term
                dtypes[key] = value.dtype
        return {k: v.to(dtypes[k]) for k, v in acc.items()}

    def train_epoch(self, then_average: bool = False) -> dict[str, float]:
        """One epoch from the activation cache for every trainer; the loss is sample-weighted.

        ``then_average`` adds each trainer's new weights to its tail average in the same pass (a
        paged store then brings each trainer in once per round, not twice).
        """
        loss = seconds = samples = 0.0
        for trainer in self.trainers.values():  # one at a time: paged trainers come in and go out in turn
            if len(trainer.cache):
                stats = trainer.train_epoch()
                loss += stats["loss"] * stats["samples"]
                seconds += stats["seconds"]
                samples += stats["samples"]
            if then_average:
                trainer.update_average()
        if samples == 0:
            raise SideNetworkError("the activation cache is empty: devices must forward frames first")
        return {"loss": loss / samples, "seconds": seconds, "samples": samples}

    def state_digest(self) -> str:
        """A digest of every trainer's weights, optimizer state and step, and of the cache index.

        Equal digests before and after something prove it changed nothing the store keeps.
        """
        import hashlib

        h = hashlib.sha256()
        for name, trainer in sorted(self.trainers.items()):
            h.update(name.encode())
            h.update(trainer.state_digest().encode())
            h.update(str((trainer.step, trainer.cache.nbytes, trainer.cache.rejected)).encode())
            for decoded in trainer.cache.frames:
                h.update(str(decoded.frame.sample_ids).encode())
        for device, net in sorted(self.personal.items()):
            h.update(device.encode())
            update_digest(h, net.state_dict())
        return h.hexdigest()

    @property
    def train_seconds(self) -> float:
        """Seconds spent training, over every trainer (a paged store answers without paging in)."""
        if isinstance(self.trainers, PagedTrainers):
            return self.trainers.train_seconds() + self.personal_seconds
        return sum(t.train_seconds for t in self.trainers.values()) + self.personal_seconds

    def averaging(self, epoch: int) -> bool:
        """Whether the weights after ``epoch`` (1-based) join the delivered tail average."""
        k = self.train_config.average_epochs
        return k > 0 and epoch > self.train_config.epochs - k

    def update_average(self) -> None:
        """Add every trainer's current weights to its tail average (see SideTrainer.update_average)."""
        for trainer in self.trainers.values():
            trainer.update_average()

    def use_average(self, then: Callable[[str, SideNetwork], None] | None = None) -> bool:
        """Load each trainer's tail average (before delivery); True when averages were taken.

        ``then(key, network)`` runs on each trainer's network right after (a paged store brings
        each trainer in once for both, e.g. to export it)."""
        taken = []
        for key, trainer in self.trainers.items():
            taken.append(trainer.use_average())
            if then is not None:
                then(key, trainer.net)
        return all(taken)

    # ---- networks ---------------------------------------------------------------------------
    def network_for(self, device: str) -> SideNetwork:
        """The side network ``device`` uses: its own, the shared one, or its personalised copy."""
        if self.config.mode == "hybrid" and device in self.personal:
            return self.personal[device]
        return self.trainer_for(device).net

    def personalize(
        self, devices: list[str] | None = None, validate: Callable[[str, SideNetwork], float | None] | None = None
    ) -> dict[str, float]:
        """Hybrid: fine-tune each device's personal part on its cached frames over the current trunk.

        ``validate(device, net)``, when given, scores ``net`` on that device's held-out frames (lower is
        better; None: the device has none): each device then keeps the epoch count, from 0 (the trunk as it
        is) to ``personal-epochs``, that scores best, so a device with little text is not overfitted by a
        fixed number of epochs. Without it every device keeps all its epochs."""
        if self.config.mode != "hybrid":
            return {}
        shared = self.trainers[SHARED]
        losses: dict[str, float] = {}
        for device in devices or list(self.device_samples):
            frames = [f for f in shared.cache.frames if f.frame.meta.get("device_id") == device]
            if not frames:
                continue
            net = copy_network(shared.net)
            if device in self.personal and not self.config.personal_restart:  # keep the head; take the new trunk
                net.load_state_dict(self._personal_state(self.personal[device]), strict=False)
            for name, p in net.named_parameters():
                p.requires_grad_(self._is_personal(name))
            trainer = SideTrainer(net, personal_train_config(self.train_config, self.config), total_steps=1)
            for f in frames:
                trainer.cache.add(f)
            losses[device], self.personal_epochs_kept[device] = train_personal(
                trainer, self._personal_state, None if validate is None else (lambda n, d=device: validate(d, n))
            )
            self.personal_seconds += trainer.train_seconds
            for p in net.parameters():
                p.requires_grad_(False)
            self.personal[device] = net.eval()
        return losses

    def _personal_state(self, net: SideNetwork) -> dict[str, torch.Tensor]:
        """A copy of ``net``'s personal parameters (and buffers)."""
        return {k: v.detach().clone() for k, v in net.state_dict().items() if self._is_personal(k)}

    def _is_personal(self, name: str) -> bool:
        return any(name.startswith(prefix) for prefix in self.config.personal_parts)

    def device_networks(self) -> dict[str, SideNetwork]:
        """Per-device mode: each device's network, all in memory at once (not for a paged store)."""
        if self.config.mode != "per-device":
            raise SideNetworkError("device networks exist only in per-device mode")
        if self.config.memory_budget_mb:
            raise SideNetworkError(
                "a paged store cannot hold every device network at once: use average_networks "
                "or take them one at a time from store.trainers"
            )
        return {d: t.net for d, t in self.trainers.items()}

    def load_all(self, state: Mapping[str, torch.Tensor], then_average: bool = False) -> None:
        """Per-device mode: every device continues from ``state`` (the FedAvg result); with
        ``then_average`` each also adds it to its tail average in the same pass."""
        for trainer in self.trainers.values():
            trainer.net.load_state_dict({k: v.to(trainer.device) for k, v in state.items()})
            if then_average:
                trainer.update_average()

    # ---- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path, extra: dict | None = None) -> Path:
        """Every trainer's checkpoint (atomic each) and the personal networks, under ``directory``."""
        from mobiflower.platform.side_networks import save_side_network

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.trainers, PagedTrainers):
            self.trainers.save_all(directory, extra=extra)
        else:
            for name, trainer in self.trainers.items():
                trainer.save_checkpoint(directory / name, extra=extra)
        for device, net in self.personal.items():
            save_side_network(net, directory / "personal" / f"{device}.safetensors")
        rng = {"torch_rng": torch.get_rng_state()}  # the generator as it is now, after every trainer's save
        if torch.cuda.is_available():
            rng["cuda_rng"] = torch.cuda.get_rng_state()
        save_file(rng, str(directory / "rng.safetensors"))
        (directory / "store.json").write_text(
            json.dumps({"config": asdict(self.config), "devices": self.device_samples, **(extra or {})})
        )
        return directory

    def load(self, directory: str | Path) -> None:
        """Restore what :meth:`save` wrote: every trainer (weights, optimizer, schedule, RNG, tail
        average) and the personal networks. The activation cache is restored by the frame intake."""
        directory = Path(directory)
        saved = json.loads((directory / "store.json").read_text())
        if saved["config"]["mode"] != self.config.mode or set(saved["devices"]) != set(self.device_samples):
            raise SideNetworkError(
                f"the checkpoint in {directory} is for mode {saved['config']['mode']!r} and "
                f"devices {sorted(saved['devices'])}; this run has mode {self.config.mode!r} "
                f"and devices {sorted(self.device_samples)}: resume with the same fleet and mode"
            )
        for name, trainer in self.trainers.items():
            trainer.load_checkpoint(directory / name)
        if (directory / "rng.safetensors").exists():  # trainers' own RNG states are older than the store's
            rng = load_file(str(directory / "rng.safetensors"))
            torch.set_rng_state(rng["torch_rng"])
            if "cuda_rng" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda_rng"])
        for path in sorted((directory / "personal").glob("*.safetensors")):  # same architecture as the trunk
            net = copy.deepcopy(self.trainers[SHARED].net)
            net.load_state_dict(load_file(str(path)))
            self.personal[path.stem] = net.requires_grad_(False).eval()
