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
    wait = 0.001  # poll fast at first (a label-private step waits on this), then back off to 50 ms
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
            wait = 0.001 if landed else min(0.05, wait * 2)
            time.sleep(wait)
    return out
