"""``mobiflower bench personalize``: does a per-user side network write like its own speaker? (issue 26, item 5)

One simulated device per speaker of the 2012 convention speeches (the ``speakers`` with the most words,
counted over their paragraphs; at most ``paragraphs`` of each, a seeded shuffle's first), each device
splitting its own paragraphs 80/10/10 into train / validation / test (``partitioning = natural``), task
``causal-lm``. Every method is scored per user on that user's test paragraphs, the same scored tokens for
every method (``same_scored_tokens`` says whether they were):

* **zero-shot**: the backbone alone (the on-device LoRA run's ``zero_shot_*`` figures).
* **on-device LoRA**: PEFT LoRA backpropagated on each user's device, lr and epochs picked on that user's
  validation (:func:`~mobiflower.simulations.baselines.on_device.run_baseline`).
* **fed LoRA**: federated LoRA (FedAvg) over the same devices, lr picked on the mean per-user validation
  perplexity after the last round; one adapter for everyone.
* **fed LoRA + local FT**: that federated adapter, then fine-tuned on each user's device (on-device LoRA
  from the federated adapter, ``BaselineConfig.init_adapter``; lr and epochs picked on the user's validation).
* **mobiflower shared / per-device / hybrid**: ``simulate`` with side-network ``mode`` shared, per-device,
  or hybrid (the shared tail's LoRA copied per device and fine-tuned on that device's cached frames, at
  the run's lr). The lr is picked per mode on the mean per-user validation perplexity of the delivered
  adapters (training seed ``seeds[0]``); the other seeds rerun at that lr and the per-user figures are the
  mean over seeds (each seed's kept).

Costs per user: device compute (``device_s``: one run at the picked setting, for mobiflower its first
seed's; ``device_s_tuning``: every trial the method ran for it), peak RSS (mobiflower and fed LoRA: the
device's own report; the on-device methods: this process's peak, an upper bound) and bytes up / down (fed
LoRA: training rounds and the final adapter, not the evaluation broadcasts). Ratios and the acceptance
line are measured, never asserted.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mobiflower.simulations.bench.common import bench_logger, bench_run_config, fmt, keys_read_by, ratio
from mobiflower.simulations.bench.personalize_report import FED, FED_FT, LORA, ZERO_SHOT

MODES = ("shared", "per-device", "hybrid")
PERSONAL_MODES = ("per-device", "hybrid")
ACCEPTANCE = {"personal_over_lora_perplexity": 1.02}
SPEECHES = "bundled:convention-speeches"
ROW_KEYS = ("test_perplexity", "test_token_accuracy", "test_count", "device_s", "device_s_tuning")
COST_KEYS = ("peak_rss_mb", "bytes_up", "bytes_down")
Log = Callable[[str], None]

# Run-config keys the bench sets itself (every method must see the same users, samples and tokens): `-c`
# may not set them, and the refusal says what does.
BENCH_SETS = {
    "model": "use --model",
    "seed": "use --seed",
    "data": "use --data (the bench writes its sample of the chosen speakers' paragraphs)",
    "max-length": "use --max-length",
    "batch-size": "use --batch-size",
    "devices": "one device per speaker: use --speakers",
    "task": "the bench compares causal-LM perplexities",
    "partitioning": "one device per speaker (natural)",
    "user-column": "one device per speaker (natural)",
    "validation-fraction": "each device splits its paragraphs 80/10/10",
    "test-fraction": "each device splits its paragraphs 80/10/10",
    "mode": "use --modes",
    "lr": "use --tail-lrs (mobiflower) or --fed-lrs (federated LoRA)",
    "personal-lr": "hybrid: it is the mobiflower lr, or picked on validation over --personal-lrs",
    "personal-epochs": "use --personal-epochs",
    "num-server-rounds": "use --num-server-rounds (mobiflower) or --fed-rounds (federated LoRA)",
    "train-seed": "use --seeds",
    "eval-split": "every method is scored the same way, per user on its test paragraphs",
    "final-eval": "every method is scored the same way, per user on its test paragraphs",
    "run-dir": "each run keeps its own folder under --workdir",
}


def mode_method(mode: str) -> str:
    """A mobiflower mode's method name in the result (``mobiflower hybrid``)."""
    return f"mobiflower {mode}"


@dataclass
class PersonalizeBench:
    """What the benchmark runs. The defaults are sized for about 40 minutes on a quiet 2-core machine (the
    server's tail training and on-device backprop dominate): 20 paragraphs a speaker (16/2/2), one tail lr
    (4e-3: of 1e-3/2e-3/4e-3 the best in ``bench causal-lm``'s tail runs on these speeches) and one federated lr; the on-device LoRA
    reference tunes over two. Give more lrs or paragraphs for a longer, better-tuned run."""

    model: str = "smollm2-135m"
    data: str = SPEECHES  # a file with `text` and `user` columns, or the bundled speeches
    speakers: int = 8  # devices: the speakers with the most words
    paragraphs: int = 20  # per speaker at most (a seeded shuffle's first); 0 = all
    max_length: int = 128
    batch_size: int = 8  # every method's training batch (few paragraphs a user: more, smaller steps)
    rounds: int = 3  # mobiflower: epochs over the fleet's text
    tail_lrs: tuple[float, ...] = (4e-3,)
    personal_epochs: int = 3  # hybrid: epochs of each device's copy over its own cached frames
    personal_lrs: tuple[float, ...] = ()  # hybrid: personal lrs tried with each lr (empty: the lr itself)
    seeds: tuple[int, ...] = (0, 1)  # mobiflower's training seeds (the data split stays `seed`'s)
    modes: tuple[str, ...] = MODES
    lora_lrs: tuple[float, ...] = (1e-3, 2e-3)
    lora_epochs: int = 3  # on-device LoRA: the most epochs tried (each one scored on validation)
    fed_lrs: tuple[float, ...] = (2e-3,)
    fed_rounds: int = 3
    finetune_lrs: tuple[float, ...] = (1e-3,)
    finetune_epochs: int = 2
    seed: int = 0  # the paragraphs kept and every device's split
    engine: str = "simulation"  # how the fleets run (simulate's engines)
    side_run_config: dict[str, Any] = field(default_factory=dict)  # more keys for mobiflower's fleets (tail-cut, ...)
    # -c KEY=VALUE: more keys, each given to every fleet run whose app reads it (mobiflower's, federated LoRA's)
    run_config: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 3600.0  # per fleet run
    workdir: str = "runs/bench_personalize"

    def __post_init__(self) -> None:
        for name in ("tail_lrs", "personal_lrs", "seeds", "modes", "lora_lrs", "fed_lrs", "finetune_lrs"):
            setattr(self, name, tuple(getattr(self, name)))
        checks = [
            (self.speakers >= 1, f"speakers={self.speakers} must be at least 1"),
            (self.paragraphs == 0 or self.paragraphs >= 3, f"paragraphs={self.paragraphs}: 0 (all) or >= 3"),
            (bool(self.tail_lrs and self.seeds and self.lora_lrs), "tail_lrs, seeds and lora_lrs need a value"),
            (bool(self.fed_lrs and self.finetune_lrs), "fed_lrs and finetune_lrs need a value"),
            (set(self.modes) <= set(MODES), f"modes={self.modes}: each one of {MODES}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.run_config:  # refused before the first run: a retired, bench-set or unknown key
            self.run_config = bench_run_config("personalize", self.run_config, BENCH_SETS, ("side", "fed-lora"))


def list_option(text: str, kind: type) -> tuple:
    """A comma-separated command-line option's values (``2e-3,4e-3``), or a ValueError naming it."""
    try:
        return tuple(kind(part.strip()) for part in text.split(",") if part.strip())
    except ValueError as err:
        raise ValueError(f"{text!r} is not a comma-separated list of {kind.__name__}: {err}") from None


def as_option(values: tuple) -> str:
    """A tuple field's default as the comma-separated text its command-line option takes."""
    return ",".join(format(v, "g") if isinstance(v, float) else str(v) for v in values)


# ---- the fleet's data -------------------------------------------------------------------------------
def top_speakers(examples, n: int) -> list[tuple[str, int]]:
    """The ``n`` users with the most words over their paragraphs, most first (ties by name): the speakers
    with the most text to learn from, which is not always the ones with the most paragraphs."""
    words: dict[str, int] = {}
    for e in examples:
        if e.user:
            words[e.user] = words.get(e.user, 0) + len(e.text.split())
    return sorted(words.items(), key=lambda item: (-item[1], item[0]))[:n]


def speaker_sample(config: PersonalizeBench, path: Path) -> list[dict[str, Any]]:
    """Write the chosen speakers' paragraphs (at most ``paragraphs`` each, a seeded shuffle's first) as JSON
    Lines with ``text`` and ``user``; returns each speaker's words and paragraphs (all, and kept)."""
    from mobiflower.platform.tasks import CausalLMTask
    from mobiflower.platform.user_data import read_user_data

    examples = read_user_data(config.data, CausalLMTask()).examples
    rng = random.Random(config.seed)
    rows, speakers = [], []
    for user, words in top_speakers(examples, config.speakers):
        mine = sorted((e for e in examples if e.user == user), key=lambda e: e.id)
        rng.shuffle(mine)
        kept = mine[: config.paragraphs] if config.paragraphs else mine
        rows += [{"text": e.text, "user": user} for e in kept]
        speakers.append({"user": user, "words": words, "paragraphs": len(mine), "kept": len(kept)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return speakers


def base_run_config(config: PersonalizeBench, data: Path) -> dict[str, Any]:
    """The run-config keys every fleet and baseline shares: the data, one device per user, 80/10/10, and the
    ``-c`` keys both apps read (the rest go to the runs whose app reads them)."""
    return {
        **keys_read_by(keys_read_by(config.run_config, "side"), "fed-lora"),
        "model": config.model,
        "data": str(data.resolve()),
        "task": "causal-lm",
        "partitioning": "natural",
        "user-column": "user",
        "validation-fraction": 0.1,
        "test-fraction": 0.1,
        "max-length": config.max_length,
        "batch-size": config.batch_size,
        "seed": config.seed,
    }


def user_splits(run_config: dict[str, Any], devices: int) -> dict[str, tuple[str, Any]]:
    """Each device's ``(user, Splits)`` exactly as the fleet's devices split them (device id -> ...)."""
    from mobiflower.clients.device_setup import DeviceSetup
    from mobiflower.simulations.simulate import default_app_config

    merged = {**default_app_config(), **run_config}
    out = {}
    for i in range(devices):
        setup = DeviceSetup.from_configs(merged, {"partition-id": i, "num-partitions": devices})
        out[setup.device_id] = (setup.data_report().user, setup.data())
    return out


# ---- the on-device methods --------------------------------------------------------------------------
def on_device_lora(
    config: PersonalizeBench,
    run_config: dict[str, Any],
    users: dict[str, tuple[str, Any]],
    lrs: tuple[float, ...],
    epochs: int,
    init_adapter: str | None = None,
) -> dict[str, dict[str, Any]]:
    """LoRA trained on each user's device (from ``init_adapter``: a local fine-tune), tuned on its validation;
    per user its test figures, the backbone's zero-shot ones on the same tokens, and its costs."""
    from mobiflower.simulations.baselines.on_device import BaselineConfig, lora_fields, run_baseline

    rows = {}
    for user, splits in users.values():
        baseline = BaselineConfig.with_task(
            "lora",
            run_config,
            model=config.model,
            seed=config.seed,
            epochs=epochs,
            lrs=lrs,
            batch_size=config.batch_size,
            init_adapter=init_adapter,
            **lora_fields(config.run_config),  # -c lora-r / lora-target-modules: every LoRA the same shape
        )
        r = run_baseline(baseline, progress=False, splits=splits)
        rows[user] = {
            **{k: r[k] for k in ("test_perplexity", "test_token_accuracy", "test_count", "validation_perplexity")},
            **{k: r[k] for k in ("zero_shot_perplexity", "zero_shot_token_accuracy", "lr", "epochs")},
            "device_s": r["train_s"] / len(lrs),  # every lr trains the same epochs: one lr's share
            "device_s_tuning": r["train_s"],
            "peak_rss_mb": r["peak_rss_mb"],
            "bytes_up": 0,
            "bytes_down": 0,
        }
    return rows


def zero_shot_rows(lora: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The backbone alone, from the on-device LoRA runs' zero-shot figures (the same scored tokens)."""
    return {
        user: {
            "test_perplexity": r["zero_shot_perplexity"],
            "test_token_accuracy": r["zero_shot_token_accuracy"],
            "test_count": r["test_count"],
            "device_s": 0.0,
            "device_s_tuning": 0.0,
            "peak_rss_mb": None,
            "bytes_up": 0,
            "bytes_down": 0,
        }
        for user, r in lora.items()
    }


def tune_lr(lrs: Sequence, run: Callable[[Any], dict[str, Any]], name: str, log: Log, label=lambda lr: f"lr {lr:g}"):
    """A fleet run per learning rate (or setting: ``label`` names it); all trials, and the one with the
    lowest mean per-user validation perplexity (the test split never picks)."""
    trials = []
    for lr in lrs:
        trial = run(lr)
        trial["validation_perplexity"] = mean_of(trial["per_user"], "validation_perplexity")
        log(f"{name} {label(lr)}: mean per-user validation ppl {fmt(trial['validation_perplexity'])}")
        trials.append(trial)
    return trials, min(trials, key=lambda t: finite_or_inf(t["validation_perplexity"]))


def trial_lines(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the result keeps of each tuning trial (its per-user rows are the picked one's)."""
    return [{k: t.get(k) for k in ("lr", "personal_lr", "validation_perplexity", "run_dir", "wall_s")} for t in trials]


# ---- federated LoRA ---------------------------------------------------------------------------------
def fed_lora_trial(
    config: PersonalizeBench, run_config: dict[str, Any], users: dict[str, tuple[str, Any]], lr: float
) -> dict[str, Any]:
    """One federated LoRA run at ``lr``: per user its validation after the last round, its test with the
    final adapter, and its costs; and where the final adapter was written."""
    from mobiflower.simulations.baselines.fed_lora import FedLoraRun, run_fed_lora

    run = FedLoraRun(
        devices=len(users),
        workdir=f"{config.workdir}/fed-lora-{lr:g}",
        timeout_s=config.timeout_s,
        run_config={
            **run_config,
            **keys_read_by(config.run_config, "fed-lora"),
            "lr": lr,
            "num-server-rounds": config.fed_rounds,
            "eval-split": "validation",
            "final-eval": True,
        },
    )
    summary = run_fed_lora(run)
    last = summary["rounds"][-1]["devices"] if summary["rounds"] else {}
    rows = {}
    for device, (user, _) in users.items():
        d = summary["devices"].get(device, {})
        rows[user] = {
            **{k: d.get(k) for k in ("test_perplexity", "test_token_accuracy", "test_count", "peak_rss_mb")},
            "validation_perplexity": last.get(device, {}).get("validation_perplexity"),
            "device_s": d.get("device_compute_s", 0.0),
            "bytes_up": d.get("bytes_up", 0),
            "bytes_down": d.get("bytes_down", 0) + summary["adapter_bytes"],  # rounds + the delivered adapter
        }
    run = {
        "adapter": summary["adapter_path"],
        "run_dir": summary["simulation"]["run_dir"],
        "wall_s": summary["simulation"]["wall_s"],
    }
    return {"lr": lr, "per_user": rows, **run}


def fed_lora_methods(
    config: PersonalizeBench, run_config: dict[str, Any], users: dict[str, tuple[str, Any]], log: Log
) -> dict[str, dict[str, Any]]:
    """Federated LoRA tuned on the mean per-user validation perplexity, and the same adapter fine-tuned on
    each user's device (the personalized-FL baseline); tuning trials' device seconds are summed per user."""
    trials, picked = tune_lr(config.fed_lrs, lambda lr: fed_lora_trial(config, run_config, users, lr), FED, log)
    fed = {user: dict(row) for user, row in picked["per_user"].items()}
    for user, row in fed.items():
        row["device_s_tuning"] = sum(t["per_user"][user]["device_s"] for t in trials)
    local = on_device_lora(
        config, run_config, users, config.finetune_lrs, config.finetune_epochs, init_adapter=picked["adapter"]
    )
    tuned = {}
    for user, row in local.items():
        base = fed[user]
        tuned[user] = {
            **row,
            "device_s": base["device_s"] + row["device_s"],
            "device_s_tuning": base["device_s_tuning"] + row["device_s_tuning"],
            "peak_rss_mb": max(v for v in (base["peak_rss_mb"], row["peak_rss_mb"]) if v is not None),
            "bytes_up": base["bytes_up"],
            "bytes_down": base["bytes_down"],
        }
    log(f"fed LoRA + local FT: mean per-user test ppl {mean_of(tuned, 'test_perplexity'):.2f}")
    return {
        FED: {"per_user": fed, "lr": picked["lr"], "lr_trials": trial_lines(trials)},
        FED_FT: {"per_user": tuned, "federated_lr": picked["lr"], "adapter": picked["adapter"]},
    }


# ---- mobiflower -------------------------------------------------------------------------------------
class AdapterScorer:
    """Scores delivered causal-LM adapters on text as a device does (backbone + adapter), one backbone
    loaded once for all of them: what picks a mobiflower mode's learning rate."""

    def __init__(self) -> None:
        self.backbone = None

    def perplexity(self, adapter: Path, examples) -> float:
        from mobiflower.clients.inference import TailLanguageModel

        model = TailLanguageModel.load(adapter, backbone=self.backbone)
        self.backbone = model.backbone
        try:
            return float(model.evaluate(examples, zero_shot=False)["metrics"]["perplexity"])
        finally:
            model.close()


def mobiflower_run(
    config: PersonalizeBench,
    run_config: dict[str, Any],
    users: dict[str, tuple[str, Any]],
    mode: str,
    lr: float,
    seed: int,
    scorer: AdapterScorer,
    personal_lr: float | None = None,
) -> dict[str, Any]:
    """One fleet run of ``mode`` at ``lr`` (training seed ``seed``; hybrid's personal lr ``personal_lr``,
    None: ``lr``): per user its device's test of what it installed, its validation with the same adapter,
    and the device's costs."""
    personal_lr = lr if personal_lr is None else personal_lr
    from mobiflower.simulations.simulate import SimulateConfig, run_simulate

    run = SimulateConfig(
        devices=len(users),
        workdir=f"{config.workdir}/{mode}-{lr:g}{'' if personal_lr == lr else f'-p{personal_lr:g}'}-s{seed}",
        timeout_s=config.timeout_s,
        run_config={
            **run_config,
            **keys_read_by(config.run_config, "side"),
            **config.side_run_config,
            "mode": mode,
            "lr": lr,
            "personal-lr": personal_lr,
            "personal-epochs": config.personal_epochs,
            "num-server-rounds": config.rounds,
            "train-seed": seed,
        },
    )
    summary = run_simulate(run, quiet=True, engine=config.engine)
    exported = Path(summary["simulation"]["run_dir"]) / "side_networks"
    rows = {}
    for device, (user, splits) in users.items():
        d = summary["devices"][device]
        rows[user] = {
            **{k: d.get(k) for k in ("test_perplexity", "test_token_accuracy", "test_count", "bytes_up", "bytes_down")},
            "validation_perplexity": scorer.perplexity(exported / device, splits.validation),
            "personal_epochs": d.get("personal_epochs"),  # hybrid: the epochs its validation kept
            "device_s": d.get("device_forward_s", 0.0),
            "peak_rss_mb": d.get("device_peak_rss_mb"),
        }
    timing = {k: summary.get(k) for k in ("device_forward_s", "server_train_s")}
    return {
        "lr": lr,
        "personal_lr": personal_lr,
        "seed": seed,
        "per_user": rows,
        "run_dir": summary["simulation"]["run_dir"],
        "wall_s": summary["simulation"]["wall_s"],
        **timing,
    }


def mobiflower_mode(
    config: PersonalizeBench,
    run_config: dict[str, Any],
    users: dict[str, tuple[str, Any]],
    mode: str,
    scorer: AdapterScorer,
    log: Log,
) -> dict[str, Any]:
    """``mode`` at every lr of the grid (first seed; hybrid: with every personal lr of ``personal_lrs``),
    the setting with the lowest mean per-user validation perplexity, the other seeds at that setting; per
    user the mean over seeds (each seed's figures kept)."""
    first, *others = config.seeds
    personal = config.personal_lrs if mode == "hybrid" and config.personal_lrs else (None,)
    grid = [(lr, plr) for lr in config.tail_lrs for plr in personal]
    run = lambda s, seed: mobiflower_run(config, run_config, users, mode, s[0], seed, scorer, s[1])  # noqa: E731
    label = lambda s: f"lr {s[0]:g}" + ("" if s[1] is None else f", personal lr {s[1]:g}")  # noqa: E731
    trials, picked = tune_lr(grid, lambda s: run(s, first), mode_method(mode), log, label)
    runs = [picked] + [run((picked["lr"], picked["personal_lr"]), seed) for seed in others]
    per_user = {}
    for user in picked["per_user"]:
        seeds = [r["per_user"][user] for r in runs]
        row = {k: _mean([s[k] for s in seeds]) for k in ("test_perplexity", "test_token_accuracy")}
        row.update({k: picked["per_user"][user][k] for k in ("test_count", "device_s", *COST_KEYS)})
        row["device_s_tuning"] = sum(t["per_user"][user]["device_s"] for t in trials)
        row["test_perplexity_seeds"] = [s["test_perplexity"] for s in seeds]
        if mode == "hybrid":
            row["personal_epochs_seeds"] = [s.get("personal_epochs") for s in seeds]
        per_user[user] = row
    log(f"mobiflower {mode} (lr {picked['lr']:g}): mean per-user test ppl {mean_of(per_user, 'test_perplexity'):.2f}")
    return {
        "per_user": per_user,
        "lr": picked["lr"],
        "personal_lr": picked["personal_lr"] if mode == "hybrid" else None,
        "lr_trials": trial_lines(trials),
        "seeds": {r["seed"]: r for r in runs},
    }


# ---- the result -------------------------------------------------------------------------------------
def _mean(values: list) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def mean_of(per_user: dict[str, dict[str, Any]], key: str) -> float | None:
    """The mean over users of one figure (users without it left out)."""
    return _mean([row.get(key) for row in per_user.values()])


def finite_or_inf(value: float | None) -> float:
    """A figure to minimise: a missing or non-finite one ranks last."""
    return float(value) if value is not None and math.isfinite(value) else math.inf


def method_summary(per_user: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A method's mean per user of every figure, and its largest peak RSS."""
    mean = {k: mean_of(per_user, k) for k in (*ROW_KEYS, "bytes_up", "bytes_down")}
    peaks = [row["peak_rss_mb"] for row in per_user.values() if row.get("peak_rss_mb") is not None]
    mean["peak_rss_mb"] = max(peaks) if peaks else None
    return mean


def verdict(methods: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The best personalized mobiflower mode against on-device LoRA, mobiflower shared and zero-shot
    (mean per-user test perplexity), and the acceptance line (measured, not asserted)."""
    ppl = {name: m["mean"]["test_perplexity"] for name, m in methods.items()}
    personal = [mode_method(m) for m in PERSONAL_MODES if mode_method(m) in methods]
    best = min(personal, key=lambda name: finite_or_inf(ppl[name])) if personal else None
    ratios = {
        "best_personal_mode": best,
        "personal_over_lora_perplexity": ratio(ppl.get(best), ppl.get(LORA)),
        "personal_over_shared_perplexity": ratio(ppl.get(best), ppl.get(mode_method("shared"))),
        "personal_over_zero_shot_perplexity": ratio(ppl.get(best), ppl.get(ZERO_SHOT)),
        "fed_ft_over_lora_perplexity": ratio(ppl.get(FED_FT), ppl.get(LORA)),
    }

    def below(key: str, bound: float) -> bool | None:
        return None if ratios[key] is None else ratios[key] < bound

    acceptance = {
        "personal_within_1.02x_of_lora": None
        if ratios["personal_over_lora_perplexity"] is None
        else ratios["personal_over_lora_perplexity"] <= ACCEPTANCE["personal_over_lora_perplexity"],
        "personal_below_shared": below("personal_over_shared_perplexity", 1.0),
        "personal_below_zero_shot": below("personal_over_zero_shot_perplexity", 1.0),
    }
    return {"ratios": ratios, "acceptance": acceptance}


def scored_tokens(methods: dict[str, dict[str, Any]]) -> tuple[dict[str, list[int]], bool]:
    """Per user the test token counts the methods scored (one each), and whether all agree."""
    counts: dict[str, set[int]] = {}
    for m in methods.values():
        for user, row in m["per_user"].items():
            counts.setdefault(user, set()).add(row.get("test_count"))
    return {u: sorted(c, key=str) for u, c in counts.items()}, all(len(c) == 1 for c in counts.values())


def run_methods(
    config: PersonalizeBench, run_config: dict[str, Any], users: dict[str, tuple[str, Any]], log: Log
) -> dict[str, dict[str, Any]]:
    """Every method on the fleet's users, each with the wall seconds it took (tuning included)."""
    t0 = time.perf_counter()
    lora = on_device_lora(config, run_config, users, config.lora_lrs, config.lora_epochs)
    log(f"on-device LoRA: mean per-user test ppl {mean_of(lora, 'test_perplexity'):.2f}")
    methods: dict[str, dict[str, Any]] = {ZERO_SHOT: {"per_user": zero_shot_rows(lora)}}
    methods[LORA] = {"per_user": lora, "wall_s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    methods.update(fed_lora_methods(config, run_config, users, log))
    methods[FED_FT]["wall_s"] = time.perf_counter() - t0  # the federated runs and the fine-tunes
    scorer = AdapterScorer()
    for mode in config.modes:
        t0 = time.perf_counter()
        methods[mode_method(mode)] = mobiflower_mode(config, run_config, users, mode, scorer, log)
        methods[mode_method(mode)]["wall_s"] = time.perf_counter() - t0
    return methods


def run_personalize_bench(config: PersonalizeBench, out: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run every method on the same per-speaker fleet and return (and write, with its figure) the result."""
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.personalize_report import plot_personalize

    log = bench_logger("personalize", progress)
    t0 = time.perf_counter()
    data = Path(config.workdir) / "speakers.jsonl"
    speakers = speaker_sample(config, data)
    run_config = base_run_config(config, data)
    users = user_splits(run_config, len(speakers))
    for s in speakers:
        device, (_, splits) = next((d, v) for d, v in users.items() if v[0] == s["user"])
        s.update(device=device, train=len(splits.train), validation=len(splits.validation), test=len(splits.test))
    log(f"{len(speakers)} speakers, {sum(s['kept'] for s in speakers)} paragraphs, one device each: {data}")
    methods = run_methods(config, run_config, users, log)
    for m in methods.values():
        m["mean"] = method_summary(m["per_user"])
    tokens, same = scored_tokens(methods)
    result = {
        "config": asdict(config),
        "speakers": speakers,
        "methods": methods,
        "scored_tokens": tokens,
        "same_scored_tokens": same,
        **verdict(methods),
        "wall_s": time.perf_counter() - t0,
    }
    write_outputs(result, out, None, plot_personalize, log)
    return result


__all__ = [
    "PersonalizeBench",
    "run_personalize_bench",
    "top_speakers",
    "speaker_sample",
    "user_splits",
    "mode_method",
    "list_option",
    "as_option",
    "MODES",
    "ZERO_SHOT",
    "LORA",
    "FED",
    "FED_FT",
]
