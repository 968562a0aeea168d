"""This process's memory: resident set now, its peak, a sampler for the peak over a stretch of work,
and handing memory back (the C heap's free pages; a file's cached pages).

``ru_maxrss`` is the peak over the whole life of the process, so the memory a job adds on top of
what the process already had needs samples taken while it runs: :class:`RssSampler`.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from pathlib import Path
from typing import Iterable


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def current_rss_mb() -> float:
    """Resident set size of this process now, in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / (1024 * 1024)
    except Exception:  # pragma: no cover - psutil is a dependency; fall back to the peak
        return peak_rss_mb()


def rss_parts_mb() -> dict[str, float]:
    """This process's RSS split as Linux counts it: anonymous (heap, tensors), file-backed and shared
    memory (``RssAnon``, ``RssFile``, ``RssShmem`` of ``/proc/self/status``); empty elsewhere.

    The split tells the process's own allocations from mapped files and from shared-memory
    segments other processes own too (such as Ray's object store in a Flower simulation).
    """
    parts: dict[str, float] = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    parts[key[3:].lower()] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return parts


class RssSampler:
    """Samples this process's RSS every ``interval_s`` in a daemon thread; ``peak_mb`` is the highest seen."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s = interval_s
        self.start_mb = current_rss_mb()
        self.peak_mb = self.start_mb
        self.start_parts = rss_parts_mb()
        self.peak_parts = dict(self.start_parts)  # each part's own peak
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> float:
        now = current_rss_mb()
        self.peak_mb = max(self.peak_mb, now)
        for key, value in rss_parts_mb().items():
            self.peak_parts[key] = max(self.peak_parts.get(key, 0.0), value)
        return now

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "RssSampler":
        return self.__enter__()

    def stop(self) -> dict[str, float]:
        """Stop sampling; the start, peak and end RSS in MiB, and each part's start and peak."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        end = self._sample()
        return {
            "start_mb": self.start_mb,
            "peak_mb": self.peak_mb,
            "end_mb": end,
            **{f"start_{k}_mb": v for k, v in self.start_parts.items()},
            **{f"peak_{k}_mb": v for k, v in self.peak_parts.items()},
        }


_LIBC = None  # glibc once loaded (False where there is none)


def release_free_heap() -> bool:
    """Hand the C heap's free memory back to the OS (glibc ``malloc_trim``); False where unavailable.

    Loading a tokenizer parses a multi-MB JSON file; glibc keeps the freed parse buffers in the
    process, where they would sit under every later peak.
    """
    global _LIBC
    if _LIBC is None:
        _LIBC = False
        if sys.platform.startswith("linux"):
            try:
                import ctypes

                libc = ctypes.CDLL("libc.so.6")
                libc.malloc_trim  # noqa: B018 - glibc only (musl has none)
                _LIBC = libc
            except (OSError, AttributeError):
                pass
    if not _LIBC:
        return False
    _LIBC.malloc_trim(0)
    return True


def evict_from_page_cache(paths: Iterable[str | Path]) -> int:
    """Ask the kernel to drop these files' cached pages (for cold-start measurements); bytes advised."""
    total = 0
    advise = getattr(os, "posix_fadvise", None)
    if advise is None:
        return 0
    for path in paths:
        path = Path(path)
        files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
        for file in files:
            try:
                fd = os.open(file, os.O_RDONLY)
            except OSError:
                continue
            try:
                advise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                total += file.stat().st_size
            finally:
                os.close(fd)
    return total
