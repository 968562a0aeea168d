"""Names users know (issue 28): Flower's ``num-server-rounds``, PEFT's ``lora-r`` / ``lora-target-modules``,
``dirichlet-alpha``, ``weight-precision``, ``--adapter``. A command's option for a run-config key is named
for the key, and every earlier name is refused with a message naming its replacement (no silent alias)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import typer

from mobiflower.clients.device_setup import DeviceSetup, DeviceSetupError
from mobiflower.platform.run_config import RETIRED_KEYS
from mobiflower.simulations.baselines.fed_lora import default_fed_lora_app_config
from mobiflower.simulations.baselines.fed_lora_strategy import FedLoraConfig, FedLoraConfigError
from mobiflower.simulations.bench.load import load_run_config
from mobiflower.simulations.cli import RETIRED_OPTIONS, app, main
from mobiflower.simulations.config_reference import run_config_keys
from mobiflower.simulations.simulate import SimulateConfig, default_app_config
from mobiflower.strategies.config import ConfigError, SideTuningConfig
from mobiflower.strategies.fleet_model import FleetModelError, parse_fleet

NODE = {"partition-id": 0, "num-partitions": 1}


def _commands(group: click.Group, path: tuple[str, ...] = ()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


COMMANDS = dict(_commands(typer.main.get_command(app)))
# options named for something other than a run-config key although a key has the same name: the sweeps of
# `bench device` (several precisions at once) are not one run's setting
NOT_KEYS = {("bench", "device"): {"--weights"}}


def test_no_command_keeps_a_retired_name_and_options_for_keys_are_named_for_them():
    keys = set(default_app_config()) | set(default_fed_lora_app_config())
    assert {"num-server-rounds", "lora-r", "lora-target-modules", "dirichlet-alpha", "weight-precision"} <= keys
    for path, command in COMMANDS.items():
        options = {opt for p in command.params for opt in p.opts if opt.startswith("--")}
        kept = (options & set(RETIRED_OPTIONS)) - NOT_KEYS.get(path, set())
        assert not kept, (
            f"mobiflower {' '.join(path)} still takes {kept}: rename to {[RETIRED_OPTIONS[k] for k in kept]}"
        )
    # the options that set a run-config key are spelled as the key
    for path, names in {
        ("simulate",): {"--num-server-rounds", "--dirichlet-alpha", "--data", "--mode", "--partitioning", "--bits"},
        ("local",): {"--num-server-rounds", "--weight-precision", "--data", "--bits"},
        ("bench", "modes"): {"--num-server-rounds", "--dirichlet-alpha"},
        ("bench", "fleet"): {"--num-server-rounds"},
        ("bench", "load"): {"--num-server-rounds"},
        ("bench", "causal-lm"): {"--num-server-rounds", "--model", "--seed"},
        ("bench", "personalize"): {"--num-server-rounds", "--model", "--seed"},
    }.items():
        options = {opt for p in COMMANDS[path].params for opt in p.opts}
        assert names <= options, (path, names - options)
        assert {n[2:] for n in names} <= keys
    assert {opt for p in COMMANDS[("infer",)].params for opt in p.opts} >= {"--adapter"}


FLEET_COMMANDS = [
    ("simulate",),
    ("local",),
    ("fed-lora",),
    *(("bench", name) for name in ("pipeline", "modes", "load", "fleet", "causal-lm", "personalize", "precision")),
]


def test_the_commands_that_run_a_fleet_from_run_config_keys_take_c():
    for path in FLEET_COMMANDS:
        options = {opt for p in COMMANDS[path].params for opt in p.opts}
        assert {"-c", "--run-config"} <= options, path


# ---- one source: the config dataclasses ------------------------------------------------------------------
# Commands whose options named for a run-config key deliberately take another default (or type): command ->
# (those options, why). Any other option named like a key the command's app reads must take that key's type
# and, where it has a default, the key's default from the config dataclasses.
DIFFERENT_ON_PURPOSE: dict[tuple[str, ...], tuple[set[str], str]] = {
    # the fleet size; the command writes it into the fed-LoRA app's `devices` key (0 there: whoever connects)
    ("fed-lora",): ({"--devices"}, "the fleet size"),
    # --resume takes the interrupted run's folder, and sets resume = true and run-dir from it
    ("simulate",): ({"--resume"}, "a run folder, not the flag"),
    # the ladder's wire (8-bit frames of the last token) measured against on-device LoRA and full fine-tuning
    ("bench", "device"): ({"--bits", "--token-policy"}, "the ladder's wire"),
    # a full-width ladder in small chunks, so the device's forward and the server's training cost about the same
    ("bench", "pipeline"): ({"--reduction", "--chunk-size"}, "both sides of the pipeline equally busy"),
    # RESULTS.md's 20-round comparison of shared, per-device and hybrid side networks
    ("bench", "modes"): ({"--num-server-rounds"}, "the measured comparison's rounds"),
    # a few cached rounds per fleet size: enough paging to measure, minutes per size
    ("bench", "load"): ({"--num-server-rounds"}, "sized for minutes"),
    # a fleet of phones sized for about an hour on 2 cores, a test point every round (the time-to-target
    # curve), enough retries that a flaky fleet's device is rarely dropped for bad luck
    ("bench", "fleet"): (
        {"--fleet", "--train-samples", "--validation-samples", "--test-samples"}
        | {"--num-server-rounds", "--eval-every", "--max-retries"},
        "sized for an hour on a fleet of phones",
    ),
    # the attacks and the side-tuning they score, sized for minutes on 2 cores
    ("bench", "privacy"): ({"--train-samples", "--test-samples"}, "sized for minutes"),
    # paragraphs of speeches fit 128 tokens; two epochs of the tail, sized for minutes on 2 cores
    ("bench", "causal-lm"): ({"--max-length", "--num-server-rounds"}, "paragraphs of speeches, minutes"),
    # the speeches, one device per speaker: few paragraphs a user (smaller batches, more epochs)
    ("bench", "personalize"): (
        {"--data", "--max-length", "--batch-size", "--num-server-rounds"},
        "per-speaker paragraphs of the speeches",
    ),
}


def _source(path: tuple[str, ...]) -> dict[str, Any]:
    """The keys a command's runs read, with their defaults, from the config dataclasses: the fed-LoRA app's
    for `fed-lora`, the reference's (mobiflower's app) for every other command."""
    return default_fed_lora_app_config() if path == ("fed-lora",) else run_config_keys()


def _kind(param: click.Parameter) -> type | str:
    """What a command-line option takes: bool, int, float or str (or a description of anything else)."""
    if getattr(param, "is_flag", False):
        return bool
    if param.multiple or param.nargs != 1:
        return "several values"
    if isinstance(param.type, click.Choice):
        return type(param.type.choices[0])
    kinds = ((click.types.BoolParamType, bool), (click.types.IntParamType, int), (click.types.FloatParamType, float))
    return next((kind for base, kind in kinds if isinstance(param.type, base)), str)


def options_unlike_their_keys(commands: dict[tuple[str, ...], click.Command]) -> list[str]:
    """Every option named for a run-config key that does not take the key's type and default, outside
    :data:`DIFFERENT_ON_PURPOSE` (and :data:`NOT_KEYS`)."""
    wrong = []
    for path, command in commands.items():
        source = _source(path)
        excused = DIFFERENT_ON_PURPOSE.get(path, (set(), ""))[0] | NOT_KEYS.get(path, set())
        for param in command.params:
            for opt in (o for o in param.opts if o.startswith("--") and o[2:] in source and o not in excused):
                default = source[opt[2:]]
                if _kind(param) is not type(default):
                    wrong.append(f"{' '.join(path)} {opt} takes {_kind(param)}, key {opt[2:]} is {type(default)}")
                elif param.default is not None and param.default != default:
                    wrong.append(f"{' '.join(path)} {opt} defaults to {param.default!r}, key {opt[2:]} to {default!r}")
    return wrong


def test_every_option_named_for_a_key_takes_its_type_and_default_from_the_one_source():
    assert options_unlike_their_keys(COMMANDS) == []
    for path, (options, why) in DIFFERENT_ON_PURPOSE.items():  # the table names real options, each with a why
        have = {opt for p in COMMANDS[path].params for opt in p.opts}
        assert why and options <= have, (path, options - have)
        unnamed = {opt for opt in options if opt[2:] not in _source(path)}
        assert not unnamed, f"{path}: {unnamed} name no run-config key: drop them from the table"


def test_the_options_check_catches_an_option_whose_default_drifts_from_its_key():
    drifted = click.Command("x", params=[click.Option(["--lora-r"], type=int, default=99)])
    assert options_unlike_their_keys({("x",): drifted}) == ["x --lora-r defaults to 99, key lora-r to 8"]
    typed = click.Command("x", params=[click.Option(["--bits"], type=float, default=None)])
    assert options_unlike_their_keys({("x",): typed}) == ["x --bits takes <class 'float'>, key bits is <class 'int'>"]


def test_pyproject_and_the_app_declare_the_keys_of_the_one_source_with_its_defaults():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["tool"]["flwr"]["app"]["config"]
    source = run_config_keys()
    assert sorted(set(declared) - set(source)) == [], "pyproject declares keys no config dataclass reads"
    assert {k: v for k, v in declared.items() if source[k] != v or type(source[k]) is not type(v)} == {}
    assert sorted(set(source) - set(declared)) == [], "keys the app reads that pyproject does not declare"
    assert default_app_config() == source


def test_no_key_the_apps_read_or_pyproject_declares_is_a_retired_name():
    declared = set(default_app_config()) | set(default_fed_lora_app_config()) | set(run_config_keys())
    assert not declared & set(RETIRED_KEYS)


@pytest.mark.parametrize("old,new", sorted(RETIRED_KEYS.items()))
def test_a_retired_key_is_refused_naming_its_replacement(old, new):
    message = rf"'{old}' was renamed: use {new}"
    with pytest.raises(ConfigError, match=message):
        SideTuningConfig.from_run_config({old: 2})
    with pytest.raises(DeviceSetupError, match=message):
        DeviceSetup.from_configs({old: 2}, NODE)
    with pytest.raises(FedLoraConfigError, match=message):
        FedLoraConfig.from_run_config({old: 2})


def test_a_device_refuses_a_retired_node_config_key_and_a_fleet_tier_its_retired_key():
    with pytest.raises(DeviceSetupError, match=r"'weights' was renamed: use weight-precision"):
        DeviceSetup.from_configs({}, {**NODE, "weights": "int8"})
    tier = {"name": "t", "share": 1.0, "uplink-mbps": 1.0, "downlink-mbps": 1.0, "weights": "int8"}
    with pytest.raises(FleetModelError, match=r"'weights' was renamed: use weight-precision"):
        parse_fleet({"name": "f", "tier": [tier]}, "f.toml")


@pytest.mark.parametrize(
    "argv,new",
    [
        (["simulate", "-c", "rounds=2"], "num-server-rounds"),
        (["simulate", "-c", "lora-rank=4"], "lora-r"),
        (["local", "-c", "weights=int8"], "weight-precision"),
        (["fed-lora", "--no-tune", "-c", "lora-targets=q_proj"], "lora-target-modules"),
        (["simulate", "--rounds", "2"], "--num-server-rounds"),
        (["simulate", "--alpha", "0.3"], "--dirichlet-alpha"),
        (["local", "--weights", "int8"], "--weight-precision"),
        (["infer", "--side-network", "x", "text"], "--adapter"),
        (["bench", "modes", "--rounds=2"], "--num-server-rounds"),
        (["bench", "modes", "-c", "rounds=2"], "num-server-rounds"),
        (["bench", "load", "--devices", "1", "-c", "lora-rank=2"], "lora-r"),
        (["bench", "fleet", "-c", "rounds=2"], "num-server-rounds"),
        (["bench", "causal-lm", "-c", "lora-targets=q_proj"], "lora-target-modules"),
        (["bench", "personalize", "-c", "weights=int8"], "weight-precision"),
        (["bench", "pipeline", "-c", "lora-rank=2"], "lora-r"),
        (["bench", "precision", "--accuracy", "-c", "weights=int8"], "weight-precision"),
    ],
)
def test_the_command_line_refuses_retired_names_naming_the_new_one(argv, new, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a bench that got as far as its scratch folder writes it here
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "was renamed" in err and new in err, err


@pytest.mark.parametrize(
    "argv,told",
    [
        (["bench", "fleet", "-c", "num-server-rounds=2"], "use --num-server-rounds"),
        (["bench", "fleet", "-c", "lr=1e-3"], "use --side-lrs"),
        (["bench", "causal-lm", "-c", "max-length=64"], "use --max-length"),
        (["bench", "personalize", "-c", "mode=shared"], "use --modes"),
        (["bench", "pipeline", "-c", "chunk-size=8"], "use --chunk-size"),
        (["bench", "pipeline", "-c", "test-samples=8"], "only the streaming is timed"),
        (["bench", "modes", "-c", "mode=shared"], "it is what the bench compares"),
        (["bench", "modes", "-c", "dirichlet-alpha=0.5"], "use --dirichlet-alpha"),
        (["bench", "load", "-c", "side-memory-mb=8"], "use --budget-mb"),
        (["bench", "load", "-c", "lr=1e-3"], "the ladder these figures were measured on"),
        (["bench", "precision", "--accuracy", "-c", "weight-precision=int8"], "use --precisions"),
    ],
)
def test_a_bench_refuses_a_key_it_sets_itself_naming_what_sets_it(argv, told, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"sets {argv[-1].split('=')[0]} itself" in err and told in err, err


@pytest.mark.parametrize(
    "bench", [["fleet"], ["causal-lm"], ["personalize"], ["pipeline"], ["modes"], ["load"], ["precision", "--accuracy"]]
)
def test_a_bench_refuses_a_key_its_runs_do_not_read(bench, capsys):
    assert main(["bench", *bench, "-c", "no-such-key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown run-config key(s) ['no-such-key']" in err and "lora-r" in err, err


def test_bench_precision_refuses_c_without_the_accuracy_runs_it_goes_to(capsys):
    assert main(["bench", "precision", "-c", "lora-r=4"]) == 2
    err = capsys.readouterr().err
    assert "-c keys go to the accuracy runs; add --accuracy" in err, err


def test_every_key_a_bench_sets_under_the_c_keys_is_in_its_table_and_every_entry_is_a_key():
    """A key the bench sets over the ``-c`` keys but leaves out of BENCH_SETS would be dropped without a word;
    an entry no app reads would refuse nothing."""
    from mobiflower.simulations.bench import causal_lm, fleet, load, modes, personalize, pipeline, precision

    sets = {
        load: load_run_config("m", 8, samples_per_device=4, rounds=2, reduction=4, budget_mb=1.0),
        modes: {**modes.modes_run_config(0.1, 20, 10, 2), "mode": "shared"},
        precision: precision._accuracy_run_config("m", "int8", 2, {"train_samples": 20, "epochs": 1}),
    }
    for bench, config in sets.items():
        assert set(config) - set(bench.BENCH_SETS) == set(), bench.__name__
    # (a key of the fleet's size, `devices`, is read by federated LoRA only: a side-only bench may still name
    # the option that sets it)
    keys = set(default_app_config()) | set(default_fed_lora_app_config())
    for bench in (causal_lm, fleet, load, modes, personalize, pipeline, precision):
        assert set(bench.BENCH_SETS) - keys == set(), bench.__name__


def _mode_summary(config: SimulateConfig, _quiet: bool) -> dict[str, Any]:
    """A stand-in for one mode's run: the figures the bench reads, the run config it was given."""
    device = {"test_accuracy": 0.5, "test_samples": 3, "label_shares": [0.5, 0.5]}
    return {
        "test_accuracy": 0.5,
        "mean_device_test_accuracy": 0.5,
        "devices": {"device-0": device},
        "bytes_up": 1,
        "bytes_down": 1,
        "server_train_s": 1.0,
        "simulation": {"run_dir": "x"},
        "run_config": dict(config.run_config),
    }


def test_bench_modes_gives_every_mode_the_c_keys_under_its_own(monkeypatch, tmp_path):
    from mobiflower.simulations.bench import modes

    seen: list[dict[str, Any]] = []

    def run_simulate(config: SimulateConfig, quiet: bool) -> dict[str, Any]:
        seen.append(_mode_summary(config, quiet))
        return seen[-1]

    monkeypatch.setattr(modes, "run_simulate", run_simulate)
    result = modes.run_modes_bench(2, 0.3, 20, 10, rounds=2, workdir=str(tmp_path), run_config={"lora-r": 4}, log=print)
    assert [c["run_config"]["mode"] for c in seen] == list(modes.MODES)
    for config in (c["run_config"] for c in seen):
        assert config["lora-r"] == 4 and config["dirichlet-alpha"] == 0.3 and config["num-server-rounds"] == 2
    assert result["config"]["lora-r"] == 4  # recorded with the result


def test_bench_load_gives_every_run_the_c_keys_under_its_own(monkeypatch, tmp_path):
    from mobiflower.simulations.bench import load

    (tmp_path / "tiny-llama-256").mkdir()
    (tmp_path / "tiny-llama-256" / "config.json").write_text("{}")  # the bench's model, as if made already
    seen: list[dict[str, Any]] = []
    row = {"rss_growth_mb": 1.0, "side_peak_mb": 0.5, "other_mb": 0.5, "server_samples_per_s": 1.0}
    row.update({"page_ins": 0, "run_wall_s": 1.0, "failures": 0})
    monkeypatch.setattr(load, "run_simulate", lambda config, quiet: seen.append(dict(config.run_config)) or {})
    monkeypatch.setattr(load, "measure", lambda summary, n, budget: {**row, "devices": n, "budget_mb": budget})
    result = load.run_load_bench([2], 4.0, 4, 2, workdir=str(tmp_path), run_config={"lora-r": 4}, log=print)
    assert [c["side-memory-mb"] for c in seen] == [4.0, 0.0]
    assert all(c["lora-r"] == 4 and c["mode"] == "per-device" for c in seen)
    assert result["config"]["run_config"] == {"lora-r": 4}
