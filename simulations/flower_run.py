"""Running the app through Flower's own command line and streaming its output.

``flwr run <app_dir> <connection> --stream -c k=v ...`` is the supported way to run a Flower app
and exercises the real wire. Facts this relies on (flwr 1.41-1.42, read in its source and by
running it): ``--federation`` means something else (a ``@account/name`` federation id), so the
connection is positional. ``--stream`` exits 0 even when the ServerApp failed, so success is read
back with ``flwr ls <connection> --run-id <id> --format json`` (``status ==
"finished:completed"``); the ServerApp's ``print()`` and ``logging`` output does appear in the
stream. The simulation size comes from ``--federation-config 'num-supernodes=N
client-resources-num-cpus=C ...'`` (``options.*`` keys in ``config.toml`` still work but warn on
every run); ``client-resources-num-cpus`` is an unsigned integer in Flower's protocol.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mobiflower.simulations.flower_config import (
    LOCAL_CONNECTION,
    RunConfigValue,
    check_run_config,
    run_config_args,
    toml_value,
    whole_cpus,
    write_connections,
)
from mobiflower.simulations.flower_processes import flower_command, flower_env, stop_local_superlink

COMPLETED = "finished:completed"
"""Run status of a run whose ServerApp returned normally."""
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_RUN_STARTED = re.compile(r"Successfully started run (\d+)")
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

    def read_summary(self, run_dir: Path, run: str = "the run") -> dict[str, Any]:
        """The ``summary.json`` the run's ServerApp wrote in ``run_dir``, what its caller reports from. A run
        that wrote none (it failed or stopped before its end) is a RuntimeError naming its status."""
        path = run_dir / "summary.json"
        if not path.exists():
            raise RuntimeError(f"{run} finished ({self.status}) but wrote no summary at {path}")
        return json.loads(path.read_text())


def strip_ansi(text: str) -> str:
    """``text`` without terminal colour codes."""
    return _ANSI.sub("", text)


def output_tail(text: str, n: int = _TAIL_LINES) -> str:
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
            lines.put(strip_ansi(raw.rstrip("\n")))
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


def flwr_json(args: list[str], env: Mapping[str, str], timeout_s: float = 60.0) -> dict[str, Any]:
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
        return {"success": False, "error-message": output_tail(text + res.stderr, 20)}


def run_info(connection: str, run_id: int, env: Mapping[str, str]) -> dict[str, Any]:
    """Flower's record of one run (``flwr ls <connection> --run-id <id> --format json``)."""
    data = flwr_json(["ls", connection, "--run-id", str(run_id)], env)
    runs = data.get("runs") or []
    if not data.get("success") or not runs:
        raise FlowerRunError(f"could not read run {run_id} from {connection!r}: {data.get('error-message', data)}")
    return dict(runs[0])


def run_and_stream(
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
            flwr_json(["stop", str(run_id), connection], env, timeout_s=30)
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
            why = f"ended with status {status!r}" + (f": {result.details}" if result.details else "")
        name = f"Flower run {run_id}" if run_id is not None else "Flower run"
        raise FlowerRunError(
            f"{name} on {connection!r} {why}.\n--- last output ---\n{output_tail(output)}",
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
    cpus = whole_cpus(client_cpus)
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
        return run_and_stream(
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


__all__ = [
    "COMPLETED",
    "FlowerRunError",
    "FlowerRunResult",
    "flwr_json",
    "output_tail",
    "run_and_stream",
    "run_info",
    "run_simulation",
    "strip_ansi",
]
