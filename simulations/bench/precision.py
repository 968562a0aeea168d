"""``mobiflower bench precision``: what the device's backbone weight precision costs and saves.

For each weight precision (:data:`~mobiflower.platform.precision.WEIGHT_PRECISIONS`: fp32, bf16
where this CPU computes it natively, int8, int4) the benchmark first prepares the converted,
memory-mapped copy of the backbone (once, in this process: :func:`ensure_prepared`), then starts
fresh Python processes (``sys.executable -m mobiflower.simulations.bench.precision_child ...``),
as a Flower deployment does for every message:

* ``cold`` start (optional): the prepared copy's files are evicted from the page cache
  (``posix_fadvise(DONTNEED)``; Python and library files stay cached), then a process imports,
  loads the backbone (``Backbone.load(ref, weights=precision)``) and builds and encodes one
  frame of ``batch_size`` samples with :class:`DeviceRuntime`. Start to first frame is measured
  from just before the process is spawned to the moment the encoded frame exists; the process's
  CPU seconds up to then (``start_cpu_s``) tell what the start costs on an idle CPU when the
  machine is busy (with one thread, CPU seconds ~ idle wall seconds).
* ``warm`` starts (``starts`` of them): the same, with the files in the page cache.
* the ``measure`` process: imports the runtime code (torch, transformers' model and tokenizer
  code, mobiflower), records its RSS (``baseline_rss_mb``: the runtime, before the backbone is
  loaded), loads the backbone, builds the first frame (its start-to-first-frame is reported
  too), forwards the remaining batches (seconds per sample over those: the first batch is the
  warm-up), records its own peak RSS (``VmHWM``; see
  :func:`~mobiflower.simulations.bench.precision_child.peak_rss_mb`) and, on Linux, how much of the weights file is
  resident (``weights_resident_mb``), and saves the last-token states of every tapped layer for
  the first batch.

Model memory = peak RSS - RSS just before the backbone is loaded (tokenizer, weights, activations
and the runtime's buffers: everything loading and running the backbone adds). The tapped states
of each precision are compared with fp32's for the same batch (relative L2 error per layer, a
cheap proxy of accuracy). With ``accuracy=True`` the side-tuned accuracy of each precision on the
bundled task is measured by a one-device run (``mobiflower local``) with the device at that precision.

Acceptance thresholds are evaluated and reported as booleans, never asserted.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from mobiflower.simulations.bench.common import (
    acceptance_lines,
    bars_with_values,
    bench_logger,
    bench_run_config,
    judge_acceptance,
    ratio,
    run_child,
    save_figure,
    write_outputs,
)
from mobiflower.simulations.bench.common import (
    fmt as _fmt,
)
from mobiflower.simulations.bench.device_spec import bench_samples

PRECISIONS = ("fp32", "bf16", "int8", "int4")
ACCEPTANCE = {
    # name: (ratio key, comparison, threshold)
    "int8_model_memory_le_0.35x_fp32": ("int8_vs_fp32_model_memory", "<=", 0.35),
    "int8_s_le_1.3x_fp32": ("int8_vs_fp32_s", "<=", 1.3),
    "int8_accuracy_within_1pt_fp32": ("int8_vs_fp32_accuracy_points_abs", "<=", 1.0),
    "int4_model_memory_le_0.25x_fp32": ("int4_vs_fp32_model_memory", "<=", 0.25),
    "fp32_warm_start_le_3s": ("fp32_warm_start_s", "<=", 3.0),
    "int8_warm_start_le_3s": ("int8_warm_start_s", "<=", 3.0),
}
# Run-config keys the accuracy runs set themselves (each precision side-tuned the same way): `-c` may not set
# them, and the refusal says what does.
BENCH_SETS = {
    "model": "use --model",
    "weight-precision": "it is what the bench compares: use --precisions",
    "train-samples": "use --train-samples",
    "num-server-rounds": "use --epochs",
    "device-threads": "use --threads (every measurement runs on the same threads)",
    "run-dir": "each precision's run keeps its own folder",
}


def _log(message: str, progress: bool) -> None:
    bench_logger("precision", progress)(message)


# ------------------------------------------------------------------------------------------
# parent


def run_precision_bench(
    model: str = "smollm2-135m",
    precisions: Sequence[str] = PRECISIONS,
    batches: int = 6,
    batch_size: int = 16,
    threads: int | None = None,
    out: str | None = None,
    plot: str | None = None,
    accuracy: bool = False,
    progress: bool = True,
    *,
    num_taps: int = 8,
    seed: int = 0,
    starts: int = 2,
    cold: bool = True,
    weights_dir: str | None = None,
    group_size: int | None = None,
    accuracy_config: dict | None = None,
    include_unsupported: bool = False,
    max_tokens: int | None = -1,
    run_config: dict | None = None,
) -> dict:
    """Measure every precision in fresh processes; return (and optionally write) the result JSON.

    ``precisions`` are run in the order given, fp32 first if present (the reference). bf16 is
    skipped (and reported as such) on a CPU without native bf16 unless ``include_unsupported``.
    ``starts`` warm start-only processes per precision (plus one ``cold`` one) measure start to
    first frame. ``weights_dir`` holds the prepared copies (default ``$MOBIFLOWER_HOME/models``).
    ``accuracy_config`` overrides the accuracy runs' settings (``train_samples``, ``epochs`` = rounds; e.g.
    ``{"train_samples": 500}``). ``max_tokens`` is the device's forward budget
    (:attr:`ForwardConfig.max_tokens`; -1: its default, None: whole batches). ``run_config``: more keys of
    the accuracy runs (``-c``), refused before the first measurement where retired, set by the bench
    (:data:`BENCH_SETS`), read by no run, or given without ``accuracy``.
    """
    from mobiflower.platform.precision import DEFAULT_INT4_GROUP_SIZE

    extra = _accuracy_keys(run_config or {}, accuracy)
    _check_counts(batches, batch_size, threads, starts)
    run, skipped, support = _precisions_to_run(precisions, include_unsupported)
    samples = bench_samples(batches, batch_size, seed)
    config = {
        "max_tokens": _forward_budget(max_tokens),
        "model": model,
        "precisions": run,
        "batches": batches,
        "batch_size": batch_size,
        "samples": len(samples),
        "timed_batches": max(1, batches - 1),
        "warmup_batches": 1 if batches > 1 else 0,
        "num_taps": num_taps,
        "seed": seed,
        "threads": threads,
        "starts": starts,
        "cold": cold,
        "group_size": group_size or DEFAULT_INT4_GROUP_SIZE,
        "weights_dir": weights_dir,
        "run_config": extra,
    }
    _log(
        f"{', '.join(run)} of {model}: {len(samples)} samples ({batches} batches of {batch_size}), every "
        "measurement in a fresh process",
        progress,
    )
    entries, machine = _measure_precisions(config, samples, progress)
    result: dict[str, Any] = {"config": config, "precisions": entries, "skipped": skipped}
    if accuracy:
        result["accuracy"] = _accuracy(model, run, threads, {**extra, **(accuracy_config or {})}, progress)
        for precision, acc in result["accuracy"].items():
            if isinstance(acc, dict) and "test_accuracy" in acc:
                result["precisions"][precision]["test_accuracy"] = acc["test_accuracy"]
    result["ratios"] = _ratios(result["precisions"])
    result["acceptance"] = judge_acceptance(result["ratios"], ACCEPTANCE)
    result["machine"] = {**machine, **_machine_facts(support)}
    result["support"] = support

    write_outputs(result, out, plot, plot_result, lambda msg: _log(msg, progress))
    return result


def _accuracy_keys(run_config: dict, accuracy: bool) -> dict:
    """The ``-c`` keys of the accuracy runs, checked before the first measurement (minutes of them)."""
    if not run_config:
        return {}
    if not accuracy:
        raise ValueError(f"-c {', '.join(sorted(run_config))}: -c keys go to the accuracy runs; add --accuracy")
    return bench_run_config("precision", run_config, BENCH_SETS)


def _forward_budget(max_tokens: int | None) -> int | None:
    """The device's forward budget in tokens: -1 is the runtime's default, None whole batches."""
    from mobiflower.clients.runtime import ForwardConfig

    return ForwardConfig.max_tokens if max_tokens == -1 else max_tokens


def _measure_precisions(config: dict, samples: Sequence, progress: bool) -> tuple[dict[str, dict], dict]:
    """Every precision of the run measured in fresh processes, their states compared with fp32's; with
    the measuring children's machine facts."""
    entries: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="mobiflower-bench-precision-") as tmp:
        tmp_path = Path(tmp)
        for precision in config["precisions"]:
            spec = {
                **{key: config[key] for key in _CHILD_KEYS},
                "precision": precision,
                "samples": [[e.id, e.text, e.label] for e in samples],
                "states_path": str(tmp_path / f"{precision}.states.pt"),
            }
            entries[precision] = _measure_precision(spec, tmp_path, config["starts"], config["cold"], progress)
        _state_errors(entries, tmp_path)
        machine = _take_machine(entries)
    return entries, machine


# what a child process is told of the run (with its precision, samples and where to save its states)
_CHILD_KEYS = ("model", "batch_size", "num_taps", "max_tokens", "threads", "weights_dir", "group_size")


def _check_counts(batches: int, batch_size: int, threads: int | None, starts: int) -> None:
    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches={batches} and batch_size={batch_size} must be at least 1")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    if starts < 0:
        raise ValueError(f"starts={starts} must be at least 0")


def _take_machine(entries: dict) -> dict:
    """The measuring children's machine facts (the last one's), taken out of the per-precision entries."""
    machine = {}
    for entry in entries.values():
        machine = entry.pop("machine", machine)
        for key in ("states_path",):
            entry.pop(key, None)
    return machine


def _machine_facts(support: dict) -> dict:
    return {
        "cpu_count": os.cpu_count(),
        "bf16_native": support["bf16"]["native"],
        "arch": os.uname().machine if hasattr(os, "uname") else sys.platform,
        "python": ".".join(map(str, sys.version_info[:3])),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def _precisions_to_run(precisions: Sequence[str], include_unsupported: bool) -> tuple[list[str], dict, dict]:
    """The precisions to measure (fp32 first, the reference), those skipped with why, and this CPU's support."""
    from mobiflower.platform.precision import normalize_precision, precision_support

    wanted = [normalize_precision(p) for p in precisions]
    if not wanted:
        raise ValueError("give at least one precision")
    wanted = sorted(dict.fromkeys(wanted), key=lambda p: (p != "fp32", wanted.index(p)))
    support = precision_support()
    skipped = {}
    run = []
    for p in wanted:
        if not support[p]["native"] and not include_unsupported:
            skipped[p] = f"not native on this CPU ({support[p]['path']})"
        else:
            run.append(p)
    return run, skipped, support


def _measure_precision(spec: dict, tmp_path: Path, starts: int, cold: bool, progress: bool) -> dict[str, Any]:
    """One precision: prepare its copy, then its cold start, warm starts and measuring process."""
    from mobiflower.platform.prepared_weights import ensure_prepared

    precision = spec["precision"]
    t0 = time.perf_counter()
    folder = ensure_prepared(
        spec["model"],
        precision,
        spec["weights_dir"],
        spec["group_size"],
        log=(lambda m: _log(m, progress)) if progress else None,
    )
    prepare_s = time.perf_counter() - t0
    entry: dict[str, Any] = {
        "prepared": str(folder),
        "prepare_s": prepare_s,
        "weights_file_mb": _folder_weights_mb(folder),
        # other work on the machine inflates wall-clock starts: say how busy it was
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if cold:
        from mobiflower.platform.process_memory import evict_from_page_cache

        evict_from_page_cache([folder])
        run_cold = _run_child({**spec, "mode": "start"}, tmp_path, f"{precision}-cold")
        entry["cold_start"] = {k: v for k, v in run_cold.items() if k != "fingerprint"}
        entry["cold_start_s"] = run_cold["start_to_first_frame_s"]
    warm = [_run_child({**spec, "mode": "start"}, tmp_path, f"{precision}-warm{i}") for i in range(starts)]
    entry["warm_starts"] = [{k: v for k, v in w.items() if k != "fingerprint"} for w in warm]
    measured = _run_child({**spec, "mode": "measure"}, tmp_path, f"{precision}-measure")
    entry.update(measured)
    warm = warm or [measured]
    entry["warm_start_s"] = statistics.median(w["start_to_first_frame_s"] for w in warm)
    entry["warm_start_cpu_s"] = statistics.median(w["start_cpu_s"] for w in warm)
    _log(
        f"{precision}: model memory {entry['model_memory_mb']:.0f} MB (peak {entry['peak_rss_mb']:.0f}, "
        f"runtime {entry['baseline_rss_mb']:.0f}), {entry['s_per_sample'] * 1000:.1f} ms/sample, "
        f"start to first frame {entry['warm_start_s']:.2f} s warm"
        + (f", {entry['cold_start_s']:.2f} s cold" if cold else "")
        + f" [{time.perf_counter() - t0:.1f} s]",
        progress,
    )
    return entry


def _folder_weights_mb(folder: Path) -> float:
    from mobiflower.platform.prepared_weights import WEIGHTS_FILE

    return (Path(folder) / WEIGHTS_FILE).stat().st_size / 2**20


def _run_child(spec: dict, tmp: Path, tag: str) -> dict:
    """A fresh child that also learns when it was launched (start-to-first-frame is timed from it)."""
    return run_child("mobiflower.simulations.bench.precision_child", spec, tmp, tag, [repr(time.time())])


def _state_errors(entries: dict, tmp: Path) -> None:
    """Relative L2 error of each precision's tapped last-token states against fp32's (same batch)."""
    import torch

    ref_path = tmp / "fp32.states.pt"
    if "fp32" not in entries or not ref_path.is_file():
        return
    ref = torch.load(ref_path, weights_only=True)
    for precision, entry in entries.items():
        path = tmp / f"{precision}.states.pt"
        if not path.is_file():
            continue
        states = torch.load(path, weights_only=True)
        errors = {}
        for layer, r in ref.items():
            s = states[layer]
            errors[str(layer)] = float((s.float() - r.float()).norm() / r.float().norm().clamp_min(1e-12))
        entry["state_rel_error_by_layer"] = errors
        entry["state_rel_error_mean"] = sum(errors.values()) / len(errors)
        entry["state_rel_error_max"] = max(errors.values())


_ACCURACY_KEYS = {"train_samples": "train-samples", "epochs": "num-server-rounds"}  # accuracy_config -> run config


def _accuracy_run_config(model: str, precision: str, threads: int | None, overrides: dict) -> dict:
    """The run config of one accuracy run: ``overrides`` under their run-config keys (``-c`` keys as they
    are), the device at ``precision``."""
    run_config = {"model": model, **{_ACCURACY_KEYS.get(k, k): v for k, v in overrides.items()}}
    run_config["weight-precision"] = precision
    if threads:
        run_config.setdefault("device-threads", threads)
    return run_config


def _accuracy(model: str, precisions: Sequence[str], threads: int | None, overrides: dict, progress: bool) -> dict:
    """Side-tuned test accuracy with the device at each precision: a one-device run (``mobiflower local``:
    the fleet's strategy, the device in its own process)."""
    from mobiflower.simulations.simulate import SimulateConfig, run_simulate

    results = {}
    with tempfile.TemporaryDirectory(prefix="mobiflower-bench-precision-acc-") as tmp:
        for precision in precisions:
            run_config = _accuracy_run_config(model, precision, threads, overrides)
            t0 = time.perf_counter()
            config = SimulateConfig(devices=1, workdir=str(Path(tmp) / precision), run_config=run_config)
            r = run_simulate(config, quiet=True, engine="processes")
            device = next(iter(r["devices"].values()))
            results[precision] = {
                "test_accuracy": r.get("test_accuracy"),
                "fingerprint": device.get("fingerprint"),
                "device_forward_s": r.get("device_forward_s"),
                "device_peak_rss_mb": device.get("device_peak_rss_mb"),
                "wall_s": r.get("simulation", {}).get("wall_s"),
            }
            _log(
                f"{precision}: side-tuned test accuracy {r['test_accuracy']:.4f} [{time.perf_counter() - t0:.0f} s]",
                progress,
            )
    return results


def _ratios(entries: dict) -> dict:
    def get(precision: str, key: str) -> float | None:
        return entries.get(precision, {}).get(key)

    ratios: dict[str, float | None] = {}
    for p in ("bf16", "int8", "int4"):
        ratios[f"{p}_vs_fp32_model_memory"] = ratio(get(p, "model_memory_mb"), get("fp32", "model_memory_mb"))
        ratios[f"{p}_vs_fp32_weights_resident"] = ratio(
            get(p, "weights_resident_mb"), get("fp32", "weights_resident_mb")
        )
        ratios[f"{p}_vs_fp32_s"] = ratio(get(p, "s_per_sample"), get("fp32", "s_per_sample"))
    a8, a32 = get("int8", "test_accuracy"), get("fp32", "test_accuracy")
    ratios["int8_vs_fp32_accuracy_points"] = None if a8 is None or a32 is None else (a8 - a32) * 100
    ratios["int8_vs_fp32_accuracy_points_abs"] = None if a8 is None or a32 is None else abs(a8 - a32) * 100
    for p in ("fp32", "int8"):
        ratios[f"{p}_warm_start_s"] = get(p, "warm_start_s")
        ratios[f"{p}_warm_start_cpu_s"] = get(p, "warm_start_cpu_s")
    return ratios


# ------------------------------------------------------------------------------------------
# report


def format_table(result: dict) -> str:
    """A readable table of each precision's memory, speed, start-up and error, then the acceptance checks."""
    cfg = result.get("config", {})
    machine = result.get("machine", {})
    lines = [
        f"Backbone weight precision on the device: {cfg.get('model')} - {cfg.get('batches')} batches x "
        f"{cfg.get('batch_size')} (1 warm-up), at most {cfg.get('max_tokens') or 'all'} tokens per forward, "
        f"threads {machine.get('threads')}, "
        f"bf16 native: {machine.get('bf16_native')}",
        "",
        *_precision_rows(result),
        "",
        "model MB = peak RSS - RSS just before the backbone is loaded; weights res = resident part of the "
        "memory-mapped weights file;",
        "start = process spawn to first encoded frame (warm: median, cold: "
        "backbone files evicted from the page cache); start cpu = CPU seconds the warm start used",
        "",
        *_breakdown_rows(result),
        "",
        *acceptance_lines(result, ACCEPTANCE, width=36),
    ]
    return "\n".join(lines)


def _precision_rows(result: dict) -> list[str]:
    """The main table: a row per precision measured (memory, speed, start-up, error, accuracy), then the skipped."""
    header = (
        f"{'precision':<10}{'file MB':>9}{'runtime MB':>12}{'peak MB':>9}{'model MB':>10}{'weights res':>13}"
        f"{'ms/sample':>11}{'start warm':>12}{'cold':>7}{'start cpu':>11}{'state err':>11}{'test acc':>10}"
        f"  {'forward':<13}"
    )
    lines = [header, "-" * len(header)]
    for name, e in result.get("precisions", {}).items():
        lines.append(
            f"{name:<10}{_fmt(e.get('weights_file_mb'), '.0f'):>9}{_fmt(e.get('baseline_rss_mb'), '.0f'):>12}"
            f"{_fmt(e.get('peak_rss_mb'), '.0f'):>9}{_fmt(e.get('model_memory_mb'), '.0f'):>10}"
            f"{_fmt(e.get('weights_resident_mb'), '.0f'):>13}"
            f"{_fmt(e.get('s_per_sample') and e['s_per_sample'] * 1000, '.1f'):>11}"
            f"{_fmt(e.get('warm_start_s')):>12}{_fmt(e.get('cold_start_s')):>7}"
            f"{_fmt(e.get('warm_start_cpu_s')):>11}"
            f"{_fmt(e.get('state_rel_error_mean'), '.4f'):>11}{_fmt(e.get('test_accuracy'), '.4f'):>10}"
            f"  {e.get('forward') or '-':<13}"
        )
    for name, reason in result.get("skipped", {}).items():
        lines.append(f"{name:<10}skipped: {reason}")
    return lines


def _breakdown_rows(result: dict) -> list[str]:
    """Where each precision's model memory goes (MB, at the end of the run) and its warm start (s, median)."""
    lines = [
        "where model memory goes (MB, at the end of the run) and where the warm start goes (s, median):",
        f"{'precision':<10}{'weights':>9}{'code+files':>12}{'anon':>7}{'transient':>11}"
        f"{'imports':>10}{'load':>7}{'1st frame':>11}",
    ]
    for name, e in result.get("precisions", {}).items():
        b = e.get("memory_breakdown_mb") or {}
        warm = e.get("warm_starts") or []

        def med(key):
            values = [w[key] for w in warm if w.get(key) is not None]
            return statistics.median(values) if values else None

        lines.append(
            f"{name:<10}{_fmt(b.get('weights_resident'), '.0f'):>9}"
            f"{_fmt(b.get('code_and_other_files'), '.0f'):>12}{_fmt(b.get('anonymous'), '.0f'):>7}"
            f"{_fmt(b.get('transient_at_peak'), '.0f'):>11}{_fmt(med('imports_s')):>10}"
            f"{_fmt(med('model_load_s')):>7}{_fmt(med('first_frame_s')):>11}"
        )
    return lines


def plot_result(result: dict, path: str) -> Path:
    """Bars per precision: model memory (weights share marked), ms per sample, start to first frame."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["precisions"]
    names = list(entries)
    colors = {"fp32": "#8d99ae", "bf16": "#e9c46a", "int8": "#2a9d8f", "int4": "#264653"}
    fig, (ax_mem, ax_s, ax_start) = plt.subplots(1, 3, figsize=(12, 4))
    mem = [entries[n]["model_memory_mb"] for n in names]
    res = [entries[n].get("weights_resident_mb") or 0 for n in names]
    ax_mem.bar(names, mem, color=[colors.get(n, "#999") for n in names])
    ax_mem.bar(names, res, color="none", edgecolor="black", hatch="//", linewidth=0.5, label="weights resident")
    for i, v in enumerate(mem):
        ax_mem.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax_mem.set_ylabel("model memory (MB)")
    ax_mem.set_title("Peak RSS - RSS before load")
    ax_mem.legend(fontsize=8)
    ms = [entries[n]["s_per_sample"] * 1000 for n in names]
    bars_with_values(ax_s, names, ms, [colors.get(n, "#999") for n in names], ".1f")
    ax_s.set_ylabel("ms per sample")
    ax_s.set_title("Device forward + pack")
    x = range(len(names))
    warm = [entries[n]["warm_start_s"] for n in names]
    cold = [entries[n].get("cold_start_s") for n in names]
    ax_start.bar([i - 0.2 for i in x], warm, width=0.4, label="warm", color="#2a9d8f")
    if any(c is not None for c in cold):
        ax_start.bar([i + 0.2 for i in x], [c or 0 for c in cold], width=0.4, label="cold files", color="#e76f51")
    ax_start.axhline(3.0, color="black", linestyle="--", linewidth=0.8)
    ax_start.set_xticks(list(x), names)
    ax_start.set_ylabel("seconds")
    ax_start.set_title("Process start to first frame")
    ax_start.legend(fontsize=8)
    return save_figure(fig, result, path)


__all__ = ["run_precision_bench", "format_table", "plot_result", "PRECISIONS", "ACCEPTANCE"]
