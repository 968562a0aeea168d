"""Requests over a Flower ``Grid``: push and track, and send-one-per-node-and-wait with a window.

Replies are matched by ``reply_to_message_id``: an error reply Flower makes itself (node
unavailable, TTL expired) comes from the SuperLink, not from the node it is about.
"""

from __future__ import annotations

import json
import time
from typing import Iterable

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

Reply = Message | str  # a device's reply, or why there is none


def config_bytes(record: ConfigRecord) -> int:
    """What a request's config record costs on the way down (its JSON size; bytes count by length)."""
    return len(json.dumps({k: v if not isinstance(v, bytes) else len(v) for k, v in record.items()}, default=str))


def why(reply: Reply) -> str:
    """Why a request failed: the reason given instead of a reply, or the error reply's code and reason."""
    if isinstance(reply, str):
        return reply
    return f"error {reply.error.code}: {reply.error.reason}" if reply.has_error() else "malformed reply"


def failed(reply: Reply) -> bool:
    return isinstance(reply, str) or reply.has_error()


class PollBackoff:
    """How long to sleep between pulls: ``first`` right after a reply landed, doubling while none does, up
    to ``cap``. Each pull is a call to the SuperLink, so waiting on a slow or dead device must not poll
    it hard; after a reply the next may follow at once (a label-private step waits on this)."""

    def __init__(self, first: float = 0.001, cap: float = 0.05) -> None:
        self.first, self.cap, self.current = first, cap, first

    def reset(self) -> None:
        """A reply landed: the next wait is short again."""
        self.current = self.first

    def sleep(self, landed: bool) -> None:
        """Sleep before the next pull; ``landed``: whether the last pull brought a reply."""
        self.current = self.first if landed else min(self.cap, self.current * 2)
        time.sleep(self.current)


def push_tracked(grid: Grid, messages: list[Message]) -> tuple[dict[str, Message], list[Message]]:
    """Push; return ({message id: message} for those Flower took, [messages it refused])."""
    if not messages:
        return {}, []
    ids = {str(i) for i in grid.push_messages(messages) if i}
    taken, refused = {}, []
    for msg in messages:
        mid = msg.metadata.message_id
        (taken.__setitem__(mid, msg) if mid and mid in ids else refused.append(msg))
    return taken, refused


def request_all(grid: Grid, messages: Iterable[Message], timeout: float, window: int | None = None) -> dict[int, Reply]:
    """Send one request per node and wait; {node id: its reply, or why there is none}.

    ``window`` bounds the requests in flight at once: the next message is only built (a generator
    builds lazily) and pushed when a reply frees a slot, so messages that carry a side network each
    (evaluate, deliver) never sit in memory for the whole fleet at once.
    """
    todo = iter(messages)
    out: dict[int, Reply] = {}
    taken: dict[str, Message] = {}
    sent_at: dict[str, float] = {}

    def fill() -> None:
        batch = []
        while window is None or len(taken) + len(batch) < window:
            msg = next(todo, None)
            if msg is None:
                break
            batch.append(msg)
        pushed, refused = push_tracked(grid, batch)
        for msg in refused:
            out[msg.metadata.dst_node_id] = "Flower refused the request"
        now = time.monotonic()
        taken.update(pushed)
        sent_at.update({mid: now for mid in pushed})

    fill()
    backoff = PollBackoff()
    while taken:
        landed = False
        for reply in grid.pull_messages(list(taken)):
            msg = taken.pop(reply.metadata.reply_to_message_id, None)
            if msg is not None:
                out[msg.metadata.dst_node_id] = reply
                landed = True
        now = time.monotonic()
        for mid in [mid for mid in taken if now - sent_at[mid] > timeout]:
            out[taken.pop(mid).metadata.dst_node_id] = f"no reply within {timeout:.0f} s"
        fill()
        if taken:
            backoff.sleep(landed)
    return out
