"""``mobiflower compare``: one table of several runs' ``--out`` JSON files (side-tuning and baselines),
and the runs that differ only in their training seed summarized together (the noise of one run).

The metric columns are the runs' tasks' (each result's ``metrics`` names them; a result without one is
scored by accuracy): ``test <m>`` and ``zero-shot <m>`` per metric, from the result's ``test_<m>`` and
``zero_shot_<m>``; a column no run has a figure for is left out. Seed groups summarize each run's
primary metric.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mobiflower.platform.run_summary import figure, format_metric, metric_key, summary_metrics

# what a training seed may change between runs compared as one configuration (with where the run wrote)
_SEED_KEYS = frozenset({"seed", "train_seed", "workdir", "out", "threads", "device_threads", "server_threads"})


def read_results(files: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    """``(file name, result)`` per file; an unreadable file raises ``ValueError`` naming it."""
    results = []
    for name in files:
        try:
            results.append((Path(name).name, json.loads(Path(name).read_text())))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {name}: {err}") from err
    return results


def run_label(result: dict[str, Any]) -> str:
    """``method/family`` of a run (``mobiflower/tail``, ``lora``)."""
    return result.get("method", "?") + (f"/{result['family']}" if result.get("family") else "")


def _primary_value(result: dict[str, Any]) -> tuple[str, float]:
    """A result's primary metric and its test figure (NaN when it has none)."""
    primary = summary_metrics(result)["primary"]
    value = figure(result.get(f"test_{metric_key(primary)}"))
    return primary, math.nan if value is None else value


def seed_groups(results: list[tuple[str, dict]]) -> list[dict]:
    """Group ``(file name, result)`` pairs whose run configurations differ only in the training seed (same
    data split): each group's label, files, primary ``metric`` and its test figure's mean / sample sd / min /
    max, in first-seen order. Runs with a different split seed are different groups (their test sets differ),
    and so are runs scored by another metric."""
    groups: dict[str, dict] = {}
    for name, r in results:
        config = r.get("config")
        primary, value = _primary_value(r)
        if isinstance(config, dict):
            split = config.get("seed")
            key = json.dumps(
                {
                    "method": r.get("method"),
                    "metric": primary,
                    "split": split,
                    **{k: v for k, v in config.items() if k not in _SEED_KEYS},
                },
                sort_keys=True,
                default=str,
            )
        else:  # no recorded configuration: a group of its own
            key = f"file:{name}"
        group = groups.setdefault(key, {"label": run_label(r), "metric": primary, "files": [], "values": []})
        group["files"].append(name)
        group["values"].append(value)
    for group in groups.values():
        values = group.pop("values")
        mean = sum(values) / len(values)
        group.update(
            mean=mean,
            min=min(values),
            max=max(values),
            sd=(sum((a - mean) ** 2 for a in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0,
        )
    return list(groups.values())


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in (header, *rows)]


def _metric_names(results: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Every task metric of the runs, in first-seen order."""
    names: list[str] = []
    for _, r in results:
        names += [n for n in summary_metrics(r)["names"] if n not in names]
    return names


def _columns(results: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, Any]]:
    """The table's columns after file and method: (heading, cell of a result: text or "-")."""

    def metric(prefix: str, name: str):
        def cell(r: dict[str, Any]) -> str:
            value = figure(r.get(f"{prefix}{metric_key(name)}"))
            return "-" if value is None else format_metric(name, value)

        return cell

    def device_s(r: dict[str, Any]) -> str:
        value = r.get("device_s_per_sample", r.get("s_per_sample"))
        return f"{value * 1000:.0f}" if value else "-"

    def rss(r: dict[str, Any]) -> str:
        value = r.get("device_peak_rss_mb", r.get("peak_rss_mb"))
        return f"{value:.0f}" if value else "-"

    names = _metric_names(results)
    return [
        *((f"test {n}", metric("test_", n)) for n in names),
        *((f"zero-shot {n}", metric("zero_shot_", n)) for n in names),
        ("wire", lambda r: f"{r['bits']}-bit {r['token_policy']}" if r.get("token_policy") else "-"),
        ("B/sample sent", lambda r: f"{r['bytes_per_sample']:.0f}" if r.get("bytes_per_sample") else "-"),
        ("device ms/sample", device_s),
        ("peak RSS MB", rss),
    ]


def format_comparison(results: list[tuple[str, dict[str, Any]]]) -> str:
    """The runs' task metrics and costs, one row each (columns no run fills left out), then the seed
    groups with more than one run."""
    columns = _columns(results)
    cells = [[cell(r) for _, cell in columns] for _, r in results]
    kept = [i for i, (heading, _) in enumerate(columns) if any(row[i] != "-" for row in cells)]
    rows = [(name, run_label(r), *(row[i] for i in kept)) for (name, r), row in zip(results, cells)]
    lines = _table(("file", "method", *(columns[i][0] for i in kept)), rows)
    groups = seed_groups(results)
    if any(len(g["files"]) > 1 for g in groups):
        lines += ["", "runs that differ only in their training seed (test figures of each run's primary metric):"]
        lines += _table(
            ("method", "metric", "runs", "mean", "sd", "min", "max", "files"),
            [
                (
                    g["label"],
                    g["metric"],
                    len(g["files"]),
                    *(format_metric(g["metric"], g[k]) for k in ("mean", "sd", "min", "max")),
                    " ".join(g["files"]),
                )
                for g in groups
            ],
        )
    return "\n".join(lines)


__all__ = ["format_comparison", "read_results", "run_label", "seed_groups"]
