"""``mobiflower bench device``'s table and figure: each method's memory and speed, the wire sizes,
the ratios and the acceptance verdicts (reported, never asserted)."""

from __future__ import annotations

import os
from pathlib import Path

from mobiflower.simulations.bench.common import acceptance_lines, fmt, save_figure
from mobiflower.simulations.bench.device_spec import (
    ACCEPTANCE,
    BILLION_ACCEPTANCE,
    CAUSAL_LM_ACCEPTANCE,
    CAUSAL_LM_REPORTED,
    DEVICE_KINDS,
    REPORTED_RATIOS,
    WIRE_BITS,
    WIRE_POLICIES,
)


def _fmt(value: float | None, spec: str) -> str:
    return fmt(value, spec, missing="n/a")


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_table(result: dict) -> str:
    """A readable table of the per-method costs, the training configurations, the wire sizes, the
    ratios and the acceptance checks (the causal-LM mode's: :func:`format_causal_lm_table`)."""
    if result.get("acceptance_set") == "causal-lm":
        return format_causal_lm_table(result)
    cfg = result.get("config", {})
    lines = [
        f"Device cost per sample: {cfg.get('model')} - {cfg.get('batches')} batches x {cfg.get('batch_size')} "
        f"(1 warm-up), device frames {cfg.get('bits')}-bit / {cfg.get('token_policy')}, "
        f"{cfg.get('num_taps')} taps, threads {result.get('machine', {}).get('threads')}" + _cap_note(cfg),
        *(["random weights (a shipped shape): cost figures only"] if cfg.get("random_weights") else []),
        "",
        *_methods_lines(result),
        *_configs_lines(result.get("train_configs")),
        *_wire_lines(result),
    ]
    acceptance = BILLION_ACCEPTANCE if result.get("acceptance_set") == "billion" else ACCEPTANCE
    lines += ["", *acceptance_lines(result, acceptance, width=30)]
    if result.get("ratios", {}).get("full_step_out_of_memory"):
        lines.append("  (full fine-tuning ran out of memory: its ratios are taken against the cap, an upper bound)")
    if result.get("acceptance_set") == "billion":
        lines += _reported_lines(result.get("ratios", {}), REPORTED_RATIOS)
    return "\n".join(lines)


def format_causal_lm_table(result: dict) -> str:
    """The causal-LM mode's table: each method's cost at ``seq_len`` tokens a sample, the tail's frame
    sizes, the acceptance lines (tail device against inference only) and on-device training's ratios."""
    cfg = result.get("config", {})
    methods = result.get("methods", {})
    lines = [
        f"Device cost per sample, causal-LM: {cfg.get('model')} - {cfg.get('batches')} batches x "
        f"{cfg.get('batch_size')} (1 warm-up, the same batch for every method), {cfg.get('seq_len')} tokens a "
        f"sample; tail device: blocks below cut {methods.get('tail_device', {}).get('tail_cut', 'n/a')}, every "
        f"real token at {cfg.get('bits')} bits with its next-token target; threads "
        f"{result.get('machine', {}).get('threads')}" + _cap_note(cfg),
        *(["random weights (a shipped shape): cost figures only"] if cfg.get("random_weights") else []),
        "",
        *_methods_lines(result),
        "tokens forwarded per sample: "
        + ", ".join(f"{name} {_fmt(m.get('tokens_per_sample'), '.1f')}" for name, m in methods.items()),
    ]
    if result.get("tail_wire"):
        lines.append(
            "tail frame (every real token + next-token targets): "
            + ", ".join(f"{w['bits']}-bit {_fmt_bytes(w['bytes_per_sample'])}" for w in result["tail_wire"])
            + " per sample"
        )
    lines += ["", *acceptance_lines(result, CAUSAL_LM_ACCEPTANCE, width=30)]
    lines += _reported_lines(result.get("ratios", {}), CAUSAL_LM_REPORTED)
    return "\n".join(lines)


def _cap_note(cfg: dict) -> str:
    cap = cfg.get("memory_cap_mb")
    return f", each process capped at {cap / 1024:.1f} GB" if cap else ""


def _reported_lines(ratios: dict, keys) -> list[str]:
    lines = ["Reported as measured (no bound)"]
    for key in keys:
        if ratios.get(key) is not None:
            lines.append(f"  {key:<30}{ratios[key]:>10.3g}")
    return lines


def _methods_lines(result: dict) -> list[str]:
    header = (
        f"{'method':<24}{'peak RSS MB':>13}{'runtime MB':>12}{'model MB':>10}{'start s':>9}{'load s':>9}"
        f"{'ms/sample':>11}{'cpu load':>10}"
    )
    lines = [header, "-" * len(header)]
    for name, m in result.get("methods", {}).items():
        lines.append(_method_row(name, m, 24))
    lines.append(
        f"(cpu load: the machine's 1-minute load average around the run, {os.cpu_count()} cores: above "
        "the threads used, other work shared the CPU and the ms/sample are inflated)"
    )
    return lines


def _configs_lines(configs: dict | None) -> list[str]:
    if not configs:
        return []
    names = list(dict.fromkeys(n for row in configs["rows"] for n in row["methods"]))
    lines = [
        "",
        f"Peak RSS MB (ms/sample) per training configuration (device at "
        f"{configs.get('device_precision') or 'the checkpoint precision'})",
    ]
    header = f"{'configuration':<32}" + "".join(f"{n:>24}" for n in names)
    lines += [header, "-" * len(header)]
    for row in configs["rows"]:
        cells = []
        for n in names:
            m = row["methods"].get(n, {})
            cells.append(
                "OOM"
                if m.get("out_of_memory")
                else f"{_fmt(m.get('peak_rss_mb'), '.0f')} ({_fmt(m.get('s_per_sample') and m['s_per_sample'] * 1000, '.0f')})"
            )
        lines.append(f"{row['label']:<32}" + "".join(f"{c:>24}" for c in cells))
    lines.append(
        f"{'spread (max - min) / min':<32}" + "".join(f"{_spread(configs['spread'].get(n, {})):>24}" for n in names)
    )
    return lines


def _wire_lines(result: dict) -> list[str]:
    cfg = result.get("config", {})
    lines = [
        "",
        "Uplink bytes per sample (one encoded frame"
        + (" of the first batch)" if cfg.get("weights") else " of all samples)"),
    ]
    header = f"{'bits':<6}" + "".join(f"{p:>12}" for p in WIRE_POLICIES)
    lines += [header, "-" * len(header)]
    table = {(w["bits"], w["token_policy"]): w["bytes_per_sample"] for w in result.get("wire", [])}
    for bits in WIRE_BITS:
        lines.append(f"{bits:<6}" + "".join(f"{_fmt_bytes(table.get((bits, p))):>12}" for p in WIRE_POLICIES))
    lines.append(
        f"fp32, all tokens, all tapped layers: {_fmt_bytes(result.get('fp32_all_token_bytes_per_sample'))}/sample"
    )
    if result.get("tail_wire"):
        lines.append(
            "pretrained tail (cut layer, every real token): "
            + ", ".join(f"{w['bits']}-bit {_fmt_bytes(w['bytes_per_sample'])}" for w in result["tail_wire"])
            + f" per sample ({result['tail_wire'][0]['tokens_per_sample']:.1f} tokens)"
        )
    return lines


def _method_row(name: str, m: dict, width: int) -> str:
    if m.get("out_of_memory"):
        seen = f", {m['peak_rss_mb'] / 1024:.1f} GB seen" if m.get("peak_rss_mb") else ""
        return (
            f"{name:<{width}}{'OUT OF MEMORY':>13}  under the {m.get('cap_mb', 0) / 1024:.1f} GB cap "
            f"({m.get('stage')}{seen}): {m.get('reason')}"
        )
    startup = m.get("startup_s")
    return (
        f"{name:<{width}}{m['peak_rss_mb']:>13.0f}{m['baseline_rss_mb']:>12.0f}"
        f"{m['peak_rss_mb'] - m['baseline_rss_mb']:>10.0f}{_fmt(startup, '.2f'):>9}{m['model_load_s']:>9.2f}"
        f"{m['s_per_sample'] * 1000:>11.1f}{_fmt(max(m.get('load_average') or [None], key=lambda v: v or 0), '.1f'):>10}"
    )


def _spread(entry: dict) -> str:
    if entry.get("spread") is not None:
        return f"{entry['spread'] * 100:.1f}%"
    if entry.get("out_of_memory"):
        return f"OOM in {entry['out_of_memory']}"
    return "n/a"


def plot_result(result: dict, path: str) -> Path:
    """Bars of peak RSS (runtime share marked; a method out of memory drawn at the cap) and
    milliseconds per sample for each method; with training configurations, a third panel of each
    method's peak RSS per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    names = list(methods)
    labels = [n.replace("_", "\n") for n in names]
    colors = ["#2a9d8f" if n.startswith(DEVICE_KINDS) else "#8d99ae" for n in names]
    configs = result.get("train_configs")
    fig, axes = plt.subplots(1, 3 if configs else 2, figsize=(16 if configs else max(10, len(names) * 1.1), 4.5))
    ax_rss, ax_s = axes[0], axes[1]
    cap = result.get("config", {}).get("memory_cap_mb")
    oom = [bool(methods[n].get("out_of_memory")) for n in names]
    peaks = [cap if o else methods[n]["peak_rss_mb"] for n, o in zip(names, oom)]
    base = [0 if o else methods[n]["baseline_rss_mb"] for n, o in zip(names, oom)]
    ax_rss.bar(labels, peaks, color=["#e76f51" if o else c for o, c in zip(oom, colors)])
    ax_rss.bar(
        labels, base, color="none", edgecolor="black", hatch="//", linewidth=0.5, label="runtime before model load"
    )
    for i, (v, o) in enumerate(zip(peaks, oom)):
        ax_rss.text(i, v, "OOM\n(cap)" if o else f"{v:.0f}", ha="center", va="bottom", fontsize=7)
    ax_rss.set_ylabel("peak RSS (MB)")
    ax_rss.set_title("Device memory")
    ax_rss.legend(fontsize=8, loc="upper left")
    ms = [0.0 if o else methods[n]["s_per_sample"] * 1000 for n, o in zip(names, oom)]
    ax_s.bar(labels, ms, color=colors)
    for i, (v, o) in enumerate(zip(ms, oom)):
        ax_s.text(i, v, "OOM" if o else f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax_s.set_ylabel("ms per sample")
    ax_s.set_title("Device time")
    for ax in (ax_rss, ax_s):
        ax.tick_params(axis="x", labelsize=7)
    if configs:
        _plot_configs(axes[2], configs, cap)
    return save_figure(fig, result, path, title=_plot_title(result.get("config", {})))


def _plot_configs(ax, configs: dict, cap: float | None) -> None:
    """Each method's peak RSS per training configuration (out of memory drawn at the cap)."""
    rows = configs["rows"]
    kinds = list(dict.fromkeys(n for row in rows for n in row["methods"]))
    width = 0.8 / max(1, len(kinds))
    for j, kind in enumerate(kinds):
        xs = [i + (j - (len(kinds) - 1) / 2) * width for i in range(len(rows))]
        entries = [r["methods"].get(kind, {}) for r in rows]
        values = [cap if m.get("out_of_memory") else m.get("peak_rss_mb", 0) for m in entries]
        oom = any(m.get("out_of_memory") for m in entries)
        ax.bar(xs, values, width=width, label=kind + (" (OOM at cap)" if oom else ""))
    ax.set_xticks(range(len(rows)), [r["label"].replace(", ", "\n") for r in rows], fontsize=7)
    ax.set_ylabel("peak RSS (MB)")
    ax.set_title("Whose memory moves with the training configuration")
    ax.legend(fontsize=7)


def _plot_title(cfg: dict) -> str | None:
    """The figure's title where the default (model and batch) says too little: random weights, causal-LM."""
    random = cfg.get("random_weights")
    if cfg.get("task") == "causal-lm":
        return (
            f"{Path(str(cfg.get('model'))).name}, causal-LM: {cfg.get('samples')} samples of {cfg.get('seq_len')} "
            f"tokens, batch {cfg.get('batch_size')}" + (" (random weights: cost only)" if random else "")
        )
    if random:
        return f"{cfg['model']} (random weights: cost only): {cfg['samples']} samples, batch {cfg['batch_size']}"
    return None


__all__ = ["format_table", "format_causal_lm_table", "plot_result"]
