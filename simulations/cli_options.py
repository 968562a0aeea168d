"""The command line's one way to give run-config keys: ``-c KEY=VALUE`` (shared by ``mobiflower`` and
``mobiflower bench``; the keys are then checked where every fleet run checks them, simulations/flower_config.py)."""

import tomllib
from collections.abc import Sequence
from typing import Annotated, Any, Optional

import typer

RunConfigOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "-c",
        "--run-config",
        metavar="KEY=VALUE",
        help="any other run-config key (VALUE read as TOML: numbers, true/false, quoted strings; else a plain "
        "string), e.g. -c lora-r=16 -c family=adapter; a key a bench sets itself is refused, naming its option",
    ),
]


def run_config_items(items: Sequence[str] | None) -> dict[str, Any]:
    """``-c KEY=VALUE`` pairs as a run-config mapping, each VALUE read as TOML where it parses."""
    config: dict[str, Any] = {}
    for text in items or ():
        key, sep, value = text.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"-c takes KEY=VALUE, got {text!r}", param_hint="'-c' / '--run-config'")
        try:
            config[key.strip()] = tomllib.loads(f"v = {value.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            config[key.strip()] = value.strip()
    return config
