"""What a frame carries, by task and mode, and an audit that fails on a frame carrying more.

Why: the privacy guide (docs/privacy.md) tells users what the server receives; this module is that
table as data, so a test can hold every frame a device builds against it. The states a frame carries
are the point of the method (what they reveal is measured by ``mobiflower bench privacy``); what the
audit guards is everything else: the header's keys, the kind of targets, and no run of a sample's
token ids anywhere in the header except where the table says the task needs them (a causal-LM
frame's targets are the text's own next tokens: the server trains on them, so it reads them).
Flower-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from mobiflower.platform.frames import HEADER_FIELDS, raw_header

DEFAULT_RUN = 6
"""Consecutive token ids of one sample that count as a leak when found together in a header list."""


@dataclass(frozen=True)
class WireRow:
    """One line of the table: what a frame of ``task`` carries besides the states of its tokens."""

    task: str
    label_private: bool
    targets: str  # the header's targets kind
    token_ids_in: str | None  # the header field allowed to hold the samples' token ids (None: nowhere)
    says: str  # the line in words, as docs/privacy.md puts it


WIRE_TABLE: tuple[WireRow, ...] = (
    WireRow("classification", False, "class", None, "one class id per sample (its label)"),
    WireRow("classification", True, "none", None, "no label; residuals travel later, randomized by label-epsilon"),
    WireRow("causal-lm", False, "tokens", "targets.values", "the next token's id at every scored position: the text"),
)


def wire_row(task: str, label_private: bool) -> WireRow:
    """The table's line for a run; a combination the project does not run is an error naming it."""
    for row in WIRE_TABLE:
        if row.task == task and row.label_private == label_private:
            return row
    raise ValueError(
        f"no wire-table line for task={task!r} label-private={label_private}: the project refuses that run"
    )


def _int_lists(value: Any, where: str) -> Iterator[tuple[str, list[int]]]:
    """Every list of integers inside ``value`` (maps and lists walked), with its path."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _int_lists(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        ints = [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
        if ints:
            yield where, ints
        for i, v in enumerate(value):
            if isinstance(v, (dict, list, tuple)):
                yield from _int_lists(v, f"{where}[{i}]")


def _has_run(values: Sequence[int], runs: set[tuple[int, ...]], size: int) -> bool:
    return any(tuple(values[i : i + size]) in runs for i in range(len(values) - size + 1))


def audit_frame(blob: bytes, row: WireRow, token_ids: Sequence[Sequence[int]], run: int = DEFAULT_RUN) -> list[str]:
    """What the frame ``blob`` carries beyond ``row``: unknown header keys, another targets kind, and
    any run of ``run`` consecutive token ids of ``token_ids`` (the device's samples) in a header list
    other than the one the row allows. Empty when the frame holds to the table."""
    header = raw_header(blob)  # as sent: the keys the format does not have are what the audit looks for
    problems = [f"header key {k!r} is not in the frame format" for k in header if k not in HEADER_FIELDS]
    kind = (header.get("targets") or {}).get("kind")
    if kind != row.targets:
        problems.append(f"targets of kind {kind!r}; the table says {row.targets!r} for {row.task}")
    runs = {tuple(ids[i : i + run]) for ids in token_ids for i in range(len(ids) - run + 1)}
    for where, values in _int_lists(header, "header"):
        if where != f"header.{row.token_ids_in}" and _has_run(values, runs, run):
            problems.append(f"{where} holds {run} consecutive token ids of a sample")
    return problems
