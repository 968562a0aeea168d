"""The processes Flower starts for a run, found and stopped by pid.

Every process we start gets a marker variable in its environment (children inherit it), so
cleanup finds exactly our processes, detached grandchildren included (``flower-superexec``,
``flwr-serverapp``, Ray workers), and never touches anyone else's. A ``flwr run`` against a
``:local:`` connection starts a detached local ``flower-superlink --simulation`` on
``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` (default 39091, shared by every user of the machine) that
outlives the command: :func:`flower_env` gives it free ports, :func:`stop_local_superlink` stops it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from pathlib import Path

import psutil

MARKER_VAR = "MOBIFLOWER_FLOWER_SCRATCH"
"""Environment variable that marks every process started for one scratch folder."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct free loopback ports (sockets held open together, so no repeats)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
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
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)]),
            MARKER_VAR: str(scratch),
        }
    )
    return env


def _marked_processes(scratch: Path) -> list[psutil.Process]:
    """Every live process started (directly or not) with our scratch marker, never ourselves."""
    marker = str(Path(scratch).resolve())
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter():
        if proc.pid in mine:
            continue
        try:
            if proc.environ().get(MARKER_VAR) == marker:
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def stop_processes(procs: Iterable[psutil.Process], grace_s: float = 5.0) -> None:
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
    stop_processes(first)
    for _ in range(3):
        left = _marked_processes(scratch)
        if not left:
            return
        stop_processes(left, grace_s=3.0)


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


__all__ = [
    "MARKER_VAR",
    "flower_command",
    "flower_env",
    "free_port",
    "free_ports",
    "processes_of",
    "stop_flower_processes",
    "stop_local_superlink",
    "stop_processes",
]
