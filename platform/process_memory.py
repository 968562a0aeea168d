"""This process's memory: resident set now, its peak, and a sampler for the peak over a stretch of work.

``ru_maxrss`` is the peak over the whole life of the process, so the memory a job adds on top of
what the process already had needs samples taken while it runs: :class:`RssSampler`.
"""

from __future__ import annotations

import resource
import sys
import threading


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
        return {"start_mb": self.start_mb, "peak_mb": self.peak_mb, "end_mb": end,
                **{f"start_{k}_mb": v for k, v in self.start_parts.items()},
                **{f"peak_{k}_mb": v for k, v in self.peak_parts.items()}}
