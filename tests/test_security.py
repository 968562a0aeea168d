"""A TLS deployment with SuperNode authentication (Flower's own): a registered SuperNode joins over
TLS, an unknown one is refused. Every process is stopped by pid, also when an assertion fails."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from mobiflower.simulations.flower_processes import (
    flower_command,
    flower_env,
    free_ports,
    processes_of,
    stop_flower_processes,
)
from mobiflower.simulations.tls import make_loopback_pki


def _supernode(pki, index: int, link: str, port: int, home: Path, env: dict, log: Path) -> subprocess.Popen:
    private, _ = pki.node_keys[index]
    node_env = {**env, "FLWR_HOME": str(home)}
    return subprocess.Popen(
        [
            flower_command("flower-supernode"),
            "--root-certificates",
            str(pki.ca_cert),
            "--superlink",
            link,
            "--port",
            str(port),
            "--node-config",
            f"partition-id={index} num-partitions=2",
            "--auth-supernode-private-key",
            str(private),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=node_env,
    )


def _nodes(env: dict) -> list[dict]:
    out = subprocess.run(
        [flower_command("flwr"), "supernode", "ls", "secure", "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return json.loads(out.stdout).get("nodes") or [] if out.stdout.strip().startswith("{") else []


@pytest.mark.slow
def test_tls_deployment_admits_registered_supernodes_only(tmp_path):
    scratch = tmp_path.resolve()
    pki = make_loopback_pki(scratch / "pki", nodes=2)
    env = flower_env(scratch)
    link_port, known_port, unknown_port = free_ports(3)
    link = f"127.0.0.1:{link_port}"
    home = Path(env["FLWR_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "secure"\n\n[superlink.secure]\naddress = "{link}"\n'
        f'root-certificates = "{pki.ca_cert}"\n'
    )
    procs: list[subprocess.Popen] = []
    try:
        procs.append(
            subprocess.Popen(
                [
                    flower_command("flower-superlink"),
                    "--ssl-ca-certfile",
                    str(pki.ca_cert),
                    "--ssl-certfile",
                    str(pki.server_cert),
                    "--ssl-keyfile",
                    str(pki.server_key),
                    "--enable-supernode-auth",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(link_port),
                    "--database",
                    str(scratch / "state.db"),
                    "--disable-runtime-dependency-installation",
                ],
                stdout=(scratch / "superlink.log").open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
            )
        )
        registered = None
        for _ in range(60):  # the SuperLink takes a few seconds to serve TLS
            reg = subprocess.run(
                [flower_command("flwr"), "supernode", "register", str(pki.node_keys[0][1]), "secure"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if "registered successfully" in reg.stdout:
                registered = reg.stdout
                break
            time.sleep(1)
        assert registered, (scratch / "superlink.log").read_text()[-2000:]

        known = _supernode(pki, 0, link, known_port, scratch / "node-0", env, scratch / "node-0.log")
        unknown = _supernode(pki, 1, link, unknown_port, scratch / "node-1", env, scratch / "node-1.log")
        procs += [known, unknown]
        try:
            unknown.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(
                "the unregistered SuperNode was not refused within 90 s:\n"
                + (scratch / "node-1.log").read_text()[-2000:]
            )
        refusal = (scratch / "node-1.log").read_text()
        assert unknown.returncode != 0 and "Failed to activate SuperNode" in refusal, refusal[-2000:]

        online = []
        for _ in range(60):
            online = [n for n in _nodes(env) if n.get("status") == "online"]
            if online:
                break
            time.sleep(1)
        assert len(online) == 1 and known.poll() is None, (scratch / "node-0.log").read_text()[-2000:]
        assert len(_nodes(env)) == 1  # the unknown key never became a node
    finally:
        stop_flower_processes(scratch, first=processes_of(procs))
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
