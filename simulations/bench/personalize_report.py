"""``bench personalize``'s table and figure: per-user test perplexity of every method, their mean and costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mobiflower.simulations.bench.common import acceptance_lines, fmt, save_figure

ZERO_SHOT, LORA, FED, FED_FT = "zero-shot", "on-device LoRA", "fed LoRA", "fed LoRA + local FT"
"""The baselines' method names (the report's vocabulary; the mobiflower modes are named by mode_method)."""

ACCEPTANCE_ROWS = {
    "personal_within_1.02x_of_lora": ("personal_over_lora_perplexity", "<=", 1.02),
    "personal_below_shared": ("personal_over_shared_perplexity", "<", 1.0),
    "personal_below_zero_shot": ("personal_over_zero_shot_perplexity", "<", 1.0),
}
COLORS = ["#999999", "#d62728", "#ff9896", "#9467bd", "#1f77b4", "#2ca02c", "#17becf"]


def _short(user: str, width: int = 12) -> str:
    return user if len(user) <= width else user[: width - 1] + "."


def _per_user_lines(result: dict[str, Any]) -> list[str]:
    """One row per method: its test perplexity for each user and the mean over users."""
    users = [s["user"] for s in result["speakers"]]
    lines = [f"{'test perplexity':<22}" + "".join(f"{_short(u):>13}" for u in users) + f"{'mean':>9}"]
    for name, m in result["methods"].items():
        cells = "".join(f"{fmt(m['per_user'].get(u, {}).get('test_perplexity')):>13}" for u in users)
        lines.append(f"{name:<22}{cells}{fmt(m['mean']['test_perplexity']):>9}")
    return lines


def _cost_lines(result: dict[str, Any]) -> list[str]:
    """One row per method: mean per user of token accuracy, device seconds (one run; tuning included),
    the largest peak RSS and the bytes up and down; and the setting tuning picked."""
    head = f"{'mean per user':<22}{'tok acc':>8}{'dev s':>8}{'dev s tuned':>12}{'peak MB':>9}{'MB up':>8}{'MB down':>9}  picked"
    lines = [head]
    for name, m in result["methods"].items():
        a = m["mean"]
        picked = f"lr {m['lr']:g}" if m.get("lr") is not None else ""
        if m.get("personal_lr") is not None:
            picked += f", personal lr {m['personal_lr']:g}"
        if m.get("federated_lr") is not None:
            picked = f"federated lr {m['federated_lr']:g}, then per user"
        if name == LORA:
            picked = "per user"
        lines.append(
            f"{name:<22}{fmt(a['test_token_accuracy'], '.3f'):>8}{fmt(a['device_s'], '.1f'):>8}"
            f"{fmt(a['device_s_tuning'], '.1f'):>12}{fmt(a['peak_rss_mb'], '.0f'):>9}"
            f"{(a['bytes_up'] or 0) / 1e6:>8.2f}{(a['bytes_down'] or 0) / 1e6:>9.2f}  {picked}"
        )
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The per-user table, the costs, whether every method scored the same tokens, and the acceptance."""
    speakers = ", ".join(
        f"{s['user']} ({s['words']} words, {s['train']}/{s['validation']}/{s['test']})" for s in result["speakers"]
    )
    lines = [f"speakers (train/validation/test paragraphs): {speakers}", ""]
    lines += _per_user_lines(result) + [""] + _cost_lines(result) + [""]
    same = "yes" if result["same_scored_tokens"] else f"NO: {result['scored_tokens']}"
    lines.append(f"same scored test tokens for every method: {same}")
    lines.append(f"best personalized mode: {result['ratios']['best_personal_mode']}")
    lines += acceptance_lines(result, ACCEPTANCE_ROWS, width=36)
    return "\n".join(lines)


def plot_personalize(result: dict[str, Any], path: str) -> Path:
    """Grouped bars: each user's (and the mean's) test perplexity per method; beside it each method's mean
    device seconds per user."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    users = [s["user"] for s in result["speakers"]]
    names = list(result["methods"])
    groups = users + ["mean"]
    fig, (ax, cost) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / len(names)
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        m = result["methods"][name]
        values = [m["per_user"].get(u, {}).get("test_perplexity") or 0.0 for u in users]
        values.append(m["mean"]["test_perplexity"] or 0.0)
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name, color=COLORS[i % len(COLORS)])
    ax.set_xticks(x, [_short(g) for g in groups], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test perplexity (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    seconds = [result["methods"][n]["mean"]["device_s"] or 0.0 for n in names]
    cost.barh(names, seconds, color=[COLORS[i % len(COLORS)] for i in range(len(names))])
    cost.set_xlabel("device compute s per user (one run)")
    cost.tick_params(axis="y", labelsize=7)
    cfg = result["config"]
    title = f"{len(users)} speakers, <= {cfg['paragraphs'] or 'all'} paragraphs each, causal-LM, {Path(str(cfg['model'])).name}"
    return save_figure(fig, result, path, title)


__all__ = ["format_table", "plot_personalize"]
