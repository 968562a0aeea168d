"""``mobiflower bench device``'s parent side, shared by its modes: each method in a fresh, memory-capped
child process (``python -m mobiflower.simulations.bench.device_child SPEC RESULT LAUNCHED``), so the peak
RSS the child reports (``VmHWM``) is that method's alone; a child over the cap is an *out of memory*
result, not an error. And what the machine is (cores, architecture, Python, memory)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class MethodRunner:
    """Runs one method per fresh child process under the memory cap; an out-of-memory child is a result."""

    def __init__(self, tmp: Path, cap_mb: float, log):
        self.tmp, self.cap_mb, self.log = tmp, cap_mb, log

    def run(self, spec: dict, tag: str, label: str | None = None) -> dict:
        from mobiflower.simulations.bench.memory_cap import run_capped

        spec_path, result_path = self.tmp / f"{tag}.spec.json", self.tmp / f"{tag}.result.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        cmd = [
            sys.executable,
            "-m",
            "mobiflower.simulations.bench.device_child",
            str(spec_path),
            str(result_path),
            repr(time.time()),
        ]
        run = run_capped(cmd, self.cap_mb)
        if result_path.is_file():
            result = json.loads(result_path.read_text())
        elif run.out_of_memory or any(text in run.stderr for text in _OOM_TEXTS):
            result = {
                "out_of_memory": True,
                "reason": run.reason or _last_line(run.stderr),
                "peak_rss_mb": run.peak_rss_mb,
                "stage": "the watchdog stopped it",
            }
        else:
            tail = "\n".join(run.stderr.strip().splitlines()[-25:])
            raise RuntimeError(f"bench device child {tag!r} failed in its process (exit {run.returncode}):\n{tail}")
        result["cap_mb"] = self.cap_mb
        name = label or tag
        if result.get("out_of_memory"):
            self.log(
                f"{name}: OUT OF MEMORY under the {self.cap_mb / 1024:.1f} GB cap ({result.get('reason')}) "
                f"[{time.perf_counter() - t0:.1f} s]"
            )
        elif spec["method"] == "prepare":
            self.log(
                f"{name}: {result['folder']} ({result['weights_file_mb']:.0f} MB) [{time.perf_counter() - t0:.1f} s]"
            )
        else:
            self.log(
                f"{name}: peak RSS {result['peak_rss_mb']:.0f} MB (runtime {result['baseline_rss_mb']:.0f} MB), "
                f"{result['s_per_sample'] * 1000:.1f} ms/sample, start-up {result['startup_s']:.2f} s "
                f"[{time.perf_counter() - t0:.1f} s]"
            )
        return result


_OOM_TEXTS = ("MemoryError", "can't allocate memory", "Cannot allocate memory", "std::bad_alloc")


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def machine_info(child: dict) -> dict:
    """This machine (cores, architecture, Python, memory) with what a child reported (torch, threads)."""
    machine = {"cpu_count": os.cpu_count(), **child}
    machine["arch"] = os.uname().machine if hasattr(os, "uname") else sys.platform
    machine["python"] = ".".join(map(str, sys.version_info[:3]))
    machine["memory_mb"] = _memory_total_mb()
    return machine


def _memory_total_mb() -> float | None:
    from mobiflower.simulations.bench.memory_cap import _meminfo_mb

    return _meminfo_mb().get("MemTotal")


__all__ = ["MethodRunner", "machine_info"]
