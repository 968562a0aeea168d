"""A device's counters are written by two threads (the round's main thread and the trainer thread):
each update is one locked step, so no count is lost (issue 28)."""

import sys
import threading

import pytest

from mobiflower.strategies.reply_checks import ReplyError
from mobiflower.strategies.run_state import DeviceState

THREADS, UPDATES = 8, 3000


@pytest.fixture
def fast_switching():
    """Switch threads as often as the interpreter allows, so an unlocked read-modify-write would lose updates."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _hammer(dev: DeviceState, worker: int) -> None:
    refusal = ReplyError("residual", "shape", "the residual has the wrong shape")
    for i in range(UPDATES):
        dev.add(bytes_up=1, bytes_down=2, frames=1, busy_s=0.5)
        dev.count("residual_requests")
        dev.count(f"worker_{worker}")
        if i % 10 == 0:
            dev.refuse(refusal, "residual")
            dev.fail(f"worker {worker}: request {i} failed")


def test_counters_written_from_many_threads_add_up_exactly(fast_switching):
    dev = DeviceState(1, "device-0", {}, 8)
    threads = [threading.Thread(target=_hammer, args=(dev, w)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = THREADS * UPDATES
    assert (dev.bytes_up, dev.bytes_down, dev.frames, dev.busy_s) == (total, 2 * total, total, 0.5 * total)
    assert dev.metrics["residual_requests"] == total
    assert all(dev.metrics[f"worker_{w}"] == UPDATES for w in range(THREADS))
    refusals = THREADS * (UPDATES // 10)
    assert dev.replies_refused == {"residual: shape": refusals}
    assert len(dev.failures) == 2 * refusals  # each refusal records why, and each fail() once


def test_only_the_devices_counters_can_be_added_to():
    dev = DeviceState(1, "device-0", {}, 8)
    with pytest.raises(KeyError, match="not a device counter"):
        dev.add(dropped=1)
    dev.add(samples_lost=3, forward_s=1.5)
    assert (dev.samples_lost, dev.forward_s) == (3, 1.5)
    assert dev.usage().bytes_up == 0
