"""A real Flower deployment on 127.0.0.1: one SuperLink and N SuperNodes as separate processes.

flwr 1.41-1.42 SuperLinks serve the Fleet, Control and Runtime APIs over one HTTP port
(``--host``/``--port``); SuperNodes take ``--superlink host:port`` and their own ``--port`` for
their local Runtime API. Both spawn a detached ``flower-superexec``, which is why stopping goes by
the scratch folder's process marker as well as by pid.
"""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from mobiflower.simulations.flower_config import RunConfigValue, add_connection, check_key, toml_value
from mobiflower.simulations.flower_processes import (
    flower_command,
    flower_env,
    free_port,
    free_ports,
    processes_of,
    stop_flower_processes,
    stop_processes,
)
from mobiflower.simulations.flower_run import (
    FlowerRunError,
    FlowerRunResult,
    flwr_json,
    output_tail,
    run_and_stream,
    run_info,
    strip_ansi,
)


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

    def _spawn(self, cmd: list[str], log_name: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
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
            parts.append(f"--- {path.name} ---\n{strip_ansi(output_tail(text, n))}")
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
                raise self._fail(f"flower-superlink exited with {self.superlink.returncode}")
            if time.monotonic() > deadline:
                raise self._fail("SuperLink did not answer on /health in time")
            time.sleep(0.2)
        add_connection(Path(self.env["FLWR_HOME"]), self.name, self.address)
        self._start_supernodes()
        self._wait_online(deadline)

    def _start_supernodes(self) -> None:
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
                        " ".join(f"{check_key(k)}={toml_value(v)}" for k, v in cfg.items()),
                    ],
                    f"supernode-{i}.log",
                    node_env,
                )
            )

    def _wait_online(self, deadline: float) -> None:
        online = 0
        while True:
            for i, node in enumerate(self.supernodes):
                if node.poll() is not None:
                    raise self._fail(f"flower-supernode {i} exited with {node.returncode}")
            nodes = self.nodes()
            online = sum(1 for n in nodes if n.get("status") == "online")
            if online >= self.num_supernodes:
                return
            if time.monotonic() > deadline:
                raise self._fail(f"only {online}/{self.num_supernodes} SuperNodes online in time")
            time.sleep(0.5)

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's node list (``flwr supernode ls <connection> --format json``)."""
        data = flwr_json(["supernode", "ls", self.name], self.env)
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
        return run_and_stream(self.name, app_dir, run_config, self.env, on_line, timeout_s, [], check)

    def run_info(self, run_id: int) -> dict[str, Any]:
        """Flower's full record of a run on this deployment."""
        return run_info(self.name, run_id, self.env)

    def traffic(self, run_id: int) -> dict[str, int]:
        """Flower's own byte counts for a run: ``inbound-bytes`` (replies, node to
        SuperLink), ``outbound-bytes`` (messages, SuperLink to nodes) and ``total-bytes``.
        Objects are content-addressed: identical arrays are sent only once."""
        return {k: int(v) for k, v in self.run_info(run_id).get("network-traffic", {}).items()}

    def stop(self) -> None:
        """Stop SuperNodes, then the SuperLink (terminate, wait, kill), then any process
        they left behind; idempotent."""

        stop_processes(processes_of(self.supernodes))
        stop_flower_processes(self.scratch, first=processes_of([self.superlink] if self.superlink else []))
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


__all__ = ["LoopbackDeployment"]
