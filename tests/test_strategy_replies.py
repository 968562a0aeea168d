"""The strategy reads device replies defensively: a reply missing its records is a failure, not a crash."""

from __future__ import annotations

import pytest
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from mobiflower.platform import messages as m
from mobiflower.strategies.evaluation import weighted_accuracy
from mobiflower.strategies.reply_checks import forward_reply


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


def test_evaluate_replies_without_valid_metrics_are_skipped():
    good = _Reply(RecordDict({m.STATS_KEY: MetricRecord({"accuracy": 0.75, "samples": 8})}))
    other = _Reply(RecordDict({m.STATS_KEY: MetricRecord({"accuracy": 0.25, "samples": 24})}))
    assert weighted_accuracy([good])["accuracy"] == 0.75
    assert weighted_accuracy([good, other])["accuracy"] == 0.375  # weighted by samples
    bad = [
        _Reply(error="device crashed"),
        _Reply(RecordDict({})),
        _Reply(RecordDict({m.STATS_KEY: MetricRecord({"accuracy": 3.0, "samples": 8})})),
    ]
    assert weighted_accuracy(bad) is None
    assert weighted_accuracy([good, *bad]) == weighted_accuracy([good])
