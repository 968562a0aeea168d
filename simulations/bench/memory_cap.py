"""Run a measurement in its own process under a memory cap: over the cap it is *out of memory*, and
the machine stays alive.

Why: a benchmark that puts full fine-tuning of a billion-parameter model next to a lean device
must let the heavy method fail the way it would on a phone (it does not fit), without swapping or
waking the kernel's OOM killer on a shared machine. Two guards, both reported as out of memory:

* in the child, an address-space limit (``RLIMIT_AS`` = cap + :data:`ADDRESS_SLACK_MB`, set by
  :func:`apply_address_space_cap` before anything large is imported): an allocation past it fails
  at once with ``MemoryError`` / torch's "can't allocate memory", which the child catches
  (:func:`is_out_of_memory`) and reports;
* in the parent, a watchdog that samples the resident memory of the child and all its descendants
  every ``poll_s`` and kills them when it passes the cap, or when the machine's available memory
  falls under ``reserve_mb`` (whatever else is running), so a process tree with no address-space
  limit (a Flower simulation's Ray workers) is held too.

``python -m mobiflower.simulations.bench.memory_cap --cap-gb 16 -- CMD ...`` runs any command this way
and prints what happened (peak resident memory of the whole tree, and whether it was stopped).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Sequence

ADDRESS_SLACK_MB = 1024
"""Address space allowed beyond the cap: a process maps more than it touches (libraries, thread
stacks, allocator arenas: most of a GB for torch + transformers), so a limit equal to the cap
would stop it well below a resident cap."""
CAP_ENV = "MOBIFLOWER_MEMORY_CAP_MB"


@dataclass
class CappedRun:
    """What became of one capped process."""

    returncode: int | None
    out_of_memory: bool
    reason: str  # why it was stopped (or "" when it ran to its end)
    peak_rss_mb: float  # highest resident memory of the process tree the watchdog saw
    cap_mb: float
    wall_s: float
    stdout: str = ""
    stderr: str = ""

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("stdout", "stderr")}


def default_cap_mb(limit_gb: float = 20.0, share: float = 0.85) -> float:
    """``limit_gb``, or ``share`` of this machine's memory where that is less."""
    total = _meminfo_mb().get("MemTotal")
    cap = limit_gb * 1024
    return min(cap, share * total) if total else cap


def _meminfo_mb() -> dict[str, float]:
    out = {}
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                out[key] = int(value.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return out


def apply_address_space_cap(cap_mb: float | None = None) -> float | None:
    """Limit this process's address space to ``cap_mb`` (default: ``$MOBIFLOWER_MEMORY_CAP_MB``) plus
    :data:`ADDRESS_SLACK_MB`; the cap applied in MB, or None where there is none or no ``resource``."""
    if cap_mb is None:
        value = os.environ.get(CAP_ENV)
        cap_mb = float(value) if value else None
    if not cap_mb:
        return None
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux / macOS
        return None
    limit = int((cap_mb + ADDRESS_SLACK_MB) * 2**20)
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    return cap_mb


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a failed allocation (Python's, torch's, or a failed ``mmap``)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    if isinstance(error, OSError) and getattr(error, "errno", None) == 12:  # ENOMEM
        return True
    return isinstance(error, RuntimeError) and any(
        s in text
        for s in (
            "can't allocate memory",
            "cannot allocate memory",
            "not enough memory",
            "out of memory",
            "defaultcpuallocator",
        )
    )


def _tree_rss_mb(pid: int) -> float:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _kill_tree(pid: int) -> None:
    """SIGKILL the process ``pid`` started and every descendant of it, each by its own id."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [*root.children(recursive=True), root]
    except psutil.NoSuchProcess:
        return
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass


def run_capped(
    cmd: Sequence[str],
    cap_mb: float,
    *,
    reserve_mb: float = 1024.0,
    poll_s: float = 0.05,
    env: dict | None = None,
    timeout_s: float | None = None,
    capture: bool = True,
    address_cap: bool = True,
) -> CappedRun:
    """Run ``cmd`` under a ``cap_mb`` resident-memory cap on its whole process tree (see the module).

    ``address_cap`` also passes the cap to the child in ``$MOBIFLOWER_MEMORY_CAP_MB`` for
    :func:`apply_address_space_cap` (the bench children apply it; any other command ignores it).
    Output is captured (``capture``) or passed through. A run past ``timeout_s`` is killed and
    reported with ``reason`` "timeout" (not out of memory).
    """
    env = dict(os.environ if env is None else env)
    if address_cap:
        env[CAP_ENV] = str(cap_mb)
    pipe = subprocess.PIPE if capture else None
    start = time.perf_counter()
    proc = subprocess.Popen(list(cmd), stdout=pipe, stderr=pipe, text=True, env=env)
    state = {"peak": 0.0, "reason": ""}
    done = threading.Event()

    def watch() -> None:
        while not done.wait(poll_s):
            rss = _tree_rss_mb(proc.pid)
            state["peak"] = max(state["peak"], rss)
            available = _meminfo_mb().get("MemAvailable")
            if rss > cap_mb:
                state["reason"] = f"resident memory reached the {cap_mb / 1024:.1f} GB cap"
            elif available is not None and available < reserve_mb:
                state["reason"] = (
                    f"the machine had {available:.0f} MB available (< {reserve_mb:.0f} MB reserve) "
                    f"at {rss / 1024:.1f} GB resident"
                )
            elif timeout_s is not None and time.perf_counter() - start > timeout_s:
                state["reason"] = "timeout"
            else:
                continue
            _kill_tree(proc.pid)
            return

    watcher = threading.Thread(target=watch, name="memory-cap", daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate()
    finally:
        done.set()
        watcher.join()
    reason = state["reason"]
    killed_by_kernel = proc.returncode == -signal.SIGKILL and not reason
    if killed_by_kernel:
        reason = "killed by SIGKILL (the kernel's OOM killer, most likely)"
    return CappedRun(
        returncode=proc.returncode,
        out_of_memory=bool(reason) and reason != "timeout",
        reason=reason,
        peak_rss_mb=state["peak"],
        cap_mb=cap_mb,
        wall_s=time.perf_counter() - start,
        stdout=stdout or "",
        stderr=stderr or "",
    )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(
            "usage: python -m mobiflower.simulations.bench.memory_cap [--cap-gb G] [--reserve-mb M] -- CMD ...",
            file=sys.stderr,
        )
        return 2
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m mobiflower.simulations.bench.memory_cap")
    parser.add_argument("--cap-gb", type=float, default=None, help="default: 20 GB or 85%% of this machine's memory")
    parser.add_argument("--reserve-mb", type=float, default=1024.0)
    parser.add_argument("--timeout-s", type=float, default=None)
    args = parser.parse_args(argv[:split])
    cap_mb = args.cap_gb * 1024 if args.cap_gb else default_cap_mb()
    run = run_capped(
        argv[split + 1 :],
        cap_mb,
        reserve_mb=args.reserve_mb,
        timeout_s=args.timeout_s,
        capture=False,
        address_cap=False,
    )
    verdict = f"OUT OF MEMORY ({run.reason})" if run.out_of_memory else (run.reason or f"exit {run.returncode}")
    print(
        f"[memory-cap] {verdict}; peak resident memory of the process tree {run.peak_rss_mb / 1024:.2f} GB "
        f"(cap {cap_mb / 1024:.1f} GB), {run.wall_s:.0f} s",
        file=sys.stderr,
        flush=True,
    )
    return 137 if run.out_of_memory else (run.returncode if run.returncode is not None else 1)


__all__ = [
    "CappedRun",
    "run_capped",
    "apply_address_space_cap",
    "is_out_of_memory",
    "default_cap_mb",
    "ADDRESS_SLACK_MB",
    "CAP_ENV",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
