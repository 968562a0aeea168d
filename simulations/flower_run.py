"""Flower process plumbing: isolated ``flwr run`` simulations and loopback deployments.

Everything here drives Flower through its own command line (``flwr``, ``flower-superlink``,
``flower-supernode``) as separate processes, because that is the supported way to run a Flower
app in flwr 1.41 and it exercises the real wire. Facts this module relies on (flwr 1.41.0,
checked in its source and by running it):

* ``flwr run <app_dir> <connection> --stream -c k=v ...``: the connection is a positional
  name looked up in ``$FLWR_HOME/config.toml`` (``--federation`` means something else: a
  ``@account/name`` federation id). ``--stream`` exits 0 even when the ServerApp failed, so
  success is read back with ``flwr ls <connection> --run-id <id> --format json``
  (``status == "finished:completed"``). The ServerApp's ``print()`` and ``logging`` output
  does appear in the stream.
* A connection with ``address = ":local:"`` makes ``flwr`` start a detached local
  ``flower-superlink --simulation`` on ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (default 39091,
  shared by every user of the machine) that outlives the command. We give it a free port
  and stop it, with everything it spawned, by pid when we are done.
* The simulation size comes from ``--federation-config 'num-supernodes=N
  client-resources-num-cpus=C ...'``; ``options.*`` keys in ``config.toml`` still work but
  are deprecated (a warning on every run). ``client-resources-num-cpus`` is an unsigned
  integer in Flower's protocol: fractional CPUs are refused.
* flwr 1.41 SuperLinks serve Fleet, Control and Runtime APIs over one HTTP port
  (``--host``/``--port``); SuperNodes take ``--superlink host:port`` and their own
  ``--port`` for their local Runtime API. Both spawn a detached ``flower-superexec``.
* ``flwr run <dir>`` packs a FAB from ``<dir>``: every ``*.py``, ``*.toml``, ``*.md``,
  ``*.yaml``/``*.yml``, ``*.json``/``*.jsonl`` and the root ``LICENSE``, minus the root
  ``.gitignore`` patterns, ``.venv/``, ``venv/``, ``build/``, ``__pycache__/``, ``test_*.py``
  and ``*_test.py``; at most 10 MB compressed and 10 directory levels. It walks the whole
  tree first. :func:`write_app_dir` therefore makes a tiny app folder (``pyproject.toml`` and
  ``LICENSE`` only) whose components are imported from the installed ``mobiflower`` package.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
from packaging.version import Version

RunConfigValue = bool | int | float | str
"""A value Flower's run config accepts (``[tool.flwr.app.config]`` / ``-c``)."""

LOCAL_CONNECTION = "local"
"""Name of the connection that makes ``flwr`` start a local simulation SuperLink."""

COMPLETED = "finished:completed"
"""Run status of a run whose ServerApp returned normally."""

DEFAULT_SERVERAPP = "mobiflower.strategies.server_app:app"
DEFAULT_CLIENTAPP = "mobiflower.clients.client_app:app"

# Marks every process we start (children inherit it), so cleanup finds exactly our processes,
# including detached grandchildren (flower-superexec, flwr-serverapp, Ray workers).
_MARKER_VAR = "MOBIFLOWER_FLOWER_SCRATCH"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_TAIL_LINES = 60


class FlowerRunError(RuntimeError):
    """A Flower run or process failed; the message carries the output tail."""

    def __init__(self, message: str, result: FlowerRunResult | None = None) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class FlowerRunResult:
    """Outcome of one ``flwr run``.

    ``status`` is Flower's run status (``"finished:completed"``, ``"finished:failed"``,
    ``"finished:stopped"``, or ``"timeout"`` / ``"unknown"`` when it could not be read);
    ``info`` is the run's full ``flwr ls --format json`` record (network traffic, compute
    time, timestamps) when it could be read.
    """

    run_id: int | None
    status: str
    ok: bool
    output: str
    wall_s: float
    details: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def traffic(self) -> dict[str, int]:
        """Flower's byte counts for the run: ``inbound-bytes``, ``outbound-bytes``, ``total-bytes``."""
        return dict(self.info.get("network-traffic", {}))


# ---------------------------------------------------------------------------------------------
# environment, ports, config files


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct free loopback ports (sockets held open together, so no repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(
                socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            )
            sock.bind(("127.0.0.1", 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def flower_command(name: str) -> str:
    """Path of a console script of the running interpreter's environment, else the bare name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def flower_env(scratch: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for flwr processes that touch nothing outside ``scratch``.

    ``FLWR_HOME`` holds config.toml, installed FABs and the local SuperLink's state; runtime
    ``uv`` installs, telemetry and update checks are off (the machine may be offline); the
    auto-started local SuperLink gets free ports instead of the machine-wide 39091/39093; this
    interpreter's ``bin/`` comes first on ``PATH`` because ``flwr`` spawns ``flower-superlink``
    by bare name; output is unbuffered so ``--stream`` lines arrive as they are written.
    """
    scratch = Path(scratch).resolve()
    env = dict(os.environ if base is None else base)
    http_port, control_port = free_ports(2)
    env.update(
        {
            "FLWR_HOME": str(scratch / "flwr-home"),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
            "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
            "PYTHONUNBUFFERED": "1",
            "PATH": os.pathsep.join(
                [str(Path(sys.executable).parent), env.get("PATH", os.defpath)]
            ),
            _MARKER_VAR: str(scratch),
        }
    )
    return env


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
    raise TypeError(
        f"run config values must be bool, int, float or str, got {type(value).__name__}"
    )


def _check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(
            f"run config key {key!r} is not a bare TOML key (letters, digits, - and _)"
        )
    return key


def run_config_args(config: Mapping[str, RunConfigValue]) -> list[str]:
    """Turn a run config into ``flwr run`` arguments: ``["-c", "k=v", "-c", ...]``.

    Flower splits each ``-c`` value on whitespace unless the value is quoted, then parses it
    as TOML; strings are emitted as basic strings with ``"`` escaped as ``\\u0022`` so values
    with spaces, quotes and backslashes all round-trip.
    """
    args: list[str] = []
    for key, value in config.items():
        args += ["-c", f"{_check_key(key)}={toml_value(value)}"]
    return args


def _whole_cpus(client_cpus: float) -> int:
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
    """Write ``$FLWR_HOME/config.toml`` with the SuperLink connections flwr 1.41 reads.

    ``[superlink] default = "local"``; ``[superlink.local] address = ":local:"`` (a local
    simulation SuperLink, started on demand) with ``options.num-supernodes`` and
    ``options.backend.client-resources.*`` when ``local_options`` (deprecated in 1.41 but
    honoured, handy for running ``flwr run <dir>`` by hand; :func:`run_simulation` passes
    ``--federation-config`` instead); one ``[superlink.<name>] address = "127.0.0.1:P",
    insecure = true`` per deployment. Never put ``[tool.flwr.federations]`` in a
    pyproject: flwr 1.41 migrates it into this file and comments it out in the pyproject.
    """
    cpus = _whole_cpus(client_cpus)
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
            "backend": {
                "client-resources": {"num-cpus": cpus, "num-gpus": float(client_gpus)}
            },
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
    lines += [
        f"{k} = {toml_value(v)}" for k, v in links.items() if not isinstance(v, Mapping)
    ]
    for name, conn in links.items():
        if isinstance(conn, Mapping):
            lines += ["", f"[superlink.{name}]", *_dotted(conn)]
    path = flwr_home / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    with path.open("rb") as fh:
        return dict(tomllib.load(fh))


def _add_connection(flwr_home: Path, name: str, address: str) -> None:
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
        return "1.41.0"


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
        raise ValueError(
            f"Flower app name {name!r} must be a letter then letters/digits/-, <= 32 chars"
        )
    for ref in (serverapp, clientapp):
        if ":" not in ref:
            raise ValueError(
                f"component {ref!r} must look like 'package.module:attribute'"
            )
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
        'dependencies = ["flwr>=1.41.0"]',
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
        lines.append(f"{_check_key(key)} = {toml_value(value)}")
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
    unknown = sorted(set(run_config) - set(declared))
    if unknown:
        raise ValueError(
            f"run config keys {unknown} are not in [tool.flwr.app.config] of {path}; "
            "Flower only accepts overrides of declared keys"
        )


def app_dir_for_run(scratch: Path, app_config: Mapping[str, RunConfigValue]) -> Path:
    """The mobiflower app folder under ``scratch`` (see :func:`write_app_dir`)."""
    return write_app_dir(Path(scratch) / "flower-app", app_config)


# ---------------------------------------------------------------------------------------------
# processes


def _marked_processes(scratch: Path) -> list[psutil.Process]:
    """Every live process started (directly or not) with our scratch marker, never ourselves."""
    marker = str(Path(scratch).resolve())
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            if proc.environ().get(_MARKER_VAR) == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def _stop(procs: Iterable[psutil.Process], grace_s: float = 5.0) -> None:
    """Terminate, wait, kill: one batch of processes, by pid."""
    procs = [p for p in procs if p.is_running()]
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2.0)


def processes_of(popens: Iterable[subprocess.Popen[bytes]]) -> list[psutil.Process]:
    """The still-existing processes behind ``popens`` (to stop them in order by pid)."""
    procs = []
    for popen in popens:
        try:
            procs.append(psutil.Process(popen.pid))
        except psutil.Error:
            pass
    return procs


def stop_flower_processes(scratch: Path, first: Iterable[psutil.Process] = ()) -> None:
    """Stop everything Flower left running for ``scratch``: ``first`` (the SuperLink /
    SuperNodes, so they shut their children down in order), then any marked leftover
    (detached ``flower-superexec``, app processes, Ray)."""
    _stop(first)
    for _ in range(3):
        left = _marked_processes(scratch)
        if not left:
            return
        _stop(left, grace_s=3.0)


def stop_local_superlink(scratch: Path) -> list[int]:
    """Stop the auto-started local SuperLink of ``scratch`` and all it spawned; return pids."""
    procs = _marked_processes(scratch)
    links = [p for p in procs if any("flower-superlink" in a for a in _cmdline(p))]
    stop_flower_processes(scratch, first=links)
    return [p.pid for p in procs]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except psutil.Error:
        return []


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    return "\n".join(text.splitlines()[-n:])


def _stream(
    cmd: list[str],
    env: Mapping[str, str],
    on_line: Callable[[str], None] | None,
    timeout_s: float,
) -> tuple[int | None, list[str], int | None]:
    """Run ``cmd``, hand each output line (ANSI colours stripped) to ``on_line``.

    Returns (exit code or None on timeout, lines, run id seen in the output).
    """
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        errors="replace",
        bufsize=1,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.put(_ANSI.sub("", raw.rstrip("\n")))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    out: list[str] = []
    run_id: int | None = None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None, out, run_id
            try:
                line = lines.get(timeout=min(left, 0.5))
            except queue.Empty:
                continue
            if line is None:
                break
            out.append(line)
            if run_id is None and (m := _RUN_STARTED.search(line)):
                run_id = int(m.group(1))
            if on_line is not None:
                on_line(line)
        return proc.wait(timeout=30), out, run_id
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)


def _flwr_json(
    args: list[str], env: Mapping[str, str], timeout_s: float = 60.0
) -> dict[str, Any]:
    """Run a ``flwr ... --format json`` command and return its JSON (errors included)."""
    res = subprocess.run(
        [flower_command("flwr"), *args, "--format", "json"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        stdin=subprocess.DEVNULL,
        check=False,
    )
    text = res.stdout
    start = text.find("{")
    try:
        return dict(json.loads(text[start:])) if start >= 0 else {}
    except json.JSONDecodeError:
        return {"success": False, "error-message": _tail(text + res.stderr, 20)}


def run_info(connection: str, run_id: int, env: Mapping[str, str]) -> dict[str, Any]:
    """Flower's record of one run (``flwr ls <connection> --run-id <id> --format json``)."""
    data = _flwr_json(["ls", connection, "--run-id", str(run_id)], env)
    runs = data.get("runs") or []
    if not data.get("success") or not runs:
        raise FlowerRunError(
            f"could not read run {run_id} from {connection!r}: {data.get('error-message', data)}"
        )
    return dict(runs[0])


def _finish(
    connection: str,
    app_dir: Path,
    run_config: Mapping[str, RunConfigValue],
    env: Mapping[str, str],
    on_line: Callable[[str], None] | None,
    timeout_s: float,
    extra_args: list[str],
    check: bool,
) -> FlowerRunResult:
    """``flwr run --stream`` then read the status back; the shared half of both run kinds."""
    check_run_config(app_dir, run_config)
    t0 = time.monotonic()
    cmd = [flower_command("flwr"), "run", str(Path(app_dir).resolve()), connection, "--stream"]
    cmd += run_config_args(run_config) + extra_args
    code, out, run_id = _stream(cmd, env, on_line, timeout_s)
    status, details, info = "unknown", "", {}
    if code is None:
        status = "timeout"
        if run_id is not None:
            _flwr_json(["stop", str(run_id), connection], env, timeout_s=30)
    elif run_id is not None:
        # The stream ends when the logs do; the status may lag a moment behind.
        for _ in range(40):
            try:
                info = run_info(connection, run_id, env)
            except FlowerRunError as err:
                details = str(err)
                break
            status, details = (
                str(info.get("status", "unknown")),
                str(info.get("status-details", "")),
            )
            if status.startswith("finished"):
                break
            time.sleep(0.5)
    output = "\n".join(out)
    result = FlowerRunResult(
        run_id=run_id,
        status=status,
        ok=status == COMPLETED,
        output=output,
        wall_s=time.monotonic() - t0,
        details="" if details == "N/A" else details,
        info=info,
    )
    if check and not result.ok:
        if code is None:
            why = f"timed out after {timeout_s:.0f}s"
        elif run_id is None:
            why = f"did not start (flwr exited with {code})"
        else:
            why = f"ended with status {status!r}" + (
                f": {result.details}" if result.details else ""
            )
        name = f"Flower run {run_id}" if run_id is not None else "Flower run"
        raise FlowerRunError(
            f"{name} on {connection!r} {why}.\n--- last output ---\n{_tail(output)}",
            result,
        )
    return result


def run_simulation(
    app_dir: Path,
    run_config: Mapping[str, RunConfigValue],
    *,
    num_supernodes: int,
    client_cpus: float,
    scratch: Path,
    on_line: Callable[[str], None] | None = None,
    timeout_s: float = 3600.0,
    client_gpus: float = 0.0,
    extra_env: Mapping[str, str] | None = None,
    check: bool = True,
) -> FlowerRunResult:
    """Run the app as a Flower simulation (``flwr run <app_dir> local --stream``).

    ``flwr`` starts a detached local simulation SuperLink (Ray inside) on free ports inside
    ``scratch``; it is always stopped afterwards, with every process it spawned, found by pid
    through a marker variable in their environment. ``ok`` comes from the run status, not
    from the exit code. With ``check`` a failed, unreadable or timed-out run raises
    :class:`FlowerRunError` carrying the output tail and the result. Run-config keys the app
    does not declare raise ``ValueError`` up front. Use one ``scratch`` per concurrent run:
    cleanup stops every process marked with it.
    """
    scratch = Path(scratch).resolve()
    env = flower_env(scratch)
    env.update(extra_env or {})
    cpus = _whole_cpus(client_cpus)
    write_connections(
        Path(env["FLWR_HOME"]),
        num_supernodes=num_supernodes,
        client_cpus=cpus,
        client_gpus=client_gpus,
        local_options=False,
    )
    federation = (
        f"num-supernodes={int(num_supernodes)} client-resources-num-cpus={cpus} "
        f"client-resources-num-gpus={toml_value(float(client_gpus))}"
    )
    try:
        return _finish(
            LOCAL_CONNECTION,
            app_dir,
            run_config,
            env,
            on_line,
            timeout_s,
            ["--federation-config", federation],
            check,
        )
    finally:
        stop_local_superlink(scratch)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as res:
            return bool(200 <= res.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LoopbackDeployment:
    """A real Flower deployment on 127.0.0.1: one SuperLink and N SuperNodes.

    Each SuperNode ``i`` gets ``--node-config 'partition-id=i num-partitions=N'`` (plus
    ``node_configs[i]``), its own Runtime API port and its own ``FLWR_HOME`` (installed FABs
    are not shared between nodes). Logs go to ``scratch/logs``. Use as a context manager:
    every process is stopped by pid on exit, also when the body raised.
    """

    def __init__(
        self,
        scratch: Path,
        num_supernodes: int,
        *,
        name: str = "loopback",
        node_configs: list[Mapping[str, RunConfigValue]] | None = None,
        extra_env: Mapping[str, str] | None = None,
        startup_timeout_s: float = 90.0,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if node_configs is not None and len(node_configs) != num_supernodes:
            raise ValueError("node_configs needs one mapping per SuperNode")
        self.scratch = Path(scratch).resolve()
        self.num_supernodes = num_supernodes
        self.name = name
        self.node_configs = [dict(c) for c in node_configs] if node_configs else None
        self.startup_timeout_s = startup_timeout_s
        self.env = flower_env(self.scratch)
        self.env.update(extra_env or {})
        self.port: int | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: list[subprocess.Popen[bytes]] = []
        self.log_dir = self.scratch / "logs"
        self._logs: list[Any] = []

    @property
    def address(self) -> str:
        """The SuperLink's HTTP address (Fleet, Control and Runtime APIs)."""
        if self.port is None:
            raise RuntimeError("deployment not started")
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackDeployment:  # noqa: PYI034 - not meant for subclassing
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(
        self, cmd: list[str], log_name: str, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / log_name).open("wb")
        self._logs.append(log)
        return subprocess.Popen(
            cmd,
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # our stop() decides the shutdown order, not a Ctrl-C
        )

    def _log_tails(self, n: int = 25) -> str:
        parts = []
        for path in sorted(self.log_dir.glob("*.log")):
            text = path.read_text(encoding="utf-8", errors="replace")
            parts.append(f"--- {path.name} ---\n{_ANSI.sub('', _tail(text, n))}")
        return "\n".join(parts)

    def _fail(self, why: str) -> FlowerRunError:
        return FlowerRunError(f"loopback deployment: {why}\n{self._log_tails()}")

    def start(self) -> None:
        """Start the SuperLink, wait for its health endpoint, start the SuperNodes and wait
        until all of them show as ``online`` in ``flwr supernode ls``."""
        if self.superlink is not None:
            return
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        self.port = free_port()
        link_dir = self.scratch / "superlink"
        link_dir.mkdir(parents=True, exist_ok=True)
        self.superlink = self._spawn(
            [
                flower_command("flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--database",
                str(link_dir / "state.db"),
                "--disable-runtime-dependency-installation",
            ],
            "superlink.log",
            self.env,
        )
        while not _http_ok(f"http://{self.address}/health"):
            if self.superlink.poll() is not None:
                raise self._fail(
                    f"flower-superlink exited with {self.superlink.returncode}"
                )
            if time.monotonic() > deadline:
                raise self._fail("SuperLink did not answer on /health in time")
            time.sleep(0.2)
        _add_connection(Path(self.env["FLWR_HOME"]), self.name, self.address)

        runtime_ports = free_ports(self.num_supernodes)
        for i, port in enumerate(runtime_ports):
            cfg: dict[str, RunConfigValue] = {
                "partition-id": i,
                "num-partitions": self.num_supernodes,
            }
            if self.node_configs:
                cfg.update(self.node_configs[i])
            node_env = dict(self.env)
            node_env["FLWR_HOME"] = str(self.scratch / f"supernode-{i}" / "flwr-home")
            self.supernodes.append(
                self._spawn(
                    [
                        flower_command("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        self.address,
                        "--port",
                        str(port),
                        "--node-config",
                        " ".join(
                            f"{_check_key(k)}={toml_value(v)}" for k, v in cfg.items()
                        ),
                    ],
                    f"supernode-{i}.log",
                    node_env,
                )
            )

        online = 0
        while True:
            for i, node in enumerate(self.supernodes):
                if node.poll() is not None:
                    raise self._fail(
                        f"flower-supernode {i} exited with {node.returncode}"
                    )
            nodes = self.nodes()
            online = sum(1 for n in nodes if n.get("status") == "online")
            if online >= self.num_supernodes:
                return
            if time.monotonic() > deadline:
                raise self._fail(
                    f"only {online}/{self.num_supernodes} SuperNodes online in time"
                )
            time.sleep(0.5)

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's node list (``flwr supernode ls <connection> --format json``)."""
        data = _flwr_json(["supernode", "ls", self.name], self.env)
        return list(data.get("nodes") or [])

    def run(
        self,
        app_dir: Path,
        run_config: Mapping[str, RunConfigValue],
        on_line: Callable[[str], None] | None = None,
        timeout_s: float = 3600.0,
        check: bool = True,
    ) -> FlowerRunResult:
        """``flwr run <app_dir> <connection> --stream -c ...`` against this deployment; a
        timed-out run is stopped with ``flwr stop``. Same result and errors as
        :func:`run_simulation`."""
        if self.superlink is None:
            raise RuntimeError("deployment not started")
        return _finish(
            self.name, app_dir, run_config, self.env, on_line, timeout_s, [], check
        )

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Flower's full record of a run on this deployment."""
        return run_info(self.name, run_id, self.env)

    def traffic(self, run_id: int) -> dict[str, int]:
        """Flower's own byte counts for a run: ``inbound-bytes`` (replies, node to
        SuperLink), ``outbound-bytes`` (messages, SuperLink to nodes) and ``total-bytes``.
        Objects are content-addressed: identical arrays are sent only once."""
        return {
            k: int(v)
            for k, v in self.run_info(run_id).get("network-traffic", {}).items()
        }

    def stop(self) -> None:
        """Stop SuperNodes, then the SuperLink (terminate, wait, kill), then any process
        they left behind; idempotent."""

        _stop(processes_of(self.supernodes))
        stop_flower_processes(
            self.scratch, first=processes_of([self.superlink] if self.superlink else [])
        )
        for popen in [*self.supernodes, *([self.superlink] if self.superlink else [])]:
            try:
                popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        for log in self._logs:
            log.close()
        self._logs.clear()
        self.supernodes.clear()
        self.superlink = None


__all__ = [
    "COMPLETED",
    "DEFAULT_CLIENTAPP",
    "DEFAULT_SERVERAPP",
    "FlowerRunError",
    "FlowerRunResult",
    "LoopbackDeployment",
    "RunConfigValue",
    "app_dir_for_run",
    "check_run_config",
    "flower_command",
    "flower_env",
    "free_port",
    "free_ports",
    "run_config_args",
    "run_info",
    "processes_of",
    "run_simulation",
    "stop_flower_processes",
    "stop_local_superlink",
    "toml_value",
    "write_app_dir",
    "write_connections",
]
