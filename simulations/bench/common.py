"""What the benchmarks share: fresh child processes, ratios, printed acceptance lines, figures."""

from __future__ import annotations

import json
import operator
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence


def run_child(module: str, spec: dict, tmp: Path, tag: str, extra_args: Sequence[str] = ()) -> dict:
    """Run ``python -m module spec.json result.json [extra]`` in a fresh process; its result dict.

    A fresh process per measurement makes its peak RSS its own (nothing inherited from the parent).
    """
    spec_path, result_path = tmp / f"{tag}.spec.json", tmp / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, "-m", module, str(spec_path), str(result_path), *extra_args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    if proc.returncode != 0 or not result_path.is_file():
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-25:])
        raise RuntimeError(f"{module} child {tag!r} failed in its process (exit {proc.returncode}):\n{tail}")
    return json.loads(result_path.read_text())


def app_run_config_keys(app: str) -> dict[str, Any]:
    """The run-config keys an app reads, with its defaults: ``side`` (mobiflower's) or ``fed-lora``."""
    if app == "fed-lora":
        from mobiflower.simulations.baselines.fed_lora import default_fed_lora_app_config

        return default_fed_lora_app_config()
    from mobiflower.simulations.simulate import default_app_config

    return default_app_config()


def keys_read_by(config: Mapping[str, Any], app: str) -> dict[str, Any]:
    """The keys of ``config`` that ``app`` (``side`` or ``fed-lora``) reads: a bench's ``-c`` keys for one run."""
    reads = app_run_config_keys(app) if config else {}
    return {key: value for key, value in config.items() if key in reads}


def bench_run_config(
    command: str, given: Mapping[str, Any], sets: Mapping[str, str], apps: Sequence[str] = ("side",)
) -> dict[str, Any]:
    """A bench's ``-c KEY=VALUE`` keys, checked before its first run so a typo costs seconds, not an hour.

    Refused (a ValueError saying what to do): a retired key (naming the key that replaced it), a key the
    bench sets itself (``sets`` says which option sets it: the bench's comparison depends on it), a key none
    of its ``apps`` read. A data path is made absolute: the fleet's devices do not run in this folder."""
    from mobiflower.platform.run_config import refuse_retired

    known = {key for app in apps for key in app_run_config_keys(app)}
    refuse_retired(given, own=known)
    for key in sorted(set(given) & set(sets)):
        raise ValueError(f"-c {key}: bench {command} sets {key} itself; {sets[key]}")
    unknown = sorted(set(given) - known)
    if unknown:
        readable = ", ".join(sorted(known - set(sets)))
        raise ValueError(f"unknown run-config key(s) {unknown} for bench {command}: its runs read {readable}")
    config = dict(given)
    data = str(config.get("data") or "")
    if data and not data.startswith("bundled:"):
        config["data"] = str(Path(data).expanduser().resolve())
    return config


def fmt(value: float | None, spec: str = ".2f", missing: str = "-") -> str:
    """A figure for a table, or ``missing`` where a run did not measure it."""
    return missing if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or not b:
        return None
    return a / b


def write_outputs(
    result: dict, out: str | None, plot: str | None, plot_fn: Callable[[dict, str], Path], log: Callable[[str], None]
) -> None:
    """Write the result JSON to ``out`` and the figure to ``plot`` (default: ``out`` with .png)."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    if plot is None and out:
        plot = str(Path(out).with_suffix(".png"))
    if plot:
        plot_fn(result, plot)
        log(f"wrote {plot}")


def acceptance_lines(result: dict, acceptance: dict, width: int = 30) -> list[str]:
    """One line per acceptance check: the measured ratio, the wanted bound, and PASS / FAIL / n/a.

    ``acceptance`` maps a check's name to ``(ratio key, operator, threshold)``, optionally with a
    fourth item: a flag in the ratios that also passes the check (named beside the verdict when it
    did); the verdicts are the booleans the benchmark stored under ``result["acceptance"]``
    (measured, never asserted).
    """
    ratios, verdicts = result.get("ratios", {}), result.get("acceptance", {})
    lines = ["Ratios and acceptance"]
    for name, (key, op, threshold, *alternative) in acceptance.items():
        verdict = verdicts.get(name)
        mark = "n/a" if verdict is None else ("PASS" if verdict else "FAIL")
        if verdict and alternative and ratios.get(alternative[0]):
            mark += f" ({alternative[0]})"
        value = ratios.get(key)
        shown = "-" if value is None else format(value, ".3g")
        lines.append(f"  {key:<{width}}{shown:>10}   want {op} {threshold:<6g} {mark}")
    return lines


_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}


def judge_acceptance(ratios: Mapping[str, Any], acceptance: Mapping[str, tuple]) -> dict[str, bool | None]:
    """Each acceptance line (as :func:`acceptance_lines` reads it) against the measured ratios: True, False,
    or None where the ratio was not measured, so that a verdict is stored, never asserted; a line whose
    fourth item names a flag that is set in the ratios passes."""
    verdict: dict[str, bool | None] = {}
    for name, (key, op, threshold, *alternative) in acceptance.items():
        value = ratios.get(key)
        if alternative and ratios.get(alternative[0]):
            verdict[name] = True
        else:
            verdict[name] = None if value is None else bool(_COMPARE[op](value, threshold))
    return verdict


def bars_with_values(ax, labels, values, colors, fmt: str = ".0f") -> None:
    """A bar per label, each with its value written on top."""
    ax.bar(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.text(i, v, format(v, fmt), ha="center", va="bottom", fontsize=8)


def bench_logger(name: str, progress: bool = True) -> Callable[[str], None]:
    """``log(message)`` printing ``[bench NAME] message`` to stderr, or nothing without progress."""

    def log(message: str) -> None:
        if progress:
            print(f"[bench {name}] {message}", file=sys.stderr, flush=True)

    return log


def save_figure(fig, result: dict, path, title: str | None = None):
    """Title the figure (default: the benchmark's model and batch), write it as PNG, and close it."""
    import matplotlib.pyplot as plt

    cfg = result.get("config", {})
    fig.suptitle(
        title or f"{Path(str(cfg.get('model'))).name}: {cfg.get('samples')} samples, batch {cfg.get('batch_size')}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
