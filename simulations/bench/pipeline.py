"""Benchmark: does device forwarding overlap server training? One device, three schedules, one run.

A one-device Flower simulation (one Ray actor, one device thread, one server thread) streams its
samples once (one round, no cache epochs) in a setting where the two sides cost about the same:
a full-width ladder (reduction 1) on every real token. Three schedules, measured back to back:

* ``in-flight 2``: two forward requests pushed per device; frames train in a background thread.
* ``in-flight 1``: one request at a time, but training still runs beside the pulling, so the
  device only idles for the message round trip.
* ``serial``: one request at a time, and the server trains on a frame before asking for the next
  (``overlap = false``): no overlap, the wall time approaches the sum of both sides.

Reported per schedule: device forward seconds, server training seconds, streaming wall seconds,
wall / max(both) (1.0 = perfect overlap) and wall / sum(both) (1.0 = no overlap at all).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from mobiflower.simulations.bench.common import acceptance_lines, bars_with_values, judge_acceptance, save_figure
from mobiflower.simulations.simulate import SimulateConfig, run_simulate

SCHEDULES = {
    "in-flight 2": {"in-flight": 2, "overlap": True},
    "in-flight 1": {"in-flight": 1, "overlap": True},
    "serial": {"in-flight": 1, "overlap": False},
}
# Run-config keys the bench sets itself (the schedules it compares, and a setting where both sides cost about
# the same): `-c` may not set them, and the refusal says what does.
BENCH_SETS = {
    "train-samples": "use --samples",
    "reduction": "use --reduction",
    "chunk-size": "use --chunk-size",
    "in-flight": "it is what the schedules compare",
    "overlap": "it is what the schedules compare",
    "num-server-rounds": "one round: the samples are streamed once",
    "token-policy": "every real token, so the device's forward and the server's training cost about the same",
    "eval-every": "only the streaming is timed",
    "deliver": "only the streaming is timed",
    "validation-samples": "only the streaming is timed (16 samples)",
    "test-samples": "only the streaming is timed (16 samples)",
    "run-dir": "each schedule's run keeps its own folder under the bench's workdir",
}
ACCEPTANCE = {"in-flight 2 wall <= 1.15 x max(device, server)": ("in_flight_2_wall_over_max", "<=", 1.15)}


def run_pipeline_bench(
    samples: int = 256,
    reduction: int = 1,
    chunk_size: int = 32,
    token_policy: str = "nonpad",
    workdir: str = "runs/bench-pipeline",
    run_config: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run the three schedules and return the measured figures and ratios; ``run_config``: more keys (the
    ``-c`` ones, checked against :data:`BENCH_SETS` by the command), under the bench's own."""
    base = {
        **(run_config or {}),
        "train-samples": samples,
        "validation-samples": 16,
        "test-samples": 16,
        "num-server-rounds": 1,
        "eval-every": 0,
        "token-policy": token_policy,
        "reduction": reduction,
        "chunk-size": chunk_size,
        "deliver": False,
    }
    rows: dict[str, dict[str, float]] = {}
    for name, schedule in SCHEDULES.items():
        log(f"[bench pipeline] {name}: one device, {samples} samples in chunks of {chunk_size} ...")
        t0 = time.perf_counter()
        # client_cpus=2 on a 2-core machine: exactly one actor, so the device is one process.
        summary = run_simulate(
            SimulateConfig(devices=1, client_cpus=2, workdir=workdir, run_config={**base, **schedule}), quiet=True
        )
        device_s = summary["stream_device_forward_s"]
        train_s = summary["stream_server_train_s"]
        wall = summary["stream_wall_s"]
        rows[name] = {
            "device_forward_s": device_s,
            "server_train_s": train_s,
            "wall_s": wall,
            "wall_over_max": wall / max(device_s, train_s),
            "wall_over_sum": wall / (device_s + train_s),
            "pipeline_efficiency": summary["pipeline_efficiency"],
            "frames": summary["frames"],
            "run_s": time.perf_counter() - t0,
        }
        log(f"  device {device_s:.1f} s, server {train_s:.1f} s, wall {wall:.1f} s")
    ratios = {
        "in_flight_2_wall_over_max": rows["in-flight 2"]["wall_over_max"],
        "in_flight_1_wall_over_max": rows["in-flight 1"]["wall_over_max"],
        "serial_wall_over_sum": rows["serial"]["wall_over_sum"],
        "serial_wall_over_in_flight_2_wall": rows["serial"]["wall_s"] / rows["in-flight 2"]["wall_s"],
    }
    return {
        "benchmark": "pipeline",
        "config": {
            "samples": samples,
            "reduction": reduction,
            "chunk_size": chunk_size,
            "token_policy": token_policy,
            "family": "ladder",
        },
        "schedules": rows,
        "ratios": ratios,
        "acceptance": judge_acceptance(ratios, ACCEPTANCE),
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [f"{'schedule':<12} {'device s':>9} {'server s':>9} {'wall s':>8} {'wall/max':>9} {'wall/sum':>9}"]
    for name, r in result["schedules"].items():
        lines.append(
            f"{name:<12} {r['device_forward_s']:>9.1f} {r['server_train_s']:>9.1f} {r['wall_s']:>8.1f} "
            f"{r['wall_over_max']:>9.2f} {r['wall_over_sum']:>9.2f}"
        )
    return "\n".join(lines + [""] + acceptance_lines(result, ACCEPTANCE, width=34))


def plot(result: dict[str, Any], path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["schedules"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    rows = result["schedules"]
    width = 0.27
    xs = range(len(names))
    for i, (key, label) in enumerate(
        (("device_forward_s", "device forward"), ("server_train_s", "server training"), ("wall_s", "wall"))
    ):
        ax[0].bar([x + (i - 1) * width for x in xs], [rows[n][key] for n in names], width, label=label)
    ax[0].set_xticks(list(xs), names)
    ax[0].set_ylabel("seconds")
    ax[0].legend(fontsize=8)
    bars_with_values(ax[1], names, [rows[n]["wall_over_max"] for n in names], ["C0", "C1", "C2"], fmt=".2f")
    ax[1].axhline(1.15, color="k", ls="--", lw=1)
    ax[1].set_ylabel("wall / max(device, server)")
    cfg = result["config"]
    return save_figure(
        fig,
        result,
        path,
        title=f"one device, {cfg['samples']} samples, ladder r={cfg['reduction']} on {cfg['token_policy']} tokens",
    )
