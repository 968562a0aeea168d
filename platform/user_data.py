"""A user's own data as the task's samples: a file or folder of JSON Lines, JSON, CSV or Parquet, or a
bundled set, read with Hugging Face ``datasets`` (local files only, never the hub).

Why a module of its own: data is the user's (docs/concepts.md §8), so what a row becomes is decided
here once, for the simulation and for a real device reading its own file alike. Which columns a row
needs is the task's business: classification reads a text and a label (a name from the task's
``labels`` or an integer id); causal-LM reads chat messages, else a prompt and a completion, else a
text. Every row either becomes an :class:`Example` whose id is its row number, is skipped and counted
(an empty or whitespace text), or is refused: by default with a :class:`DataError` that names the file,
the row and what to do; with ``bad-rows = "skip"`` it is left out and counted instead. Nothing is lost
silently: :class:`UserData` keeps a record of every row it did not keep.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from mobiflower.platform.data import DataError
from mobiflower.platform.tasks import Example, Task, TaskError

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read before `datasets` is imported: never the hub

BUNDLED_RT = "bundled:rotten-tomatoes"
BUNDLED_SPEECHES = "bundled:convention-speeches"
BUNDLED = (BUNDLED_RT, BUNDLED_SPEECHES)
FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
BAD_ROWS = ("refuse", "skip")
_FIX = 'fix the row, or set bad-rows = "skip" to leave such rows out (they are counted)'


@dataclass(frozen=True)
class Columns:
    """Which column holds what (run-config or node-config keys ``text-column`` ... ``user-column``)."""

    text: str = "text"
    label: str = "label"
    prompt: str = "prompt"
    completion: str = "completion"
    messages: str = "messages"
    user: str = "user"

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Columns":
        given = {name: config.get(f"{name}-column") for name in cls.__dataclass_fields__}
        return cls(**{name: str(value) for name, value in given.items() if value not in (None, "")})


@dataclass(frozen=True)
class Skipped:
    """A row that did not become a sample: ``kind`` is ``empty`` (no text) or ``refused``."""

    row: int
    user: str
    kind: str
    why: str


@dataclass(frozen=True)
class ReadCounts:
    """What reading did to the rows (of a whole source, or of one user's rows)."""

    rows: int = 0
    kept: int = 0
    empty: int = 0
    refused: int = 0
    first_refusal: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "empty": self.empty, "refused": self.refused}


@dataclass(frozen=True)
class UserData:
    """A source's samples (id = row number, counted over the files in name order) and the rows it left out."""

    source: str
    examples: list[Example]
    skipped: list[Skipped] = field(default_factory=list)

    def counts(self, users: set[str] | None = None) -> ReadCounts:
        """Counts over all rows, or over the rows of ``users`` only (one device of a natural partition)."""
        kept = [e for e in self.examples if users is None or e.user in users]
        left = [s for s in self.skipped if users is None or s.user in users]
        refused = [s for s in left if s.kind == "refused"]
        return ReadCounts(
            rows=len(kept) + len(left),
            kept=len(kept),
            empty=sum(1 for s in left if s.kind == "empty"),
            refused=len(refused),
            first_refusal=refused[0].why if refused else "",
        )


# ---- files -----------------------------------------------------------------------------------------
def data_files(source: str | Path) -> list[Path]:
    """The files a ``data`` path names: the file itself, or a folder's files of one supported format."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data {str(source)!r}: no such file or folder; check the data key (run or node config)")
    if path.is_file():
        if _format(path) is None:
            raise DataError(
                f"{path}: unsupported format {path.suffix or '(no extension)'!r}; "
                f"use JSON Lines, JSON, CSV or Parquet ({', '.join(FORMATS)})"
            )
        if not os.access(path, os.R_OK):
            raise DataError(f"{path}: cannot be read (permissions); let this user read it")
        return [path]
    found = sorted(p for p in path.rglob("*") if p.is_file() and _format(p) is not None)
    kinds = {_format(p) for p in found}
    if not found:
        raise DataError(f"folder {path} holds no {', '.join(FORMATS)} file; point data at the files to read")
    if len(kinds) > 1:
        raise DataError(f"folder {path} mixes formats ({', '.join(sorted(kinds))}); keep one format per folder")
    return found


def _format(path: Path) -> str | None:
    return FORMATS.get(path.suffix.lower())


def load_table(path: Path):
    """One file as a Hugging Face dataset, in memory (its cache is a temporary folder, removed after)."""
    import datasets

    datasets.disable_progress_bars()
    builder = _format(path)
    if builder is None:
        raise DataError(f"{path}: unsupported format {path.suffix!r}; use {', '.join(FORMATS)}")
    if path.stat().st_size == 0:
        return datasets.Dataset.from_dict({})
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # it logs the failure we report below
    try:
        with tempfile.TemporaryDirectory(prefix="mobiflower-read-") as cache:
            options = _csv_options(path) if builder == "csv" else {}
            return datasets.load_dataset(
                builder, data_files=[str(path)], split="train", cache_dir=cache, keep_in_memory=True, **options
            )
    except Exception as err:  # noqa: BLE001 - any failure of the reader is the file's: say which and why
        if "corresponds to no data" in str(err):  # a CSV with a header and no rows
            return datasets.Dataset.from_dict({})
        raise DataError(f"{path}: cannot be read as {builder.upper()}: {_diagnose(path, err)}") from None
    finally:
        datasets.logging.set_verbosity(level)


def _csv_options(path: Path) -> dict[str, Any]:
    """Every CSV cell as text as written: " 4" keeps its space, "NA" or "None" is that text (pandas would
    make them a number and a missing value)."""
    import datasets

    with open(path, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), [])
    strings = datasets.Features({name: datasets.Value("string") for name in header})
    return {"keep_default_na": False, "features": strings} if len(set(header)) == len(header) else {}


def _diagnose(path: Path, err: BaseException) -> str:
    """The reader's own reason, and for JSON the first line that does not parse (the reader's row
    numbers count parsed blocks, not lines)."""
    if _format(path) == "json":
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = path.read_text(encoding="utf-8")
            try:
                json.loads(text)
            except json.JSONDecodeError:
                for number, line in enumerate(text.splitlines(), 1):
                    try:
                        line.strip() and json.loads(line)
                    except json.JSONDecodeError as bad:
                        return f"line {number} is not valid JSON ({bad.msg}); fix or remove that line"
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return f"{type(err).__name__}: {str(err).strip()}"


def speeches_table():
    """The bundled 2012 convention speeches, one paragraph per row: ``text``, ``user`` (the speaker),
    ``label`` (the party)."""
    import datasets

    from mobiflower.platform.assets import resolve_speeches

    speeches = load_table(resolve_speeches())
    rows: dict[str, list[str]] = {"text": [], "user": [], "label": []}
    for speech in speeches:
        for paragraph in str(speech["text"] or "").split("\n"):
            if paragraph.strip():
                rows["text"].append(paragraph.strip())
                rows["user"].append(str(speech["speaker"] or "").strip())
                rows["label"].append(str(speech["party"] or "").strip())
    return datasets.Dataset.from_dict(rows)


# ---- rows into samples -----------------------------------------------------------------------------
class _RowProblem(Exception):
    def __init__(self, kind: str, why: str):
        super().__init__(why)
        self.kind, self.why = kind, why


def read_user_data(source: str, task: Task, columns: Columns = Columns(), bad_rows: str = "refuse") -> UserData:
    """Every row of ``source`` (a path, or ``bundled:convention-speeches``) as the task's samples."""
    if bad_rows not in BAD_ROWS:
        raise DataError(f"bad-rows={bad_rows!r} must be one of {', '.join(BAD_ROWS)}")
    if source == BUNDLED_RT:
        from mobiflower.platform.data import load_corpus

        return UserData(source, load_corpus())
    if source == BUNDLED_SPEECHES:
        tables = [(source, speeches_table())]
        columns = Columns()  # the bundled set names its own columns
    elif source.startswith("bundled:"):
        raise DataError(f"data={source!r}: unknown bundled set; use a path or one of {', '.join(BUNDLED)}")
    else:
        tables = [(str(path), load_table(path)) for path in data_files(source)]
    examples: list[Example] = []
    skipped: list[Skipped] = []
    for where, table in tables:
        made, left = table_examples(table, where, len(examples) + len(skipped), task, columns, bad_rows)
        examples += made
        skipped += left
    return UserData(source, examples, skipped)


def table_examples(table, where: str, first_id: int, task: Task, columns: Columns, bad_rows: str):
    """The rows of one table as samples (ids from ``first_id``) and the rows it skipped."""
    names = list(table.column_names)
    mode = row_mode(names, where, task, columns) if table.num_rows else "text"
    examples: list[Example] = []
    skipped: list[Skipped] = []
    for index, row in enumerate(table):
        user = _user_of(row.get(columns.user))
        try:
            examples.append(row_example(row, first_id + index, mode, task, columns, user))
        except _RowProblem as problem:
            why = f"{where} row {index + 1}: {problem.why}"
            if problem.kind == "refused" and bad_rows == "refuse":
                raise DataError(f"{why}; {_FIX}") from None
            skipped.append(Skipped(first_id + index, user, problem.kind, why))
    return examples, skipped


def row_mode(names: list[str], where: str, task: Task, columns: Columns) -> str:
    """What the task reads from this table's rows: ``text`` (+ label), ``completion`` or ``messages``."""
    found = ", ".join(names) or "none"
    if task.name == "classification":
        for key, column in (("text-column", columns.text), ("label-column", columns.label)):
            if column not in names:
                raise DataError(
                    f"{where}: no column {column!r} (columns found: {found}); classification reads a text and "
                    f"a label per row: set {key} to the column that holds it"
                )
        return "text"
    for mode, column in (("messages", columns.messages), ("completion", columns.completion), ("text", columns.text)):
        if column in names:
            return mode
    raise DataError(
        f"{where}: no column to learn from (columns found: {found}); causal-lm reads chat messages "
        f"(messages-column={columns.messages!r}), a prompt and a completion (prompt-column={columns.prompt!r}, "
        f"completion-column={columns.completion!r}) or a text (text-column={columns.text!r}): set the key "
        "that names your column"
    )


def row_example(row: Mapping[str, Any], id: int, mode: str, task: Task, columns: Columns, user: str) -> Example:
    """One row as a sample, or a :class:`_RowProblem` (``empty``: nothing to learn from; ``refused``)."""
    if mode == "messages":
        messages = chat_messages(row.get(columns.messages))
        if not messages:
            raise _RowProblem("empty", f"{columns.messages!r} holds no messages (row skipped)")
        example = Example(id=id, messages=messages, user=user)
    elif mode == "completion":
        completion = _cell_text(row.get(columns.completion))
        if not completion.strip():
            raise _RowProblem("empty", f"{columns.completion!r} is empty (row skipped)")
        example = Example(id=id, prompt=_cell_text(row.get(columns.prompt)), completion=completion, user=user)
    else:
        text = _cell_text(row.get(columns.text))
        if not text.strip():
            raise _RowProblem("empty", f"{columns.text!r} is empty (row skipped)")
        label = label_id(row.get(columns.label), task.labels) if task.name == "classification" else -1
        example = Example(id=id, text=text, label=label, user=user)
    try:
        task.check(example)
    except TaskError as err:
        raise _RowProblem("refused", str(err)) from None
    return example


def _cell_text(value: Any) -> str:
    """A cell as text: missing (None, NaN) is empty; numbers become their text; lists are refused."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (list, dict)):
        raise _RowProblem("refused", f"expected a text, found {type(value).__name__} {str(value)[:60]!r}")
    return str(value)


def _user_of(value: Any) -> str:
    """Who wrote a row (any scalar, as text; nothing when missing or not a scalar)."""
    try:
        return _cell_text(value).strip()
    except _RowProblem:
        return ""


def label_id(value: Any, labels: tuple[str, ...]) -> int:
    """A label given as one of the task's label names or as an integer id, as the id."""
    declared = f"the task's labels {list(labels)} (ids 0-{len(labels) - 1})"
    if value is None or (isinstance(value, float) and math.isnan(value)) or str(value).strip() == "":
        raise _RowProblem("refused", "has no label")
    if isinstance(value, str):
        name = value.strip()
        if name in labels:
            return labels.index(name)
        if not re.fullmatch(r"[+-]?\d+", name):
            raise _RowProblem("refused", f"label {value!r} is not one of {declared}; or add it to labels")
        value = int(name)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise _RowProblem("refused", f"label {value!r} is neither a label name nor an integer id of {declared}")
    if not 0 <= value < len(labels):
        raise _RowProblem("refused", f"label id {value} is outside {declared}")
    return int(value)


def chat_messages(value: Any) -> tuple[tuple[str, str], ...]:
    """Chat messages as ``(role, content)`` pairs: a list of ``{"role", "content"}`` objects or of
    ``[role, content]`` pairs, or that list as JSON text (a CSV cell)."""
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError:
            raise _RowProblem("refused", "messages are not a JSON list of {role, content} objects") from None
    if not isinstance(value, (list, tuple)):
        raise _RowProblem("refused", f"messages must be a list, found {type(value).__name__}")
    pairs = []
    for turn in value:
        role, content = (turn.get("role"), turn.get("content")) if isinstance(turn, Mapping) else (turn, None)
        if isinstance(turn, (list, tuple)) and len(turn) == 2:
            role, content = turn
        if not isinstance(role, str) or not isinstance(content, str):
            raise _RowProblem("refused", f"message {str(turn)[:60]!r} needs a text role and a text content")
        pairs.append((role, content))
    return tuple(pairs)
