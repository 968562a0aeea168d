"""Per-device side networks under a memory budget: the least recently used are paged to disk.

A fleet of thousands of phones in ``per-device`` mode means thousands of side networks, each with
its AdamW moments, tail average and activation cache. :class:`PagedTrainers` keeps only as many
:class:`SideTrainer` s in memory as ``budget_bytes`` allows and writes the others to ``directory``
(the trainer's own atomic checkpoint plus its cache as encoded frames), loading them back when
they are next used. Paging is exact: a trainer paged out and in continues bit for bit where it
was (weights, optimizer, schedule, its shuffling RNG, tail average, cache). It never touches the
process-wide torch RNG, so training in the same order gives the same weights with or without a
budget (the tests check this by digest).

A reference a caller gets from ``pager[key]`` is good until the next access of another key: that
access may page it out. Use each trainer and let it go, as a loop over ``items()`` does.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Callable, Iterator

import torch

from mobiflower.platform.side_networks import SideNetworkError
from mobiflower.platform.trainer import SideTrainer


class PagedTrainers(Mapping):
    """A mapping of device id to :class:`SideTrainer` that holds at most ``budget_bytes`` resident.

    ``build(key)`` makes a key's trainer the first time it is used. ``budget_bytes = 0`` keeps
    every trainer in memory (nothing is written). One trainer larger than the budget on its own
    is an error that names the budget to raise.
    """

    def __init__(
        self,
        keys: list[str],
        build: Callable[[str], SideTrainer],
        budget_bytes: int = 0,
        directory: str | Path | None = None,
    ):
        if budget_bytes < 0:
            raise SideNetworkError(f"the side-network memory budget must be >= 0 bytes, not {budget_bytes}")
        if budget_bytes and directory is None:
            raise SideNetworkError("a side-network memory budget needs a directory to page trainers to")
        self._keys = list(keys)
        self._known = set(self._keys)
        self._build = build
        self.budget_bytes = int(budget_bytes)
        self.directory = Path(directory) if directory else None
        self._resident: OrderedDict[str, SideTrainer] = OrderedDict()  # least recently used first
        self._sizes: dict[str, int] = {}  # bytes of each trainer when last measured
        self._on_disk: set[str] = set()
        self._paged_meta: dict[str, dict[str, int]] = {}  # what a paged trainer's cache held when it left
        self._lock = threading.RLock()
        self.page_ins = self.page_outs = 0
        self.page_seconds = 0.0
        self.peak_resident_bytes = 0

    # ---- Mapping ------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> SideTrainer:
        with self._lock:
            if key not in self._known:
                raise KeyError(key)
            trainer = self._resident.get(key)
            if trainer is None:
                trainer = self._bring_in(key)
            self._resident.move_to_end(key)
            self.settle()
            return trainer

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._known

    # ---- paging -------------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes the resident trainers may hold (each one's :meth:`SideTrainer.footprint_bytes`)."""
        with self._lock:
            for key, trainer in self._resident.items():
                self._sizes[key] = trainer.footprint_bytes()
            return sum(self._sizes[k] for k in self._resident)

    def settle(self) -> None:
        """Measure the resident trainers and page out the least recently used until they fit.

        The most recently used trainer stays (it is the one in use); call this after a trainer
        grew (a frame joined its cache) so the budget holds again.
        """
        with self._lock:
            total = self.resident_bytes()
            self.peak_resident_bytes = max(self.peak_resident_bytes, total)
            if not self.budget_bytes:
                return
            while total > self.budget_bytes and len(self._resident) > 1:
                victim = next(iter(self._resident))
                total -= self._sizes[victim]
                self._page_out(victim)
            if total > self.budget_bytes:
                key = next(iter(self._resident))
                raise SideNetworkError(
                    f"one side network ({key}: {total / 2**20:.1f} MB with its optimizer state and activation "
                    f"cache) is larger than the side-network memory budget ({self.budget_bytes / 2**20:.1f} MB): "
                    f"raise side-memory-mb, or shrink the side network (reduction) or the cache (cache-mb)"
                )

    def _bring_in(self, key: str) -> SideTrainer:
        # A trainer's cache grows as frames land: make room for the largest trainer seen so far.
        expected = max([self._sizes.get(key, 0), *self._sizes.values()])
        if self.budget_bytes:  # make room first, so the peak stays under the budget
            total = self.resident_bytes()
            while self._resident and total + expected > self.budget_bytes:
                victim = next(iter(self._resident))
                total -= self._sizes[victim]
                self._page_out(victim)
        gpus = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=gpus):  # building a trainer seeds torch; the fleet's RNG must not move
            trainer = self._build(key)
            if key in self._on_disk:
                t = time.perf_counter()
                folder = self._folder(key)
                trainer.load_checkpoint(folder / "trainer")
                trainer.load_cache(folder / "cache.msgpack")
                self.page_ins += 1
                self.page_seconds += time.perf_counter() - t
        self._resident[key] = trainer
        return trainer

    def _page_out(self, key: str) -> None:
        trainer = self._resident.pop(key)
        t = time.perf_counter()
        folder = self._folder(key)
        folder.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(folder / "trainer", rng=False)
        meta = {"frames": len(trainer.cache), "rejected": trainer.cache.rejected}
        old = self._paged_meta.get(key, {})
        if meta != {k: old.get(k) for k in meta} or not (folder / "cache.msgpack").exists():
            trainer.save_cache(folder / "cache.msgpack")  # caches only grow: unchanged counts, unchanged cache
        self._paged_meta[key] = {**meta, "train_seconds": trainer.train_seconds}
        self._on_disk.add(key)
        self.page_outs += 1
        self.page_seconds += time.perf_counter() - t

    def cache_counts(self) -> dict[str, dict[str, int]]:
        """Each trainer's cached frames and cache refusals, without paging anything in."""
        with self._lock:
            out = {}
            for key in self._keys:
                trainer = self._resident.get(key)
                if trainer is not None:
                    out[key] = {"frames": len(trainer.cache), "rejected": trainer.cache.rejected}
                else:
                    meta = self._paged_meta.get(key, {})
                    out[key] = {"frames": meta.get("frames", 0), "rejected": meta.get("rejected", 0)}
            return out

    def train_seconds(self) -> float:
        """Seconds every trainer has spent training, without paging anything in."""
        with self._lock:
            return sum(
                self._resident[key].train_seconds
                if key in self._resident
                else self._paged_meta.get(key, {}).get("train_seconds", 0.0)
                for key in self._keys
            )

    def save_all(self, directory: str | Path, extra: dict | None = None) -> None:
        """A checkpoint of every trainer under ``directory/<key>``: resident ones are saved, paged ones
        copied from disk as they are (a paged trainer has not changed since it was written)."""
        directory = Path(directory)
        with self._lock:
            for key in self._keys:
                trainer = self._resident.get(key)
                if trainer is not None or key not in self._on_disk:
                    self[key].save_checkpoint(directory / key, extra=extra)
                else:
                    shutil.copytree(self._folder(key) / "trainer", directory / key)

    def _folder(self, key: str) -> Path:
        return self.directory / key

    def stats(self) -> dict[str, float]:
        """Paging figures for a run summary."""
        return {
            "budget_mb": self.budget_bytes / 2**20,
            "peak_resident_mb": self.peak_resident_bytes / 2**20,
            "resident": len(self._resident),
            "paged_out": len(self._on_disk - set(self._resident)),
            "page_ins": self.page_ins,
            "page_outs": self.page_outs,
            "page_seconds": self.page_seconds,
        }
