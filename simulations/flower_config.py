"""Flower's configuration files for a mobiflower run: run-config values as TOML, the SuperLink
connections in ``$FLWR_HOME/config.toml``, and the tiny app folder ``flwr run`` packs.

Facts this relies on (flwr 1.41-1.42, read in its source and by running it): the connection is a
positional name looked up in ``$FLWR_HOME/config.toml``; never put ``[tool.flwr.federations]`` in
a pyproject (flwr migrates it into config.toml and comments it out). ``flwr run <dir>`` packs a
FAB from ``<dir>``: every ``*.py``, ``*.toml``, ``*.md``, ``*.yaml``/``*.yml``,
``*.json``/``*.jsonl`` and the root ``LICENSE``, minus the root ``.gitignore`` patterns,
``.venv/``, ``venv/``, ``build/``, ``__pycache__/``, ``test_*.py`` and ``*_test.py``; at most
10 MB compressed and 10 directory levels, after walking the whole tree. :func:`write_app_dir`
therefore makes a tiny app folder (``pyproject.toml`` and ``LICENSE`` only) whose components are
imported from the installed ``mobiflower`` package.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.version import Version

from mobiflower.platform.run_config import refuse_retired

RunConfigValue = bool | int | float | str
"""A value Flower's run config accepts (``[tool.flwr.app.config]`` / ``-c``)."""

LOCAL_CONNECTION = "local"
"""Name of the connection that makes ``flwr`` start a local simulation SuperLink."""

COMPLETED = "finished:completed"
"""Run status of a run whose ServerApp returned normally."""

DEFAULT_SERVERAPP = "mobiflower.strategies.server_app:app"
DEFAULT_CLIENTAPP = "mobiflower.clients.client_app:app"

_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def _toml_string(value: str) -> str:
    """A TOML basic string that survives ``flwr``'s ``-c`` parser (no raw ``"`` inside)."""
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"' or ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: RunConfigValue) -> str:
    """Format a run-config value as TOML (strings quoted, bools ``true``/``false``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        if text in ("inf", "-inf", "nan"):
            return text
        return text if any(c in text for c in ".eE") else text + ".0"
    if isinstance(value, str):
        return _toml_string(value)
    raise TypeError(f"run config values must be bool, int, float or str, got {type(value).__name__}")


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"run config key {key!r} is not a bare TOML key (letters, digits, - and _)")
    return key


def run_config_args(config: Mapping[str, RunConfigValue]) -> list[str]:
    """Turn a run config into ``flwr run`` arguments: ``["-c", "k=v", "-c", ...]``.

    Flower splits each ``-c`` value on whitespace unless the value is quoted, then parses it
    as TOML; strings are emitted as basic strings with ``"`` escaped as ``\\u0022`` so values
    with spaces, quotes and backslashes all round-trip.
    """
    args: list[str] = []
    for key, value in config.items():
        args += ["-c", f"{check_key(key)}={toml_value(value)}"]
    return args


def fleet_run_config(
    devices: int, client_cpus: int, run_config: Mapping[str, RunConfigValue], known: Mapping[str, Any], reader: str
) -> dict[str, Any]:
    """The checks every Flower fleet run shares (fleet size, CPUs per device, run-config keys the app
    declares, ``reader`` naming who reads them); returns the app's defaults with ``run_config`` over them."""
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    if client_cpus < 1:
        raise ValueError(f"--client-cpus must be a whole number >= 1, got {client_cpus}")
    refuse_retired(run_config, own=known)
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise ValueError(f"unknown run-config key(s) {unknown}: {reader} {', '.join(sorted(known))}")
    return {**known, **run_config}


def whole_cpus(client_cpus: float) -> int:
    if client_cpus < 1 or float(client_cpus) != int(client_cpus):
        raise ValueError(
            f"client_cpus must be a whole number >= 1 (Flower's simulation config stores it as an "
            f"unsigned integer), got {client_cpus}"
        )
    return int(client_cpus)


def write_connections(
    flwr_home: Path,
    *,
    num_supernodes: int,
    client_cpus: float,
    client_gpus: float = 0.0,
    deployments: Mapping[str, str] | None = None,
    local_options: bool = True,
) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with the SuperLink connections flwr reads.

    ``[superlink] default = "local"``; ``[superlink.local] address = ":local:"`` (a local
    simulation SuperLink, started on demand) with ``options.num-supernodes`` and
    ``options.backend.client-resources.*`` when ``local_options`` (deprecated since 1.41 but
    honoured, handy for running ``flwr run <dir>`` by hand; :func:`run_simulation` passes
    ``--federation-config`` instead); one ``[superlink.<name>] address = "127.0.0.1:P",
    insecure = true`` per deployment. Never put ``[tool.flwr.federations]`` in a
    pyproject: flwr migrates it into this file and comments it out in the pyproject.
    """
    cpus = whole_cpus(client_cpus)
    if num_supernodes < 1:
        raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
    deployments = dict(deployments or {})
    for name in deployments:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in ("local", "default"):
            raise ValueError(f"invalid deployment connection name {name!r}")
    local: dict[str, Any] = {"address": ":local:"}
    if local_options:
        local["options"] = {
            "num-supernodes": int(num_supernodes),
            "backend": {"client-resources": {"num-cpus": cpus, "num-gpus": float(client_gpus)}},
        }
    links: dict[str, Any] = {"default": LOCAL_CONNECTION, "local": local}
    for name, address in deployments.items():
        links[name] = {"address": address, "insecure": True}
    return _write_flower_config(Path(flwr_home), links)


def _dotted(table: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``key = value`` lines with nested tables as dotted keys (as flwr writes them)."""
    lines = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            lines += _dotted(value, f"{prefix}{key}.")
        else:
            lines.append(f"{prefix}{key} = {toml_value(value)}")
    return lines


def _write_flower_config(flwr_home: Path, links: Mapping[str, Any]) -> Path:
    """Write ``[superlink]`` (default + one table per connection) to config.toml."""
    lines = ["[superlink]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in links.items() if not isinstance(v, Mapping)]
    for name, conn in links.items():
        if isinstance(conn, Mapping):
            lines += ["", f"[superlink.{name}]", *_dotted(conn)]
    path = flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return dict(tomllib.load(fh))


def add_connection(flwr_home: Path, name: str, address: str) -> None:
    """Add (or replace) one ``[superlink.<name>]`` entry, keeping the rest of config.toml."""
    path = Path(flwr_home) / "config.toml"
    links = dict(_read_toml(path).get("superlink", {})) if path.exists() else {}
    links.setdefault("default", LOCAL_CONNECTION)
    links.setdefault("local", {"address": ":local:"})
    links[name] = {"address": address, "insecure": True}
    _write_flower_config(Path(flwr_home), links)


# ---------------------------------------------------------------------------------------------
# the app folder


def _flwr_version() -> str:
    try:
        return Version(metadata.version("flwr")).base_version
    except (
        metadata.PackageNotFoundError,
        ValueError,
    ):  # pragma: no cover - flwr is a dependency
        return "1.42.0"


def write_app_dir(
    target: Path,
    app_config: Mapping[str, RunConfigValue],
    serverapp: str = DEFAULT_SERVERAPP,
    clientapp: str = DEFAULT_CLIENTAPP,
    *,
    name: str = "mobiflower",
    version: str = "1.0.0",
    publisher: str = "mobiflower",
    license_text: str = "Apache License, Version 2.0\n",
) -> Path:
    """Write a minimal Flower app folder (``pyproject.toml`` + ``LICENSE``) and return it.

    ``flwr run <dir>`` packs ``<dir>`` into a FAB; this folder holds nothing but the app
    description, so the FAB stays tiny and the components come from the installed package
    (no source tree, no scanning of big ignored folders). ``fab-format-version = 1`` requires
    ``[project].license = { file = "LICENSE" }`` with that file present, a ``flwr>=``
    dependency and ``flwr-version-target`` (set to the installed flwr). ``app_config`` becomes
    ``[tool.flwr.app.config]``: the run config defaults, which ``-c`` may override.
    """
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]{0,31}", name):
        raise ValueError(f"Flower app name {name!r} must be a letter then letters/digits/-, <= 32 chars")
    for ref in (serverapp, clientapp):
        if ":" not in ref:
            raise ValueError(f"component {ref!r} must look like 'package.module:attribute'")
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    flwr_target = _flwr_version()
    lines = [
        "[build-system]",
        'requires = ["setuptools>=69"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        f"name = {_toml_string(name)}",
        f"version = {_toml_string(version)}",
        'description = "Flower app entry for mobiflower (components come from the installed package)"',
        'license = { file = "LICENSE" }',
        'dependencies = ["flwr>=1.42.0"]',
        "",
        "[tool.flwr.app]",
        f"publisher = {_toml_string(publisher)}",
        "fab-format-version = 1",
        f"flwr-version-target = {_toml_string(flwr_target)}",
        "",
        "[tool.flwr.app.components]",
        f"serverapp = {_toml_string(serverapp)}",
        f"clientapp = {_toml_string(clientapp)}",
        "",
        "[tool.flwr.app.config]",
    ]
    for key, value in app_config.items():
        lines.append(f"{check_key(key)} = {toml_value(value)}")
    (target / "pyproject.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (target / "LICENSE").write_text(license_text, encoding="utf-8")
    return target


def _flat(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_run_config(app_dir: Path, run_config: Mapping[str, RunConfigValue]) -> None:
    """Refuse overrides of keys the app does not declare, naming them: the SuperLink
    refuses them too, but only says "Invalid run configuration"."""
    path = Path(app_dir) / "pyproject.toml"
    if not path.exists():
        raise FileNotFoundError(f"no pyproject.toml in Flower app folder {app_dir}")
    app = _read_toml(path).get("tool", {}).get("flwr", {}).get("app", {})
    declared = _flat(app.get("config", {}))
    refuse_retired(run_config, own=declared)
    unknown = sorted(set(run_config) - set(declared))
    if unknown:
        raise ValueError(
            f"run config keys {unknown} are not in [tool.flwr.app.config] of {path}; "
            "Flower only accepts overrides of declared keys"
        )


def app_dir_for_run(scratch: Path, app_config: Mapping[str, RunConfigValue]) -> Path:
    """The mobiflower app folder under ``scratch`` (see :func:`write_app_dir`)."""
    return write_app_dir(Path(scratch) / "flower-app", app_config)


__all__ = [
    "DEFAULT_CLIENTAPP",
    "DEFAULT_SERVERAPP",
    "LOCAL_CONNECTION",
    "RunConfigValue",
    "add_connection",
    "app_dir_for_run",
    "check_key",
    "check_run_config",
    "run_config_args",
    "toml_value",
    "whole_cpus",
    "write_app_dir",
    "write_connections",
]
