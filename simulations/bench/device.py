"""``mobiflower bench device``: what one device pays per sample, MobiFlower vs. on-device alternatives.

Five methods run the SAME batches (the first ``batches * batch_size`` training samples of
:func:`~mobiflower.platform.data.task_samples`, i.e. the first samples a side-tuning run with the
same seed trains on), each in its own fresh Python process (``sys.executable -m
mobiflower.simulations.bench.device_child ...``), so that the peak RSS a child reports
(``VmHWM``) is that method's alone:

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
PyTorch and transformers runtime), ``model_load_s`` and ``startup_s`` (process launch to ready for
the first batch). Seconds per sample time every batch after
one warm-up batch. Then, in the device child after its own measurements, one frame of all the
samples is built at each bit-width (16/8/4/2) and token policy (all/nonpad/last) and its encoded
size recorded, next to what fp32 states of all (padded) tokens of every tapped layer would weigh.

Billion-sized backbones (issue 16). With ``weights`` (backbone precisions) the device methods run
as a fleet device does, once per precision: the prepared, memory-mapped copy of the backbone
(:mod:`mobiflower.platform.prepared_weights`, built once in its own process first), its data tokenized and
the tokenizer dropped before the forward, pieces of at most 256 tokens (``mobiflower_device_int4``
and so on). With ``train_configs`` (:class:`TrainingConfig`: batch size, sequence length, LoRA
rank) the fp32 device methods, the LoRA step and the full fine-tuning step run again per
configuration, to show whose memory moves. Every child runs under a memory cap
(:mod:`mobiflower.simulations.bench.memory_cap`: an address-space limit in the child and a watchdog on
its resident memory in the parent); a method over the cap is reported as *out of memory* with the
reason, not raised. ``mobiflower bench device --model opt-1.3b-shape`` (a shipped shape,
:mod:`mobiflower.platform.shapes`: random weights, so cost figures only) turns all of this on
with :data:`BILLION_DEFAULTS` and judges :data:`BILLION_ACCEPTANCE`.

Causal-LM (issue 25). ``task="causal-lm"`` measures what a device pays when the fleet fine-tunes a
causal LM through the pretrained tail, at 256 tokens a sample: the tail device (4-bit states of every
real token, next-token targets), inference only, and an on-device LoRA and full fine-tuning step with
the next-token loss (:mod:`mobiflower.simulations.bench.device_lm`).

The acceptance thresholds of the benchmark are evaluated and reported as booleans, never asserted.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from mobiflower.simulations.bench.common import bench_logger, judge_acceptance, ratio, write_outputs
from mobiflower.simulations.bench.device_report import plot_result
from mobiflower.simulations.bench.device_runner import MethodRunner, machine_info
from mobiflower.simulations.bench.device_spec import (
    ACCEPTANCE,
    BILLION_ACCEPTANCE,
    CAUSAL_LM_DEFAULTS,
    DEVICE_KINDS,
    LORA_SETTINGS,
    LR,
    MAX_LENGTH,
    TAIL_CUT,
    TASKS,
    TRAINING_METHODS,
    bench_samples,
    random_weights,
)


@dataclass(frozen=True)
class TrainingConfig:
    """One training configuration the on-device methods are measured in: batch size, sequence length
    (``seq_len`` tokens per sample, texts lengthened to fill it; 0 = the samples as they are) and
    LoRA rank (alpha = 2 x rank). The device's forward does not depend on the rank; LoRA's does."""

    batch_size: int
    seq_len: int = 0
    lora_rank: int = LORA_SETTINGS["r"]

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 0 or self.lora_rank < 1:
            raise ValueError(f"training config {self}: batch size and LoRA rank must be >= 1, sequence length >= 0")

    @property
    def label(self) -> str:
        return (
            f"batch {self.batch_size}, {f'{self.seq_len} tokens' if self.seq_len else 'own length'}, r {self.lora_rank}"
        )

    @classmethod
    def parse(cls, text: str) -> "TrainingConfig":
        """``B``, ``B,S`` or ``B,S,R`` (batch size, sequence length with 0 = the samples' own, LoRA rank)."""
        try:
            parts = [int(x) for x in str(text).split(",")]
            return cls(*parts)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"training config {text!r}: write BATCH[,SEQ_LEN[,LORA_RANK]], e.g. 8,256,64 ({err})"
            ) from None


BILLION_DEFAULTS: dict[str, Any] = {
    "batches": 4,
    "batch_size": 8,
    "weights": ("fp32", "bf16", "int8", "int4"),
    "train_configs": (TrainingConfig(8), TrainingConfig(32), TrainingConfig(8, 256, 64)),
}
"""What ``bench device`` measures on a shipped billion-sized shape unless told otherwise: fewer, smaller
batches (a billion-parameter LoRA step is slow on a CPU), every weight precision, three training
configurations (the base one, 4x the batch, 256-token sequences with a rank-64 LoRA)."""


def bench_settings(
    model: str,
    batches: int | None = None,
    batch_size: int | None = None,
    weights: Sequence[str] | None = None,
    train_configs: Sequence[TrainingConfig] | None = None,
    task: str = "classification",
) -> dict[str, Any]:
    """The settings to run with: what was given, else :data:`BILLION_DEFAULTS` on a shipped shape
    (:mod:`mobiflower.platform.shapes`), else the bundled model's defaults (6 x 16, the checkpoint
    as loaded, no training configurations); for ``task="causal-lm"`` the causal-LM mode's
    (:data:`~mobiflower.simulations.bench.device_lm.CAUSAL_LM_DEFAULTS`: 5 x 4 samples of 256 tokens)."""
    from mobiflower.platform.shapes import is_shape

    if task == "causal-lm":
        lm = CAUSAL_LM_DEFAULTS
        big = False
        batches = lm["batches"] if batches is None else batches
        batch_size = lm["batch_size"] if batch_size is None else batch_size
    else:
        big = is_shape(model)
    return {
        "batches": batches if batches is not None else (BILLION_DEFAULTS["batches"] if big else 6),
        "batch_size": batch_size if batch_size is not None else (BILLION_DEFAULTS["batch_size"] if big else 16),
        "weights": list(weights) if weights else (list(BILLION_DEFAULTS["weights"]) if big else None),
        "train_configs": list(train_configs)
        if train_configs
        else (list(BILLION_DEFAULTS["train_configs"]) if big else None),
    }


def device_method(kind: str, precision: str | None) -> str:
    """The method's name: ``mobiflower_device`` (the checkpoint as loaded) or ``mobiflower_device_int4``."""
    return kind if precision is None else f"{kind}_{precision}"


# ------------------------------------------------------------------------------------------
# parent


def run_device_bench(
    model: str = "smollm2-135m",
    batches: int = 6,
    batch_size: int = 16,
    bits: int = 8,
    token_policy: str = "last",
    num_taps: int = 8,
    seed: int = 0,
    threads: int | None = None,
    out: str | None = None,
    plot: str | None = None,
    progress: bool = True,
    tail_cut: int = TAIL_CUT,
    *,
    weights: Sequence[str] | None = None,
    train_configs: Sequence[TrainingConfig] | None = None,
    memory_cap_gb: float | None = None,
    task: str = "classification",
    seq_len: int | None = None,
) -> dict:
    """Run every method in fresh, memory-capped processes, measure the wire sizes, and return the result JSON.

    ``weights`` runs the device methods from prepared copies at each of these precisions (see the
    module docstring); ``train_configs`` measures the fp32 device, LoRA and full fine-tuning again in
    each :class:`TrainingConfig`. ``memory_cap_gb`` caps every child (default: 20 GB or 85% of this
    machine's memory). Writes the JSON to ``out`` and a bar plot of peak RSS and seconds per sample
    to ``plot`` (default: ``out`` with a ``.png`` suffix; no plot when neither is given).

    ``task="causal-lm"`` runs the causal-LM mode instead (:mod:`~mobiflower.simulations.bench.device_lm`,
    ``seq_len`` tokens a sample, default 256; ``bits``, ``token_policy`` and ``num_taps`` are not read there).
    """
    if task not in TASKS:
        raise ValueError(f"task={task!r} is unknown: choose one of {', '.join(TASKS)}")
    if task == "causal-lm":
        from mobiflower.simulations.bench.device_lm import run_causal_lm_bench

        shared = dict(seed=seed, threads=threads, out=out, plot=plot, progress=progress, tail_cut=tail_cut)
        if weights or train_configs:
            raise ValueError("the causal-lm mode runs the checkpoint as loaded: drop weights and train_configs")
        lengths = {"seq_len": seq_len} if seq_len is not None else {}
        return run_causal_lm_bench(model, batches, batch_size, **lengths, **shared, memory_cap_gb=memory_cap_gb)
    if seq_len is not None:
        raise ValueError("seq_len is the causal-lm mode's: the classification mode's lengths are train_configs'")
    _check_args(batches, batch_size, bits, token_policy, threads, num_taps, memory_cap_gb)
    from mobiflower.platform.precision import normalize_precision
    from mobiflower.simulations.bench.memory_cap import default_cap_mb

    precisions = list(dict.fromkeys(normalize_precision(w) for w in weights)) if weights else [None]
    configs = list(train_configs or [])
    cap_mb = memory_cap_gb * 1024 if memory_cap_gb else default_cap_mb()
    samples = bench_samples(batches, batch_size, seed)
    args = {"model": model, "batches": batches, "batch_size": batch_size, "samples": len(samples), "bits": bits}
    args.update(token_policy=token_policy, num_taps=num_taps, seed=seed, threads=threads, tail_cut=tail_cut)
    config = _bench_config(args, precisions, configs, cap_mb)
    common = {k: config[k] for k in ("model", "tail_cut", "bits", "token_policy", "num_taps", "seed", "threads")}
    common["max_length"] = MAX_LENGTH
    log = bench_logger("device", progress)
    log(
        f"{len(samples)} samples ({batches} batches of {batch_size}) of {model}, each method in a fresh process "
        f"capped at {cap_mb / 1024:.1f} GB"
        + (" (random weights: cost figures only)" if config["random_weights"] else "")
    )
    result: dict[str, Any] = {"config": config, "methods": {}, "wire": [], "tail_wire": []}
    with tempfile.TemporaryDirectory(prefix="mobiflower-bench-") as tmp:
        runner = MethodRunner(Path(tmp), cap_mb, log)
        extra = _run_methods(runner, result, common, samples, precisions, billion=bool(weights) or bool(configs))
        if configs:
            primary = "fp32" if "fp32" in precisions else precisions[0]
            result["train_configs"] = _run_configs(
                runner, common, configs, TrainingConfig(batch_size), result["methods"], primary, batches, seed
            )
    _judge(result, extra, billion=bool(weights) or bool(configs), cap_mb=cap_mb)

    write_outputs(result, out, plot, plot_result, log)
    return result


def _bench_config(args: dict, precisions: list, configs: list, cap_mb: float) -> dict:
    """The result's ``config``: the arguments, the timed and warm-up batches, the training settings."""
    return {
        **args,
        "timed_batches": max(1, args["batches"] - 1),
        "warmup_batches": 1 if args["batches"] > 1 else 0,
        "lora": dict(LORA_SETTINGS),
        "lr": dict(LR),
        "weights": [p for p in precisions if p],
        "train_configs": [asdict(c) for c in configs],
        "memory_cap_mb": cap_mb,
        "max_length": MAX_LENGTH,
        "random_weights": random_weights(args["model"]),
    }


def _check_args(batches, batch_size, bits, token_policy, threads, num_taps, memory_cap_gb) -> None:
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
    if memory_cap_gb is not None and memory_cap_gb <= 0:
        raise ValueError(f"memory_cap_gb={memory_cap_gb} must be positive")


def _run_methods(
    runner: MethodRunner, result: dict, common: dict, samples: list, precisions: list, billion: bool
) -> dict[str, Any]:
    """Each precision's device methods (prepared copies built first), then inference and the training
    steps, into ``result["methods"]``; the wire rows moved to ``result``; what else the children reported
    once (the fp32 size, the machine, the backbone)."""
    batch_size = result["config"]["batch_size"]
    weights = any(precisions)
    primary = "fp32" if "fp32" in precisions else precisions[0]
    if weights:
        result["prepared"] = {
            p: runner.run({**common, "method": "prepare", "precision": p}, f"prepare-{p}") for p in precisions
        }
    base = _config_specs(common, TrainingConfig(batch_size), samples, MAX_LENGTH)
    for precision in precisions:
        for kind in DEVICE_KINDS:
            name = device_method(kind, precision)
            if weights and result["prepared"][precision].get("out_of_memory"):
                result["methods"][name] = {**result["prepared"][precision], "stage": "prepare"}
                continue
            wire = precision == primary
            spec = {
                **base,
                "method": kind,
                "precision": precision,
                "wire": wire and kind == "mobiflower_device",
                "tail_wire": wire and kind == "tail_device",
                # billion-sized: the wire sizes of one batch (each row is another forward)
                "wire_samples": batch_size if billion else len(samples),
            }
            result["methods"][name] = runner.run(spec, name)
    for method in ("inference_forward", *TRAINING_METHODS):
        result["methods"][method] = runner.run({**base, "method": method}, method)
    extra: dict[str, Any] = {}
    for m in result["methods"].values():
        result["wire"] += m.pop("wire", [])
        if "tail_wire" in m:
            result["tail_wire"] = m.pop("tail_wire")
        for key in ("fp32_all_token_bytes_per_sample", "machine", "backbone"):
            if key in m:
                extra[key] = m.pop(key)
    return extra


def _judge(result: dict, extra: dict, billion: bool, cap_mb: float) -> None:
    """The ratios and the acceptance verdicts (booleans, never asserted), the machine and the backbone."""
    fp32 = extra.get("fp32_all_token_bytes_per_sample")
    result["fp32_all_token_bytes_per_sample"] = fp32
    result["ratios"] = _ratios(result["methods"], result["wire"], fp32)
    if billion:
        result["ratios"].update(_billion_ratios(result, cap_mb))
    result["acceptance_set"] = "billion" if billion else "default"
    result["acceptance"] = judge_acceptance(result["ratios"], BILLION_ACCEPTANCE if billion else ACCEPTANCE)
    result["machine"] = machine_info(extra.get("machine", {}))
    if "backbone" in extra:
        result["backbone"] = extra["backbone"]


def _config_specs(common: dict, config: TrainingConfig, samples: list, max_length: int) -> dict:
    return {
        **common,
        "batch_size": config.batch_size,
        "lora_rank": config.lora_rank,
        "max_length": config.seq_len or max_length,
        "samples": [[e.id, e.text, e.label] for e in samples],
    }


def _run_configs(
    runner: MethodRunner,
    common: dict,
    configs: Sequence[TrainingConfig],
    base_config: TrainingConfig,
    base_methods: dict,
    primary: str | None,
    batches: int,
    seed: int,
) -> dict:
    """The primary-precision device methods, LoRA and full fine-tuning in each training configuration
    (the base configuration's figures are reused, not measured twice)."""
    names = [device_method(k, primary) for k in DEVICE_KINDS] + list(TRAINING_METHODS)
    rows = []
    for config in configs:
        if config == base_config:
            rows.append(
                {
                    "config": asdict(config),
                    "label": config.label,
                    "base": True,
                    "methods": {n: base_methods[n] for n in names if n in base_methods},
                }
            )
            continue
        samples = bench_samples(batches, config.batch_size, seed, config.seq_len)
        spec = _config_specs(common, config, samples, MAX_LENGTH)
        methods = {}
        for kind in (*DEVICE_KINDS, *TRAINING_METHODS):
            name = device_method(kind, primary) if kind in DEVICE_KINDS else kind
            tag = f"{name}-b{config.batch_size}-s{config.seq_len}-r{config.lora_rank}"
            methods[name] = runner.run(
                {**spec, "method": kind, "precision": primary if kind in DEVICE_KINDS else None},
                tag,
                label=f"{name} [{config.label}]",
            )
        rows.append({"config": asdict(config), "label": config.label, "base": False, "methods": methods})
    spread = {}
    for name in names:
        peaks = [r["methods"].get(name, {}) for r in rows]
        measured = [m["peak_rss_mb"] for m in peaks if m and not m.get("out_of_memory")]
        spread[name] = {
            "min_mb": min(measured) if measured else None,
            "max_mb": max(measured) if measured else None,
            "spread": (max(measured) - min(measured)) / min(measured) if len(measured) == len(rows) else None,
            "out_of_memory": sum(bool(m.get("out_of_memory")) for m in peaks),
        }
    return {"rows": rows, "spread": spread, "device_precision": primary}


def _pick(methods: dict, kind: str) -> dict:
    """The device method the ratios use: the checkpoint run, else the fp32 copy's."""
    return methods.get(kind) or methods.get(device_method(kind, "fp32")) or {}


def _ratios(methods: dict, wire: list[dict], fp32: float | None) -> dict:
    def get(method: str, key: str) -> float | None:
        m = _pick(methods, method) if method in DEVICE_KINDS else methods.get(method, {})
        return None if m.get("out_of_memory") else m.get(key)

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


def _billion_ratios(result: dict, cap_mb: float) -> dict:
    """Issue 16's figures: against a full fine-tuning step that ran out of memory the ratio is taken
    against the cap (the step needs more, so the true ratio is lower) and flagged."""
    methods = result["methods"]

    def peak(m: dict) -> float | None:
        return None if not m or m.get("out_of_memory") else m.get("peak_rss_mb")

    full, lora = methods.get("full_step", {}), methods.get("lora_step", {})
    full_peak = cap_mb if full.get("out_of_memory") else peak(full)
    lora_peak, lora_s = peak(lora), None if lora.get("out_of_memory") else lora.get("s_per_sample")
    out: dict[str, Any] = {
        "full_step_out_of_memory": bool(full.get("out_of_memory")),
        # issue 16's alternative: the step was stopped holding 20 GB or more (it would not fit a 20 GB cap)
        "full_step_oom_under_20gb": bool(full.get("out_of_memory")) and (full.get("peak_rss_mb") or 0) >= 0.99 * 20480,
        "lora_step_out_of_memory": bool(lora.get("out_of_memory")),
    }
    for kind, prefix in (("mobiflower_device", "device"), ("tail_device", "tail")):
        dev = _pick(methods, kind)
        out[f"{prefix}_vs_full_rss"] = ratio(peak(dev), full_peak)
        out[f"{prefix}_vs_lora_rss"] = ratio(peak(dev), lora_peak)
        out[f"{prefix}_vs_lora_s"] = ratio(None if dev.get("out_of_memory") else dev.get("s_per_sample"), lora_s)
        for precision in ("int8", "int4"):
            m = methods.get(device_method(kind, precision), {})
            name = f"{precision}_{'device' if prefix == 'device' else 'tail'}"
            out[f"{name}_peak_rss_gb"] = None if peak(m) is None else peak(m) / 1024
            out[f"{name}_vs_lora_rss"] = ratio(peak(m), lora_peak)
    spread = (result.get("train_configs") or {}).get("spread", {})
    primary = (result.get("train_configs") or {}).get("device_precision")
    out["device_rss_spread"] = spread.get(device_method("mobiflower_device", primary), {}).get("spread")
    out["tail_rss_spread"] = spread.get(device_method("tail_device", primary), {}).get("spread")
    out["lora_rss_spread"] = spread.get("lora_step", {}).get("spread")
    out["full_rss_spread"] = spread.get("full_step", {}).get("spread")
    return out


__all__ = ["run_device_bench", "bench_settings", "device_method", "TrainingConfig", "BILLION_DEFAULTS"]
