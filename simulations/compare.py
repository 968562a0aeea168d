"""``mobiflower compare``: one table of several runs' ``--out`` JSON files (side-tuning and baselines),
and the runs that differ only in their training seed summarized together (the noise of one run)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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


def seed_groups(results: list[tuple[str, dict]]) -> list[dict]:
    """Group ``(file name, result)`` pairs whose run configurations differ only in the training seed (same
    data split): each group's label, files and test accuracy mean / sample sd / min / max, in first-seen order.
    Runs with a different split seed are different groups (their test sets differ)."""
    groups: dict[str, dict] = {}
    for name, r in results:
        config = r.get("config")
        if isinstance(config, dict):
            split = config.get("seed")
            key = json.dumps(
                {"method": r.get("method"), "split": split, **{k: v for k, v in config.items() if k not in _SEED_KEYS}},
                sort_keys=True,
                default=str,
            )
        else:  # no recorded configuration: a group of its own
            key = f"file:{name}"
        group = groups.setdefault(key, {"label": run_label(r), "files": [], "accuracies": []})
        group["files"].append(name)
        group["accuracies"].append(float(r["test_accuracy"]))
    for group in groups.values():
        acc = group.pop("accuracies")
        mean = sum(acc) / len(acc)
        group.update(
            mean=mean,
            min=min(acc),
            max=max(acc),
            sd=(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)) ** 0.5 if len(acc) > 1 else 0.0,
        )
    return list(groups.values())


def _table(header: tuple, rows: list[tuple]) -> list[str]:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in (header, *rows)]


def format_comparison(results: list[tuple[str, dict[str, Any]]]) -> str:
    """The runs' accuracy and cost, one row each, then the seed groups with more than one run."""
    rows = []
    for name, r in results:
        wire = f"{r['bits']}-bit {r['token_policy']}" if r.get("token_policy") else "-"
        device_s = r.get("device_s_per_sample", r.get("s_per_sample"))
        rss = r.get("device_peak_rss_mb", r.get("peak_rss_mb"))
        rows.append(
            (
                name,
                run_label(r),
                f"{r['test_accuracy']:.4f}",
                f"{r['zero_shot_accuracy']:.4f}",
                wire,
                f"{r.get('bytes_per_sample') or 0:.0f}",
                f"{device_s * 1000:.0f}" if device_s else "-",
                f"{rss:.0f}" if rss else "-",
            )
        )
    lines = _table(
        ("file", "method", "test acc", "zero-shot", "wire", "B/sample sent", "device ms/sample", "peak RSS MB"), rows
    )
    groups = seed_groups(results)
    if any(len(g["files"]) > 1 for g in groups):
        lines += ["", "runs that differ only in their training seed:"]
        lines += _table(
            ("method", "runs", "mean test acc", "sd", "min", "max", "files"),
            [
                (
                    g["label"],
                    len(g["files"]),
                    f"{g['mean']:.4f}",
                    f"{g['sd']:.4f}",
                    f"{g['min']:.4f}",
                    f"{g['max']:.4f}",
                    " ".join(g["files"]),
                )
                for g in groups
            ],
        )
    return "\n".join(lines)


__all__ = ["format_comparison", "read_results", "run_label", "seed_groups"]
