"""The strategy reads device replies defensively: a reply missing its records is a failure, not a crash."""

from __future__ import annotations

import math

import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from mobiflower.platform import messages as m
from mobiflower.platform.tasks import CausalLMTask, ClassificationTask
from mobiflower.strategies.evaluation import fleet_figures
from mobiflower.strategies.reply_checks import ReplyError, evaluate_reply, forward_reply

CLASSIFICATION, CAUSAL_LM = ClassificationTask(), CausalLMTask(max_length=64)


class _Reply:
    """The two methods and the content the strategy uses of a Flower reply Message."""

    def __init__(self, content: RecordDict | None = None, error: str | None = None):
        self.content, self.error = content, error

    def has_content(self) -> bool:
        return self.content is not None

    def has_error(self) -> bool:
        return self.error is not None


def _stats(**kw) -> MetricRecord:
    return MetricRecord({"samples": 4, "forward-s": 0.1, "busy-s": 0.2, **kw})


def test_a_complete_forward_reply_yields_its_frame_bytes():
    blob = b"MBFL" + bytes(100)
    forwarded = forward_reply(_Reply(RecordDict({m.FRAME_KEY: m.frame_record(blob), m.STATS_KEY: _stats()})))
    assert isinstance(forwarded, m.ForwardReply) and forwarded.frame == blob and forwarded.samples == 4
    assert (forwarded.forward_s, forwarded.busy_s) == (0.1, 0.2)


@pytest.mark.parametrize(
    "content, why",
    [
        (RecordDict({m.STATS_KEY: _stats()}), "needs 'frame'"),
        (RecordDict({m.FRAME_KEY: m.frame_record(b"x")}), "needs 'frame' and 'stats'"),
        (RecordDict({m.FRAME_KEY: m.frame_record(b"x"), m.STATS_KEY: MetricRecord({"samples": 1})}), "no 'forward-s'"),
        (
            RecordDict(
                {
                    m.FRAME_KEY: ArrayRecord({"frame": Array(dtype="float32", shape=(1,), stype="raw", data=bytes(4))}),
                    m.STATS_KEY: _stats(),
                }
            ),
            "raw 1-D uint8",
        ),
        (None, "needs"),
    ],
)
def test_malformed_forward_replies_are_refused_with_a_reason(content, why):
    with pytest.raises((ValueError, KeyError), match=why):
        forward_reply(_Reply(content))


def _scores(**stats) -> _Reply:
    return _Reply(RecordDict({m.STATS_KEY: MetricRecord(stats)}))


def _classified(accuracy: float, samples: int, f1: float = 0.5) -> _Reply:
    return _scores(accuracy=accuracy, **{"macro-f1": f1}, samples=samples, count=samples)


def fleet_metrics(replies, task) -> dict | None:
    """What the evaluator does with a round's evaluate replies: check each for ``task`` (a reply that
    fails is left out) and combine the rest into the fleet's figures (None: none passed)."""
    scored = {}
    for i, reply in enumerate(replies):
        try:
            scored[str(i)] = evaluate_reply(reply, task).stats
        except ReplyError:
            continue
    return fleet_figures(task, scored) if scored else None


def test_evaluate_replies_without_valid_metrics_are_skipped():
    good, other = _classified(0.75, 8, f1=0.7), _classified(0.25, 24, f1=0.2)
    assert fleet_metrics([good], CLASSIFICATION)["accuracy"] == 0.75
    both = fleet_metrics([good, other], CLASSIFICATION)
    assert both["accuracy"] == 0.375 and both["macro-f1"] == pytest.approx(0.325)  # weighted by samples
    assert (both["samples"], both["count"]) == (32, 32)
    bad = [
        _Reply(error="device crashed"),
        _Reply(RecordDict({})),
        _classified(3.0, 8),
        _scores(accuracy=0.75, samples=8, count=8),  # no macro-f1: a metric of the task is missing
        _scores(accuracy=0.75, **{"macro-f1": 0.5}, samples=8),  # no count to weigh it by
    ]
    assert fleet_metrics(bad, CLASSIFICATION) is None
    assert fleet_metrics([good, *bad], CLASSIFICATION) == fleet_metrics([good], CLASSIFICATION)


def _lm(loss: float, tokens: int, samples: int = 8, accuracy: float = 0.5) -> _Reply:
    return _scores(perplexity=math.exp(loss), loss=loss, **{"token-accuracy": accuracy}, samples=samples, count=tokens)


def test_a_fleets_perplexity_is_exp_of_its_token_weighted_loss_not_a_mean_of_perplexities():
    """Two devices: 100 scored tokens at loss 1 and 300 at loss 3. The fleet's loss is (100 + 900) / 400 =
    2.5 and its perplexity exp(2.5), neither the mean of the two perplexities nor the per-device mean loss."""
    fleet = fleet_metrics([_lm(1.0, 100, accuracy=0.8), _lm(3.0, 300, accuracy=0.4)], CAUSAL_LM)
    assert fleet["loss"] == pytest.approx(2.5)
    assert fleet["perplexity"] == pytest.approx(math.exp(2.5))
    assert fleet["perplexity"] != pytest.approx((math.e + math.exp(3.0)) / 2)  # 11.4, not 12.2
    assert fleet["token-accuracy"] == pytest.approx(0.5)  # (80 + 120) / 400 correct tokens
    assert (fleet["count"], fleet["samples"]) == (400, 16)
    assert math.isnan(fleet["zero-shot-perplexity"])  # neither device reported a zero-shot figure


def test_zero_shot_figures_combine_over_the_devices_that_have_them():
    per_device = {
        "a": {"perplexity": math.e, "loss": 1.0, "token-accuracy": 0.5, "count": 100, "samples": 2,
              "zero-shot-perplexity": math.exp(2.0), "zero-shot-loss": 2.0, "zero-shot-token-accuracy": 0.3},
        "b": {"perplexity": math.e, "loss": 1.0, "token-accuracy": 0.5, "count": 300, "samples": 2,
              "zero-shot-perplexity": math.nan, "zero-shot-loss": math.nan, "zero-shot-token-accuracy": math.nan},
    }  # fmt: skip
    fleet = fleet_figures(CAUSAL_LM, per_device)
    assert fleet["zero-shot-loss"] == 2.0 and fleet["zero-shot-perplexity"] == pytest.approx(math.exp(2.0))
    assert fleet["perplexity"] == pytest.approx(math.e)
    nobody = fleet_figures(CAUSAL_LM, {})
    assert math.isnan(nobody["perplexity"]) and (nobody["count"], nobody["samples"]) == (0, 0)
