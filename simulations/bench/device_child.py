"""One ``mobiflower bench device`` method, measured in this fresh process.

The parent (:mod:`mobiflower.simulations.bench.device`) starts one child per method,
``python -m mobiflower.simulations.bench.device_child SPEC RESULT LAUNCHED``, so the peak RSS the
child reports (``VmHWM``) is that method's alone. The child caps its own address space first
(:mod:`mobiflower.simulations.bench.memory_cap`); a failed allocation is written as an
*out of memory* result, anything else raises.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mobiflower.platform.tasks import BUNDLED_TASK
from mobiflower.simulations.bench.device_spec import (
    DEVICE_KINDS,
    LORA_SETTINGS,
    LR,
    MAX_LENGTH,
    METHODS,
    TAIL_CUT,
    WIRE_BITS,
    WIRE_POLICIES,
)

_STAGE = {"now": "start"}


def _child_main(spec_path: str, result_path: str, launched: str | None = None) -> None:
    from mobiflower.simulations.bench.memory_cap import apply_address_space_cap, is_out_of_memory

    apply_address_space_cap()  # the parent's cap ($MOBIFLOWER_MEMORY_CAP_MB), before anything large
    spec = json.loads(Path(spec_path).read_text())
    try:
        if spec["method"] == "prepare":
            result = _prepare(spec)
        else:
            result = _measure(spec, float(launched) if launched else time.time())
    except Exception as err:  # noqa: BLE001 - a failed allocation is this method's result; anything else is a bug
        if not is_out_of_memory(err):
            raise
        import gc

        gc.collect()
        result = {
            "out_of_memory": True,
            "stage": _STAGE["now"],
            "peak_rss_mb": _peak_rss_mb(),
            "reason": f"{type(err).__name__}: {str(err).strip().splitlines()[-1][:240]}",
        }
    Path(result_path).write_text(json.dumps(result))


def _peak_rss_mb() -> float:
    """This process's own peak (``VmHWM``: ``ru_maxrss`` would start at the parent's; see
    :func:`mobiflower.simulations.bench.precision_child.peak_rss_mb`)."""
    from mobiflower.simulations.bench.precision_child import peak_rss_mb as own_peak

    return own_peak()


def _prepare(spec: dict) -> dict:
    """Build (once) the prepared, memory-mapped copy at ``spec['precision']``, in this process."""
    from mobiflower.platform.prepared_weights import WEIGHTS_FILE, ensure_prepared

    _STAGE["now"] = "prepare"
    t0 = time.perf_counter()
    folder = ensure_prepared(spec["model"], spec["precision"], log=lambda m: print(m, file=sys.stderr, flush=True))
    return {
        "folder": str(folder),
        "prepare_s": time.perf_counter() - t0,
        "peak_rss_mb": _peak_rss_mb(),
        "weights_file_mb": (folder / WEIGHTS_FILE).stat().st_size / 2**20,
    }


def _import_device_code(spec: dict) -> str:
    """Import what the device's forward runs (the lean forward imports no transformers); which one."""
    from mobiflower.platform.device_forward import forward_implementation
    from mobiflower.platform.prepared_weights import prepared_dir

    if spec.get("precision") is None:  # the checkpoint through transformers, as before
        import transformers  # noqa: F401

        from mobiflower.platform.hf_model import resolve_model

        _import_model_code(resolve_model(spec["model"]), spec["method"])
        return "transformers"
    forward = forward_implementation(prepared_dir(spec["model"], spec["precision"]))
    if forward == "transformers":
        import transformers  # noqa: F401

        _import_model_code(str(prepared_dir(spec["model"], spec["precision"])), spec["method"])
    import mobiflower.clients.runtime  # noqa: F401
    import mobiflower.platform.lean_llama  # noqa: F401
    import mobiflower.platform.lean_opt  # noqa: F401

    return forward


def _loadavg() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


_loadavg_at_start = _loadavg()


@dataclass
class _Loaded:
    """A method ready to time: its step on one batch, the runtime's RSS before the model was loaded, the
    load time, what the wire sizes need (the device's runtime and backbone), and the token count of each
    sample as the step forwards it (causal-LM mode)."""

    step: Callable[[list], None]
    baseline_mb: float
    load_s: float
    runtime: Any = None
    backbone: Any = None
    token_counts: Callable[[list], list[int]] | None = None


def _task(spec: dict):
    """The causal-LM task at the spec's length, or None: the classification mode (the bundled job)."""
    from mobiflower.platform.tasks import CausalLMTask

    return CausalLMTask(int(spec["max_length"])) if spec.get("task") == "causal-lm" else None


def _measure(spec: dict, launched: float) -> dict:
    """Import, load, time the method's steps (one warm-up batch first) and record its cost."""
    import torch

    from mobiflower.platform.data import Example

    method = spec["method"]
    if method not in METHODS:
        raise ValueError(f"unknown bench method {method!r}: choose one of {', '.join(METHODS)}")
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    examples = [Example(int(i), str(text), int(label)) for i, text, label in spec["samples"]]
    bs = int(spec["batch_size"])
    batches = [examples[i : i + bs] for i in range(0, len(examples), bs)]
    extra: dict[str, Any] = {}
    _STAGE["now"] = "imports"
    path = _import_method_code(spec, extra)
    imported = time.time()
    _STAGE["now"] = "load"
    if method in DEVICE_KINDS:
        loaded = _load_device(spec, examples, extra)
    elif method == "inference_forward":
        loaded = _load_inference(spec, path)
    else:
        loaded = _load_training(spec, path, extra)
    ready = time.time()
    _STAGE["now"] = "step"
    timing = _time_steps(loaded.step, batches)
    result = {
        "peak_rss_mb": _peak_rss_mb(),
        **_cost_record(spec, loaded, timing),
        # start-up: process launch to ready for the first batch (imports, load; a device also tokenizes)
        "startup_s": ready - launched,
        "imports_s": imported - launched,
        "first_batch_s": timing["first_s"],
        **extra,
    }
    result["machine"] = {
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "threads": torch.get_num_threads(),
    }
    _STAGE["now"] = "wire"
    result.update(_wire_results(spec, loaded, examples[: int(spec.get("wire_samples") or len(examples))], bs))
    if loaded.token_counts is not None:  # causal-LM: the tokens each sample was forwarded at
        counts = loaded.token_counts(examples)
        result["tokens_per_sample"] = sum(counts) / len(counts)
        result["min_tokens_per_sample"] = min(counts)
    return result


def _import_method_code(spec: dict, extra: dict) -> str | None:
    """Import the method's code before its baseline RSS is read (code is runtime: the baseline and the
    load cover the weights only); the checkpoint's folder for the transformers methods."""
    method = spec["method"]
    if method in DEVICE_KINDS:
        extra["forward"] = _import_device_code(spec)
        return None
    import transformers  # noqa: F401  (part of the runtime every method pays for)

    from mobiflower.platform.hf_model import resolve_model
    from mobiflower.platform.hf_quiet import quiet_transformers

    quiet_transformers()
    path = resolve_model(spec["model"])
    _import_model_code(path, method, causal_lm=_task(spec) is not None)
    return path


def _load_device(spec: dict, examples: list, extra: dict) -> _Loaded:
    """The MobiFlower device (tapped layers) or the tail device (blocks below the cut, every real token)."""
    import gc

    from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
    from mobiflower.platform.backbone import Backbone
    from mobiflower.platform.frames import encode_frame
    from mobiflower.platform.process_memory import current_rss_mb

    tail, task = spec["method"] == "tail_device", _task(spec)
    precision = spec.get("precision")
    gc.collect()
    baseline = current_rss_mb()
    t0 = time.perf_counter()
    if tail:
        from mobiflower.platform.pretrained_tail import resolve_cut

        cut = extra["tail_cut"] = resolve_cut(spec["model"], int(spec.get("tail_cut", TAIL_CUT)))
    backbone = Backbone.load(
        spec["model"],
        num_taps=int(spec["num_taps"]),
        layers=[cut - 1] if tail else None,
        weights=precision,
        max_length=int(spec.get("max_length") or MAX_LENGTH),
    )
    # classification: the tail at 8 bits (as measured since issue 12); causal-LM: the spec's (4, the tail's default)
    bits = int(spec["bits"]) if task is not None or not tail else 8
    policy = "nonpad" if tail else spec["token_policy"]
    runtime = DeviceRuntime(
        backbone, ForwardConfig(bits=bits, token_policy=policy, batch_size=int(spec["batch_size"])), task=task
    )
    if precision is not None:  # as a fleet device: tokenize its data, drop the tokenizer, then forward
        runtime.pretokenize(examples)
        extra["tokens_per_sample"] = sum(len(e.ids) for e in runtime.encode_samples(examples)) / len(examples)
    load_s = time.perf_counter() - t0

    def step(batch: list) -> None:
        frame, _stats = runtime.make_frame(batch)
        encode_frame(frame)

    counts = None if task is None else (lambda xs: [len(e.ids) for e in runtime.encode_samples(xs)])
    return _Loaded(step, baseline, load_s, runtime, backbone, counts)


def _load_inference(spec: dict, path: str) -> _Loaded:
    """A plain model forward with logits under inference mode: the bundled job's prompt, or the
    causal-LM sample's token ids (the same ids the tail device forwards)."""
    import gc

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from mobiflower.platform.classifier import collate, encode, encode_examples, load_tokenizer
    from mobiflower.platform.hf_model import DECODER_TYPES
    from mobiflower.platform.process_memory import current_rss_mb

    task, max_length = _task(spec), int(spec.get("max_length") or MAX_LENGTH)
    gc.collect()
    baseline = current_rss_mb()
    t0 = time.perf_counter()
    auto = AutoModelForCausalLM if AutoConfig.from_pretrained(path).model_type in DECODER_TYPES else AutoModel
    model = auto.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(path)
    load_s = time.perf_counter() - t0

    def step(batch: list) -> None:
        if task is None:
            enc = encode(tokenizer, [BUNDLED_TASK.render(e.text) for e in batch], max_length)
        else:
            tensors = collate(encode_examples(tokenizer, task, batch), batch, task, tokenizer.pad_token_id)
            enc = {"input_ids": tensors["input_ids"], "attention_mask": tensors["attention_mask"]}
        with torch.inference_mode():
            model(**enc, use_cache=False)  # eager: the logits are materialized

    return _Loaded(step, baseline, load_s, token_counts=_token_counter(tokenizer, task))


def _load_training(spec: dict, path: str, extra: dict) -> _Loaded:
    """An on-device training step: LoRA or full fine-tuning, on the bundled job or the causal-LM task."""
    import gc

    import peft  # noqa: F401

    from mobiflower.platform.classifier import build_classifier, load_tokenizer, make_optimizer, train_step
    from mobiflower.platform.process_memory import current_rss_mb

    method, task = spec["method"], _task(spec)
    kind = "lora" if method == "lora_step" else "full"
    rank = int(spec.get("lora_rank") or LORA_SETTINGS["r"])
    max_length = int(spec.get("max_length") or MAX_LENGTH)
    gc.collect()
    baseline = current_rss_mb()
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(path)
    lora = {"lora_r": rank, "lora_alpha": 2 * rank, "lora_dropout": LORA_SETTINGS["dropout"]}
    model = build_classifier(path, kind, tokenizer, seed=int(spec["seed"]), **lora, **({"task": task} if task else {}))
    optimizer = make_optimizer(model, kind, LR[method])
    params = [p for p in model.parameters() if p.requires_grad]
    load_s = time.perf_counter() - t0
    extra["trainable_parameters"] = sum(p.numel() for p in params)
    if kind == "lora":
        extra["lora_rank"] = rank

    def step(batch: list) -> None:
        train_step(model, tokenizer, batch, params, optimizer, max_length=max_length, task=task)

    return _Loaded(step, baseline, load_s, token_counts=_token_counter(tokenizer, task))


def _token_counter(tokenizer, task) -> Callable[[list], list[int]] | None:
    if task is None:
        return None
    from mobiflower.platform.classifier import encode_examples

    return lambda xs: [len(e.ids) for e in encode_examples(tokenizer, task, xs)]


def _time_steps(step: Callable[[list], None], batches: list) -> dict:
    """One warm-up batch (allocator, lazy init, optimizer state), then every other batch timed."""
    import torch

    timed = batches[1:] if len(batches) > 1 else batches
    first_s = None
    if len(batches) > 1:
        t0 = time.perf_counter()
        step(batches[0])
        first_s = time.perf_counter() - t0
    t0, cpu0 = time.perf_counter(), time.process_time()
    for batch in timed:
        step(batch)
    elapsed = time.perf_counter() - t0
    return {
        "first_s": first_s,
        "elapsed": elapsed,
        "samples": sum(len(b) for b in timed),
        "cpu_share": (time.process_time() - cpu0) / (elapsed * torch.get_num_threads()),  # < 1: waits or sharing
    }


def _cost_record(spec: dict, loaded: _Loaded, timing: dict) -> dict:
    from mobiflower.platform.process_memory import rss_parts_mb

    return {
        "s_per_sample": timing["elapsed"] / timing["samples"],
        "baseline_rss_mb": loaded.baseline_mb,
        # where the memory is at the end: anonymous (tensors, heap) vs file-backed (mapped weights, code)
        "rss_end_parts_mb": rss_parts_mb(),
        # other work on the machine slows the timed steps: how busy it was (1-minute load average)
        "load_average": [_loadavg_at_start, _loadavg()],
        "model_load_s": loaded.load_s,
        "samples": timing["samples"],
        "precision": spec.get("precision"),
        "cpu_share": timing["cpu_share"],
    }


def _wire_results(spec: dict, loaded: _Loaded, examples: list, batch_size: int) -> dict:
    """The device's frame sizes: every (bits, policy) for the MobiFlower device; for the tail device the
    cut layer's every-real-token frames per bit-width (causal-LM frames carry the next-token targets)."""
    method = spec["method"]
    if method == "mobiflower_device" and spec.get("wire"):
        return _wire(loaded.runtime, loaded.backbone, examples, batch_size)
    if method != "tail_device" or not spec.get("tail_wire", True):
        return {}
    from mobiflower.clients.runtime import ForwardConfig
    from mobiflower.platform.frames import encode_frame

    rows = []
    for bits in (8, 4, 2):
        config = ForwardConfig(bits=bits, token_policy="nonpad", batch_size=batch_size)
        frame, stats = loaded.runtime.make_frame(examples, config=config)
        rows.append(
            {
                "bits": bits,
                "bytes_per_sample": len(encode_frame(frame)) / len(examples),
                "tokens_per_sample": stats.tokens_sent / len(examples),
            }
        )
    return {"tail_wire": rows}


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _import_model_code(path: str, method: str, causal_lm: bool = False) -> None:
    """Import the architecture's modeling module (transformers imports it lazily on first load)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from mobiflower.platform.hf_model import DECODER_TYPES

    config = AutoConfig.from_pretrained(path)
    if method in ("lora_step", "full_step") and not causal_lm:
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM if config.model_type in DECODER_TYPES else AutoModel
    try:
        auto._model_mapping[type(config)]  # noqa: B018  (the lazy mapping imports the module)
    except Exception:  # an unusual architecture: it is imported during the load instead
        pass


def _wire(runtime, backbone, examples: Sequence, batch_size: int) -> dict:
    """Encoded bytes per sample of one frame of all ``examples`` at every (bits, policy)."""
    from mobiflower.clients.runtime import ForwardConfig
    from mobiflower.platform.frames import encode_frame

    rows = []
    fp32 = None
    n = len(examples)
    for policy in WIRE_POLICIES:
        for bits in WIRE_BITS:
            frame, stats = runtime.make_frame(
                examples, config=ForwardConfig(bits=bits, token_policy=policy, batch_size=batch_size)
            )
            data = encode_frame(frame)
            rows.append(
                {
                    "bits": bits,
                    "token_policy": policy,
                    "bytes_per_sample": len(data) / n,
                    "payload_bytes_per_sample": frame.nbytes() / n,
                    "tokens_per_sample": stats.tokens_sent / n,
                }
            )
            if policy == "all" and fp32 is None:
                # fp32 states of every (padded) token of every tapped layer: what a naive uplink would send
                fp32 = 4 * backbone.hidden_size * sum(frame.token_counts) * len(frame.layers) / n
    rows.sort(key=lambda r: (-r["bits"], WIRE_POLICIES.index(r["token_policy"])))
    return {
        "wire": rows,
        "fp32_all_token_bytes_per_sample": fp32,
        "backbone": {
            "fingerprint": backbone.fingerprint,
            "hidden_size": backbone.hidden_size,
            "num_layers": backbone.num_layers,
            "layers": list(backbone.layers),
        },
    }


if __name__ == "__main__":
    _child_main(*sys.argv[1:4])
