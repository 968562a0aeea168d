"""The one `mobiflower` command line: every command line README.md, RESULTS.md and docs/ show parses to the values it
says, every command's --help works, a wrong flag or value is a clear usage error, and `simulate`'s progress bars
follow the server's log lines."""

from __future__ import annotations

import io
import re
import shlex
from pathlib import Path

import click
import pytest
import typer

from mobiflower.simulations.cli import app, main, spell_out_variadic
from mobiflower.simulations.progress import RunProgress

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("assets", "simulate", "local", "infer", "generate", "compare", "fed-lora", "bench")
BENCH = ("device", "precision", "pipeline", "modes", "load", "fleet", "hostile")


def _documented_lines() -> list[str]:
    """`mobiflower ...` lines of the README's, RESULTS.md's and the guides' command blocks and the commands
    they quote."""
    lines = set()
    for path in (ROOT / "README.md", ROOT / "RESULTS.md", *sorted((ROOT / "docs").glob("*.md"))):
        text = path.read_text()
        lines |= {line.split("  #")[0].strip() for line in text.splitlines() if line.startswith("mobiflower ")}
        lines |= set(re.findall(r"`(mobiflower [^`]+)`", text.replace("\n", " ")))
    out = []
    for line in sorted(lines):
        line = line.replace("[--accuracy]", "--accuracy").replace(" S ", " 1 ").replace("tsS", "ts1")
        line = line.replace("KEY=VALUE", "num-server-rounds=2").replace(" ...", "")
        words = shlex.split(line)
        if len(words) > 1 and words[1] in COMMANDS and "--help" not in words:  # --help: see test_help_of_...
            out.append(line)
    return out


def _parse(argv: list[str]) -> dict:
    """The values Click parses from a command line for its command (repeated options as tuples), without
    running the command."""
    command = typer.main.get_command(app)
    seen: dict = {}

    def patch(cmd: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                patch(sub, (*path, name))
        else:
            cmd.callback = lambda **kwargs: seen.update(command=path, **kwargs) or 0

    patch(command, ())
    command.main(args=spell_out_variadic(argv), prog_name="mobiflower", standalone_mode=False)
    return seen


DOCUMENTED = _documented_lines()


def test_the_documents_show_many_command_lines():
    assert len(DOCUMENTED) >= 40
    assert any(line.startswith("mobiflower bench fleet") for line in DOCUMENTED)


@pytest.mark.parametrize("line", DOCUMENTED)
def test_every_documented_command_line_parses(line):
    kwargs = _parse(shlex.split(line)[1:])
    assert kwargs["command"][0] == shlex.split(line)[1]


def test_values_keep_their_meaning():
    kw = _parse(
        shlex.split(
            "bench fleet --fleet mixed-phones --test-samples 1000 --skip-tuning 0.002 2 "
            "--lora-rounds 2 --side-seeds 1 2 --lrs 5e-4 1e-3 --epochs 1 2 --out f.json"
        )
    )
    assert kw["command"] == ("bench", "fleet") and kw["test_samples"] == 1000 and kw["skip_tuning"] == ("0.002", "2")
    assert kw["side_seeds"] == ("1", "2") and kw["lrs"] == ("5e-4", "1e-3") and kw["epochs"] == ("1", "2")
    assert kw["lora_rounds"] == 2 and kw["out"] == "f.json" and kw["side_lrs"] == ()
    kw = _parse(shlex.split("local --baseline lora --baseline-lrs 1e-3 2e-3 --epochs 2 --bits 8 --quiet -c seed=3"))
    assert kw["baseline_lrs"] == (1e-3, 2e-3) and kw["epochs"] == 2 and kw["bits"] == 8 and kw["quiet"] is True
    assert kw["run_config"] == ("seed=3",) and kw["weight_precision"] is None and kw["data"] is None
    kw = _parse(shlex.split("simulate --loopback --devices 2 -c num-server-rounds=10 -c lr=0.001 --adapt"))
    assert (
        kw["devices"] == 2
        and kw["loopback"]
        and kw["adapt"]
        and kw["run_config"] == ("num-server-rounds=10", "lr=0.001")
    )
    assert kw["mode"] is None and kw["timeout"] == 3600.0
    kw = _parse(shlex.split("fed-lora --no-tune -c lr=0.001"))
    assert kw["tune"] is False and not kw["lrs"]
    kw = _parse(shlex.split("bench load --devices 8 16 --paged-only"))
    assert kw["devices"] == (8, 16) and kw["paged_only"]
    assert _parse(["bench", "load"])["devices"] == (8, 16, 32, 64)
    kw = _parse(shlex.split("bench device --train-configs 8 32 8,256,64 --bits 4"))
    assert kw["train_configs"] == ("8", "32", "8,256,64") and kw["bits"] == 4 and kw["token_policy"] == "last"


def test_negative_numbers_are_values_not_flags():
    assert spell_out_variadic(["bench", "fleet", "--lrs", "-1", "2", "--quiet"]) == [
        "bench",
        "fleet",
        "--lrs=-1",
        "--lrs=2",
        "--quiet",
    ]
    assert spell_out_variadic(["simulate", "--lrs", "1"]) == ["simulate", "--lrs", "1"]  # not a list there


@pytest.mark.parametrize("path", [[], *([c] for c in COMMANDS), *(["bench", b] for b in BENCH)])
def test_help_of_every_command(path, capsys):
    assert main([*path, "--help"]) == 0
    out = capsys.readouterr().out
    assert "Usage: mobiflower" in out
    if path[:1] == ["simulate"]:
        assert "--devices" in out and "default 4" in out and "natural" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["simulate", "--no-such-flag"], "No such option"),
        (["local", "--bits", "3"], "'--bits': '3' is not one of"),
        (["simulate", "--mode", "federated"], "'--mode': 'federated' is not one of"),
        (["simulate", "-c", "oops"], "-c takes KEY=VALUE, got 'oops'"),
        (["bench", "device", "--train-configs", "8,x"], "write BATCH[,SEQ_LEN[,LORA_RANK]]"),
        (["bench", "no-such-bench"], "No such command"),
        (["fed-lora", "--devices", "two"], "'--devices': 'two' is not a valid integer"),
    ],
)
def test_a_wrong_flag_or_value_is_a_usage_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Try 'mobiflower" in err


def test_run_config_values_are_read_as_toml():
    from mobiflower.simulations.cli import run_config_items

    assert run_config_items(["num-server-rounds=3", "lr=1e-3", "adapt=true", "fleet=mixed-phones", 'model="a b"']) == {
        "num-server-rounds": 3,
        "lr": 1e-3,
        "adapt": True,
        "fleet": "mixed-phones",
        "model": "a b",
    }


def test_simulate_progress_follows_the_server_log():
    out = io.StringIO()
    progress = RunProgress(file=out)
    progress(
        "INFO :      SideTuningStrategy: mode=shared family=tail r=8 rounds=3 chunk=64 in-flight=2 bits=4 cache=True"
    )
    assert progress.rounds is not None and progress.rounds.total == 3 and progress.rounds.n == 0
    progress("INFO :      [round 1] frames landed for 128/500 samples, 2 training queued")
    assert progress.samples.total == 500 and progress.samples.n == 128
    progress("INFO :      [round 1] frames landed for 384/500 samples, 0 training queued")
    assert progress.samples.n == 384
    progress("INFO :      [round 1/3] stream loss 0.6931, server train 3.0 s, wall 9.0 s, up 1.00 MB")
    assert progress.rounds.n == 1 and progress.samples is None  # the round is done: its samples bar goes
    progress("INFO :      [round 2] frames landed for 10/500 samples, 0 training queued")
    assert progress.samples.n == 10 and progress.round == 2  # a new round, a new bar
    progress("INFO :      [round 3/3] cache loss 0.40, server train 1.0 s")
    assert progress.rounds.n == 3
    progress("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO noise")
    progress.close()
    text = out.getvalue()
    assert "[round 1/3] stream loss" in text and "RAY_ACCEL" not in text


def test_progress_bars_only_on_a_terminal_by_default(monkeypatch):
    """On stderr that is not a terminal (a log file, CI) the lines are printed without bars."""
    err = io.StringIO()
    monkeypatch.setattr("sys.stderr", err)
    progress = RunProgress()
    progress("INFO :      SideTuningStrategy: mode=shared family=tail r=8 rounds=3 chunk=64")
    progress("INFO :      [round 1] frames landed for 128/500 samples, 2 training queued")
    progress.close()
    assert "rounds:" not in err.getvalue() and "frames landed for 128/500" in err.getvalue()


def test_quiet_progress_prints_nothing():
    out = io.StringIO()
    progress = RunProgress(file=out, enabled=False)
    progress("INFO : [round 1/3] stream loss 0.5")
    progress.close()
    assert out.getvalue() == "" and progress.rounds is None
