"""A federated run's summary on disk: ``summary.json`` and ``summary.png`` (training loss, the task's primary
metric, bytes and time against samples trained), and how a summary names a task's metrics.

A summary says which task it is and which metrics it holds (``"task"``, ``"metrics": {"primary",
"names", "higher_is_better"}``); each metric ``m`` of the task appears as ``test_<m>`` (and
``zero_shot_<m>``, ``initial_test_<m>``, ``mean_device_test_<m>``, ``validation_<m>`` per round) with
dashes as underscores (:func:`metric_key`). A summary written before tasks were recorded is the bundled
classification job's, scored by accuracy alone (:func:`summary_metrics`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mobiflower.platform.atomic import atomic_file

LEGACY_METRICS = {"primary": "accuracy", "names": ["accuracy"], "higher_is_better": True}
"""What a summary without a ``metrics`` entry holds: the bundled job's accuracy."""


def metric_key(name: str) -> str:
    """A metric's name as a summary key's part: ``macro-f1`` -> ``macro_f1``."""
    return name.replace("-", "_")


def format_metric(name: str, value: Any) -> str:
    """A metric's value as a log line or table shows it (``n/a`` for none): perplexity to two decimals,
    losses, accuracies and F1 to four."""
    if value is None:
        return "n/a"
    return format(float(value), ".2f" if name == "perplexity" else ".4f")


def summary_metrics(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``metrics`` entry of a summary (or of a ``--out`` result): primary, names, higher_is_better."""
    metrics = summary.get("metrics")
    if not isinstance(metrics, dict) or not metrics.get("names"):
        return dict(LEGACY_METRICS)
    return {**LEGACY_METRICS, **metrics}


def figure(value: Any) -> float | None:
    """A summary's number as a float, None for absent, null or NaN (what tables leave blank)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _clean(value: Any) -> Any:
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write_summary(summary: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``summary.json`` atomically and its plots next to it; returns the JSON path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_clean(summary), indent=2, default=str))
    plot_rounds(summary, run_dir / "summary.png")
    return path


def _round_samples(rounds: list[dict[str, Any]]) -> list[int]:
    """Samples each round trained on: a streaming round's own count; an epoch over the activation cache
    (``cache``, ``cache+stream``) trains on every sample once, what the first round streamed."""
    epoch = int(rounds[0].get("samples") or 0) if rounds else 0
    return [int(r.get("samples") or 0) if r.get("phase", "stream") == "stream" else epoch for r in rounds]


def _loss_series(rounds: list[dict[str, Any]], sizes: list[int]) -> dict[str, list]:
    """Training loss against samples trained: per frame where a round logged its frames (``frame_log``:
    samples, loss, bytes, clock seconds it landed), and each round's mean at its end."""
    frames, means, up, landed, done = [], [], [], [], 0
    sent = 0.0
    for record, size in zip(rounds, sizes):
        seen = done
        for samples, loss, nbytes, at in record.get("frame_log") or []:
            seen += int(samples)
            sent += float(nbytes)
            frames.append((seen, figure(loss)))
            up.append((seen, sent / 1e6))
            landed.append((seen, float(at)))
        done += size
        means.append((done, figure(record.get("loss"))))
    return {"frames": frames, "rounds": means, "frame_mb": up, "landed_s": landed}


def plot_data(summary: dict[str, Any]) -> dict[str, Any]:
    """What ``summary.png`` draws, as data (x: samples trained so far): ``loss`` (per frame and per round,
    see :func:`_loss_series`), the task's primary ``metric`` on the evaluated ``split`` after each round that
    scored it (``validation``), the final ``test`` and the ``references`` (zero-shot, untrained) the run has,
    cumulative MB ``up`` / ``down`` at each round's end and after the final test and delivery, and
    ``seconds``: the run's clock (virtual seconds of a fleet, else training wall) and the cumulative server
    training and device forward seconds at each round's end."""
    rounds = summary.get("rounds", [])
    sizes = _round_samples(rounds)
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    primary = summary_metrics(summary)["primary"]
    key, split = metric_key(primary), str(summary.get("config", {}).get("eval-split", "validation"))
    clock = "virtual_s" if any("virtual_s" in r for r in rounds) else "train_wall_s"

    def running(name: str) -> list[tuple[int, float]]:
        total, out = 0.0, [(0, 0.0)]
        for x, r in zip(ends, rounds):
            total += float(r.get(name) or 0.0)
            out.append((x, total))
        return out

    total = ends[-1] if ends else 0
    up, down = running("bytes_up"), running("bytes_down")
    up.append((total, float(summary.get("bytes_up") or up[-1][1])))
    down.append((total, float(summary.get("bytes_down") or down[-1][1])))
    test = figure(summary.get(f"test_{key}"))
    references = {
        name: figure(summary.get(f"{prefix}{key}"))
        for name, prefix in (("zero-shot", "zero_shot_"), ("untrained", "initial_test_"))
    }
    return {
        "x": "samples trained",
        "loss": _loss_series(rounds, sizes),
        "metric": primary,
        "split": split,
        "validation": [(x, v) for x, r in zip(ends, rounds) if (v := figure(r.get(f"{split}_{key}"))) is not None],
        "test": None if test is None else (total, test),
        "references": {k: v for k, v in references.items() if v is not None},
        "up_mb": [(x, b / 1e6) for x, b in up],
        "down_mb": [(x, b / 1e6) for x, b in down],
        "seconds": {
            "clock": "virtual" if clock == "virtual_s" else "wall",
            "run": [(0, 0.0)] + [(x, float(r[clock])) for x, r in zip(ends, rounds) if r.get(clock) is not None],
            "server training": running("server_train_s"),
            "device forward": running("device_forward_s"),
        },
    }


def _draw_loss(ax, data: dict[str, Any]) -> None:
    loss = data["loss"]
    if loss["frames"]:
        ax.plot(*zip(*[(x, y if y is not None else math.nan) for x, y in loss["frames"]]), lw=1, label="per frame")
    means = [(x, y) for x, y in loss["rounds"] if y is not None]
    if means:
        ax.plot(*zip(*means), marker="o", ls="--" if loss["frames"] else "-", label="round mean")
    ax.set_title("training loss")
    if loss["frames"] or means:
        ax.legend(fontsize=8)


def _draw_metric(ax, data: dict[str, Any]) -> None:
    metric = data["metric"]
    if data["validation"]:
        ax.plot(*zip(*data["validation"]), marker="o", label=data["split"])
    if data["test"] is not None:
        ax.scatter(*data["test"], color="C3", zorder=3, label="test (installed)")
    for i, (name, value) in enumerate(data["references"].items()):
        ax.axhline(value, color=f"C{4 + i}", ls=":", label=name)
    if metric in ("accuracy", "macro-f1", "token-accuracy"):
        ax.set_ylim(0, 1)
    ax.set_title(metric)
    ax.set_ylabel(metric)
    if data["validation"] or data["test"] is not None or data["references"]:
        ax.legend(fontsize=8)


def _draw_costs(mb_ax, s_ax, data: dict[str, Any]) -> None:
    mb_ax.plot(*zip(*data["up_mb"]), marker=".", label="up (all traffic)")
    mb_ax.plot(*zip(*data["down_mb"]), marker=".", label="down")
    if data["loss"]["frame_mb"]:
        mb_ax.plot(*zip(*data["loss"]["frame_mb"]), lw=1, ls="--", label="frames, as trained")
    mb_ax.set_title("MB sent (cumulative)")
    mb_ax.legend(fontsize=8)
    seconds = data["seconds"]
    s_ax.plot(*zip(*seconds["run"]), marker="o", label=f"{seconds['clock']} clock")
    if data["loss"]["landed_s"]:
        s_ax.plot(*zip(*data["loss"]["landed_s"]), lw=1, label="frame landed")
    s_ax.plot(*zip(*seconds["server training"]), marker="s", label="server training")
    s_ax.plot(*zip(*seconds["device forward"]), marker="^", label="device forward (all)")
    s_ax.set_title("seconds (cumulative)")
    s_ax.legend(fontsize=8)


def plot_rounds(summary: dict[str, Any], path: str | Path) -> Path:
    """Four panels against samples trained (:func:`plot_data`): training loss, the task's primary metric,
    MB sent, seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = plot_data(summary)
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    _draw_loss(axes[0], data)
    _draw_metric(axes[1], data)
    _draw_costs(axes[2], axes[3], data)
    for ax in axes:
        ax.set_xlabel(data["x"])
        ax.set_xlim(left=0)
    test = data["test"][1] if data["test"] else None
    fig.suptitle(
        f"{summary.get('task', 'classification')}, mode {summary.get('config', {}).get('mode', '?')}, "
        f"{len(summary.get('rounds', []))} rounds: test {data['metric']} {format_metric(data['metric'], test)}, "
        f"pipeline efficiency {figure(summary.get('pipeline_efficiency')) or float('nan'):.2f}"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
