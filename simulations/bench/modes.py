"""Benchmark: shared, per-device and hybrid side networks on a label-skewed fleet, side by side.

Devices get a Dirichlet(alpha) split by label (alpha = 0.1: most devices hold mostly one label),
and each device's validation and test samples follow its own label mix, so "accuracy on the
device's own held-out data" is what a user of that device sees. The same fleet, samples and seed
run once per mode; the table reports every device's own test accuracy per mode, the pooled
accuracy over all devices' own test samples (the verdict) and the unweighted mean over devices, beside
each device's label mix (its profile's label shares, in percent per label).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mobiflower.simulations.bench.common import acceptance_lines, bench_run_config, judge_acceptance, save_figure
from mobiflower.simulations.simulate import SimulateConfig, run_simulate

MODES = ("shared", "per-device", "hybrid")
# Run-config keys the bench sets itself (every mode runs on the same split, samples and rounds): `-c` may not
# set them, and the refusal says what does.
BENCH_SETS = {
    "mode": "it is what the bench compares (shared, per-device and hybrid, one run each)",
    "partitioning": "the modes are compared on a Dirichlet label split: set its skew with --dirichlet-alpha",
    "dirichlet-alpha": "use --dirichlet-alpha",
    "train-samples": "use --train-samples",
    "test-samples": "use --test-samples",
    "num-server-rounds": "use --num-server-rounds",
    "run-dir": "each mode's run keeps its own folder under the bench's workdir",
}
ACCEPTANCE = {
    "per-device beats shared (own test data, pooled)": ("per_device_minus_shared", ">", 0.0),
    "hybrid beats shared (own test data, pooled)": ("hybrid_minus_shared", ">", 0.0),
}


def modes_run_config(
    alpha: float, train_samples: int, test_samples: int, rounds: int, run_config: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The run config every mode shares: the ``-c`` keys (checked against :data:`BENCH_SETS`) under the
    bench's own, so that nothing given on the command line changes what the modes are compared on."""
    return {
        **(run_config or {}),
        "partitioning": "dirichlet",
        "dirichlet-alpha": alpha,
        "train-samples": train_samples,
        "test-samples": test_samples,
        "num-server-rounds": rounds,
    }


def run_modes_bench(
    devices: int = 4,
    alpha: float = 0.1,
    train_samples: int = 2000,
    test_samples: int = 1000,
    rounds: int = 20,
    workdir: str = "runs/bench-modes",
    run_config: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run every mode on the same fleet and samples; ``run_config``: more keys (``-c``), refused before the
    first run where retired, set by the bench itself or read by no run (a ValueError saying what to use)."""
    extra = bench_run_config("modes", run_config or {}, BENCH_SETS)
    base = modes_run_config(alpha, train_samples, test_samples, rounds, extra)
    runs: dict[str, dict[str, Any]] = {}
    for mode in MODES:
        log(f"[bench modes] {mode}: {devices} devices, Dirichlet alpha {alpha} ...")
        t0 = time.perf_counter()
        summary = run_simulate(
            SimulateConfig(devices=devices, workdir=workdir, run_config={**base, "mode": mode}), quiet=True
        )
        per_device = {
            d: {
                "test_accuracy": v.get("test_accuracy"),
                "test_samples": v.get("test_samples"),
                "label_shares": v.get("label_shares"),
            }
            for d, v in summary["devices"].items()
        }
        runs[mode] = {
            "test_accuracy": summary["test_accuracy"],
            "mean_device_test_accuracy": summary["mean_device_test_accuracy"],
            "devices": per_device,
            "bytes_up": summary["bytes_up"],
            "bytes_down": summary["bytes_down"],
            "server_train_s": summary["server_train_s"],
            "run_s": time.perf_counter() - t0,
            "run_dir": summary["simulation"]["run_dir"],
        }
        log(f"  mean of devices {summary['mean_device_test_accuracy']:.4f}, pooled {summary['test_accuracy']:.4f}")
    return summarize({"benchmark": "modes", "config": {**base, "devices": devices}, "runs": runs})


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios and verdicts from the runs: pooled accuracy over every device's own test samples.

    The pooled figure (sample-weighted) is the verdict; the unweighted mean over devices is shown
    beside it but a Dirichlet(0.1) split can leave a device with a single test sample.
    """
    runs = result["runs"]
    shared = runs["shared"]["test_accuracy"]
    ratios = {
        "per_device_minus_shared": runs["per-device"]["test_accuracy"] - shared,
        "hybrid_minus_shared": runs["hybrid"]["test_accuracy"] - shared,
        "per_device_minus_shared_mean_of_devices": runs["per-device"]["mean_device_test_accuracy"]
        - runs["shared"]["mean_device_test_accuracy"],
        "hybrid_minus_shared_mean_of_devices": runs["hybrid"]["mean_device_test_accuracy"]
        - runs["shared"]["mean_device_test_accuracy"],
    }
    return {**result, "ratios": ratios, "acceptance": judge_acceptance(ratios, ACCEPTANCE)}


def format_table(result: dict[str, Any]) -> str:
    names = list(result["runs"])
    devices = sorted(next(iter(result["runs"].values()))["devices"])
    shares = {d: _shares(result["runs"][names[0]]["devices"][d].get("label_shares")) for d in devices}
    width = max([9, *(len(s) for s in shares.values())])
    lines = [f"{'device':<10} {'test n':>7} {'% labels':>{width}} " + " ".join(f"{n:>11}" for n in names)]
    for d in devices:
        first = result["runs"][names[0]]["devices"][d]
        accs = [result["runs"][name]["devices"][d]["test_accuracy"] for name in names]
        lines.append(
            f"{d:<10} {first['test_samples']:>7} {shares[d]:>{width}} " + " ".join(f"{a:>11.4f}" for a in accs)
        )
    lines.append(
        f"{'mean':<10} {'':>7} {'':>{width}} "
        + " ".join(f"{result['runs'][n]['mean_device_test_accuracy']:>11.4f}" for n in names)
    )
    lines.append(
        f"{'pooled':<10} {'':>7} {'':>{width}} "
        + " ".join(f"{result['runs'][n]['test_accuracy']:>11.4f}" for n in names)
    )
    return "\n".join(lines + [""] + acceptance_lines(result, ACCEPTANCE, width=28))


def _shares(shares: list[float] | None) -> str:
    """A device's label mix in percent, in label order (``12/88``); empty when it reported none."""
    return "/".join(f"{100 * s:.0f}" for s in shares) if shares else ""


def plot(result: dict[str, Any], path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["runs"])
    devices = sorted(next(iter(result["runs"].values()))["devices"])
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        accs = [result["runs"][name]["devices"][d]["test_accuracy"] for d in devices]
        ax.bar([x + i * width for x in range(len(devices))], accs, width, label=name)
    ax.set_xticks([x + width for x in range(len(devices))], devices)
    ax.set_ylabel("test accuracy on the device's own data")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    cfg = result["config"]
    return save_figure(
        fig,
        result,
        path,
        title=f"{cfg['devices']} devices, Dirichlet alpha {cfg['dirichlet-alpha']}, {cfg['train-samples']} samples",
    )
