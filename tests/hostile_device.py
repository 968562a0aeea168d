"""Test only: the fleet's ClientApp with its last device turned hostile (``clientapp = "hostile_device:app"``).

Every other device is the stock one. The last partition profiles itself honestly (so it takes part in
the run) and then answers every request with a hostile reply, a different kind each time: frames
whose header content is beyond its bounds, that give a key twice, that carry targets the head cannot
train on, that replay an earlier frame, truncated or garbage bytes, and replies whose metrics lie
(wrong sample counts, NaN times), hold smuggled arrays, claim impossible accuracies or unreadable
delivery receipts. The server must refuse each alone and train the honest devices as if it were not
there. Loaded by the simulation from this folder (tests/ on PYTHONPATH), never by the product.
"""

from __future__ import annotations

import itertools
import math
import struct
import zlib

import msgpack
import numpy as np
from flwr.app import Array, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mobiflower.clients import client_app as stock
from mobiflower.platform import messages as m

# a lying reply is retried: the kinds between them are frames, so a retry meets a frame kind
FORWARD_KINDS = (
    "meta bomb",
    "samples lie",
    "key twice",
    "wrong targets",
    "nan busy",
    "replay",
    "truncated",
    "smuggled array",
    "garbage",
    "nested values",
    "deep meta",
    "many target keys",
)
_turn = itertools.count()
_forward_turn = itertools.count()  # per worker process: which kinds a run meets depends on how requests spread
_first_frame: list[bytes] = []


def _split(blob: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from("<I", blob, 4)
    return msgpack.unpackb(blob[8 : 8 + hlen], raw=False), blob[8 + hlen : -4]


def _join(header: dict | None, payload: bytes, raw: bytes | None = None) -> bytes:
    hdr = raw if raw is not None else msgpack.packb(header, use_bin_type=True)
    body = b"MBFL" + struct.pack("<I", len(hdr)) + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _raw_map(pairs: list[tuple]) -> bytes:
    return b"\xde" + struct.pack(">H", len(pairs)) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


def _hostile_frame(kind: str, blob: bytes) -> bytes:
    h, p = _split(blob)
    if kind == "meta bomb":
        h["meta"] = {f"k{i}": [[]] * 256 for i in range(64)}  # within every bound but the bytes
    elif kind == "key twice":
        return _join(None, p, _raw_map([*h.items(), ("fingerprint", "llama-other")]))
    elif kind == "wrong targets":
        h["targets"] = {"kind": "class", "values": [0] * len(h["sample_ids"]), "num_classes": 7}
    elif kind == "replay":
        return _first_frame[0] if _first_frame else blob[:-5]
    elif kind == "truncated":
        return blob[: len(blob) // 2]
    elif kind == "garbage":
        return np.random.default_rng(len(blob)).integers(0, 256, 512, dtype=np.uint8).tobytes()
    elif kind == "nested values":
        h["targets"]["values"] = [[v] for v in h["targets"]["values"]]
    elif kind == "deep meta":
        h["meta"] = {"x": [[[[["deep"]]]]]}
    elif kind == "many target keys":
        h["targets"].update({f"k{i}": i for i in range(300)})
    return _join(h, p)


def _forward(reply: Message, kind: str) -> RecordDict:
    blob = m.frame_bytes(reply.content[m.FRAME_KEY])
    stats = dict(reply.content[m.STATS_KEY])
    if kind == "samples lie":
        stats["samples"] = int(stats["samples"]) * 1000
    elif kind == "nan busy":
        stats["busy-s"] = math.nan
    record = m.frame_record(blob if kind in ("samples lie", "nan busy") else _hostile_frame(kind, blob))
    if kind == "smuggled array":
        record["more"] = Array(np.zeros(1 << 16, np.uint8))
    return RecordDict({m.FRAME_KEY: record, m.STATS_KEY: MetricRecord(stats)})


def hostile(msg: Message, context: Context, call_next) -> Message:
    """Mod: the last partition's replies (after its profile) are hostile."""
    reply = call_next(msg, context)
    last = int(context.node_config["partition-id"]) == int(context.node_config["num-partitions"]) - 1
    if not last or reply.has_error() or msg.metadata.message_type == m.PROFILE:
        return reply
    turn = next(_turn)
    kind = msg.metadata.message_type
    if kind == m.FORWARD:
        if not _first_frame:  # the very first frame goes out honest (later ones replay it) and uses no kind
            _first_frame.append(m.frame_bytes(reply.content[m.FRAME_KEY]))
            return reply
        content = _forward(reply, FORWARD_KINDS[next(_forward_turn) % len(FORWARD_KINDS)])
    elif kind == m.EVALUATE:
        content = RecordDict({m.STATS_KEY: MetricRecord({"accuracy": [7.0, math.nan][turn % 2], "samples": -3})})
    elif kind == m.DELIVER:
        content = RecordDict({m.CONFIG_KEY: ConfigRecord({"digest": "f" * 5000, "path": 42})})
    else:
        return reply
    return Message(content, reply_to=msg)


app = ClientApp(mods=[hostile])
app.query("profile")(stock.profile)
app.train("forward")(stock.forward)
app.train("residual")(stock.residual)
app.train("deliver")(stock.deliver)
app.evaluate()(stock.evaluate)
