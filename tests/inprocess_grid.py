"""Test support: a Flower ``Grid`` that hands each message straight to a ClientApp in this process.

The strategy only ever talks to a ``Grid`` (push, pull, node ids), so it can be driven without a
SuperLink, Ray or a single subprocess: each pushed request is run by the node's ClientApp (the
stock ``mobiflower.clients.client_app:app`` unless a node is given another one), called as Flower
calls it, ``app(message, context)``, with a per-node ``Context`` whose ``state`` persists across
messages and whose ``node_config`` / ``run_config`` are what a SuperNode would hold. Requests and
replies cross a real wire: each is serialized to Flower's protobuf and read back, so neither side
ever shares an object with the other, and a reply is exactly what Flower would deliver.

Faults are injected on purpose and deterministically: drop a matching request's reply (it never
arrives; the strategy's timeout must notice), answer it with an error, delay a node's replies, or
kill a node (after some more messages: later requests get Flower's ``NODE_UNAVAILABLE`` error
reply, or nothing when ``silent``).

Any other Flower app runs the same way (:func:`run_app`), and :func:`run_simulation_in_process` stands
in for ``flwr run`` itself: the federated LoRA baseline's runner, for one, runs its app in-process.

This lives in ``tests/`` and not in the package: it is test scaffolding for the server half and
nothing a run ships with.
"""

from __future__ import annotations

import importlib
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage  # pylint: disable=no-name-in-module
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
Match = Callable[[Message], bool]


def declared_run_config() -> dict[str, Any]:
    """The app's run config as ``flwr run .`` reads it: pyproject's ``[tool.flwr.app.config]``."""
    return dict(tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"])


def over_the_wire(message: Message) -> Message:
    """A copy of ``message`` as the other side receives it (Flower's protobuf, there and back)."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(message).SerializeToString()))


def of_type(message_type: str, node_id: int | None = None) -> Match:
    """A request matcher: its message type (e.g. ``train.forward``), and its node when given."""
    return lambda msg: (
        msg.metadata.message_type == message_type and (node_id is None or msg.metadata.dst_node_id == node_id)
    )


@dataclass
class _Rule:
    match: Match
    times: int
    action: str  # "drop" | "error"


@dataclass
class Node:
    """One simulated SuperNode: its ClientApp and its context (state persists across messages)."""

    app: ClientApp
    context: Context
    alive: bool = True
    dies_after: int | None = None  # messages it still handles before it dies
    silent: bool = False  # when dead: no reply at all (True) or Flower's node-unavailable error (False)
    delay_s: float = 0.0  # wall seconds between a request being handled and its reply landing
    handled: list[str] = field(default_factory=list)  # message types it ran, in order


class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ClientApps called in this process (see the module docstring)."""

    def __init__(
        self,
        run_config: Mapping[str, Any],
        node_configs: list[dict[str, Any]],
        apps: Mapping[int, ClientApp] | None = None,
        run_id: int = 1,
        client_app: ClientApp | None = None,
    ) -> None:
        """``node_configs[i]`` is device i's node config (``partition-id`` / ``num-partitions`` are added
        when absent); every node runs ``client_app`` (the stock side-tuning one when None), except the
        partitions ``apps`` gives another."""
        if client_app is None:
            from mobiflower.clients.client_app import app as client_app

        self._run = Run.create_empty(run_id)
        # Flower stamps every new Message with the process's task identity, as its ServerApp runtime sets it
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run_id, SUPERLINK_NODE_ID
        self.run_config = dict(run_config)
        self.nodes: dict[int, Node] = {}
        for i, extra in enumerate(node_configs):
            node_id = 7001 + 13 * i  # not 0..n-1: the strategy must not confuse node ids with partitions
            node_config = {"partition-id": i, "num-partitions": len(node_configs), **extra}
            context = Context(
                run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config=dict(run_config)
            )
            self.nodes[node_id] = Node(app=(apps or {}).get(i, client_app), context=context)
        self._lock = threading.RLock()  # the strategy's trainer thread asks for residuals while the main one pulls
        self._queued: dict[str, Message] = {}  # pushed, not run yet
        self._ready: dict[str, tuple[float, Message]] = {}  # request id -> (lands at, reply)
        self._rules: list[_Rule] = []
        self.dropped: list[Message] = []  # requests whose reply was dropped on purpose
        self.peak_in_flight: dict[int, int] = {}  # per node: most forward requests pushed and not yet run

    # ---- fault injection ----------------------------------------------------------------------
    def node_id(self, partition: int) -> int:
        return list(self.nodes)[partition]

    def drop_replies(self, match: Match, times: int = 1) -> None:
        """The next ``times`` requests ``match`` accepts are run, and their replies never arrive."""
        self._rules.append(_Rule(match, times, "drop"))

    def fail_replies(self, match: Match, times: int = 1) -> None:
        """The next ``times`` requests ``match`` accepts are answered with an error reply."""
        self._rules.append(_Rule(match, times, "error"))

    def delay(self, partition: int, seconds: float) -> None:
        """Device ``partition``'s replies land ``seconds`` of wall time after it handled the request."""
        self.nodes[self.node_id(partition)].delay_s = seconds

    def kill(self, partition: int, after: int = 0, silent: bool = False) -> None:
        """Device ``partition`` dies after handling ``after`` more messages; then it leaves the grid."""
        node = self.nodes[self.node_id(partition)]
        node.dies_after, node.silent = after, silent
        if after == 0:
            node.alive = False

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
        return [n for n, node in self.nodes.items() if node.alive]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        with self._lock:
            for msg in messages:
                if msg.metadata.dst_node_id not in self.nodes:
                    continue  # Flower refuses a message for an unknown node: no id comes back
                msg.metadata.__dict__["_message_id"] = str(uuid4())
                msg.metadata.__dict__["_run_id"] = self._run.run_id
                msg.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                self._queued[msg.metadata.message_id] = msg
                ids.append(msg.metadata.message_id)
            self._count_in_flight()
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        wanted = list(message_ids)
        with self._lock:
            for mid in wanted:
                if mid in self._queued:
                    self._deliver(self._queued.pop(mid))
            now = time.monotonic()
            out = []
            for mid in wanted:
                if mid in self._ready and self._ready[mid][0] <= now:
                    out.append(self._ready.pop(mid)[1])
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        ids = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else float("inf"))
        out: list[Message] = []
        while ids and time.monotonic() < end:
            replies = list(self.pull_messages(ids))
            out += replies
            ids -= {r.metadata.reply_to_message_id for r in replies}
            if ids:
                time.sleep(0.005)
        return out

    # ---- the node side ---------------------------------------------------------------------------
    def _count_in_flight(self) -> None:
        waiting: dict[int, int] = {}
        for msg in self._queued.values():
            if msg.metadata.message_type == "train.forward":
                waiting[msg.metadata.dst_node_id] = waiting.get(msg.metadata.dst_node_id, 0) + 1
        for node_id, count in waiting.items():
            self.peak_in_flight[node_id] = max(self.peak_in_flight.get(node_id, 0), count)

    def _deliver(self, request: Message) -> None:
        node = self.nodes[request.metadata.dst_node_id]
        rule = next((r for r in self._rules if r.times > 0 and r.match(request)), None)
        if not node.alive:
            if not node.silent:
                self._land(
                    request,
                    node,
                    Message(Error(ErrorCode.NODE_UNAVAILABLE, "node unavailable"), reply_to=request),
                    delay=False,
                )
            return
        received = over_the_wire(request)
        node.handled.append(received.metadata.message_type)
        try:
            reply = node.app(received, node.context)
        except Exception as err:  # noqa: BLE001 - as Flower does: the exception becomes an error reply
            reply = Message(
                Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(err).__name__}: {err}"), reply_to=received
            )
        if node.dies_after is not None:
            node.dies_after -= 1
            if node.dies_after < 0:  # it died while handling this one: no reply leaves it
                node.alive = False
                return
            if node.dies_after == 0:
                node.alive = False
        if rule is not None:
            rule.times -= 1
            if rule.action == "drop":
                self.dropped.append(request)
                return
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "injected failure"), reply_to=received)
        self._land(request, node, reply)

    def _land(self, request: Message, node: Node, reply: Message, delay: bool = True) -> None:
        reply.metadata.__dict__["_message_id"] = str(uuid4())
        landed_at = time.monotonic() + (node.delay_s if delay else 0.0)
        self._ready[request.metadata.message_id] = (landed_at, over_the_wire(reply))


def run_app(
    tmp_path: Path,
    devices: int,
    run_config: Mapping[str, Any],
    *,
    declared: Mapping[str, Any],
    server_app: Callable[[Grid, Context], None],
    client_app: ClientApp | None = None,
    node_configs: list[dict[str, Any]] | None = None,
    apps: Mapping[int, ClientApp] | None = None,
    faults: Callable[[InProcessGrid], None] | None = None,
) -> tuple[dict[str, Any], InProcessGrid]:
    """Run ``server_app`` over ``devices`` in-process nodes running ``client_app``; returns (summary, grid).

    The run config is the app's ``declared`` one with ``run_config`` over it (as ``flwr run . -c``
    would have it); the run folder, where the ServerApp must write ``summary.json``, is
    ``tmp_path / "run"`` unless ``run-dir`` is given.
    """
    import json

    config = {**declared, "run-dir": str(tmp_path / "run"), **run_config}
    grid = InProcessGrid(config, node_configs or [{} for _ in range(devices)], apps, client_app=client_app)
    if faults is not None:
        faults(grid)
    context = Context(
        run_id=grid.run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=config
    )
    server_app(grid, context)
    return json.loads((Path(config["run-dir"]) / "summary.json").read_text()), grid


def run_fleet(
    tmp_path: Path,
    devices: int,
    run_config: Mapping[str, Any],
    *,
    node_configs: list[dict[str, Any]] | None = None,
    apps: Mapping[int, ClientApp] | None = None,
    faults: Callable[[InProcessGrid], None] | None = None,
) -> tuple[dict[str, Any], InProcessGrid]:
    """Run the side-tuning ServerApp over ``devices`` in-process devices; returns (summary, grid).

    The run config is pyproject's declared one with ``run_config`` over it (as ``flwr run . -c``
    would have it); the run folder is ``tmp_path / "run"`` unless ``run-dir`` is given.
    """
    from mobiflower.strategies.server_app import app as server_app

    # one torch thread in cached rounds too: the test process shares its cores with the devices it hosts
    declared = {**declared_run_config(), "cache-threads": 1}
    return run_app(
        tmp_path,
        devices,
        run_config,
        declared=declared,
        server_app=server_app,
        node_configs=node_configs,
        apps=apps,
        faults=faults,
    )


def _component(ref: str) -> Any:
    """``package.module:attribute``, the object it names (what ``flwr run`` loads)."""
    module, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module), attribute)


def run_simulation_in_process(
    app_dir: Path, run_config: Mapping[str, Any], *, num_supernodes: int, scratch: Path, **_: Any
) -> Any:
    """A stand-in for ``simulations.flower_run.run_simulation`` (``flwr run`` on the simulation engine):
    the components the app folder names, resolved as Flower resolves them, over ``num_supernodes``
    in-process nodes; the folder's declared config with ``run_config`` over it, whose keys must be
    declared. Returns a completed ``FlowerRunResult``; the ServerApp wrote its summary in ``run-dir``.
    For any app a runner starts through ``run_simulation`` (monkeypatch it where the runner looks it up)."""
    from mobiflower.simulations.flower_config import check_run_config
    from mobiflower.simulations.flower_run import COMPLETED, FlowerRunResult

    check_run_config(app_dir, run_config)
    app = tomllib.loads((Path(app_dir) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    server_app, client_app = (_component(app["components"][kind]) for kind in ("serverapp", "clientapp"))
    t0 = time.perf_counter()
    _, grid = run_app(
        Path(scratch),
        num_supernodes,
        run_config,
        declared=app["config"],
        server_app=server_app,
        client_app=client_app,
    )
    return FlowerRunResult(
        run_id=grid.run.run_id, status=COMPLETED, ok=True, output="", wall_s=time.perf_counter() - t0
    )
