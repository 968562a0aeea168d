"""The slowest and largest refusals of hostile frames: time and extra memory of each, at a run's limits.

Each case is the worst of its kind that the limits still let through to be read: header content at
every bound, the longest header a run allows filled with what costs most to build, a full-size payload
whose checksum or last scale is bad, a frame that passes every decode check and is refused for its
targets. Each is offered to a live :class:`~mobiflower.platform.intake.FrameIntake` (a side network
of the run's shape) and must be refused; its time is the fastest of ``--repeat`` offers (tracing off)
and its extra memory the peak tracemalloc sees above the start of one more offer. The same header
cases are also decoded under the default :class:`FrameLimits` (sized for any frame: what a server
that did not size its limits to its run would face).

    mobiflower bench hostile --out runs/bench_hostile.json
"""

from __future__ import annotations

import dataclasses
import struct
import time
import tracemalloc
import zlib
from typing import Any, Callable

import msgpack
import numpy as np
import torch

from mobiflower.platform.codec import quantize
from mobiflower.platform.frames import Frame, FrameError, FrameLimits, decode_frame, encode_frame
from mobiflower.platform.intake import SEQUENCE_TOKENS, FrameIntake, run_limits
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig
from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
from mobiflower.platform.trainer import TrainConfig

FP = "bench-d576-L30"


def _frame(config: SideNetworkConfig, samples: int, tokens: int) -> Frame:
    counts = [tokens] * samples
    rows = sum(counts)
    acts = [quantize(torch.randn(rows, config.hidden_size), config.bits, 32, "hadamard", i) for i in config.layers]
    return Frame(
        fingerprint=FP,
        layers=list(config.layers),
        token_policy=config.token_policy,
        sample_ids=list(range(samples)),
        token_counts=counts,
        seq_lengths=counts,
        targets={"kind": "class", "values": [i % 2 for i in range(samples)], "num_classes": 2},
        activations=acts,
        meta={"split": "train", "offset": 0},
    )


def _split(blob: bytes) -> tuple[dict, bytes]:
    (hlen,) = struct.unpack_from("<I", blob, 4)
    return msgpack.unpackb(blob[8 : 8 + hlen], raw=False), blob[8 + hlen : -4]


def _join(header: dict | None, payload: bytes, raw: bytes | None = None) -> bytes:
    hdr = raw if raw is not None else msgpack.packb(header, use_bin_type=True)
    body = b"MBFL" + struct.pack("<I", len(hdr)) + hdr + payload
    return body + struct.pack("<I", zlib.crc32(body))


def _raw_map(pairs: list[tuple[Any, Any]]) -> bytes:
    return b"\xde" + struct.pack(">H", len(pairs)) + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in pairs)


def _values_header(header: dict, element: bytes, n: int) -> bytes:
    """``header`` with targets.values replaced by ``n`` copies of one raw msgpack ``element``."""
    pairs = [(k, v) for k, v in header.items() if k != "targets"]
    values = b"\xdd" + n.to_bytes(4, "big") + element * n
    targets = b"\x82" + msgpack.packb("kind") + msgpack.packb("tokens") + msgpack.packb("values") + values
    return (
        _raw_map(pairs)[:1]
        + struct.pack(">H", len(pairs) + 1)
        + _raw_map(pairs)[3:]
        + msgpack.packb("targets")
        + targets
    )


def cases(config: SideNetworkConfig, limits: FrameLimits, samples: int) -> dict[str, bytes]:
    """The hostile frames: each the costliest of its kind within ``limits``."""
    per_sample = limits.max_tokens // samples
    full = encode_frame(_frame(config, samples, per_sample))  # the largest frame the run allows
    small = encode_frame(_frame(config, samples, 4))
    h, p = _split(small)
    n = limits.max_tokens
    out: dict[str, bytes] = {}
    out["targets.values: max entries, 2-char strings"] = _join(None, p, _values_header(h, b"\xa2ab", n))
    out["targets.values: max entries, uint16, wrong count"] = _join(None, p, _values_header(h, b"\xcd\x03\xe8", n))
    out["targets.values: max entries of empty arrays"] = _join(None, p, _values_header(h, b"\x90", n))
    budget = limits.max_meta_bytes
    out["meta: byte budget of empty arrays + 1"] = _join(
        {**h, "meta": {f"k{i}": [[]] * (budget // 64 - 3) for i in range(64)}}, p
    )
    out["meta: byte budget of 1-char strings"] = _join({**h, "meta": {f"k{i}": ["a"] * 255 for i in range(64)}}, p)
    out["meta: deep at the budget"] = _join({**h, "meta": {f"k{i}": [[[[0]]]] * 60 for i in range(64)}}, p)
    out["targets: 10,000 extra keys"] = _join(
        {**h, "targets": {**h["targets"], **{f"k{i}": i for i in range(10_000)}}}, p
    )
    pairs = list(h.items())
    out["key twice, last of the header"] = _join(None, p, _raw_map([*pairs, ("tensors", h["tensors"])]))
    fh, fp = _split(full)
    out["full payload, CRC wrong"] = full[:-1] + bytes([full[-1] ^ 1])
    nan = bytearray(fp)
    off, length = fh["tensors"]["scales"][-1]
    nan[off + length - 2 : off + length] = np.array([np.nan], dtype="<f2").tobytes()
    out["full payload, NaN in the last scale"] = _join(fh, bytes(nan))
    out["full frame, token targets for a classifier"] = _join(
        {**fh, "targets": {"kind": "tokens", "values": [1000] * sum(fh["token_counts"])}}, fp
    )
    out["full frame, wrong fingerprint (1,024 chars)"] = _join({**fh, "fingerprint": "x" * 1024}, fp)
    out["16-bit frame over the byte limit"] = encode_frame(
        dataclasses.replace(
            _frame(dataclasses.replace(config, bits=16), samples, per_sample),
            activations=[
                quantize(torch.randn(limits.max_tokens, config.hidden_size), 16, 32, "none", 0) for _ in config.layers
            ],
        )
    )
    return out


def _measure(offer: Callable[[], Any], repeat: int) -> tuple[float, float, Any]:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        result = offer()
        best = min(best, time.perf_counter() - t)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    offer()
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return best * 1e3, peak / 2**20, result


def run(
    samples: int = 64, hidden: int = 576, bits: int = 4, repeat: int = 3, default_limits: bool = True
) -> dict[str, Any]:
    torch.manual_seed(0)
    config = SideNetworkConfig(
        hidden_size=hidden,
        layers=[14],
        fingerprint=FP,
        family="ladder",
        reduction=8,
        dropout=0.0,
        bits=bits,
        token_policy="nonpad",
    )
    limits = run_limits(config, samples)
    store = SideNetworkStore(
        StoreConfig("shared"),
        lambda: build_side_network(config, {"final_norm.weight": torch.ones(hidden)}),
        TrainConfig(epochs=1, batch_size=16),
        {"device-0": samples},
        chunk_size=samples,
    )
    intake = FrameIntake(store, config, limits)
    before = store.state_digest()
    rows = []
    for name, blob in cases(config, limits, samples).items():
        ms, mb, result = _measure(lambda: intake.offer("device-0", blob), repeat)
        assert not result.accepted, name
        rows.append(
            {"case": name, "bytes": len(blob), "ms": ms, "extra_mb": mb, "field": result.field, "reason": result.reason}
        )
    assert store.state_digest() == before
    report: dict[str, Any] = {
        "limits": dataclasses.asdict(limits),
        "header_cap_bytes": limits.max_header_bytes,
        "sequence_tokens": SEQUENCE_TOKENS,
        "run": rows,
    }
    if default_limits:  # what the same hostile header content costs when a server keeps FrameLimits()
        wide = FrameLimits()
        h, p = _split(encode_frame(_frame(config, samples, 4)))
        n = wide.max_tokens
        heavy = {
            "targets.values: max entries, 2-char strings": _join(None, p, _values_header(h, b"\xa2ab", n)),
            "targets.values: max entries, uint16": _join(None, p, _values_header(h, b"\xcd\x03\xe8", n)),
        }
        report["default_limits"] = []
        for name, blob in heavy.items():

            def decode() -> str:
                try:
                    decode_frame(blob, limits=wide)
                except FrameError as err:
                    return err.field
                return "accepted"

            ms, mb, field = _measure(decode, 1)
            report["default_limits"].append(
                {"case": name, "bytes": len(blob), "ms": ms, "extra_mb": mb, "field": field}
            )
    return report


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'case':<48} {'MB in':>7} {'ms':>8} {'extra MB':>9}  refused as"]
    for r in rows:
        lines.append(
            f"{r['case']:<48} {r['bytes'] / 2**20:>7.2f} {r['ms']:>8.1f} {r['extra_mb']:>9.2f}  "
            f"{r.get('reason', '')} ({r['field']})"
        )
    return "\n".join(lines)


def format_report(report: dict[str, Any], samples: int, hidden: int, bits: int) -> str:
    """The run limits, one row per refused case, the slowest and largest refusal, and the same header
    cases under the default :class:`FrameLimits` when they were measured."""
    lines = [
        f"run limits: {samples} samples x {SEQUENCE_TOKENS} tokens, width {hidden}, {bits} bits; "
        f"header cap {report['header_cap_bytes'] / 2**20:.2f} MB, "
        f"frame cap {report['limits']['max_bytes'] / 2**20:.1f} MB",
        _table(report["run"]),
    ]
    slow = max(report["run"], key=lambda r: r["ms"])
    large = max(report["run"], key=lambda r: r["extra_mb"])
    lines.append(
        f"slowest refusal: {slow['case']} {slow['ms']:.1f} ms; largest: {large['case']} {large['extra_mb']:.2f} MB"
    )
    if "default_limits" in report:
        lines += [
            "",
            "the same header content under the default FrameLimits() (not a run's):",
            _table(report["default_limits"]),
        ]
    return "\n".join(lines)
