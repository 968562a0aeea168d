"""Benchmark: server memory and throughput against fleet size, with per-device side networks paged to disk.

Each fleet size runs twice as a real Flower simulation (tiny random Llama backbone, bundled data,
``per-device`` mode, the same samples per device): once with ``side-memory-mb`` set, so side
networks beyond the budget are paged to the run folder, and once with every network in memory.
Reported per run, from the server process's own summary:

* RSS at the start of the strategy, its peak (sampled every 20 ms) and the growth between them;
* the side networks' peak resident bytes as the pager measured them (weights, gradients, AdamW
  moments, tail average and activation cache), page-ins and page-outs;
* server throughput: samples trained per second of server work (training plus paging);
* wall seconds of the training rounds and of the whole run.

What the budget bounds is the side networks; the rest of the growth is the server's working set
(Flower's messages, the frame intake, allocator slack), shown as "other" = growth minus the side
networks' peak. The verdict checks the largest fleet's growth against the budget plus a constant
stated up front (:data:`CONSTANT_MB`), and the table shows how "other" moves with the fleet.

Delivery is off in these runs: in a Flower simulation every simulated device's ``Context`` lives
in the server process, and delivery installs each device's network in it, which is device
memory (RESULTS.md has the figure) that a deployment keeps on the devices. The final test
still sends every device its network in an evaluate message.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from mobiflower.simulations.bench.common import bench_run_config, save_figure
from mobiflower.simulations.simulate import SimulateConfig, run_simulate
from mobiflower.strategies.config import FAMILY_SETTINGS

DEFAULT_DEVICES = (8, 16, 32, 64)
_LADDER = "the ladder these figures were measured on (RESULTS.md), with its own settings"
# Run-config keys the bench sets itself (:func:`load_run_config`: what is paged and how much of it): `-c` may
# not set them, and the refusal says what does.
BENCH_SETS = {
    **{key: _LADDER for key in FAMILY_SETTINGS["ladder"]},
    **{key: _LADDER for key in ("family", "token-policy", "num-taps", "reduction", "dropout")},
    "model": "the bench makes its own tiny random Llama, so that 64 devices run in minutes",
    "mode": "per-device side networks are what the pager pages",
    "num-server-rounds": "use --num-server-rounds",
    "aggregate-every": "the fleet averages once, after its last round (--num-server-rounds)",
    "average-epochs": "the fleet averages once, after its last round (--num-server-rounds)",
    "train-samples": "use --samples-per-device",
    "validation-samples": "sized by the fleet (2 per device)",
    "test-samples": "sized by the fleet (8 per device)",
    "chunk-size": "one chunk per device per round: use --samples-per-device",
    "eval-every": "only the final test is scored, so that the rounds time training",
    "side-memory-mb": "use --budget-mb (each size also runs all in memory unless --paged-only)",
    "deliver": "off: in a simulation delivery would put device memory in the server process",
    "run-dir": "each run keeps its own folder under the bench's workdir",
}


def load_run_config(
    model: str, devices: int, samples_per_device: int, rounds: int, reduction: int, budget_mb: float
) -> dict[str, Any]:
    """The run config of one load run: per-device side networks, cached rounds, FedAvg at the end."""
    # the ladder, the family these figures were measured on (RESULTS.md), with its own optimizer settings
    return {
        **FAMILY_SETTINGS["ladder"],
        "model": model,
        "family": "ladder",
        "token-policy": "last",
        "num-taps": 4,
        "reduction": reduction,
        "mode": "per-device",
        "num-server-rounds": rounds,
        "aggregate-every": rounds,
        "train-samples": samples_per_device * devices,
        "validation-samples": 2 * devices,
        "test-samples": 8 * devices,
        "chunk-size": samples_per_device,
        "eval-every": 0,
        "average-epochs": min(2, rounds),
        "side-memory-mb": budget_mb,
        "dropout": 0.1,
        # In a simulation every device's Context lives in the server process, and delivery installs
        # the device's network there: device memory, not server memory. The final test still sends
        # each device its network (in an evaluate message), so the server's traffic is the same.
        "deliver": False,
    }


def measure(summary: dict[str, Any], devices: int, budget_mb: float) -> dict[str, Any]:
    """The load figures of one run's summary."""
    memory = summary["server_memory"]
    paging = memory.get("paging") or {}
    trained = sum(r.get("samples", 0) for r in summary["rounds"] if r.get("phase") == "stream")
    trained += sum(
        sum(d["samples_trained"] for d in summary["devices"].values())
        for r in summary["rounds"]
        if r.get("phase") == "cache"
    )
    work_s = summary["server_train_s"] + paging.get("page_seconds", 0.0)
    growth = memory["peak_mb"] - memory["start_mb"]
    return {
        "devices": devices,
        "budget_mb": budget_mb,
        "rss_start_mb": memory["start_mb"],
        "rss_peak_mb": memory["peak_mb"],
        "rss_growth_mb": growth,
        "side_peak_mb": paging.get("peak_resident_mb"),
        "other_mb": growth - paging.get("peak_resident_mb", 0.0),
        "page_ins": paging.get("page_ins", 0),
        "page_outs": paging.get("page_outs", 0),
        "page_s": paging.get("page_seconds", 0.0),
        "server_train_s": summary["server_train_s"],
        "samples_trained": trained,
        "server_samples_per_s": trained / work_s if work_s else None,
        "train_wall_s": summary["train_wall_s"],
        "run_wall_s": summary["run_wall_s"],
        "test_accuracy": summary["test_accuracy"],
        "failures": sum(len(d["failures"]) for d in summary["devices"].values()),
    }


def run_load_bench(
    devices: Sequence[int] = DEFAULT_DEVICES,
    budget_mb: float = 24.0,
    samples_per_device: int = 32,
    rounds: int = 3,
    hidden: int = 256,
    reduction: int = 4,
    unbounded: bool = True,
    workdir: str = "runs/bench-load",
    run_config: dict[str, Any] | None = None,
    log=print,
) -> dict[str, Any]:
    """Run every fleet size paged (and in memory, with ``unbounded``); the table's rows and the verdict.

    ``run_config``: more keys (``-c``), under the bench's own: refused before the first run where retired,
    set by the bench itself (:data:`BENCH_SETS`) or read by no run (a ValueError saying what to use)."""
    from mobiflower.platform.tiny import make_tiny_model

    extra = bench_run_config("load", run_config or {}, BENCH_SETS)
    work = Path(workdir)
    model = work / f"tiny-llama-{hidden}"
    if not (model / "config.json").exists():
        make_tiny_model("llama", model, hidden=hidden, layers=4)
    rows: list[dict[str, Any]] = []
    for n in devices:
        for budget in [budget_mb, 0.0] if unbounded else [budget_mb]:
            label = f"budget {budget:g} MB" if budget else "all in memory"
            log(f"[bench load] {n} devices, {label} ...")
            t0 = time.perf_counter()
            config = SimulateConfig(
                devices=n,
                workdir=str(work / "sim"),
                run_config={**extra, **load_run_config(str(model), n, samples_per_device, rounds, reduction, budget)},
            )
            row = measure(run_simulate(config, quiet=True), n, budget)
            row["bench_s"] = time.perf_counter() - t0
            rows.append(row)
            log(
                f"  RSS +{row['rss_growth_mb']:.0f} MB (side networks {row['side_peak_mb']:.1f} MB), "
                f"{row['server_samples_per_s']:.0f} samples/s, {row['page_ins']} page-ins, run {row['run_wall_s']:.0f} s"
            )
    return summarize(
        {
            "benchmark": "load",
            "config": {
                "model": f"tiny random llama, hidden {hidden}, 4 layers",
                "samples_per_device": samples_per_device,
                "rounds": rounds,
                "reduction": reduction,
                "budget_mb": budget_mb,
                "mode": "per-device",
                "run_config": extra,
            },
            "rows": rows,
        }
    )


CONSTANT_MB = 256.0
"""The stated constant: what a server process adds on top of its side networks whatever the fleet
size. It covers the code the first round loads (torch's optimizer and autograd paths, safetensors),
the frame intake and per-device accounting, Flower's message handling and the allocator's slack
(this benchmark's "other" column at the smallest fleet; RESULTS.md, "Load: 64 devices")."""


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """The verdict: the largest paged fleet's RSS growth against the budget plus :data:`CONSTANT_MB`.

    Also the slope of "other" between the smallest and the largest paged fleet: what the server
    still spends per device outside the side networks (accounting, intake indexes, Flower).
    """
    rows = result["rows"]
    budget = result["config"]["budget_mb"]
    paged = sorted((r for r in rows if r["budget_mb"]), key=lambda r: r["devices"])
    smallest, largest = paged[0], paged[-1]
    result["constant_mb"] = CONSTANT_MB
    if largest["devices"] > smallest["devices"]:
        result["other_mb_per_device"] = (largest["other_mb"] - smallest["other_mb"]) / (
            largest["devices"] - smallest["devices"]
        )
    result["acceptance"] = {
        f"{largest['devices']} devices: side networks' peak <= budget": largest["side_peak_mb"] <= budget,
        f"{largest['devices']} devices: RSS growth <= budget + constant ({budget:g} + {CONSTANT_MB:g} MB)": largest[
            "rss_growth_mb"
        ]
        <= budget + CONSTANT_MB,
        "no device failed": all(r["failures"] == 0 for r in rows),
    }
    return result


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'devices':>7} {'side memory':>13} {'RSS start':>9} {'RSS peak':>9} {'growth':>7} {'side peak':>9} "
        f"{'other':>6} {'page-ins':>8} {'page s':>7} {'samples/s':>9} {'train wall':>10} {'run s':>6}"
    )
    lines = [head]
    for r in result["rows"]:
        budget = f"{r['budget_mb']:g} MB" if r["budget_mb"] else "unbounded"
        lines.append(
            f"{r['devices']:>7} {budget:>13} {r['rss_start_mb']:>9.0f} {r['rss_peak_mb']:>9.0f} "
            f"{r['rss_growth_mb']:>7.0f} {r['side_peak_mb']:>9.1f} {r['other_mb']:>6.0f} {r['page_ins']:>8} "
            f"{r['page_s']:>7.1f} {r['server_samples_per_s']:>9.0f} {r['train_wall_s']:>10.1f} "
            f"{r['run_wall_s']:>6.0f}"
        )
    lines += [
        "",
        "(MB are MiB of the server process; side peak = side networks resident at their peak, as the",
        " pager measured them; other = growth - side peak; samples/s = samples trained per second of",
        " server training + paging)",
        "",
        "Acceptance",
    ]
    if "other_mb_per_device" in result:
        lines.append(
            f"  other grows by {result['other_mb_per_device']:.2f} MB per device between the smallest "
            f"and largest paged fleet"
        )
    lines += [f"  {name:<70} {'PASS' if ok else 'FAIL'}" for name, ok in result["acceptance"].items()]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, thr) = plt.subplots(1, 2, figsize=(10, 3.8))
    for label, pick in (("paged", lambda r: r["budget_mb"] > 0), ("all in memory", lambda r: r["budget_mb"] == 0)):
        rows = sorted((r for r in result["rows"] if pick(r)), key=lambda r: r["devices"])
        if not rows:
            continue
        xs = [r["devices"] for r in rows]
        mem.plot(xs, [r["rss_growth_mb"] for r in rows], marker="o", label=f"{label}: RSS growth")
        mem.plot(xs, [r["side_peak_mb"] for r in rows], marker="x", linestyle="--", label=f"{label}: side networks")
        thr.plot(xs, [r["server_samples_per_s"] for r in rows], marker="o", label=label)
    mem.axhline(result["config"]["budget_mb"], color="grey", linestyle=":", label="budget")
    mem.set_xlabel("devices")
    mem.set_ylabel("MiB")
    mem.legend(fontsize=7)
    thr.set_xlabel("devices")
    thr.set_ylabel("server samples / s")
    thr.legend(fontsize=7)
    for ax in (mem, thr):
        ax.set_xscale("log", base=2)
    cfg = result["config"]
    return save_figure(
        fig, result, path, title=f"per-device side networks, {cfg['model']}, budget {cfg['budget_mb']:g} MB"
    )
