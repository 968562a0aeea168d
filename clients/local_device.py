"""The device half of ``mobiflower local``: a separate OS process that only forwards and sends.

It talks to the server over a ``multiprocessing`` pipe (no Flower yet): first a hello (backbone
fingerprint, tapped layers, and the frozen final norm the server's head needs), then one encoded
frame per chunk of its private samples, train chunks first, then validation chunks. Frames flow
one way; the device does not wait for the server while it forwards. At the end it receives the
trained side network, installs it, and scores its own test samples locally.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass

import torch

from mobiflower.clients.inference import load_local_model
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.data import task_samples


@dataclass(frozen=True)
class LocalDeviceConfig:
    model: str
    layers: tuple[int, ...] | None
    num_taps: int
    forward: ForwardConfig
    train_samples: int
    validation_samples: int
    test_samples: int
    chunk_size: int
    seed: int
    threads: int
    mobiflower_home: str | None = None
    weights: str | None = None  # None: the checkpoint as it is; else fp32/bf16/int8/int4 prepared copy


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_device(conn, config: LocalDeviceConfig) -> None:
    """Entry point of the device process (started with the ``spawn`` method)."""
    try:
        _run(conn, config)
    except BaseException as err:  # noqa: BLE001 - report any failure to the server, then exit
        conn.send({"type": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def _run(conn, config: LocalDeviceConfig) -> None:
    if config.mobiflower_home:
        os.environ["MOBIFLOWER_HOME"] = config.mobiflower_home
    torch.set_num_threads(config.threads)
    t0 = time.perf_counter()
    backbone = Backbone.load(config.model, layers=config.layers, num_taps=config.num_taps, weights=config.weights)
    load_s = time.perf_counter() - t0
    data = task_samples(config.train_samples, config.validation_samples, config.test_samples, config.seed)
    runtime = DeviceRuntime(backbone, config.forward)
    frozen = {k: v.numpy() for k, v in backbone.frozen_head_state(lm_head=False).items()}
    conn.send(
        {
            "type": "hello",
            "fingerprint": backbone.fingerprint,
            "layers": backbone.layers,
            "hidden_size": backbone.hidden_size,
            "is_decoder": backbone.is_decoder,
            "norm_eps": float(
                getattr(backbone.model.config, "rms_norm_eps", None)
                or getattr(backbone.model.config, "layer_norm_eps", None)
                or 1e-5
            ),
            "frozen": frozen,
            "load_s": load_s,
            "train": len(data.train),
            "validation": len(data.validation),
            "test": len(data.test),
            "rss_mb": _rss_mb(),
        }
    )
    chunk = config.chunk_size
    for split, examples in (("train", data.train), ("validation", data.validation)):
        for index, start in enumerate(range(0, len(examples), chunk)):
            frame, stats = runtime.make_frame(examples[start : start + chunk], meta={"split": split, "chunk": index})
            blob = runtime.encode(frame)
            conn.send({"type": "frame", "split": split, "stats": stats.as_dict(), "nbytes": len(blob)})
            conn.send_bytes(blob)
    conn.send({"type": "sent", "peak_rss_mb": _peak_rss_mb()})

    message = conn.recv()
    if message.get("type") != "deliver":
        return
    model = load_local_model(
        message["path"], backbone=backbone, match_training_precision=message.get("match_precision", True)
    )
    done = 0

    def progress(n: int) -> None:
        nonlocal done
        done += n
        conn.send({"type": "progress", "done": done, "total": len(data.test)})

    try:
        result = model.evaluate(data.test, batch_size=config.forward.batch_size, progress=progress)
    finally:
        model.close()
    # the task's metrics at the top level (`accuracy`), and the zero-shot accuracy the summary reports
    flat = {**result["metrics"], "zero_shot_accuracy": result["zero_shot"].get("accuracy", float("nan"))}
    conn.send({"type": "result", **result, **flat, "peak_rss_mb": _peak_rss_mb()})


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
