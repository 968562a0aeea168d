"""``mobiflower bench ...``: the benchmark commands (code under simulations/bench/), one Typer sub-app."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from mobiflower.simulations.bench.causal_lm import CausalLMBench
from mobiflower.simulations.bench.fleet import FleetBenchSettings
from mobiflower.simulations.bench.personalize import PersonalizeBench, as_option, list_option
from mobiflower.simulations.bench.privacy import DEFAULT_DEFENSES as DEFAULT_PRIVACY_DEFENSES
from mobiflower.simulations.bench.privacy import PrivacyBenchSettings
from mobiflower.simulations.cli_options import RunConfigOption, run_config_items

BITS = click.Choice([16, 8, 4, 2])
TOKEN_POLICIES = click.Choice(["last", "nonpad", "all"])
PRECISIONS = "fp32,bf16,int8,int4"

bench = typer.Typer(
    help="Benchmarks (code under simulations/bench/); each writes a JSON and a PNG next to it.", no_args_is_help=True
)

# Options that take several values, per bench command (see cli.spell_out_variadic).
VARIADIC: dict[tuple[str, ...], frozenset[str]] = {
    ("device",): frozenset({"--train-configs"}),
    ("load",): frozenset({"--devices"}),
    ("fleet",): frozenset({"--lrs", "--epochs", "--side-lrs", "--side-seeds"}),
    ("privacy",): frozenset({"--configs", "--defenses", "--label-epsilons"}),
}


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _names(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@bench.command(help="Device memory, speed and wire size against inference, LoRA and full fine-tuning.")
def device(
    model: Annotated[
        str,
        typer.Option(
            help="the bundled model, a shipped shape (opt-1.3b-shape, smollm2-1.7b-shape: random weights), a folder or "
            "a hub id"
        ),
    ] = "smollm2-135m",
    batches: Annotated[Optional[int], typer.Option(help="default 6 (4 on a shipped shape)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="default 16 (8 on a shipped shape)")] = None,
    bits: Annotated[int, typer.Option(click_type=BITS)] = 8,
    token_policy: Annotated[str, typer.Option(click_type=TOKEN_POLICIES)] = "last",
    num_taps: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option(help="the samples' and the trained weights' seed")] = 0,
    threads: Annotated[Optional[int], typer.Option()] = None,
    out: Annotated[str, typer.Option(help="the result JSON (and the plot next to it)")] = "runs/bench_device.json",
    plot: Annotated[Optional[str], typer.Option(help="PNG path (default: next to --out)")] = None,
    precisions: Annotated[
        Optional[str],
        typer.Option(
            help="also measure these backbone weight precisions (comma-separated, from fp32,bf16,int8,int4: model "
            "memory, speed, start-up; what `bench precision` runs), added to the JSON as `weight_precisions`"
        ),
    ] = None,
    accuracy: Annotated[
        bool, typer.Option("--accuracy", help="with --precisions: also the side-tuned accuracy of each (minutes each)")
    ] = False,
    weights: Annotated[
        Optional[str],
        typer.Option(
            help="run the mobiflower device at each of these backbone precisions (comma-separated, from "
            "fp32,bf16,int8,int4: prepared, memory-mapped copies; default on a shipped shape: all)"
        ),
    ] = None,
    train_configs: Annotated[
        Optional[list[str]],
        typer.Option(
            metavar="B[,S[,R]] ...",
            help="training configurations (batch size, sequence length in tokens with 0 = the samples' own, LoRA "
            "rank) to measure the device, LoRA and full fine-tuning in; default on a shipped shape: 8 32 "
            "8,256,64",
        ),
    ] = None,
    memory_cap_gb: Annotated[
        Optional[float],
        typer.Option(
            help="memory cap of every measured process (default: 20 GB or 85% of this machine's memory); a method "
            "over it is reported as out of memory"
        ),
    ] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no per-method progress lines")] = False,
) -> int:
    from mobiflower.simulations.bench.device import TrainingConfig, bench_settings, run_device_bench
    from mobiflower.simulations.bench.device_report import format_table

    try:
        configs = [TrainingConfig.parse(text) for text in train_configs or ()] or None
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="'--train-configs'") from None
    settings = bench_settings(model, batches, batch_size, _names(weights), configs)
    result = run_device_bench(
        model=model,
        bits=bits,
        token_policy=token_policy,
        num_taps=num_taps,
        seed=seed,
        threads=threads,
        out=out,
        plot=plot,
        progress=not no_progress,
        memory_cap_gb=memory_cap_gb,
        **settings,
    )
    print(format_table(result))
    if precisions:
        from mobiflower.simulations.bench.common import write_outputs
        from mobiflower.simulations.bench.precision import format_table as precision_table
        from mobiflower.simulations.bench.precision import plot_result, run_precision_bench

        measured = run_precision_bench(
            model=model,
            precisions=_names(precisions),
            batches=settings["batches"],
            batch_size=settings["batch_size"],
            threads=threads,
            accuracy=accuracy,
            num_taps=num_taps,
        )
        print(precision_table(measured))
        result["weight_precisions"] = measured
        path = Path(out)
        write_outputs(
            result,
            out,
            str(path.with_name(path.stem + "_precisions.png")),
            lambda _merged, png: plot_result(measured, png),
            _log,
        )
    return 0


@bench.command(
    help="Device backbone weight precision: memory, speed, start-up and accuracy for fp32, bf16, int8, int4."
)
def precision(
    model: Annotated[str, typer.Option()] = "smollm2-135m",
    precisions: Annotated[
        str, typer.Option(help="comma-separated, from fp32,bf16,int8,int4 (bf16 only where the CPU has it natively)")
    ] = PRECISIONS,
    batches: Annotated[int, typer.Option()] = 6,
    batch_size: Annotated[int, typer.Option()] = 16,
    num_taps: Annotated[int, typer.Option()] = 8,
    max_tokens: Annotated[
        int, typer.Option(help="the device's forward budget in padded tokens (-1: the device's, 256; 0: whole batches)")
    ] = -1,
    threads: Annotated[Optional[int], typer.Option()] = None,
    starts: Annotated[int, typer.Option(help="warm start-only processes per precision")] = 2,
    no_cold: Annotated[bool, typer.Option("--no-cold", help="skip the cold-file start")] = False,
    group_size: Annotated[Optional[int], typer.Option(help="int4 group size (default 32)")] = None,
    accuracy: Annotated[
        bool,
        typer.Option(
            "--accuracy", help="also side-tune on the bundled task per precision (mobiflower local; minutes each)"
        ),
    ] = False,
    train_samples: Annotated[Optional[int], typer.Option(help="accuracy runs: training samples")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="accuracy runs: epochs")] = None,
    run_config: RunConfigOption = None,
    out: Annotated[str, typer.Option(help="result JSON (and the plot next to it)")] = "runs/bench_precision.json",
    plot: Annotated[Optional[str], typer.Option(help="PNG path (default: --out with .png)")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no per-step progress lines")] = False,
) -> int:
    from mobiflower.simulations.bench.precision import format_table, run_precision_bench

    overrides = {k: v for k, v in (("train_samples", train_samples), ("epochs", epochs)) if v is not None}
    try:
        result = run_precision_bench(
            model=model,
            precisions=_names(precisions),
            batches=batches,
            batch_size=batch_size,
            threads=threads,
            out=out,
            plot=plot,
            accuracy=accuracy,
            progress=not no_progress,
            num_taps=num_taps,
            starts=starts,
            cold=not no_cold,
            group_size=group_size,
            accuracy_config=overrides,
            max_tokens=None if max_tokens == 0 else max_tokens,
            run_config=run_config_items(run_config),  # the accuracy runs' keys, checked before the first measurement
        )
    except ValueError as err:  # a count, precision or run-config key the user can fix
        print(f"mobiflower bench precision: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    return 0


@bench.command(help="One device: forward/training overlap with 2, 1 requests in flight and serial.")
def pipeline(
    samples: Annotated[int, typer.Option()] = 256,
    reduction: Annotated[int, typer.Option(help="ladder reduction (1 = full width: training ~ forward)")] = 1,
    chunk_size: Annotated[int, typer.Option()] = 32,
    run_config: RunConfigOption = None,
    out: Annotated[str, typer.Option()] = "runs/bench_pipeline.json",
) -> int:
    from mobiflower.simulations.bench.common import bench_run_config, write_outputs
    from mobiflower.simulations.bench.pipeline import BENCH_SETS, format_table, plot, run_pipeline_bench

    try:
        extra = bench_run_config("pipeline", run_config_items(run_config), BENCH_SETS)
    except ValueError as err:  # a retired, bench-set or unknown run-config key
        print(f"mobiflower bench pipeline: {err}", file=sys.stderr)
        return 2
    result = run_pipeline_bench(samples, reduction, chunk_size, run_config=extra, log=_log)
    print(format_table(result))
    write_outputs(result, out, None, plot, _log)
    return 0


@bench.command(help="Shared vs per-device vs hybrid side networks on a Dirichlet label split.")
def modes(
    devices: Annotated[int, typer.Option()] = 4,
    dirichlet_alpha: Annotated[float, typer.Option(help="the Dirichlet alpha of the label split")] = 0.1,
    num_server_rounds: Annotated[int, typer.Option(help="server rounds (epochs over the fleet's samples)")] = 20,
    train_samples: Annotated[int, typer.Option(help="over the whole fleet")] = 2000,
    test_samples: Annotated[
        int, typer.Option(help="over the whole fleet, each device's following its label mix")
    ] = 1000,
    run_config: RunConfigOption = None,
    out: Annotated[str, typer.Option()] = "runs/bench_modes.json",
) -> int:
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.modes import format_table, plot, run_modes_bench

    try:
        result = run_modes_bench(
            devices,
            dirichlet_alpha,
            train_samples,
            test_samples,
            rounds=num_server_rounds,
            run_config=run_config_items(
                run_config
            ),  # refused before the first run: a retired, bench-set or unknown key
            log=_log,
        )
    except ValueError as err:  # a run-config key or value the user can fix
        print(f"mobiflower bench modes: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    write_outputs(result, out, None, plot, _log)
    return 0


@bench.command(
    help="Server memory and throughput at 8-64 devices, side networks paged to disk: per-device side "
    "networks on a tiny random Llama, each fleet size run paged (--budget-mb) and all in memory, as "
    "real Flower simulations."
)
def load(
    devices: Annotated[list[int], typer.Option(metavar="N ...", help="fleet sizes")] = [8, 16, 32, 64],  # noqa: B006
    budget_mb: Annotated[float, typer.Option(help="side-memory-mb of the paged runs")] = 24.0,
    num_server_rounds: Annotated[int, typer.Option(help="server rounds (epochs over the fleet's samples)")] = 3,
    samples_per_device: Annotated[int, typer.Option()] = 32,
    paged_only: Annotated[bool, typer.Option("--paged-only", help="skip the all-in-memory runs")] = False,
    run_config: RunConfigOption = None,
    out: Annotated[str, typer.Option()] = "runs/bench_load.json",
) -> int:
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.load import format_table, plot, run_load_bench

    try:
        result = run_load_bench(
            devices,
            budget_mb,
            samples_per_device,
            num_server_rounds,
            unbounded=not paged_only,
            run_config=run_config_items(
                run_config
            ),  # refused before the first run: a retired, bench-set or unknown key
            log=_log,
        )
    except ValueError as err:  # a run-config key or value the user can fix
        print(f"mobiflower bench load: {err}", file=sys.stderr)
        return 2
    print(format_table(result))
    write_outputs(result, out, None, plot, _log)
    return 0


_FLEET = FleetBenchSettings()
_PRIVACY = PrivacyBenchSettings()


def _numbers(values: list[str] | None, kind: type, flag: str) -> tuple:
    """An option's values (``--flag`` alone: none) as numbers, or a usage error naming the flag."""
    try:
        return tuple(kind(v) for v in values or () if v.strip())
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint=f"'{flag}'") from None


@bench.command(
    help="Time-to-target accuracy on a fleet model: mobiflower adaptive / 8-bit vs federated LoRA "
    "(tuned on validation). Runs federated LoRA (lr and local epochs tuned on validation first), "
    "mobiflower with fixed 8-bit frames and mobiflower adaptive on the same fleet and samples; "
    "times in virtual seconds of the fleet's devices (training only)."
)
def fleet(
    fleet: Annotated[
        str, typer.Option(help="a bundled fleet (uniform, mixed-phones, flaky, mixed-backbones) or a TOML path")
    ] = _FLEET.fleet,
    devices: Annotated[int, typer.Option(help="simulated devices, dealt the fleet's tiers")] = _FLEET.devices,
    train_samples: Annotated[int, typer.Option(help="over the whole fleet")] = _FLEET.train_samples,
    validation_samples: Annotated[
        int, typer.Option(help="over the whole fleet (federated LoRA is tuned on them)")
    ] = _FLEET.validation_samples,
    test_samples: Annotated[int, typer.Option(help="over the whole fleet")] = _FLEET.test_samples,
    seed: Annotated[int, typer.Option(help="data split and training seed, every method")] = _FLEET.seed,
    model: Annotated[Optional[str], typer.Option(help="backbone for every method (default: the bundled one)")] = None,
    num_server_rounds: Annotated[
        int, typer.Option(help="mobiflower's server rounds (epochs over the fleet's samples)")
    ] = _FLEET.rounds,
    eval_every: Annotated[
        int, typer.Option(help="mobiflower: score the test split every k rounds (the points of its curve)")
    ] = _FLEET.eval_every,
    lora_rounds: Annotated[int, typer.Option(help="federated LoRA rounds")] = _FLEET.lora_rounds,
    tune_rounds: Annotated[int, typer.Option(help="federated LoRA rounds of each tuning trial")] = _FLEET.tune_rounds,
    lrs: Annotated[list[str], typer.Option(metavar="LR ...", help="tuning grid: learning rates")] = [
        str(x) for x in _FLEET.lrs
    ],  # noqa: B006
    epochs: Annotated[list[str], typer.Option(metavar="N ...", help="tuning grid: local epochs")] = [
        str(x) for x in _FLEET.local_epochs
    ],  # noqa: B006
    skip_tuning: Annotated[
        Optional[tuple[str, str]],
        typer.Option(
            metavar="LR EPOCHS",
            help="use this federated LoRA lr and local epochs instead of tuning (recorded as given)",
        ),
    ] = None,
    side_lrs: Annotated[
        list[str],
        typer.Option(
            metavar="LR ...", help="mobiflower learning rates to pick from on validation (none: the app's default lr)"
        ),
    ] = [str(x) for x in _FLEET.side_lrs],  # noqa: B006
    side_seeds: Annotated[
        list[str],
        typer.Option(
            metavar="SEED ...",
            help="mobiflower training seeds (train-seed: initial weights and shuffles, same data): "
            "each mobiflower method runs once per seed and reports the mean accuracy and the "
            "slowest time-to-target (none: one run)",
        ),
    ] = [str(x) for x in _FLEET.side_seeds],  # noqa: B006
    max_retries: Annotated[
        int, typer.Option(help="mobiflower: retries of a failed forward request before a device is dropped")
    ] = _FLEET.max_retries,
    client_cpus: Annotated[int, typer.Option(help="CPUs per simulated device")] = _FLEET.client_cpus,
    timeout: Annotated[float, typer.Option(help="seconds per Flower run")] = _FLEET.timeout_s,
    workdir: Annotated[str, typer.Option(help="scratch folder of the Flower runs")] = _FLEET.workdir,
    run_config: RunConfigOption = None,
    out: Annotated[str, typer.Option(help="the result JSON (and a PNG next to it)")] = "runs/bench_fleet.json",
    plot: Annotated[Optional[str], typer.Option(help="PNG path (default: next to --out)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no per-run progress")] = False,
) -> int:
    import mobiflower.simulations.bench.fleet as fleet_bench
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.fleet_report import format_table
    from mobiflower.simulations.bench.fleet_report import plot as plot_fleet

    try:
        pair = None
        if skip_tuning:
            lr, local_epochs = skip_tuning
            try:
                pair = (float(lr), int(local_epochs))
            except ValueError:
                raise ValueError(
                    f"--skip-tuning takes a learning rate and a whole number of local epochs, "
                    f"e.g. --skip-tuning 1e-3 2; got {lr} {local_epochs}"
                ) from None
        settings = FleetBenchSettings(
            fleet=fleet,
            devices=devices,
            train_samples=train_samples,
            validation_samples=validation_samples,
            test_samples=test_samples,
            seed=seed,
            model=model or "",
            rounds=num_server_rounds,
            eval_every=eval_every,
            lora_rounds=lora_rounds,
            tune_rounds=tune_rounds,
            lrs=_numbers(lrs, float, "--lrs"),
            local_epochs=_numbers(epochs, int, "--epochs"),
            lora_pair=pair,
            side_lrs=_numbers(side_lrs, float, "--side-lrs"),
            side_seeds=_numbers(side_seeds, int, "--side-seeds"),
            max_retries=max_retries,
            client_cpus=client_cpus,
            timeout_s=timeout,
            workdir=workdir,
            run_config=run_config_items(run_config),  # each key to every method's runs whose app reads it
        )
        log = (lambda message: None) if quiet else _log
        result = fleet_bench.run_fleet_bench(settings, quiet=quiet, log=log)
    except ValueError as err:  # a fleet, number or run-config key the user can fix (FleetError is one)
        print(f"mobiflower bench fleet: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a tuning trial's Flower run failed (the reported runs are caught inside)
        print(f"mobiflower bench fleet: a federated LoRA tuning run failed: {err}", file=sys.stderr)
        return 1
    print(format_table(result))
    write_outputs(result, out, plot, plot_fleet, _log)
    return 0 if all(m["completed"] for m in result["methods"].values()) else 1


@bench.command(
    help="The slowest and largest refusals of hostile frames at a run's limits: time and extra memory of each."
)
def hostile(
    samples: Annotated[int, typer.Option(help="samples per request (the run's chunk-size)")] = 64,
    hidden: Annotated[int, typer.Option(help="the backbone's width (SmolLM2-135M: 576)")] = 576,
    bits: Annotated[int, typer.Option(help="the run's bit-width")] = 4,
    repeat: Annotated[int, typer.Option(help="offers per case; its time is the fastest")] = 3,
    no_default_limits: Annotated[
        bool, typer.Option("--no-default-limits", help="skip the FrameLimits() comparison")
    ] = False,
    out: Annotated[Optional[str], typer.Option(help="write the result JSON here")] = None,
) -> int:
    import json

    from mobiflower.simulations.bench.hostile import format_report, run

    report = run(samples, hidden, bits, repeat, not no_default_limits)
    print(format_report(report, samples, hidden, bits))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return 0


@bench.command(
    help="Attack our own frames: what a curious server holding the public weights reads back from each "
    "configuration's frames (a learned inverse and a white-box search trained on public speeches; labels from "
    "label-private residuals), under each device defense, with the task accuracy that defense costs."
)
def privacy(
    model: Annotated[str, typer.Option(help="the device's backbone (the bundled one, a folder or a hub id)")] = (
        _PRIVACY.model
    ),
    configs: Annotated[
        Optional[list[str]],
        typer.Option(
            metavar="SPEC ...",
            help="configurations, the first one also under every defense: tail:CUT:BITS (every real token of the "
            "cut) or ladder:TAPS:BITS (the last token at evenly spaced layers; the adapter family sends the same); "
            "default for the bundled model: tail:15:4 tail:15:8 tail:15:2 tail:22:4 ladder:8:8",
        ),
    ] = None,
    defenses: Annotated[
        Optional[list[str]],
        typer.Option(
            metavar="DEFENSE ...",
            help="device defenses to measure on the first configuration, each clip=C,noise=Z (per-token L2 clip, "
            "Gaussian noise of std Z*C), window=K (only the last K tokens), keep-first=N, combined with commas; "
            f"default: {' '.join(DEFAULT_PRIVACY_DEFENSES)}",
        ),
    ] = None,
    train_samples: Annotated[
        int, typer.Option(help="devices' training samples (attacked, and side-tuned on)")
    ] = _PRIVACY.train_samples,
    test_samples: Annotated[int, typer.Option(help="devices' test samples (attacked, and scored)")] = (
        _PRIVACY.test_samples
    ),
    public_samples: Annotated[
        int, typer.Option(help="pieces of the public convention speeches the attacks train on")
    ] = _PRIVACY.public_samples,
    vocab: Annotated[int, typer.Option(help="the learned inverse's vocabulary (most frequent public tokens)")] = (
        _PRIVACY.vocab
    ),
    mlp_epochs: Annotated[int, typer.Option(help="epochs of the MLP inverse")] = _PRIVACY.mlp_epochs,
    mlp_budget: Annotated[
        float, typer.Option(help="seconds of MLP training per row (it stops after the epoch that passes them)")
    ] = _PRIVACY.mlp_budget_s,
    search_samples: Annotated[
        int, typer.Option(help="test samples the white-box search attacks (0: no search)")
    ] = _PRIVACY.search_samples,
    search_budget: Annotated[
        float, typer.Option(help="seconds of white-box search per configuration and defense")
    ] = _PRIVACY.search_budget_s,
    epochs: Annotated[int, typer.Option(help="side-tuning epochs of the tail")] = _PRIVACY.epochs,
    accuracy: Annotated[
        str,
        typer.Option(
            click_type=click.Choice(["first", "all", "none"]),
            help="side-tune for the test accuracy on the first configuration (with its defenses), on all of them, "
            "or on none (attacks only, no label figures)",
        ),
    ] = _PRIVACY.accuracy,
    label_epsilons: Annotated[
        list[str], typer.Option(metavar="EPS ...", help="label-epsilon values the label attack is measured at")
    ] = [str(x) for x in _PRIVACY.label_epsilons],  # noqa: B006
    seed: Annotated[int, typer.Option(help="samples, noise and training seed")] = _PRIVACY.seed,
    threads: Annotated[Optional[int], typer.Option()] = None,
    out: Annotated[str, typer.Option(help="the result JSON (and the plot next to it)")] = "runs/bench_privacy.json",
    plot: Annotated[Optional[str], typer.Option(help="PNG path (default: next to --out)")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress lines")] = False,
) -> int:
    from mobiflower.simulations.bench.common import bench_logger, write_outputs
    from mobiflower.simulations.bench.privacy import format_table, run_privacy_bench
    from mobiflower.simulations.bench.privacy import plot as plot_privacy
    from mobiflower.simulations.bench.privacy_measure import parse_defense, parse_exposure

    try:
        settings = PrivacyBenchSettings(
            model=model,
            train_samples=train_samples,
            test_samples=test_samples,
            public_samples=public_samples,
            vocab=vocab,
            mlp_epochs=mlp_epochs,
            mlp_budget_s=mlp_budget,
            search_samples=search_samples,
            search_budget_s=search_budget,
            epochs=epochs,
            seed=seed,
            threads=threads,
            accuracy=accuracy,
            configs=tuple(configs) if configs else None,
            defenses=tuple(d for d in defenses if d.strip()) if defenses is not None else DEFAULT_PRIVACY_DEFENSES,
            label_epsilons=_numbers(label_epsilons, float, "--label-epsilons"),
        )
        for text in settings.defenses:
            parse_defense(text)
        for spec in settings.configs or ():
            parse_exposure(spec, num_layers=1 << 20)  # the form only: the depth is known once the model loads
    except ValueError as err:  # a defense or configuration the user can fix
        print(f"mobiflower bench privacy: {err}", file=sys.stderr)
        return 2
    result = run_privacy_bench(settings, log=bench_logger("privacy", not no_progress))
    print(format_table(result))
    write_outputs(result, out, plot, plot_privacy, _log)
    return 0


_CAUSAL = CausalLMBench()  # the causal-lm command's defaults


@bench.command(
    name="causal-lm",
    help="Causal-LM on the 2012 convention speeches: the fleet's tail vs tuned on-device LoRA vs zero-shot, "
    "perplexity on the same scored tokens.",
)
def causal_lm(
    paragraphs: Annotated[
        int, typer.Option(help="paragraphs sampled from the speeches (all devices)")
    ] = _CAUSAL.paragraphs,
    devices: Annotated[int, typer.Option(help="simulated devices (IID split)")] = _CAUSAL.devices,
    max_length: Annotated[int, typer.Option(help="tokens a sample")] = _CAUSAL.max_length,
    num_server_rounds: Annotated[
        int, typer.Option(help="the tail's server rounds (epochs over the fleet's text)")
    ] = _CAUSAL.rounds,
    lora_epochs: Annotated[int, typer.Option(help="on-device LoRA: the most epochs tried")] = _CAUSAL.lora_epochs,
    tail_lrs: Annotated[str, typer.Option(help="the tail: lrs tried (comma-separated)")] = as_option(_CAUSAL.tail_lrs),
    lora_lrs: Annotated[str, typer.Option(help="on-device LoRA: lrs tried")] = as_option(_CAUSAL.lora_lrs),
    model: Annotated[str, typer.Option(help="every method's backbone")] = _CAUSAL.model,
    seed: Annotated[int, typer.Option(help="the paragraphs sampled and every device's split")] = _CAUSAL.seed,
    train_seeds: Annotated[
        str, typer.Option(help="both methods' training seeds (same text): figures are their means")
    ] = as_option(_CAUSAL.train_seeds),
    run_config: RunConfigOption = None,
    out: Annotated[str, typer.Option(help="result JSON (and the plot next to it)")] = "runs/bench_causal_lm.json",
) -> int:
    from mobiflower.simulations.bench.causal_lm import format_table, run_causal_lm_bench

    try:
        config = CausalLMBench(
            model=model,
            paragraphs=paragraphs,
            devices=devices,
            max_length=max_length,
            rounds=num_server_rounds,
            lora_epochs=lora_epochs,
            tail_lrs=list_option(tail_lrs, float),
            lora_lrs=list_option(lora_lrs, float),
            seed=seed,
            train_seeds=list_option(train_seeds, int),
            run_config=run_config_items(run_config),  # the tail's runs (the baseline holds the same samples)
        )
    except ValueError as err:  # a retired, bench-set or unknown run-config key
        print(f"mobiflower bench causal-lm: {err}", file=sys.stderr)
        return 2
    print(format_table(run_causal_lm_bench(config, out=out)))
    return 0


_PERSONAL = PersonalizeBench()  # the personalize command's defaults


@bench.command(
    help="Per-user personalization on the 2012 convention speeches: one device per speaker (the speakers with "
    "most words, 80/10/10 by paragraphs), causal-LM; zero-shot, on-device LoRA, federated LoRA (and then a local "
    "fine-tune) and mobiflower shared / per-device / hybrid, scored per user on the same test tokens."
)
def personalize(
    speakers: Annotated[int, typer.Option(help="devices: the speakers with most words")] = _PERSONAL.speakers,
    paragraphs: Annotated[int, typer.Option(help="paragraphs per speaker at most (0 = all)")] = _PERSONAL.paragraphs,
    max_length: Annotated[int, typer.Option(help="tokens a paragraph")] = _PERSONAL.max_length,
    batch_size: Annotated[int, typer.Option(help="every method's training batch")] = _PERSONAL.batch_size,
    num_server_rounds: Annotated[
        int, typer.Option(help="mobiflower: server rounds (epochs over the text)")
    ] = _PERSONAL.rounds,
    tail_lrs: Annotated[str, typer.Option(help="mobiflower: lrs tried (comma-separated)")] = as_option(
        _PERSONAL.tail_lrs
    ),
    seeds: Annotated[str, typer.Option(help="mobiflower: training seeds")] = as_option(_PERSONAL.seeds),
    personal_epochs: Annotated[
        int, typer.Option(help="mobiflower hybrid: epochs of each device's copy on its own frames")
    ] = _PERSONAL.personal_epochs,
    personal_lrs: Annotated[
        str, typer.Option(help="mobiflower hybrid: personal lrs tried, picked on validation (empty: the lr)")
    ] = as_option(_PERSONAL.personal_lrs),
    modes: Annotated[str, typer.Option(help="mobiflower: side-network modes")] = as_option(_PERSONAL.modes),
    lora_lrs: Annotated[str, typer.Option(help="on-device LoRA: lrs tried")] = as_option(_PERSONAL.lora_lrs),
    lora_epochs: Annotated[int, typer.Option(help="on-device LoRA: most epochs tried")] = _PERSONAL.lora_epochs,
    fed_lrs: Annotated[str, typer.Option(help="federated LoRA: lrs tried")] = as_option(_PERSONAL.fed_lrs),
    fed_rounds: Annotated[int, typer.Option(help="federated LoRA: rounds")] = _PERSONAL.fed_rounds,
    finetune_lrs: Annotated[str, typer.Option(help="local fine-tune after federated LoRA: lrs tried")] = as_option(
        _PERSONAL.finetune_lrs
    ),
    finetune_epochs: Annotated[int, typer.Option(help="... and most epochs tried")] = _PERSONAL.finetune_epochs,
    data: Annotated[str, typer.Option(help="text with a user column, or the bundled speeches")] = _PERSONAL.data,
    model: Annotated[str, typer.Option(help="the backbone")] = _PERSONAL.model,
    workdir: Annotated[str, typer.Option(help="where the runs go")] = _PERSONAL.workdir,
    seed: Annotated[int, typer.Option(help="the paragraphs kept and every device's split")] = _PERSONAL.seed,
    run_config: RunConfigOption = None,
    out: Annotated[str, typer.Option(help="result JSON (and the plot next to it)")] = "runs/bench_personalize.json",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no per-method progress lines")] = False,
) -> int:
    from mobiflower.simulations.bench.personalize import run_personalize_bench
    from mobiflower.simulations.bench.personalize_report import format_table

    try:
        config = PersonalizeBench(
            model=model,
            data=data,
            speakers=speakers,
            paragraphs=paragraphs,
            max_length=max_length,
            batch_size=batch_size,
            rounds=num_server_rounds,
            tail_lrs=list_option(tail_lrs, float),
            seeds=list_option(seeds, int),
            personal_epochs=personal_epochs,
            personal_lrs=list_option(personal_lrs, float),
            modes=list_option(modes, str),
            lora_lrs=list_option(lora_lrs, float),
            lora_epochs=lora_epochs,
            fed_lrs=list_option(fed_lrs, float),
            fed_rounds=fed_rounds,
            finetune_lrs=list_option(finetune_lrs, float),
            finetune_epochs=finetune_epochs,
            workdir=workdir,
            seed=seed,
            run_config=run_config_items(run_config),  # each key to every fleet run whose app reads it
        )
    except ValueError as err:  # an option or run-config key the user can fix
        print(f"mobiflower bench personalize: {err}", file=sys.stderr)
        return 2
    print(format_table(run_personalize_bench(config, out=out, progress=not no_progress)))
    return 0


__all__ = ["VARIADIC", "bench"]
