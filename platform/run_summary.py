"""A federated run's summary on disk: ``summary.json`` and ``summary.png`` (loss, accuracy, bytes, time per round)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from mobiflower.platform.atomic import atomic_file


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
    """Four panels per round: training loss, on-device accuracy, bytes up/down, wall and compute time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = summary.get("rounds", [])
    xs = [r["round"] for r in rounds]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    axes[0].plot(xs, [r.get("loss") for r in rounds], marker="o")
    axes[0].set_title("training loss")
    val = [(r["round"], r["validation_accuracy"]) for r in rounds if r.get("validation_accuracy") is not None]
    if val:
        axes[1].plot(*zip(*val), marker="o", label="validation (on device)")
    if summary.get("test_accuracy") is not None and xs:
        axes[1].scatter([xs[-1]], [summary["test_accuracy"]], color="C3", zorder=3, label="test (installed)")
    axes[1].set_title("accuracy")
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
        f"mode {summary.get('config', {}).get('mode', '?')}: test accuracy "
        f"{summary.get('test_accuracy') or float('nan'):.4f}, pipeline efficiency "
        f"{summary.get('pipeline_efficiency') or float('nan'):.2f}"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
