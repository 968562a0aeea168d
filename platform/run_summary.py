"""A federated run's summary on disk: ``summary.json`` and ``summary.png`` (loss, the task's primary metric,
bytes, time per round), and how a summary names a task's metrics.

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


def plot_rounds(summary: dict[str, Any], path: str | Path) -> Path:
    """Four panels per round: training loss, the task's primary metric (validation per round, the final
    test), bytes up/down, wall and compute time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary.get("rounds", [])
    xs = [r["round"] for r in rounds]
    primary = summary_metrics(summary)["primary"]
    key, split = metric_key(primary), str(summary.get("config", {}).get("eval-split", "validation"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(xs, [r.get("loss") for r in rounds], marker="o")
    axes[0].set_title("training loss")
    val = [(r["round"], r[f"{split}_{key}"]) for r in rounds if figure(r.get(f"{split}_{key}")) is not None]
    if val:
        axes[1].plot(*zip(*val), marker="o", label=split)
    test = figure(summary.get(f"test_{key}"))
    if test is not None and xs:
        axes[1].scatter([xs[-1]], [test], color="C3", zorder=3, label="test (installed)")
    axes[1].set_title(primary)
    axes[1].set_ylabel(primary)
    if val or (test is not None and xs):
        axes[1].legend(fontsize=8)
    axes[2].bar(xs, [r.get("bytes_up", 0) / 1e6 for r in rounds], label="up")
    axes[2].bar(
        xs,
        [r.get("bytes_down", 0) / 1e6 for r in rounds],
        bottom=[r.get("bytes_up", 0) / 1e6 for r in rounds],
        label="down",
    )
    axes[2].set_title("MB per round")
    axes[2].legend(fontsize=8)
    axes[3].plot(xs, [r.get("wall_s") for r in rounds], marker="o", label="wall")
    axes[3].plot(xs, [r.get("server_train_s") for r in rounds], marker="s", label="server training")
    axes[3].plot(xs, [r.get("device_forward_s") for r in rounds], marker="^", label="device forward")
    axes[3].set_title("seconds per round")
    axes[3].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("round")
    fig.suptitle(
        f"{summary.get('task', 'classification')}, mode {summary.get('config', {}).get('mode', '?')}: test "
        f"{primary} {format_metric(primary, test)}, pipeline efficiency "
        f"{figure(summary.get('pipeline_efficiency')) or float('nan'):.2f}"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
