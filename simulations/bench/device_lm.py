"""``mobiflower bench device --task causal-lm``: what one device pays per sample when the fleet fine-tunes
a causal LM through the pretrained tail, at ``seq_len`` (256) tokens a sample (issue 25).

Four methods run the SAME batches, each in its own fresh, memory-capped process as in the
classification mode (:mod:`mobiflower.simulations.bench.device`; the child is
:mod:`mobiflower.simulations.bench.device_child`), so that each peak RSS (``VmHWM``) is its own:

* ``tail_device``: the MobiFlower device of a causal-LM run: :class:`Backbone` +
  :meth:`DeviceRuntime.make_frame` with :class:`~mobiflower.platform.tasks.CausalLMTask`: blocks
  ``0..cut-1`` forwarded under inference mode (no logits), the cut block's output of every real token
  quantized at 4 bits (the tail's default), the next-token targets added and the frame encoded.
  The device's own forward budget (``ForwardConfig.max_tokens``, 256 padded tokens a piece) applies.
* ``inference_forward``: a plain ``AutoModelForCausalLM`` forward of the same token ids with the
  logits of every position under inference mode: what a user pays to run the model.
* ``lora_step``: on-device LoRA (PEFT ``CAUSAL_LM``, r 8, alpha 16, q/v): forward, next-token loss
  over the scored tokens, backward, AdamW step (:func:`mobiflower.platform.classifier.train_step`).
* ``full_step``: the same step with every weight trainable.

Samples: the bundled Rotten Tomatoes snippets, each lengthened with the ones after it to at least
``seq_len`` words (so at least that many tokens) and cut by the task to exactly ``seq_len`` tokens
(:func:`~mobiflower.platform.tasks.join_segments` keeps the start); the cost does not depend on the
words. Every child records how many tokens it forwarded per sample. Seconds per sample time every
batch after one warm-up batch.

Acceptance (issue 25, evaluated and reported as booleans, never asserted): the tail device's peak RSS
at most 1.0x inference-only's and its seconds per sample at most 0.7x. Reported beside them: LoRA's
and full fine-tuning's step time and peak RSS over the tail device's.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from mobiflower.simulations.bench.common import bench_logger, judge_acceptance, ratio, write_outputs
from mobiflower.simulations.bench.device_report import plot_result
from mobiflower.simulations.bench.device_runner import MethodRunner, machine_info
from mobiflower.simulations.bench.device_spec import (
    CAUSAL_LM_ACCEPTANCE,
    CAUSAL_LM_BITS,
    CAUSAL_LM_DEFAULTS,
    CAUSAL_LM_METHODS,
    LORA_SETTINGS,
    LR,
    TAIL_CUT,
    bench_samples,
    random_weights,
)


def run_causal_lm_bench(
    model: str = "smollm2-135m",
    batches: int = CAUSAL_LM_DEFAULTS["batches"],
    batch_size: int = CAUSAL_LM_DEFAULTS["batch_size"],
    seq_len: int = CAUSAL_LM_DEFAULTS["seq_len"],
    *,
    seed: int = 0,
    threads: int | None = None,
    out: str | None = None,
    plot: str | None = None,
    progress: bool = True,
    tail_cut: int = TAIL_CUT,
    memory_cap_gb: float | None = None,
) -> dict:
    """Run the four causal-LM methods in fresh, memory-capped processes and return the result JSON
    (written to ``out``, with a bar plot at ``plot``, default ``out`` with ``.png``)."""
    from mobiflower.simulations.bench.memory_cap import default_cap_mb

    if batches < 1 or batch_size < 1 or seq_len < 2:
        raise ValueError(f"batches={batches}, batch_size={batch_size} must be >= 1 and seq_len={seq_len} >= 2")
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be at least 1")
    if memory_cap_gb is not None and memory_cap_gb <= 0:
        raise ValueError(f"memory_cap_gb={memory_cap_gb} must be positive")
    cap_mb = memory_cap_gb * 1024 if memory_cap_gb else default_cap_mb()
    samples = bench_samples(batches, batch_size, seed, seq_len)
    config = _config(model, batches, batch_size, seq_len, seed, threads, tail_cut, cap_mb, len(samples))
    log = bench_logger("device", progress)
    log(
        f"causal-LM: {len(samples)} samples ({batches} batches of {batch_size}) of {seq_len} tokens, {model}, "
        f"each method in a fresh process capped at {cap_mb / 1024:.1f} GB"
    )
    spec = _child_spec(config, samples)
    result: dict[str, Any] = {"config": config, "methods": {}, "tail_wire": []}
    with tempfile.TemporaryDirectory(prefix="mobiflower-bench-") as tmp:
        runner = MethodRunner(Path(tmp), cap_mb, log)
        for method in CAUSAL_LM_METHODS:
            result["methods"][method] = runner.run({**spec, "method": method}, method)
    machine: dict = {}
    for m in result["methods"].values():
        result["tail_wire"] = m.pop("tail_wire", None) or result["tail_wire"]
        machine = m.pop("machine", None) or machine
        if not m.get("out_of_memory"):  # CPU seconds: what other work on the machine does not inflate
            m["cpu_s_per_sample"] = m["s_per_sample"] * m["cpu_share"] * machine.get("threads", 1)
    result["ratios"] = causal_lm_ratios(result["methods"])
    result["acceptance_set"] = "causal-lm"
    result["acceptance"] = judge_acceptance(result["ratios"], CAUSAL_LM_ACCEPTANCE)
    result["machine"] = machine_info(machine)

    write_outputs(result, out, plot, plot_result, log)
    return result


def _child_spec(config: dict, samples: list) -> dict:
    """What every child reads: the model, the task at ``seq_len`` tokens, the tail's settings, the samples."""
    keys = ("model", "task", "tail_cut", "bits", "token_policy", "seed", "threads", "max_length", "batch_size")
    return {
        **{k: config[k] for k in keys},
        "num_taps": 1,  # the tail device taps the cut block only
        "lora_rank": LORA_SETTINGS["r"],
        "wire_samples": config["batch_size"],  # the tail's frame sizes: one batch per bit-width
        "samples": [[e.id, e.text, e.label] for e in samples],
    }


def _config(model, batches, batch_size, seq_len, seed, threads, tail_cut, cap_mb, n_samples) -> dict:
    return {
        "model": model,
        "task": "causal-lm",
        "batches": batches,
        "batch_size": batch_size,
        "samples": n_samples,
        "seq_len": seq_len,
        "max_length": seq_len,
        "bits": CAUSAL_LM_BITS,
        "token_policy": "nonpad",
        "seed": seed,
        "threads": threads,
        "tail_cut": tail_cut,
        "timed_batches": max(1, batches - 1),
        "warmup_batches": 1 if batches > 1 else 0,
        "methods": list(CAUSAL_LM_METHODS),
        "lora": dict(LORA_SETTINGS),
        "lr": dict(LR),
        "memory_cap_mb": cap_mb,
        "random_weights": random_weights(model),
    }


def causal_lm_ratios(methods: dict) -> dict:
    """The tail device against inference only (the acceptance lines), and on-device training against both."""

    def get(method: str, key: str) -> float | None:
        m = methods.get(method, {})
        return None if m.get("out_of_memory") else m.get(key)

    tail_rss, tail_s = get("tail_device", "peak_rss_mb"), get("tail_device", "s_per_sample")
    inference_rss = get("inference_forward", "peak_rss_mb")
    return {
        "tail_vs_inference_rss": ratio(tail_rss, inference_rss),
        "tail_vs_inference_s": ratio(tail_s, get("inference_forward", "s_per_sample")),
        "lora_vs_tail_s": ratio(get("lora_step", "s_per_sample"), tail_s),
        "full_vs_tail_s": ratio(get("full_step", "s_per_sample"), tail_s),
        "lora_vs_tail_rss": ratio(get("lora_step", "peak_rss_mb"), tail_rss),
        "full_vs_tail_rss": ratio(get("full_step", "peak_rss_mb"), tail_rss),
        "tail_vs_inference_cpu_s": ratio(
            get("tail_device", "cpu_s_per_sample"), get("inference_forward", "cpu_s_per_sample")
        ),
        "lora_vs_tail_cpu_s": ratio(get("lora_step", "cpu_s_per_sample"), get("tail_device", "cpu_s_per_sample")),
        "lora_vs_inference_rss": ratio(get("lora_step", "peak_rss_mb"), inference_rss),
        "full_vs_inference_rss": ratio(get("full_step", "peak_rss_mb"), inference_rss),
    }


__all__ = ["run_causal_lm_bench", "causal_lm_ratios"]
