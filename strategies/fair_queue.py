"""Fair service of landed frames: the server's trainer takes devices in turn, not in arrival order.

While a round streams, frames wait for the one training thread. In arrival order, a fast device
whose frames pile up would have its side network (per-device mode) trained before a slow
device's frame that landed just after, and the shared network would see runs of one device's
samples. :class:`FairQueue` keeps one first-in-first-out line per device and serves the lines in
turn (round robin), so every device's next frame is at most one frame per other device away.
It has the part of :class:`queue.Queue`'s interface the streaming loop uses.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Any, Hashable


class FairQueue:
    """Round-robin over per-key FIFO lines; ``put(None)`` is a stop sentinel served after the rest."""

    def __init__(self) -> None:
        self._lines: OrderedDict[Hashable, deque] = OrderedDict()
        self._stop = False
        self._cond = threading.Condition()
        self.unfinished_tasks = 0

    def put(self, item: Any, key: Hashable = None) -> None:
        """Queue ``item`` on ``key``'s line (``None`` alone: no more items will come)."""
        with self._cond:
            if item is None:
                self._stop = True
            else:
                self._lines.setdefault(key, deque()).append(item)
            self.unfinished_tasks += 1
            self._cond.notify()

    def get(self) -> Any:
        """The next line's oldest item (lines take turns); None once stopped and empty."""
        with self._cond:
            while not self._lines and not self._stop:
                self._cond.wait()
            if not self._lines:
                return None
            key, line = next(iter(self._lines.items()))
            item = line.popleft()
            del self._lines[key]
            if line:  # the line goes to the back: the other devices come first
                self._lines[key] = line
            return item

    def task_done(self) -> None:
        with self._cond:
            if self.unfinished_tasks <= 0:
                raise ValueError("task_done() called more times than there were items")
            self.unfinished_tasks -= 1

    def qsize(self) -> int:
        with self._cond:
            return sum(len(line) for line in self._lines.values())
