"""The ``mobiflower`` command line.

    mobiflower assets                      prepare the bundled model and data (offline after this)
    mobiflower simulate [--devices 4]      a Flower simulation of a device fleet side-tuning the model
    mobiflower local [--bits 4] [--out F]  side-tune on one device + server (two processes)
    mobiflower local --baseline lora       the same task trained on the device instead
    mobiflower infer --side-network F "a gripping, beautiful film"
    mobiflower bench device --out F        device memory / speed / wire-size benchmark
    mobiflower bench pipeline | modes      forward/training overlap; shared vs per-device vs hybrid
    mobiflower bench load                  server memory / throughput at 8-64 devices, side networks paged
    mobiflower bench fleet --fleet mixed-phones   time-to-target accuracy (virtual s): mobiflower vs fed LoRA
    mobiflower compare runs/*.json         one table of the runs' accuracy and cost
    mobiflower fed-lora [--tune] [--out F] the federated on-device LoRA baseline (Flower simulation)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--layers takes comma-separated block ids like 3,7,11: {err}") from err


def _add_assets(sub) -> None:
    p = sub.add_parser("assets", help="prepare the bundled SmolLM2 model and Rotten Tomatoes data")
    p.set_defaults(func=_cmd_assets)


def _cmd_assets(args) -> int:
    from mobiflower.platform.assets import prepare_assets

    report = prepare_assets()
    print(f"model: {report.model_dir}\ndata:  {report.corpus}\nready in {report.seconds:.1f} s")
    return 0


def _run_config_value(text: str):
    """``KEY=VALUE`` with VALUE read as TOML (numbers, true/false, quoted strings), else a plain string."""
    import tomllib

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"-c takes KEY=VALUE, got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value.strip()
    return key.strip(), parsed


def _add_simulate(sub) -> None:
    p = sub.add_parser("simulate", help="a Flower simulation of a device fleet side-tuning the bundled model",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", type=int, default=4, help="simulated devices (Flower SuperNodes)")
    p.add_argument("--mode", choices=["shared", "per-device", "hybrid"], default=None,
                   help="side networks: one shared, one per device, or a shared trunk with personal heads "
                        "(default: shared)")
    p.add_argument("--partitioning", choices=["iid", "dirichlet"], default=None, help="default: iid")
    p.add_argument("--alpha", type=float, default=None, help="Dirichlet alpha (default 0.1)")
    p.add_argument("--family", choices=["tail", "ladder", "adapter"], default=None,
                   help="side-network family, with its own lr / batch size / rounds (default: tail)")
    p.add_argument("--rounds", type=int, default=None,
                   help="epochs over the fleet's samples (default: 1 for the tail, 20 for ladder / adapter)")
    p.add_argument("--aggregate-every", type=int, default=None, help="per-device mode: FedAvg every k rounds")
    p.add_argument("--in-flight", type=int, default=None, help="forward requests in flight per device (default 2)")
    p.add_argument("--bits", type=int, choices=[16, 8, 4, 2], default=None,
                   help="activation bits (default: the family's, 4 for the tail, 8 for ladder / adapter)")
    p.add_argument("--fleet", default=None,
                   help="a fleet model (uniform, mixed-phones, flaky, mixed-backbones, or a TOML path): links, speeds and availability "
                        "drive a virtual clock; the summary reports accuracy against virtual seconds")
    p.add_argument("--adapt", action="store_const", const=True, default=None,
                   help="bandwidth adaptation: per device, bits and tapped layers chosen to meet the streaming deadline")
    p.add_argument("--client-cpus", type=int, default=1, help="CPUs per simulated device (Ray actor)")
    p.add_argument("--loopback", action="store_true",
                   help="run on a real Flower deployment on 127.0.0.1 (SuperLink + one SuperNode per device) "
                        "instead of the simulation engine; adds Flower's own traffic figures")
    p.add_argument("-c", "--run-config", type=_run_config_value, action="append", default=[], metavar="KEY=VALUE",
                   help="any other run-config key, e.g. -c train-samples=500 -c family=adapter")
    p.add_argument("--workdir", default="runs/simulate", help="scratch folder (Flower home, checkpoints, summary)")
    p.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue an interrupted run from its last checkpoint (its run folder, printed at start "
                        "and holding summary.json / checkpoint/); pass the same fleet and settings")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the run is stopped")
    p.add_argument("--out", default=None, help="write the summary (accuracy and cost figures) as JSON here")
    p.add_argument("--quiet", action="store_true", help="print only the final figures")
    p.set_defaults(func=_cmd_simulate)


def _cmd_simulate(args) -> int:
    from mobiflower.simulations.simulate import SimulateConfig, format_summary, run_simulate

    overrides = dict(args.run_config)
    if args.resume:
        if not (Path(args.resume) / "checkpoint" / "strategy.json").exists():
            print(f"mobiflower simulate: {args.resume} holds no checkpoint to resume (expected "
                  f"{Path(args.resume) / 'checkpoint' / 'strategy.json'})", file=sys.stderr)
            return 2
        overrides.update({"resume": True, "run-dir": str(Path(args.resume).resolve())})
    if args.family:
        from mobiflower.strategies.config import FAMILY_SETTINGS

        overrides = {**FAMILY_SETTINGS[args.family], "family": args.family, **overrides}
    for flag, key in (("mode", "mode"), ("partitioning", "partitioning"), ("alpha", "dirichlet-alpha"),
                      ("rounds", "rounds"), ("aggregate_every", "aggregate-every"), ("in_flight", "in-flight"),
                      ("bits", "bits"), ("fleet", "fleet"), ("adapt", "adapt")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    try:
        config = SimulateConfig(devices=args.devices, client_cpus=args.client_cpus, workdir=args.workdir,
                                timeout_s=args.timeout, run_config=overrides)
    except ValueError as err:
        print(f"mobiflower simulate: {err}", file=sys.stderr)
        return 2
    from mobiflower.simulations.flower_run import FlowerRunError

    try:
        summary = run_simulate(config, out=args.out, quiet=args.quiet, loopback=args.loopback)
    except FlowerRunError as err:
        print(f"mobiflower simulate: the Flower run failed: {err}", file=sys.stderr)
        return 1
    print(format_summary(summary))
    return 0


def _add_local(sub) -> None:
    from mobiflower.simulations.local import LocalRunConfig

    d = LocalRunConfig.__dataclass_fields__
    p = sub.add_parser("local", help="side-tune on one device + the server as two local processes",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d["model"].default, help="smollm2-135m, a local folder or a HF model id")
    p.add_argument("--weights", choices=["fp32", "bf16", "int8", "int4"], default=d["weights"].default,
                   help="device backbone weight precision (a converted, memory-mapped copy is built once under "
                        "MOBIFLOWER_HOME/models)")
    p.add_argument("--baseline", choices=["lora", "full", "zero-shot"], default=None,
                   help="train on the device instead (same samples), for comparison; lr and epochs are picked on "
                        "validation (lora: lr 2e-4..2e-3, up to 3 epochs; full: 1e-5..5e-5, up to 2) unless --lr "
                        "is given (then --epochs, default 1)")
    p.add_argument("--train-samples", type=int, default=d["train_samples"].default)
    p.add_argument("--validation-samples", type=int, default=d["validation_samples"].default)
    p.add_argument("--test-samples", type=int, default=d["test_samples"].default)
    p.add_argument("--seed", type=int, default=d["seed"].default, help="the data split (and training unless "
                   "--train-seed is given)")
    p.add_argument("--train-seed", type=int, default=None,
                   help="the trained weights' initialisation, dropout and batch order, the split kept (repeat runs "
                        "over training seeds to see the noise of one run); default: --seed")
    p.add_argument("--bits", type=int, choices=[16, 8, 4, 2], default=None,
                   help="activation bits (default: the family's, 4 for the tail, 8 for ladder / adapter)")
    p.add_argument("--group-size", type=int, default=None, help="values per scale (default: 64 at 8 bits, 32 below)")
    p.add_argument("--token-policy", choices=["last", "nonpad", "all"], default=None,
                   help="tokens each frame carries (default: 'nonpad' for the tail, else 'last')")
    p.add_argument("--family", choices=["tail", "ladder", "adapter"], default=d["family"].default,
                   help="tail: the backbone's upper blocks with LoRA on the server; ladder / adapter: small side "
                        "networks from random weights")
    p.add_argument("--baseline-lrs", type=float, nargs="+", default=None,
                   help="--baseline lora/full: the learning rates tuned over (default: lora 2e-4 5e-4 1e-3 2e-3, "
                        "full 1e-5 2e-5 5e-5); --epochs is the most epochs tried")
    p.add_argument("--tail-cut", type=int, default=d["tail_cut"].default,
                   help="tail: the device forwards blocks 0..cut-1, the server trains cut.. (0 = half the blocks)")
    p.add_argument("--lora-rank", type=int, default=d["lora_rank"].default, help="tail: LoRA rank")
    p.add_argument("--lora-alpha", type=float, default=d["lora_alpha"].default, help="tail: LoRA alpha")
    p.add_argument("--lora-targets", default=",".join(d["lora_targets"].default),
                   help="tail: comma-separated module names LoRA wraps")
    p.add_argument("--num-taps", type=int, default=d["num_taps"].default)
    p.add_argument("--layers", type=_layers, default=None, help="tapped block ids (overrides --num-taps)")
    p.add_argument("--reduction", type=int, default=d["reduction"].default)
    p.add_argument("--dropout", type=float, default=d["dropout"].default)
    p.add_argument("--epochs", type=int, default=None, help="default: 2 tail, 20 ladder / adapter")
    p.add_argument("--average-epochs", type=int, default=None,
                   help="deliver the mean weights of the last k epochs (tail averaging); 0 = the last epoch's "
                        "(default: 0 tail, 5 ladder / adapter)")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-3 tail, 3e-4 ladder / adapter, 5e-4 LoRA, 2e-5 full fine-tuning")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 0 tail, 0.1 ladder / adapter")
    p.add_argument("--select", choices=["last", "best-val"], default=d["select"].default,
                   help="deliver the last epoch's side network or the best on validation")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 tail, 32 ladder / adapter")
    p.add_argument("--chunk-size", type=int, default=d["chunk_size"].default, help="samples per frame")
    p.add_argument("--device-threads", type=int, default=d["device_threads"].default)
    p.add_argument("--workdir", default=d["workdir"].default)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_local)


# `local --baseline`: the grids the on-device baselines are tuned over on validation (unless --lr is given)
BASELINE_LR_GRID = {"lora": (2e-4, 5e-4, 1e-3, 2e-3), "full": (1e-5, 2e-5, 5e-5)}
BASELINE_MAX_EPOCHS = {"lora": 3, "full": 2}


def _cmd_local(args) -> int:
    from mobiflower.simulations.local import LocalRunConfig, format_summary, run_local

    if args.baseline:
        from mobiflower.simulations.baselines.on_device import BaselineConfig, run_baseline

        tuned = args.lr is None and args.baseline != "zero-shot"
        grid = tuple(args.baseline_lrs or BASELINE_LR_GRID.get(args.baseline, ())) if tuned else ()
        epochs = args.epochs or (BASELINE_MAX_EPOCHS.get(args.baseline, 1) if tuned else 1)
        result = run_baseline(BaselineConfig(method=args.baseline, model=args.model, train_samples=args.train_samples,
                                             validation_samples=args.validation_samples,
                                             test_samples=args.test_samples, seed=args.seed,
                                             train_seed=args.train_seed, lr=args.lr,
                                             epochs=epochs, lrs=grid, threads=args.device_threads),
                              progress=not args.quiet)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    else:
        config = LocalRunConfig(model=args.model, weights=args.weights, train_samples=args.train_samples,
                                validation_samples=args.validation_samples, test_samples=args.test_samples,
                                seed=args.seed, train_seed=args.train_seed, bits=args.bits,
                                group_size=args.group_size, token_policy=args.token_policy, family=args.family,
                                num_taps=args.num_taps, layers=args.layers, reduction=args.reduction,
                                dropout=args.dropout, tail_cut=args.tail_cut, lora_rank=args.lora_rank,
                                lora_alpha=args.lora_alpha,
                                lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                                epochs=args.epochs, average_epochs=args.average_epochs, lr=args.lr,
                                weight_decay=args.weight_decay, select=args.select,
                                batch_size=args.batch_size, chunk_size=args.chunk_size,
                                device_threads=args.device_threads, workdir=args.workdir)
        result = run_local(config, out=args.out, progress=not args.quiet)
    print(format_summary(result))
    if args.out:
        print(f"figures written to {args.out}")
    return 0


def _add_infer(sub) -> None:
    p = sub.add_parser("infer", help="classify text on the device with backbone + side network")
    p.add_argument("texts", nargs="*", help="texts to classify (default: read lines from stdin)")
    p.add_argument("--side-network", default=None,
                   help="a delivered side network: a pretrained tail's adapter folder or a .safetensors file "
                        "(default: what the last `mobiflower local` delivered, runs/local/adapter or "
                        "runs/local/side_network.safetensors)")
    p.add_argument("--model", default=None, help="backbone (default: the one the side network names)")
    p.add_argument("--full-precision", action="store_true",
                   help="feed unquantized states (default: the bit-width training saw)")
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args) -> int:
    from mobiflower.clients.inference import LocalClassifier

    if args.side_network is None:
        found = [p for p in ("runs/local/adapter", "runs/local/side_network.safetensors") if Path(p).exists()]
        args.side_network = max(found, key=lambda p: Path(p).stat().st_mtime) if found else "runs/local/adapter"
    if not Path(args.side_network).exists():
        print(f"error: no side network at {args.side_network}: run `mobiflower local` first or pass "
              "--side-network", file=sys.stderr)
        return 2
    texts = args.texts or [line.strip() for line in sys.stdin if line.strip()]
    if not texts:
        print("error: give texts as arguments or on standard input", file=sys.stderr)
        return 2
    classifier = LocalClassifier.load(args.side_network, model=args.model,
                                      match_training_precision=not args.full_precision)
    for row in classifier.classify(texts):
        print(f"{row['label']:<8} {row['probability']:.3f}  {row['text']}")
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks (code under simulations/)")
    bsub = p.add_subparsers(dest="bench", required=True)
    d = bsub.add_parser("device", help="device memory, speed and wire size against inference, LoRA and full FT",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--model", default="smollm2-135m",
                   help="the bundled model, a shipped shape (opt-1.3b-shape, smollm2-1.7b-shape: random weights), "
                        "a folder or a hub id")
    d.add_argument("--batches", type=int, default=None, help="default 6 (4 on a shipped shape)")
    d.add_argument("--batch-size", type=int, default=None, help="default 16 (8 on a shipped shape)")
    d.add_argument("--bits", type=int, choices=[16, 8, 4, 2], default=8)
    d.add_argument("--token-policy", choices=["last", "nonpad", "all"], default="last")
    d.add_argument("--num-taps", type=int, default=8)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--out", default="runs/bench_device.json")
    d.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    d.add_argument("--precisions", default=None,
                   help="also measure these backbone weight precisions (comma-separated, from fp32,bf16,int8,int4: "
                        "model memory, speed, start-up; what `bench precision` runs), added to the JSON as "
                        "`weight_precisions`")
    d.add_argument("--accuracy", action="store_true",
                   help="with --precisions: also the side-tuned accuracy of each (minutes each)")
    from mobiflower.simulations.bench.device import add_billion_arguments

    add_billion_arguments(d)
    d.set_defaults(func=_cmd_bench_device)
    from mobiflower.simulations.bench.precision import add_arguments as add_precision_arguments

    pr = bsub.add_parser("precision", help="device backbone weight precision: memory, speed, start-up, accuracy",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_precision_arguments(pr)
    pr.set_defaults(func=_cmd_bench_precision)
    pp = bsub.add_parser("pipeline", help="one device: forward/training overlap with 2, 1 requests in flight and serial",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pp.add_argument("--samples", type=int, default=256)
    pp.add_argument("--reduction", type=int, default=1, help="ladder reduction (1 = full width: training ~ forward)")
    pp.add_argument("--chunk-size", type=int, default=32)
    pp.add_argument("--out", default="runs/bench_pipeline.json")
    pp.set_defaults(func=_cmd_bench_pipeline)
    pm = bsub.add_parser("modes", help="shared vs per-device vs hybrid side networks on a Dirichlet label split",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pm.add_argument("--devices", type=int, default=4)
    pm.add_argument("--alpha", type=float, default=0.1)
    pm.add_argument("--rounds", type=int, default=20)
    pm.add_argument("--out", default="runs/bench_modes.json")
    pm.set_defaults(func=_cmd_bench_modes)
    pl = bsub.add_parser("load", help="server memory and throughput at 8-64 devices, side networks paged to disk",
                         description="Per-device side networks on a tiny random Llama, each fleet size run paged "
                                     "(--budget-mb) and all in memory, as real Flower simulations.")
    pl.add_argument("--devices", type=int, nargs="+", default=[8, 16, 32, 64], help="fleet sizes (default 8 16 32 64)")
    pl.add_argument("--budget-mb", type=float, default=24.0, help="side-memory-mb of the paged runs (default 24)")
    pl.add_argument("--rounds", type=int, default=3)
    pl.add_argument("--samples-per-device", type=int, default=32)
    pl.add_argument("--paged-only", action="store_true", help="skip the all-in-memory runs")
    pl.add_argument("--out", default="runs/bench_load.json")
    pl.set_defaults(func=_cmd_bench_load)
    _add_bench_fleet(bsub)


def _cmd_bench_pipeline(args) -> int:
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.pipeline import format_table, plot, run_pipeline_bench

    result = run_pipeline_bench(args.samples, args.reduction, args.chunk_size, log=_log)
    print(format_table(result))
    write_outputs(result, args.out, None, plot, _log)
    return 0


def _cmd_bench_modes(args) -> int:
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.modes import format_table, plot, run_modes_bench

    result = run_modes_bench(args.devices, args.alpha, rounds=args.rounds, log=_log)
    print(format_table(result))
    write_outputs(result, args.out, None, plot, _log)
    return 0


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _cmd_bench_load(args) -> int:
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.load import format_table, plot, run_load_bench

    result = run_load_bench(args.devices, args.budget_mb, args.samples_per_device, args.rounds,
                            unbounded=not args.paged_only, log=_log)
    print(format_table(result))
    write_outputs(result, args.out, None, plot, _log)
    return 0


def _cmd_bench_device(args) -> int:
    from mobiflower.simulations.bench.device import bench_settings, format_table, run_device_bench

    settings = bench_settings(args.model, args.batches, args.batch_size,
                              [w for w in (args.weights or "").split(",") if w.strip()], args.train_configs)
    result = run_device_bench(model=args.model, bits=args.bits, token_policy=args.token_policy, num_taps=args.num_taps,
                              threads=args.threads, out=args.out, plot=args.plot, memory_cap_gb=args.memory_cap_gb,
                              **settings)
    args.batches, args.batch_size = settings["batches"], settings["batch_size"]
    print(format_table(result))
    if args.precisions:
        from mobiflower.simulations.bench.common import write_outputs
        from mobiflower.simulations.bench.precision import format_table as precision_table
        from mobiflower.simulations.bench.precision import plot_result, run_precision_bench

        weights = run_precision_bench(model=args.model, precisions=[p for p in args.precisions.split(",") if p.strip()],
                                      batches=args.batches, batch_size=args.batch_size, threads=args.threads,
                                      accuracy=args.accuracy, num_taps=args.num_taps)
        print(precision_table(weights))
        result["weight_precisions"] = weights
        out = Path(args.out)
        write_outputs(result, args.out, str(out.with_name(out.stem + "_precisions.png")),
                      lambda _merged, path: plot_result(weights, path),
                      lambda msg: print(msg, file=sys.stderr))
    return 0


def _cmd_bench_precision(args) -> int:
    from mobiflower.simulations.bench.precision import run_from_args

    run_from_args(args)
    return 0


# ---- bench fleet (issue 4, item 7): all of it lives in simulations/bench_fleet.py
def _add_bench_fleet(bsub) -> None:
    from mobiflower.simulations.bench.fleet import FleetBenchSettings

    d = FleetBenchSettings.__dataclass_fields__
    p = bsub.add_parser("fleet", help="time-to-target accuracy on a fleet model: mobiflower adaptive / 8-bit vs "
                                      "federated LoRA (tuned on validation)",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                        description="Runs federated LoRA (lr and local epochs tuned on validation first), mobiflower "
                                    "with fixed 8-bit frames and mobiflower adaptive on the same fleet and samples; "
                                    "times in virtual seconds of the fleet's devices (training only).")
    p.add_argument("--fleet", default=d["fleet"].default, help="a bundled fleet (uniform, mixed-phones, flaky, mixed-backbones) or a TOML path")
    p.add_argument("--devices", type=int, default=d["devices"].default, help="simulated devices, dealt the fleet's tiers")
    p.add_argument("--train-samples", type=int, default=d["train_samples"].default, help="over the whole fleet")
    p.add_argument("--validation-samples", type=int, default=d["validation_samples"].default,
                   help="over the whole fleet (federated LoRA is tuned on them)")
    p.add_argument("--test-samples", type=int, default=d["test_samples"].default, help="over the whole fleet")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="data split and training seed, every method")
    p.add_argument("--model", default=None, help="backbone for every method (default: the bundled one)")
    p.add_argument("--rounds", type=int, default=d["rounds"].default, help="mobiflower rounds")
    p.add_argument("--eval-every", type=int, default=d["eval_every"].default,
                   help="mobiflower: score the test split every k rounds (the points of its curve)")
    p.add_argument("--lora-rounds", type=int, default=d["lora_rounds"].default, help="federated LoRA rounds")
    p.add_argument("--tune-rounds", type=int, default=d["tune_rounds"].default,
                   help="federated LoRA rounds of each tuning trial")
    p.add_argument("--lrs", type=float, nargs="+", default=list(d["lrs"].default), help="tuning grid: learning rates")
    p.add_argument("--epochs", type=int, nargs="+", default=list(d["local_epochs"].default),
                   help="tuning grid: local epochs")
    p.add_argument("--skip-tuning", nargs=2, metavar=("LR", "EPOCHS"), default=None,
                   help="use this federated LoRA lr and local epochs instead of tuning (recorded as given)")
    p.add_argument("--side-lrs", type=float, nargs="*", default=list(d["side_lrs"].default),
                   help="mobiflower learning rates to pick from on validation (none: the app's default lr)")
    p.add_argument("--side-seeds", type=int, nargs="*", default=list(d["side_seeds"].default),
                   help="mobiflower training seeds (train-seed: initial weights and shuffles, same data): each "
                        "mobiflower method runs once per seed and reports the mean accuracy and the slowest "
                        "time-to-target (none: one run)")
    p.add_argument("--max-retries", type=int, default=d["max_retries"].default,
                   help="mobiflower: retries of a failed forward request before a device is dropped")
    p.add_argument("--client-cpus", type=int, default=d["client_cpus"].default, help="CPUs per simulated device")
    p.add_argument("--timeout", type=float, default=d["timeout_s"].default, help="seconds per Flower run")
    p.add_argument("--workdir", default=d["workdir"].default, help="scratch folder of the Flower runs")
    p.add_argument("--out", default="runs/bench_fleet.json", help="the result JSON (and a PNG next to it)")
    p.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    p.add_argument("--quiet", action="store_true", help="no per-run progress")
    p.set_defaults(func=_cmd_bench_fleet)


def _cmd_bench_fleet(args) -> int:
    from mobiflower.simulations.bench.common import write_outputs
    from mobiflower.simulations.bench.fleet import FleetBenchSettings, format_table, plot, run_fleet_bench

    try:
        pair = None
        if args.skip_tuning:
            lr, epochs = args.skip_tuning
            try:
                pair = (float(lr), int(epochs))
            except ValueError:
                raise ValueError(f"--skip-tuning takes a learning rate and a whole number of local epochs, "
                                 f"e.g. --skip-tuning 1e-3 2; got {lr} {epochs}") from None
        settings = FleetBenchSettings(
            fleet=args.fleet, devices=args.devices, train_samples=args.train_samples,
            validation_samples=args.validation_samples, test_samples=args.test_samples, seed=args.seed,
            model=args.model or "", rounds=args.rounds, eval_every=args.eval_every, lora_rounds=args.lora_rounds, tune_rounds=args.tune_rounds,
            lrs=tuple(args.lrs), local_epochs=tuple(args.epochs), lora_pair=pair, side_lrs=tuple(args.side_lrs),
            side_seeds=tuple(args.side_seeds), max_retries=args.max_retries,
            client_cpus=args.client_cpus, timeout_s=args.timeout, workdir=args.workdir)
        log = (lambda message: None) if args.quiet else _log
        result = run_fleet_bench(settings, quiet=args.quiet, log=log)
    except ValueError as err:  # a fleet, number or run-config key the user can fix (FleetError is one)
        print(f"mobiflower bench fleet: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a tuning trial's Flower run failed (the reported runs are caught inside)
        print(f"mobiflower bench fleet: a federated LoRA tuning run failed: {err}", file=sys.stderr)
        return 1
    print(format_table(result))
    write_outputs(result, args.out, args.plot, plot, _log)
    return 0 if all(m["completed"] for m in result["methods"].values()) else 1
# ---- end bench fleet


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="one table of several --out JSON files (side-tuning and baselines)")
    p.add_argument("files", nargs="+")
    p.set_defaults(func=_cmd_compare)


def _cmd_compare(args) -> int:
    results = []
    for name in args.files:
        try:
            results.append((Path(name).name, json.loads(Path(name).read_text())))
        except (OSError, ValueError) as err:
            print(f"error: cannot read {name}: {err}", file=sys.stderr)
            return 2
    rows = []
    for name, r in results:
        wire = f"{r['bits']}-bit {r['token_policy']}" if r.get("token_policy") else "-"
        device_s = r.get("device_s_per_sample", r.get("s_per_sample"))
        rss = r.get("device_peak_rss_mb", r.get("peak_rss_mb"))
        rows.append((name, _run_label(r), f"{r['test_accuracy']:.4f}", f"{r['zero_shot_accuracy']:.4f}", wire,
                     f"{r.get('bytes_per_sample') or 0:.0f}", f"{device_s * 1000:.0f}" if device_s else "-",
                     f"{rss:.0f}" if rss else "-"))
    _print_table(("file", "method", "test acc", "zero-shot", "wire", "B/sample sent", "device ms/sample",
                  "peak RSS MB"), rows)
    groups = seed_groups(results)
    if any(len(g["files"]) > 1 for g in groups):
        print("\nruns that differ only in their training seed:")
        _print_table(("method", "runs", "mean test acc", "sd", "min", "max", "files"),
                     [(g["label"], len(g["files"]), f"{g['mean']:.4f}", f"{g['sd']:.4f}", f"{g['min']:.4f}",
                       f"{g['max']:.4f}", " ".join(g["files"])) for g in groups])
    return 0


def _run_label(result: dict) -> str:
    return result.get("method", "?") + (f"/{result['family']}" if result.get("family") else "")


# what a training seed may change between runs compared as one configuration (with where the run wrote)
_SEED_KEYS = frozenset({"seed", "train_seed", "workdir", "out", "threads", "device_threads", "server_threads"})


def seed_groups(results: list[tuple[str, dict]]) -> list[dict]:
    """Group ``(file name, result)`` pairs whose run configurations differ only in the training seed (same
    data split): each group's label, files and test accuracy mean / sample sd / min / max, in first-seen order.
    Runs with a different split seed are different groups (their test sets differ)."""
    groups: dict[str, dict] = {}
    for name, r in results:
        config = r.get("config")
        if isinstance(config, dict):
            split = config.get("seed")
            key = json.dumps({"method": r.get("method"), "split": split,
                              **{k: v for k, v in config.items() if k not in _SEED_KEYS}}, sort_keys=True, default=str)
        else:  # no recorded configuration: a group of its own
            key = f"file:{name}"
        group = groups.setdefault(key, {"label": _run_label(r), "files": [], "accuracies": []})
        group["files"].append(name)
        group["accuracies"].append(float(r["test_accuracy"]))
    for group in groups.values():
        acc = group.pop("accuracies")
        mean = sum(acc) / len(acc)
        group.update(mean=mean, min=min(acc), max=max(acc),
                     sd=(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)) ** 0.5 if len(acc) > 1 else 0.0)
    return list(groups.values())


def _print_table(header: tuple, rows: list[tuple]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


# ---- fed-lora (issue 4, item 6): the federated on-device LoRA baseline; all of it lives in simulations/fed_lora.py
def _add_fed_lora(sub) -> None:
    from mobiflower.simulations.baselines.fed_lora import add_arguments

    p = sub.add_parser("fed-lora", help="federated on-device LoRA (FedAvg of PEFT adapters) as a Flower simulation",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p).set_defaults(func=_cmd_fed_lora)


def _cmd_fed_lora(args) -> int:
    from mobiflower.simulations.baselines.fed_lora import main_from_args

    return main_from_args(args)
# ---- end fed-lora


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mobiflower", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_assets(sub)
    _add_simulate(sub)
    _add_local(sub)
    _add_infer(sub)
    _add_bench(sub)
    _add_compare(sub)
    _add_fed_lora(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mobiflower.platform.assets import AssetError

    try:
        return args.func(args)
    except AssetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
