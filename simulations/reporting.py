"""Small helpers the benchmarks share for their printed tables."""

from __future__ import annotations


def acceptance_lines(result: dict, acceptance: dict, width: int = 30) -> list[str]:
    """One line per acceptance check: the measured ratio, the wanted bound, and PASS / FAIL / n/a.

    ``acceptance`` maps a check's name to ``(ratio key, operator, threshold)``; the verdicts are the
    booleans the benchmark stored under ``result["acceptance"]`` (measured, never asserted).
    """
    ratios, verdicts = result.get("ratios", {}), result.get("acceptance", {})
    lines = ["Ratios and acceptance"]
    for name, (key, op, threshold) in acceptance.items():
        verdict = verdicts.get(name)
        mark = "n/a" if verdict is None else ("PASS" if verdict else "FAIL")
        value = ratios.get(key)
        shown = "-" if value is None else format(value, ".3g")
        lines.append(f"  {key:<{width}}{shown:>10}   want {op} {threshold:<6g} {mark}")
    return lines


def bars_with_values(ax, labels, values, colors, fmt: str = ".0f") -> None:
    """A bar per label, each with its value written on top."""
    ax.bar(labels, values, color=colors)
    for i, v in enumerate(values):
        ax.text(i, v, format(v, fmt), ha="center", va="bottom", fontsize=8)


def save_figure(fig, result: dict, path):
    """Title the figure with the benchmark's model and batch, write it as PNG, and close it."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    cfg = result.get("config", {})
    fig.suptitle(f"{Path(str(cfg.get('model'))).name}: {cfg.get('samples')} samples, batch {cfg.get('batch_size')}",
                 fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
