"""``mobiflower bench device``: what one device pays per sample, MobiFlower vs. on-device alternatives.

Four methods run the SAME batches (the first ``batches * batch_size`` training samples of
:func:`~mobiflower.platform.data.task_samples`, i.e. the first samples a side-tuning run with the
same seed trains on), each in its own fresh Python process (``sys.executable -m
mobiflower.simulations.bench_device --child ...``), so that the peak RSS a child reports
(``ru_maxrss``) is that method's alone:

* ``mobiflower_device``: :class:`Backbone` + :meth:`DeviceRuntime.make_frame` per batch (forward
  under inference mode, stopping after the last tapped block, no logits; quantize and pack) and
  :func:`encode_frame` - what a MobiFlower device does.
* ``tail_device``: the same device in the pretrained-tail family: it forwards blocks ``0..cut-1`` only
  and sends the cut block's output for every real token (``nonpad``, 8-bit).
* ``inference_forward``: a plain ``AutoModelForCausalLM`` forward with logits under inference mode
  (what a user pays for inference only).
* ``lora_step``: PEFT LoRA (SEQ_CLS, r 8, alpha 16, q/v) forward + backward + AdamW step.
* ``full_step``: full fine-tuning forward + backward + AdamW step.

Each child also records ``baseline_rss_mb`` (its RSS right before the model is loaded: the Python,
PyTorch and transformers runtime) and ``model_load_s``. Seconds per sample time every batch after
one warm-up batch. Then, in the device child after its own measurements, one frame of all the
samples is built at each bit-width (16/8/4/2) and token policy (all/nonpad/last) and its encoded
size recorded, next to what fp32 states of all (padded) tokens of every tapped layer would weigh.

The acceptance thresholds of the benchmark are evaluated and reported as booleans, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from mobiflower.simulations.bench_common import (acceptance_lines, bars_with_values, bench_logger, fmt, ratio,
                                                  run_child, save_figure, write_outputs)

METHODS = ("mobiflower_device", "tail_device", "inference_forward", "lora_step", "full_step")
TAIL_CUT = 0  # the pretrained tail's default cut: half the blocks (strategies.config.SideTuningConfig.tail_cut)
WIRE_BITS = (16, 8, 4, 2)
WIRE_POLICIES = ("all", "nonpad", "last")
ACCEPTANCE = {
    # name: (ratio key, comparison, threshold)
    "device_rss_le_1.15x_inference": ("device_vs_inference_rss", "<=", 1.15),
    "device_rss_le_0.25x_full": ("device_vs_full_rss", "<=", 0.25),
    "device_rss_le_0.5x_lora": ("device_vs_lora_rss", "<=", 0.5),
    "device_s_le_1.2x_inference": ("device_vs_inference_s", "<=", 1.2),
    "lora_s_ge_2.5x_device": ("lora_vs_device_s", ">=", 2.5),
    "fp32_all_ge_100x_4bit_last": ("fp32_all_vs_4bit_last_bytes", ">=", 100.0),
    "tail_rss_le_1.0x_inference": ("tail_vs_inference_rss", "<=", 1.0),
    "tail_s_le_0.7x_inference": ("tail_vs_inference_s", "<=", 0.7),
}
LORA_SETTINGS = {"r": 8, "alpha": 16, "dropout": 0.05}
LR = {"lora_step": 5e-4, "full_step": 2e-5}


def _log(message: str, progress: bool) -> None:
    bench_logger("device", progress)(message)


def bench_samples(batches: int, batch_size: int, seed: int = 0) -> list:
    """The first ``batches * batch_size`` training samples (of at least the default 2000 drawn)."""
    from mobiflower.platform.data import task_samples

    n = batches * batch_size
    train = task_samples(max(2000, n), 2, 2, seed).train
    if len(train) < n:
        raise ValueError(f"only {len(train)} training samples exist, the bench needs {n}")
    return train[:n]


# ------------------------------------------------------------------------------------------
# parent


def run_device_bench(model: str = "smollm2-135m", batches: int = 6, batch_size: int = 16, bits: int = 8,
                     token_policy: str = "last", num_taps: int = 8, seed: int = 0, threads: int | None = None,
                     out: str | None = None, plot: str | None = None, progress: bool = True,
                     tail_cut: int = TAIL_CUT) -> dict:
    """Run all four methods in fresh processes, measure the wire sizes, and return the result JSON.

    Writes the JSON to ``out`` and a bar plot of peak RSS and seconds per sample to ``plot``
    (default: ``out`` with a ``.png`` suffix; no plot when neither is given).
    """
    from mobiflower.platform.codec import SUPPORTED_BITS
    from mobiflower.platform.frames import TOKEN_POLICIES

    if batches < 1 or batch_size < 1:
        raise ValueError(f"batches={batches} and batch_size={batch_size} must be at least 1")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits} is not supported: choose one of {SUPPORTED_BITS}")
    if token_policy not in TOKEN_POLICIES:
        raise ValueError(f"token_policy={token_policy!r} is unknown: choose one of {TOKEN_POLICIES}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    if num_taps < 1:
        raise ValueError(f"num_taps={num_taps} must be at least 1")

    samples = bench_samples(batches, batch_size, seed)
    config = {"model": model, "batches": batches, "batch_size": batch_size, "samples": len(samples), "bits": bits,
              "token_policy": token_policy, "num_taps": num_taps, "seed": seed, "threads": threads, "tail_cut": tail_cut,
              "timed_batches": max(1, batches - 1), "warmup_batches": 1 if batches > 1 else 0,
              "lora": dict(LORA_SETTINGS), "lr": dict(LR)}
    _log(f"{len(samples)} samples ({batches} batches of {batch_size}) of {model}, each method in a fresh process",
         progress)
    methods: dict[str, dict] = {}
    wire: list[dict] = []
    extra: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mobiflower-bench-") as tmp:
        for method in METHODS:
            spec = {"method": method, "model": model, "tail_cut": tail_cut, "batch_size": batch_size, "bits": bits,
                    "token_policy": token_policy, "num_taps": num_taps, "seed": seed, "threads": threads,
                    "wire": method == "mobiflower_device",
                    "samples": [[e.id, e.text, e.label] for e in samples]}
            t0 = time.perf_counter()
            result = run_child("mobiflower.simulations.bench_device", spec, Path(tmp), method)
            wire += result.pop("wire", [])
            if "tail_wire" in result:
                extra["tail_wire"] = result.pop("tail_wire")
            for key in ("fp32_all_token_bytes_per_sample", "machine", "backbone"):
                if key in result:
                    extra[key] = result.pop(key)
            methods[method] = result
            _log(f"{method}: peak RSS {result['peak_rss_mb']:.0f} MB (runtime {result['baseline_rss_mb']:.0f} MB), "
                 f"{result['s_per_sample'] * 1000:.1f} ms/sample, load {result['model_load_s']:.2f} s "
                 f"[{time.perf_counter() - t0:.1f} s]", progress)

    fp32 = extra.get("fp32_all_token_bytes_per_sample")
    result = {"config": config, "methods": methods, "wire": wire, "fp32_all_token_bytes_per_sample": fp32,
              "tail_wire": extra.get("tail_wire", [])}
    result["ratios"] = _ratios(methods, wire, fp32)
    result["acceptance"] = _acceptance(result["ratios"])
    machine = {"cpu_count": os.cpu_count(), **extra.get("machine", {})}
    machine["arch"] = os.uname().machine if hasattr(os, "uname") else sys.platform
    machine["python"] = ".".join(map(str, sys.version_info[:3]))
    result["machine"] = machine
    if "backbone" in extra:
        result["backbone"] = extra["backbone"]

    write_outputs(result, out, plot, plot_result, lambda msg: _log(msg, progress))
    return result


def _ratios(methods: dict, wire: list[dict], fp32: float | None) -> dict:
    def get(method: str, key: str) -> float | None:
        return methods.get(method, {}).get(key)

    dev_rss, dev_s = get("mobiflower_device", "peak_rss_mb"), get("mobiflower_device", "s_per_sample")
    last4 = next((w["bytes_per_sample"] for w in wire if w["bits"] == 4 and w["token_policy"] == "last"), None)
    return {
        "device_vs_inference_rss": ratio(dev_rss, get("inference_forward", "peak_rss_mb")),
        "device_vs_full_rss": ratio(dev_rss, get("full_step", "peak_rss_mb")),
        "device_vs_lora_rss": ratio(dev_rss, get("lora_step", "peak_rss_mb")),
        "device_vs_inference_s": ratio(dev_s, get("inference_forward", "s_per_sample")),
        "lora_vs_device_s": ratio(get("lora_step", "s_per_sample"), dev_s),
        "fp32_all_vs_4bit_last_bytes": ratio(fp32, last4),
        "tail_vs_inference_rss": ratio(get("tail_device", "peak_rss_mb"), get("inference_forward", "peak_rss_mb")),
        "tail_vs_inference_s": ratio(get("tail_device", "s_per_sample"), get("inference_forward", "s_per_sample")),
        "tail_vs_full_rss": ratio(get("tail_device", "peak_rss_mb"), get("full_step", "peak_rss_mb")),
        "lora_vs_tail_s": ratio(get("lora_step", "s_per_sample"), get("tail_device", "s_per_sample")),
    }


def _acceptance(ratios: dict) -> dict:
    verdict = {}
    for name, (key, op, threshold) in ACCEPTANCE.items():
        value = ratios.get(key)
        verdict[name] = None if value is None else bool(value <= threshold if op == "<=" else value >= threshold)
    return verdict


# ------------------------------------------------------------------------------------------
# child: one method in this fresh process


def _child_main(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = _measure(spec)
    Path(result_path).write_text(json.dumps(result))


def _measure(spec: dict) -> dict:
    import gc

    import torch
    import transformers  # noqa: F401  (part of the runtime every method pays for)

    from mobiflower.platform.assets import resolve_model
    from mobiflower.platform.data import Example
    from mobiflower.simulations.baselines import (build_classifier, current_rss_mb, encode, load_tokenizer,
                                                  make_optimizer, peak_rss_mb, quiet_transformers, train_step)

    method = spec["method"]
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    quiet_transformers()
    examples = [Example(int(i), str(text), int(label)) for i, text, label in spec["samples"]]
    bs = int(spec["batch_size"])
    batches = [examples[i:i + bs] for i in range(0, len(examples), bs)]
    path = resolve_model(spec["model"])
    extra: dict[str, Any] = {}
    _import_model_code(path, method)  # code is runtime: baseline_rss_mb and model_load_s cover the weights only

    if method in ("mobiflower_device", "tail_device"):
        from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
        from mobiflower.platform.backbone import Backbone
        from mobiflower.platform.frames import encode_frame

        tail = method == "tail_device"
        gc.collect()
        baseline = current_rss_mb()
        t0 = time.perf_counter()
        if tail:
            from mobiflower.platform.pretrained_tail import resolve_cut

            cut = extra["tail_cut"] = resolve_cut(spec["model"], int(spec.get("tail_cut", TAIL_CUT)))
        backbone = Backbone.load(spec["model"], num_taps=int(spec["num_taps"]), layers=[cut - 1] if tail else None)
        runtime = DeviceRuntime(backbone, ForwardConfig(bits=8 if tail else int(spec["bits"]),
                                                        token_policy="nonpad" if tail else spec["token_policy"],
                                                        batch_size=bs))
        load_s = time.perf_counter() - t0

        def step(batch: list) -> None:
            frame, _stats = runtime.make_frame(batch)
            encode_frame(frame)

    elif method == "inference_forward":
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        from mobiflower.platform.backbone import DECODER_TYPES

        gc.collect()
        baseline = current_rss_mb()
        t0 = time.perf_counter()
        auto = AutoModelForCausalLM if AutoConfig.from_pretrained(path).model_type in DECODER_TYPES else AutoModel
        model = auto.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = load_tokenizer(path)
        load_s = time.perf_counter() - t0

        def step(batch: list) -> None:
            enc = encode(tokenizer, [e.prompt for e in batch])
            with torch.inference_mode():
                model(**enc, use_cache=False)  # eager: the logits are materialized

    elif method in ("lora_step", "full_step"):
        import peft  # noqa: F401
        from transformers import AutoModelForSequenceClassification  # noqa: F401

        kind = "lora" if method == "lora_step" else "full"
        gc.collect()
        baseline = current_rss_mb()
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(path)
        model = build_classifier(path, kind, tokenizer, seed=int(spec["seed"]), lora_r=LORA_SETTINGS["r"],
                                 lora_alpha=LORA_SETTINGS["alpha"], lora_dropout=LORA_SETTINGS["dropout"])
        optimizer = make_optimizer(model, kind, LR[method])
        params = [p for p in model.parameters() if p.requires_grad]
        load_s = time.perf_counter() - t0
        extra["trainable_parameters"] = sum(p.numel() for p in params)

        def step(batch: list) -> None:
            train_step(model, tokenizer, batch, params, optimizer)

    else:
        raise ValueError(f"unknown bench method {method!r}: choose one of {', '.join(METHODS)}")

    timed = batches[1:] if len(batches) > 1 else batches
    if len(batches) > 1:
        step(batches[0])  # warm-up: allocator, lazy init, optimizer state
    t0 = time.perf_counter()
    for batch in timed:
        step(batch)
    elapsed = time.perf_counter() - t0
    n_timed = sum(len(b) for b in timed)
    result = {"peak_rss_mb": peak_rss_mb(), "s_per_sample": elapsed / n_timed, "baseline_rss_mb": baseline,
              "model_load_s": load_s, "samples": n_timed, **extra}
    result["machine"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                         "threads": torch.get_num_threads()}
    if method == "mobiflower_device" and spec.get("wire"):
        result.update(_wire(runtime, backbone, examples, bs))
    if method == "tail_device":  # the tail's all-token frames of the cut layer at each bit-width
        from mobiflower.clients.runtime import ForwardConfig

        result["tail_wire"] = []
        for bits in (8, 4, 2):
            frame, stats = runtime.make_frame(examples, config=ForwardConfig(bits=bits, token_policy="nonpad",
                                                                             batch_size=bs))
            result["tail_wire"].append({"bits": bits, "bytes_per_sample": len(encode_frame(frame)) / len(examples),
                                        "tokens_per_sample": stats.tokens_sent / len(examples)})
    return result


def _import_model_code(path: str, method: str) -> None:
    """Import the architecture's modeling module (transformers imports it lazily on first load)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from mobiflower.platform.backbone import DECODER_TYPES

    config = AutoConfig.from_pretrained(path)
    if method in ("lora_step", "full_step"):
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
            frame, stats = runtime.make_frame(examples, config=ForwardConfig(bits=bits, token_policy=policy,
                                                                             batch_size=batch_size))
            data = encode_frame(frame)
            rows.append({"bits": bits, "token_policy": policy, "bytes_per_sample": len(data) / n,
                         "payload_bytes_per_sample": frame.nbytes() / n, "tokens_per_sample": stats.tokens_sent / n})
            if policy == "all" and fp32 is None:
                # fp32 states of every (padded) token of every tapped layer: what a naive uplink would send
                fp32 = 4 * backbone.hidden_size * sum(frame.token_counts) * len(frame.layers) / n
    rows.sort(key=lambda r: (-r["bits"], WIRE_POLICIES.index(r["token_policy"])))
    return {"wire": rows, "fp32_all_token_bytes_per_sample": fp32,
            "backbone": {"fingerprint": backbone.fingerprint, "hidden_size": backbone.hidden_size,
                         "num_layers": backbone.num_layers, "layers": list(backbone.layers)}}


# ------------------------------------------------------------------------------------------
# reporting


def _fmt(value: float | None, spec: str) -> str:
    return fmt(value, spec, missing="n/a")


def _fmt_bytes(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value:.0f} B"


def format_table(result: dict) -> str:
    """A readable table of the per-method costs, the wire sizes, the ratios and the acceptance checks."""
    cfg = result.get("config", {})
    lines = [f"Device cost per sample: {cfg.get('model')} - {cfg.get('batches')} batches x {cfg.get('batch_size')} "
             f"(1 warm-up), device frames {cfg.get('bits')}-bit / {cfg.get('token_policy')}, "
             f"{cfg.get('num_taps')} taps, threads {result.get('machine', {}).get('threads')}",
             ""]
    header = f"{'method':<20}{'peak RSS MB':>13}{'runtime MB':>12}{'model MB':>10}{'load s':>9}{'ms/sample':>11}"
    lines += [header, "-" * len(header)]
    for name, m in result.get("methods", {}).items():
        model_mb = m["peak_rss_mb"] - m["baseline_rss_mb"]
        lines.append(f"{name:<20}{m['peak_rss_mb']:>13.0f}{m['baseline_rss_mb']:>12.0f}{model_mb:>10.0f}"
                     f"{m['model_load_s']:>9.2f}{m['s_per_sample'] * 1000:>11.1f}")
    lines += ["", "Uplink bytes per sample (one encoded frame of all samples)"]
    header = f"{'bits':<6}" + "".join(f"{p:>12}" for p in WIRE_POLICIES)
    lines += [header, "-" * len(header)]
    table = {(w["bits"], w["token_policy"]): w["bytes_per_sample"] for w in result.get("wire", [])}
    for bits in WIRE_BITS:
        lines.append(f"{bits:<6}" + "".join(f"{_fmt_bytes(table.get((bits, p))):>12}" for p in WIRE_POLICIES))
    lines.append(f"fp32, all tokens, all tapped layers: {_fmt_bytes(result.get('fp32_all_token_bytes_per_sample'))}"
                 "/sample")
    if result.get("tail_wire"):
        lines.append("pretrained tail (cut layer, every real token): " + ", ".join(
            f"{w['bits']}-bit {_fmt_bytes(w['bytes_per_sample'])}" for w in result["tail_wire"])
            + f" per sample ({result['tail_wire'][0]['tokens_per_sample']:.1f} tokens)")
    lines += ["", *acceptance_lines(result, ACCEPTANCE, width=30)]
    return "\n".join(lines)


def plot_result(result: dict, path: str) -> Path:
    """Bar plot of peak RSS (runtime share marked) and milliseconds per sample for each method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = result["methods"]
    names = list(methods)
    labels = [n.replace("_", "\n") for n in names]
    colors = ["#2a9d8f" if n in ("mobiflower_device", "tail_device") else "#8d99ae" for n in names]
    fig, (ax_rss, ax_s) = plt.subplots(1, 2, figsize=(10, 4))
    peaks = [methods[n]["peak_rss_mb"] for n in names]
    base = [methods[n]["baseline_rss_mb"] for n in names]
    ax_rss.bar(labels, peaks, color=colors)
    ax_rss.bar(labels, base, color="none", edgecolor="black", hatch="//", linewidth=0.5,
               label="runtime before model load")
    for i, v in enumerate(peaks):
        ax_rss.text(i, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
    ax_rss.set_ylabel("peak RSS (MB)")
    ax_rss.set_title("Device memory")
    ax_rss.legend(fontsize=8, loc="upper left")
    ms = [methods[n]["s_per_sample"] * 1000 for n in names]
    bars_with_values(ax_s, labels, ms, colors, ".1f")
    ax_s.set_ylabel("ms per sample")
    ax_s.set_title("Device time")
    return save_figure(fig, result, path)


# ------------------------------------------------------------------------------------------
# command line (``python -m mobiflower.simulations.bench_device``; ``mobiflower bench device`` reuses it)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--token-policy", default="last", choices=WIRE_POLICIES)
    parser.add_argument("--num-taps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the result JSON here (and the plot next to it)")
    parser.add_argument("--plot", default=None, help="PNG path (default: --out with .png)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_from_args(args: argparse.Namespace) -> dict:
    result = run_device_bench(model=args.model, batches=args.batches, batch_size=args.batch_size, bits=args.bits,
                              token_policy=args.token_policy, num_taps=args.num_taps, seed=args.seed,
                              threads=args.threads, out=args.out, plot=args.plot, progress=not args.no_progress)
    print(format_table(result))
    return result


def main(argv: Sequence[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        _child_main(argv[1], argv[2])
        return None
    parser = add_arguments(argparse.ArgumentParser(prog="mobiflower bench device",
                                                   description="Per-device cost: MobiFlower forward vs. "
                                                               "inference, LoRA and full fine-tuning"))
    return run_from_args(parser.parse_args(argv))


__all__ = ["run_device_bench", "format_table", "plot_result", "bench_samples", "add_arguments", "run_from_args",
           "main", "METHODS", "ACCEPTANCE"]

if __name__ == "__main__":
    main()
