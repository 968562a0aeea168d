"""A Flower ``Grid`` whose nodes are device processes on this machine: ``mobiflower local``'s transport.

``mobiflower local`` runs one device against the server with the same ServerApp strategy
(:class:`mobiflower.strategies.side_tuning.SideTuningStrategy`) that ``simulate`` and a real
deployment run, so a task or a mode is implemented once. What it replaces is Flower's transport, not
Flower's messages: each node is an OS process that runs the stock ClientApp
(``mobiflower.clients.client_app:app``) on every request, called as Flower calls it,
``app(message, context)``, with a ``Context`` whose ``state`` persists across messages. Requests and
replies cross a pipe as Flower's own protobuf bytes, so the two sides share no object, and the
device's memory and time are its own process's (what a phone would measure), while the server
trains on one frame as the device forwards the next.

No SuperLink, no Ray, no polling interval: a request is handed over at once and a reply is ready
as soon as the device has answered it.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any, Iterable, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP = "mobiflower.clients.client_app:app"
FIRST_NODE_ID = 9001


def to_bytes(message: Message) -> bytes:
    return message_to_proto(message).SerializeToString()


def from_bytes(blob: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(blob))


def _load_app(ref: str):
    import importlib

    module, attr = ref.split(":")
    return getattr(importlib.import_module(module), attr)


def _node_loop(conn, app_ref: str, run_id: int, node_id: int, node_config: dict, run_config: dict) -> None:
    """The device process: answer each request in order until the server hangs up."""
    app = _load_app(app_ref)
    context = Context(
        run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=run_config
    )
    while True:
        try:
            item = conn.recv()
        except EOFError:
            return
        if item is None:
            return
        message_id, blob = item
        request = from_bytes(blob)
        try:
            reply = app(request, context)
        except Exception as err:  # noqa: BLE001 - as Flower does: the exception becomes an error reply
            reply = Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=request
            )
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        conn.send((message_id, to_bytes(reply)))


class DeviceProcessGrid(Grid):
    """One OS process per node, each running a ClientApp on the requests it is sent (see the module doc).

    Use it as a context manager: the device processes end when it closes."""

    def __init__(
        self,
        run_config: Mapping[str, Any],
        node_configs: list[dict[str, Any]],
        run_id: int = 1,
        app_ref: str = CLIENT_APP,
    ) -> None:
        self._run = Run.create_empty(run_id)
        # Flower stamps every new Message with the process's task identity, as its ServerApp runtime sets it
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        ctx = mp.get_context("spawn")  # a fresh interpreter: no torch threads or locks inherited from the server
        self._conns: dict[int, Any] = {}
        self._procs: dict[int, Any] = {}
        for i, node_config in enumerate(node_configs):
            node_id = FIRST_NODE_ID + i
            parent, child = ctx.Pipe()
            proc = ctx.Process(
                target=_node_loop,
                args=(child, app_ref, run_id, node_id, dict(node_config), dict(run_config)),
                name=f"mobiflower-device-{i}",
                daemon=True,
            )
            proc.start()
            child.close()
            self._conns[node_id], self._procs[node_id] = parent, proc
        self._lock = threading.Lock()
        self._ready: dict[str, Message] = {}
        self._pending: dict[int, dict[str, Message]] = {node_id: {} for node_id in self._conns}
        self._readers = [
            threading.Thread(target=self._read, args=(node_id,), daemon=True, name=f"grid-reader-{node_id}")
            for node_id in self._conns
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, node_id: int) -> None:
        """Collect a node's replies; when its process ends, every request it still held fails at once
        (as Flower answers for a node that is gone) instead of waiting out the strategy's timeout."""
        conn = self._conns[node_id]
        while True:
            try:
                message_id, blob = conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                self._pending[node_id].pop(message_id, None)
                self._ready[message_id] = from_bytes(blob)
        proc = self._procs[node_id]
        proc.join(5)
        with self._lock:
            for message_id, request in self._pending[node_id].items():
                error = Error(ErrorCode.NODE_UNAVAILABLE, f"the device process ended (exit code {proc.exitcode})")
                reply = Message(error, reply_to=request)
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                self._ready[message_id] = reply
            self._pending[node_id].clear()

    # ---- Grid ------------------------------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return [n for n, proc in self._procs.items() if proc.is_alive()]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            if node_id not in self._conns or not self._procs[node_id].is_alive():
                continue  # Flower refuses a message for an unknown node: no id comes back
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            with self._lock:
                self._pending[node_id][msg.metadata.message_id] = msg
            try:
                self._conns[node_id].send((msg.metadata.message_id, to_bytes(msg)))
            except (OSError, BrokenPipeError):
                pass  # the process is gone: the reader answers the request with an error
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        with self._lock:
            return [self._ready.pop(mid) for mid in list(message_ids) if mid in self._ready]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        out: list[Message] = []
        while ids and time.monotonic() < end:
            replies = list(self.pull_messages(ids))
            out += replies
            ids -= {r.metadata.reply_to_message_id for r in replies}
            if ids:
                time.sleep(0.002)
        return out

    # ---- lifetime --------------------------------------------------------------------------------
    def close(self, timeout: float = 30.0) -> None:
        """Tell every device process to stop, and wait for it (killed if it does not stop in ``timeout``)."""
        for conn in self._conns.values():
            try:
                conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self._procs.values():
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns.values():
            conn.close()

    def __enter__(self) -> "DeviceProcessGrid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["DeviceProcessGrid", "CLIENT_APP"]
