"""The trainer's queue of landed frames serves devices in turn, each device's frames in order."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from mobiflower.strategies.fair_queue import FairQueue


def test_devices_take_turns_and_the_sentinel_comes_last():
    work = FairQueue()
    for item in ["a1", "a2", "a3", "b1", "c1", "b2"]:
        work.put(item, key=item[0])
    work.put(None)
    assert work.qsize() == 6
    served = []
    while (item := work.get()) is not None:
        served.append(item)
        work.task_done()
    work.task_done()
    assert served == ["a1", "b1", "c1", "a2", "b2", "a3"] and work.unfinished_tasks == 0


@given(st.lists(st.tuples(st.integers(0, 4), st.integers()), max_size=60))
def test_every_item_is_served_once_in_its_device_order(items):
    work = FairQueue()
    for key, value in items:
        work.put((key, value), key=key)
    work.put(None)
    served = []
    while (item := work.get()) is not None:
        served.append(item)
    assert sorted(served) == sorted(items)
    for key in {k for k, _ in items}:
        assert [v for k, v in served if k == key] == [v for k, v in items if k == key]
    # no device waits behind two frames of another: between two of a device's frames, each other device at most once
    keys = [k for k, _ in served]
    for i, key in enumerate(keys):
        nxt = keys.index(key, i + 1) if key in keys[i + 1 :] else None
        if nxt is not None:
            between = keys[i + 1 : nxt]
            assert len(between) == len(set(between))


def test_a_waiting_consumer_wakes_for_an_item_from_another_thread():
    work = FairQueue()
    got = []
    consumer = threading.Thread(target=lambda: got.append(work.get()))
    consumer.start()
    work.put("x", key=1)
    consumer.join(timeout=5)
    assert got == ["x"]
