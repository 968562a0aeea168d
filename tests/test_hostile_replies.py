"""Hostile device replies: profile, forward metrics, evaluation (any task's metrics), residuals and delivery
receipts are checked before the strategy uses them. Whatever values Flower lets a device send, a check either returns values
inside their documented bounds or raises ReplyError naming the message and field; the strategy counts
it per device and goes on (profiles and residuals through the strategy itself, with a stand-in grid)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mobiflower.platform import messages as m
from mobiflower.platform.tasks import CausalLMTask, ClassificationTask
from mobiflower.strategies import reply_checks as rc
from mobiflower.strategies.reply_checks import ReplyError

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# every kind of value a Flower record lets a device send
numbers = st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(), st.sampled_from([0, -1, 2**40, math.nan, math.inf]))
metric_values = st.one_of(numbers, st.lists(st.integers(-10, 10), max_size=3), st.lists(st.floats(), max_size=3))
config_values = st.one_of(
    metric_values,
    st.booleans(),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.text(max_size=3), max_size=3),
    st.text(min_size=5000, max_size=5000),
)


class _Reply:
    """What the checks read of a Flower reply Message."""

    def __init__(self, content: RecordDict | None = None, error: str | None = None):
        self.content, self.error = content, error

    def has_content(self) -> bool:
        return self.content is not None

    def has_error(self) -> bool:
        return self.error is not None


def _profile(**changes) -> _Reply:
    desc = {
        "device-id": "device-0",
        "fingerprint": "llama-d64-L4",
        "model": "tiny",
        "layers": [1, 3],
        "is-decoder": True,
        "hidden-size": 64,
        "num-layers": 4,
        "norm-eps": 1e-5,
        "activation-cache": True,
    }
    stats = {
        "train": 32,
        "validation": 8,
        "test": 8,
        "label-shares": [0.25, 0.75],
        "forward-samples-per-s": 90.0,
        "load-s": 0.1,
        "rss-mb": 300.0,
        "peak-rss-mb": 310.0,
        "cpu-count": 2,
        "threads": 1,
    }
    frozen = {"final_norm.weight": torch.ones(64)}
    for key, value in changes.items():
        target = desc if key in desc else stats if key in stats else frozen
        if value is _DROP:
            target.pop(key, None)
        else:
            target[key] = value
    return _Reply(
        RecordDict(
            {
                m.PROFILE_KEY: ConfigRecord(desc),
                m.STATS_KEY: MetricRecord(stats),
                m.FROZEN_KEY: ArrayRecord(torch_state_dict=frozen),
            }
        )
    )


_DROP = object()
PROFILE_KEYS = [
    "device-id",
    "fingerprint",
    "model",
    "layers",
    "is-decoder",
    "hidden-size",
    "num-layers",
    "norm-eps",
    "activation-cache",
]
PROFILE_STATS = [
    "train",
    "validation",
    "test",
    "label-shares",
    "forward-samples-per-s",
    "load-s",
    "rss-mb",
    "peak-rss-mb",
    "cpu-count",
    "threads",
]


def test_an_honest_profile_passes_as_plain_values():
    checked = rc.profile_reply(_profile())
    assert isinstance(checked, m.ProfileReply)
    desc, measured, frozen = checked.description, checked.measurements, checked.frozen
    assert desc["layers"] == [1, 3] and measured["train"] == 32 and desc["hidden-size"] == 64
    assert checked.profile() == {**desc, **measured} and checked.device_id == desc["device-id"]
    assert set(frozen) == {"final_norm.weight"} and frozen["final_norm.weight"].shape == (64,)


@PROPERTY
@given(key=st.sampled_from(PROFILE_KEYS), value=st.one_of(config_values, st.just(_DROP)))
def test_any_profile_description_is_checked_or_refused_by_field(key, value):
    try:
        reply = _profile(**{key: value})
    except (TypeError, ValueError):
        return  # a value Flower itself refuses to carry
    try:
        profile = rc.profile_reply(reply).description
    except ReplyError as err:
        # a width in bounds that is not the frozen head's (64) is refused where they disagree: the frozen head
        mismatch = key == "hidden-size" and err.field == m.FROZEN_KEY and "1-D and" in str(err)
        assert err.kind == "profile" and (err.field == key or mismatch), err
        return
    assert 1 <= profile["hidden-size"] <= 65536 and 1 <= profile["num-layers"] <= rc.MAX_LAYERS
    assert profile["layers"] == sorted(set(profile["layers"])) and profile["layers"][-1] < profile["num-layers"]
    assert 0 < profile["norm-eps"] <= 1 and isinstance(profile["is-decoder"], bool)
    assert all(isinstance(profile[k], str) and profile[k] for k in ("device-id", "fingerprint", "model"))


@PROPERTY
@given(key=st.sampled_from(PROFILE_STATS), value=st.one_of(metric_values, st.just(_DROP)))
def test_any_profile_measurement_is_checked_or_refused_by_field(key, value):
    try:
        reply = _profile(**{key: value})
    except (TypeError, ValueError):
        return
    try:
        profile = rc.profile_reply(reply).measurements
    except ReplyError as err:
        assert err.kind == "profile" and err.field in (key, m.STATS_KEY), err
        return
    for split in ("train", "validation", "test"):
        assert isinstance(profile[split], int) and 0 <= profile[split] <= rc.MAX_SPLIT_SAMPLES
    shares = profile.pop("label-shares", [])
    assert all(math.isfinite(v) and v >= 0 for k, v in profile.items() if k in PROFILE_STATS)
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in shares) and sum(shares) <= 1 + 1e-3


@pytest.mark.parametrize(
    "shares, labels, text",
    [
        ([0.5, 0.6], None, "sum to at most 1"),
        ([-0.1, 1.0], None, "each share must lie in [0, 1]"),
        ([math.nan, 0.5], None, "each share must lie in [0, 1]"),
        ([0.2, 0.3, 0.5], 2, "2 (the task's labels)"),
        ([0.001] * (rc.MAX_LABELS + 1), None, f"at most {rc.MAX_LABELS}"),
    ],
)
def test_label_shares_are_one_share_per_label_of_the_task(shares, labels, text):
    with pytest.raises(ReplyError) as e:
        rc.profile_reply(_profile(**{"label-shares": shares}), num_labels=labels)
    assert e.value.field == "label-shares" and text in e.value.message, e.value
    assert rc.profile_reply(_profile(), num_labels=2).measurements["label-shares"] == [0.25, 0.75]
    assert rc.profile_reply(_profile(**{"label-shares": []}), num_labels=2).measurements["label-shares"] == []
    assert "label-shares" not in rc.profile_reply(_profile(**{"label-shares": _DROP})).measurements


@pytest.mark.parametrize(
    "frozen, text",
    [
        ({"final_norm.weight": torch.full((64,), float("nan"))}, "NaN"),
        ({"final_norm.weight": torch.ones(32)}, "64 wide"),
        ({"final_norm.weight": torch.ones(64, dtype=torch.int64)}, "floating point"),
        ({"backbone.layers.0.weight": torch.ones(64)}, "a frozen head is"),
        ({"lm_head.weight": torch.ones(64)}, "2-D"),
    ],
)
def test_a_frozen_head_that_would_poison_the_network_is_refused(frozen, text):
    reply = _profile()
    reply.content[m.FROZEN_KEY] = ArrayRecord(torch_state_dict=frozen)
    with pytest.raises(ReplyError) as e:
        rc.profile_reply(reply)
    assert (e.value.field, text in e.value.message) == (m.FROZEN_KEY, True), e.value


def _forward(**stats) -> _Reply:
    values = {"samples": 4, "forward-s": 0.1, "busy-s": 0.2, "frame-bytes": 10, **stats}
    return _Reply(
        RecordDict(
            {
                m.FRAME_KEY: m.frame_record(b"MBFL" + bytes(8)),
                m.STATS_KEY: MetricRecord({k: v for k, v in values.items() if v is not _DROP}),
            }
        )
    )


@PROPERTY
@given(
    key=st.sampled_from(["samples", "forward-s", "busy-s", "tokens"]), value=st.one_of(metric_values, st.just(_DROP))
)
def test_any_forward_metric_is_checked_or_refused_by_field(key, value):
    try:
        reply = _forward(**{key: value})
    except (TypeError, ValueError):
        return
    try:
        forwarded = rc.forward_reply(reply, samples=4)
        blob, stats = forwarded.frame, forwarded.stats
    except ReplyError as err:
        assert err.kind == "forward" and err.field in (key, m.STATS_KEY), err
        return
    assert blob.startswith(b"MBFL") and stats["samples"] == 4 == forwarded.samples
    assert all(0 <= stats[k] <= rc.MAX_SECONDS for k in ("forward-s", "busy-s"))


def test_a_forward_reply_must_say_it_forwarded_what_was_asked():
    with pytest.raises(ReplyError, match="the request asked for 8") as e:
        rc.forward_reply(_forward(samples=4), samples=8)
    assert e.value.reason == "forward: samples"
    extra = _forward()
    extra.content[m.FRAME_KEY]["smuggled"] = Array(np.zeros(1000, np.uint8))
    with pytest.raises(ReplyError, match="a frame travels alone"):
        rc.forward_reply(extra, samples=4)
    many = _forward(**{f"k{i}": i for i in range(rc.MAX_ENTRIES)})
    with pytest.raises(ReplyError, match="entries, more than"):
        rc.forward_reply(many, samples=4)


CLASSIFICATION, CAUSAL_LM = ClassificationTask(), CausalLMTask(max_length=64)
HONEST_EVALUATIONS = {
    "classification": {
        "accuracy": 0.75,
        "macro-f1": 0.7,
        "zero-shot-accuracy": 0.5,
        "zero-shot-macro-f1": 0.4,
        "samples": 8,
        "count": 8,
        "seconds": 1.0,
        "peak-rss-mb": 300.0,
    },
    "causal-lm": {
        "perplexity": math.exp(2.5),
        "loss": 2.5,
        "token-accuracy": 0.4,
        "zero-shot-perplexity": math.exp(3.0),
        "zero-shot-loss": 3.0,
        "zero-shot-token-accuracy": 0.3,
        "samples": 4,
        "count": 200,
        "seconds": 1.0,
        "peak-rss-mb": 300.0,
    },
}


def _evaluation(task: str, **changes) -> _Reply:
    values = {**HONEST_EVALUATIONS[task], **changes}
    return _Reply(RecordDict({m.STATS_KEY: MetricRecord({k: v for k, v in values.items() if v is not _DROP})}))


@PROPERTY
@given(
    key=st.sampled_from(sorted(HONEST_EVALUATIONS["classification"])), value=st.one_of(metric_values, st.just(_DROP))
)
def test_any_evaluation_metric_is_checked_or_refused_by_field(key, value):
    try:
        reply = _evaluation("classification", **{key: value})
    except (TypeError, ValueError):
        return
    try:
        stats = rc.evaluate_reply(reply, CLASSIFICATION, max_samples=8).stats
    except ReplyError as err:
        assert err.kind == "evaluate" and err.field in (key, m.STATS_KEY), err
        return
    for name in ("accuracy", "macro-f1"):  # what the fleet's figures are made of
        assert 0 <= stats[name] <= 1
        assert math.isnan(stats[f"zero-shot-{name}"]) or 0 <= stats[f"zero-shot-{name}"] <= 1
    assert 1 <= stats["count"] <= stats["samples"] <= 8  # what weights the fleet's figures
    assert all(math.isfinite(v) for k, v in stats.items() if not k.startswith("zero-shot-") and k != "peak-rss-mb")


@PROPERTY
@given(key=st.sampled_from(sorted(HONEST_EVALUATIONS["causal-lm"])), value=st.one_of(metric_values, st.just(_DROP)))
def test_any_causal_lm_evaluation_metric_is_checked_or_refused_by_field(key, value):
    try:
        reply = _evaluation("causal-lm", **{key: value})
    except (TypeError, ValueError):
        return
    try:
        stats = rc.evaluate_reply(reply, CAUSAL_LM, max_samples=4).stats
    except ReplyError as err:
        # a loss or perplexity in range that disagrees with the other is refused as a perplexity
        agreement = err.field.endswith("perplexity") and key.endswith(("loss", "perplexity"))
        assert err.kind == "evaluate" and (err.field in (key, m.STATS_KEY) or agreement), err
        return
    for prefix in ("", "zero-shot-"):
        ppl, loss, acc = (stats[f"{prefix}{n}"] for n in ("perplexity", "loss", "token-accuracy"))
        if prefix and math.isnan(ppl):
            assert math.isnan(loss)
            continue
        assert math.isfinite(ppl) and ppl >= 1 and math.isfinite(loss) and loss >= 0
        assert math.log(ppl) == pytest.approx(min(loss, 700.0), rel=1e-3)
        assert 0 <= acc <= 1 or (prefix and math.isnan(acc))
    assert 1 <= stats["samples"] <= 4 and 1 <= stats["count"] <= stats["samples"] * 64  # scored tokens bounded


@pytest.mark.parametrize(
    "task, change, key, text",
    [
        ("causal-lm", {"perplexity": 0.5, "loss": 0.0}, "perplexity", "outside [1, inf]"),
        ("causal-lm", {"loss": math.nan}, "loss", "outside [0, inf]"),
        ("causal-lm", {"loss": -0.5}, "loss", "outside [0, inf]"),
        ("causal-lm", {"perplexity": math.inf}, "perplexity", "outside [1, inf]"),
        ("causal-lm", {"perplexity": 5.0}, "perplexity", "is not exp(loss 2.5)"),
        ("causal-lm", {"count": 4 * 64 + 1}, "count", "outside [1, 256]"),  # more tokens than 4 samples can hold
        ("causal-lm", {"count": 0}, "count", "outside [1, 256]"),
        ("causal-lm", {"count": 20.5}, "count", "whole number"),
        ("causal-lm", {"token-accuracy": _DROP}, "token-accuracy", "missing"),
        ("causal-lm", {"loss": _DROP}, "loss", "missing"),
        ("causal-lm", {"zero-shot-token-accuracy": 1.5}, "zero-shot-token-accuracy", "outside [0, 1]"),
        ("causal-lm", {"zero-shot-loss": math.nan}, "zero-shot-perplexity", "is not exp(zero-shot-loss nan)"),
        ("classification", {"macro-f1": _DROP}, "macro-f1", "missing"),
        ("classification", {"macro-f1": math.nan}, "macro-f1", "outside [0, 1]"),
        ("classification", {"count": 9}, "count", "outside [1, 8]"),  # more scored samples than it scored
        ("classification", {"count": _DROP}, "count", "missing"),
    ],
)
def test_hostile_evaluations_are_refused_naming_the_key(task, change, key, text):
    tasks = {"classification": CLASSIFICATION, "causal-lm": CAUSAL_LM}
    with pytest.raises(ReplyError) as e:
        rc.evaluate_reply(_evaluation(task, **change), tasks[task], max_samples=8)
    assert (e.value.field, e.value.reason) == (key, f"evaluate: {key}") and text in e.value.message, e.value
    assert f"evaluate reply, {key}:" in str(e.value)  # the message names the key


def test_the_run_names_the_metrics_an_evaluation_must_hold_not_the_reply():
    """A reply carrying another task's metrics (a device that thinks it runs classification in a causal-LM
    run) is refused for the metric it lacks, and figures it adds are not passed along."""
    classified = _evaluation("classification")
    with pytest.raises(ReplyError, match="evaluate reply, perplexity: the 'perplexity' entry is missing"):
        rc.evaluate_reply(classified, CAUSAL_LM)
    stats = rc.evaluate_reply(_evaluation("causal-lm", accuracy=0.9, bogus=1.0), CAUSAL_LM).stats
    assert "accuracy" not in stats and "bogus" not in stats
    assert stats["count"] == 200 and stats["zero-shot-loss"] == 3.0
    honest = rc.evaluate_reply(
        _evaluation("causal-lm", **{"zero-shot-perplexity": _DROP, "zero-shot-loss": _DROP}), CAUSAL_LM
    )
    assert math.isnan(honest.zero_shot("perplexity")) and honest.metric("loss") == 2.5 and honest.count == 200


@PROPERTY
@given(
    rows=st.integers(0, 5),
    classes=st.integers(1, 4),
    dtype=st.sampled_from(["float32", "float64", "int64", "float16"]),
    fill=st.one_of(st.floats(), st.sampled_from([0.3, -0.7, 1.0, -1.0, 1.5, math.nan])),
    extra=st.booleans(),
)
def test_any_residual_reply_is_checked_or_refused(rows, classes, dtype, fill, extra):
    with np.errstate(all="ignore"):  # NaN and huge fills cast to integers and half floats as they do
        array = np.full((rows, classes), fill).astype(dtype)
    record = ArrayRecord({m.RESIDUAL_KEY: Array(array)})
    if extra:
        record["more"] = Array(np.zeros(3, np.float32))
    try:
        residual = rc.residual_reply(_Reply(RecordDict({m.RESIDUAL_KEY: record})), 3, 2).residual
    except ReplyError as err:
        assert err.reason == f"residual: {m.RESIDUAL_KEY}", err
        return
    assert residual.shape == (3, 2) and residual.dtype == np.float32 and np.isfinite(residual).all()
    assert np.abs(residual).max() <= 1 + 1e-3 and not extra


@pytest.mark.parametrize(
    "receipt, field",
    [
        ({}, "digest"),
        ({"digest": 5}, "digest"),
        ({"digest": "x" * 200}, "digest"),
        ({"digest": "ab", "path": 3}, "path"),
        ({"digest": "ab", "path": "p" * 5000}, "path"),
    ],
)
def test_a_delivery_receipt_that_cannot_be_trusted_is_refused(receipt, field):
    with pytest.raises(ReplyError) as e:
        rc.delivery_receipt(_Reply(RecordDict({m.CONFIG_KEY: ConfigRecord(receipt)})))
    assert e.value.reason == f"deliver: {field}"
    assert rc.delivery_receipt(_Reply(RecordDict({m.CONFIG_KEY: ConfigRecord({"digest": "ab"})}))) == m.DeliveryReceipt(
        "ab", ""
    )


# ---- through the strategy's parts ------------------------------------------------------------------
@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)  # Messages can be built outside a Flower run
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_hostile_profiles_leave_their_device_out_counted_by_reason():
    from mobiflower.strategies.fleet_profile import take_profiles
    from mobiflower.strategies.run_state import RunState

    replies = {
        1: _profile(),
        2: _profile(**{"device-id": "device-1", "hidden-size": -3}),
        3: _profile(**{"device-id": "device-2", "layers": [3, 1]}),
        4: _profile(**{"device-id": "device-3", "train": math.inf}),
    }
    state, frozen_by = RunState(), {}
    take_profiles(replies, state, frozen_by)
    assert [d.device_id for d in state.devices.values()] == ["device-0"]
    assert state.profiles_refused == {
        "node 2": {"profile: hidden-size": 1},
        "node 3": {"profile: layers": 1},
        "node 4": {"profile: train": 1},
    }
    assert len([e for e in state.events if "failed" in e]) == 3


class _Grid:
    """A stand-in Grid: each pushed message is answered at once by ``answer(message)``."""

    def __init__(self, answer):
        self.answer, self.pending = answer, {}

    def push_messages(self, messages):
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.__dict__["_message_id"] = f"m{len(self.pending)}-{i}"
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, ids):
        return [self.answer(self.pending.pop(i)) for i in list(ids) if i in self.pending]


@pytest.mark.parametrize(
    "answer, reason",
    [
        (lambda probs: probs * np.nan, "residual: residual"),
        (lambda probs: probs * 50, "residual: residual"),
        (lambda probs: probs[:, :1], "residual: residual"),
        (lambda probs: probs.astype(np.int64), "residual: residual"),
    ],
)
def test_hostile_residuals_leave_their_rows_out_and_are_counted(task_identity, answer, reason):
    from mobiflower.strategies.residuals import ResidualOracle
    from mobiflower.strategies.run_state import DeviceState, RunState

    state = RunState(devices={1: DeviceState(1, "device-0", {}, 2), 2: DeviceState(2, "device-1", {}, 1)})

    def reply(msg: Message) -> Message:
        probs = msg.content[m.PROBS_KEY][m.PROBS_KEY].numpy()
        honest = probs - np.eye(probs.shape[1], dtype=np.float32)[[0] * len(probs)]
        out = answer(probs) if msg.metadata.dst_node_id == 1 else honest
        return Message(
            RecordDict({m.RESIDUAL_KEY: ArrayRecord({m.RESIDUAL_KEY: Array(np.ascontiguousarray(out))})}), reply_to=msg
        )

    owners = {10: "device-0", 11: "device-0", 20: "device-1"}
    oracle = ResidualOracle(_Grid(reply), state, {}, timeout=10.0, owners=owners)
    probs = torch.softmax(torch.randn(3, 2), -1)
    out = oracle([10, 20, 11], probs)
    assert torch.isnan(out[[0, 2]]).all() and torch.isfinite(out[1]).all()  # the hostile device's rows are out
    hostile, honest = state.devices[1], state.devices[2]
    assert hostile.replies_refused == {reason: 1} and hostile.failures and hostile.bytes_up == 0
    assert honest.replies_refused == {} and honest.metrics["residual_requests"] == 1


def test_frames_kept_for_evaluation_pass_the_intakes_checks(task_identity, tiny_llama, tmp_path):
    """Server-side evaluation keeps each device's frame of the split: an honest one is kept and scored, a
    hostile one (targets of another head) is refused, counted, and leaves the others' figures alone."""
    from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
    from mobiflower.platform.backbone import Backbone
    from mobiflower.platform.data import Example
    from mobiflower.platform.intake import FrameIntake, run_limits
    from mobiflower.platform.side_factory import build_side_network
    from mobiflower.platform.side_networks import SideNetworkConfig
    from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
    from mobiflower.platform.trainer import TrainConfig
    from mobiflower.strategies.config import SideTuningConfig
    from mobiflower.strategies.evaluation import Evaluator
    from mobiflower.strategies.job import Job
    from mobiflower.strategies.round_clock import RoundClock
    from mobiflower.strategies.run_state import DeviceState, RunState

    backbone = Backbone.load(tiny_llama, num_taps=2)
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=8))
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=backbone.layers,
        bits=8,
        fingerprint=backbone.fingerprint,
        family="ladder",
        reduction=4,
        dropout=0.0,
    )
    frozen = backbone.frozen_head_state(lm_head=False)
    store = SideNetworkStore(
        StoreConfig("shared"),
        lambda: build_side_network(config, frozen),
        TrainConfig(epochs=1),
        {"device-0": 8, "device-1": 8},
        chunk_size=8,
    )
    profile = {"fingerprint": backbone.fingerprint, "validation": 4}
    state = RunState(
        devices={1: DeviceState(1, "device-0", dict(profile), 8), 2: DeviceState(2, "device-1", dict(profile), 8)}
    )

    def reply(msg: Message) -> Message:
        cfg = msg.content[m.CONFIG_KEY]
        examples = [Example(id=1000 + i, text=f"held out {i}", label=i % 2) for i in range(int(cfg["samples"]))]
        frame, _ = runtime.make_frame(examples)
        if msg.metadata.dst_node_id == 2:
            frame.targets = {"kind": "tokens", "values": [1] * len(examples)}
        stats = MetricRecord({"samples": len(examples), "forward-s": 0.1, "busy-s": 0.1})
        return Message(
            RecordDict({m.FRAME_KEY: m.frame_record(runtime.encode(frame)), m.STATS_KEY: stats}), reply_to=msg
        )

    job = Job(
        SideTuningConfig(),
        _Grid(reply),
        tmp_path,
        state,
        config,
        store,
        FrameIntake(store, config, run_limits(config, 8)),
        RoundClock(),
    )
    result = Evaluator(job).evaluate(1, "validation", max_samples=0)
    assert set(result["per_device"]) == {"device-0"} and result["per_device"]["device-0"]["samples"] == 4
    hostile = state.devices[2]
    assert hostile.replies_refused == {"evaluation frame: wrong targets": 1} and hostile.failures
    assert not state.devices[1].failures and state.devices[1].metrics["eval_bytes_up"] > 0
