"""Fast checks of the Flower plumbing's pure parts (no processes are started here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from mobiflower.simulations import flower_config as fc
from mobiflower.simulations.flower_processes import flower_env

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_run_config_args_round_trip_through_flwr_parser() -> None:
    from flwr.common.config import parse_config_args

    config = {
        "text": "plain",
        "spaces": "a b  c",
        "quotes": 'say "hi" it\'s',
        "backslash": "C:\\dir\\x",
        "looks-like-pairs": "k=v z=1",
        "empty": "",
        "control": "tab\there\nnewline",
        "unicode": "ünïcødé",
        "flag": True,
        "off": False,
        "count": 3,
        "negative": -7,
        "rate": 0.0003,
        "whole-float": 2.0,
        "tiny": 1e-12,
    }
    args = fc.run_config_args(config)
    assert args[0::2] == ["-c"] * len(config)
    assert parse_config_args(args[1::2]) == config
    assert parse_config_args([" ".join(args[1::2])]) == config  # also as one -c value


def test_toml_values() -> None:
    assert fc.run_config_args({"b": True, "i": 5, "f": 2.0, "s": "x"}) == [
        "-c",
        "b=true",
        "-c",
        "i=5",
        "-c",
        "f=2.0",
        "-c",
        's="x"',
    ]
    assert fc.toml_value(False) == "false"
    assert isinstance(tomllib.loads(f"v = {fc.toml_value(1e20)}")["v"], float)
    assert fc.run_config_args({}) == []


@pytest.mark.parametrize("bad", [{"a b": 1}, {"": 1}, {"a=b": 1}])
def test_run_config_args_rejects_bad_keys(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        fc.run_config_args(bad)


def test_run_config_args_rejects_bad_values() -> None:
    with pytest.raises(TypeError):
        fc.run_config_args({"x": [1, 2]})  # type: ignore[dict-item]


def test_write_connections(tmp_path: Path) -> None:
    path = fc.write_connections(
        tmp_path / "home",
        num_supernodes=4,
        client_cpus=2,
        client_gpus=0.25,
        deployments={"loop": "127.0.0.1:40001", "other": "127.0.0.1:40002"},
    )
    assert path == tmp_path / "home" / "config.toml"
    data = tomllib.loads(path.read_text())
    links = data["superlink"]
    assert links["default"] == "local"
    assert links["local"]["address"] == ":local:"
    assert links["local"]["options"]["num-supernodes"] == 4
    resources = links["local"]["options"]["backend"]["client-resources"]
    assert resources == {"num-cpus": 2, "num-gpus": 0.25}
    assert links["loop"] == {"address": "127.0.0.1:40001", "insecure": True}
    assert links["other"]["address"] == "127.0.0.1:40002"


def test_write_connections_is_read_by_flwr(tmp_path: Path) -> None:
    from flwr.cli.flower_config import parse_superlink_connection

    path = fc.write_connections(
        tmp_path,
        num_supernodes=3,
        client_cpus=1,
        deployments={"loop": "127.0.0.1:40001"},
    )
    links = tomllib.loads(path.read_text())["superlink"]
    local = parse_superlink_connection(links["local"], "local")
    assert local.address == ":local:"
    assert local.options is not None and local.options.num_supernodes == 3
    loop = parse_superlink_connection(links["loop"], "loop")
    assert loop.address == "127.0.0.1:40001" and loop.insecure


def test_write_connections_without_options(tmp_path: Path) -> None:
    path = fc.write_connections(tmp_path, num_supernodes=2, client_cpus=1, local_options=False)
    assert tomllib.loads(path.read_text())["superlink"]["local"] == {"address": ":local:"}


def test_write_connections_refuses_fractional_cpus(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="whole number"):
        fc.write_connections(tmp_path, num_supernodes=2, client_cpus=0.5)


def test_add_connection_keeps_others(tmp_path: Path) -> None:
    fc.write_connections(tmp_path, num_supernodes=2, client_cpus=1, deployments={"a": "127.0.0.1:1"})
    fc.add_connection(tmp_path, "b", "127.0.0.1:2")
    fc.add_connection(tmp_path, "a", "127.0.0.1:3")  # replaced, not duplicated
    links = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]
    assert links["a"]["address"] == "127.0.0.1:3"
    assert links["b"]["address"] == "127.0.0.1:2"
    assert links["local"]["options"]["num-supernodes"] == 2


def test_write_app_dir(tmp_path: Path) -> None:
    app_config = {"model": "smollm2-135m", "num-server-rounds": 3, "lr": 0.0003, "shared": True}
    target = fc.write_app_dir(tmp_path / "app", app_config, "pkg.server:app", "pkg.client:app")
    assert sorted(p.name for p in target.iterdir()) == ["LICENSE", "pyproject.toml"]
    data = tomllib.loads((target / "pyproject.toml").read_text())
    assert data["project"]["license"] == {"file": "LICENSE"}
    flwr_app = data["tool"]["flwr"]["app"]
    assert flwr_app["publisher"] == "mobiflower"
    assert flwr_app["fab-format-version"] == 1
    assert flwr_app["components"] == {
        "serverapp": "pkg.server:app",
        "clientapp": "pkg.client:app",
    }
    assert flwr_app["config"] == app_config
    assert "federations" not in data["tool"]["flwr"]


def test_write_app_dir_passes_flwr_validation(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.config import validate_config

    target = fc.write_app_dir(tmp_path / "app", {"x": 1})
    data = tomllib.loads((target / "pyproject.toml").read_text())
    ok, errors, _ = validate_config(data, check_module=False)
    assert ok, errors
    assert build_fab_from_disk(target)  # the FAB packs (LICENSE present, format 1 satisfied)


def test_app_dir_for_run_uses_mobiflower_components(tmp_path: Path) -> None:
    target = fc.app_dir_for_run(tmp_path, {"num-server-rounds": 1})
    components = tomllib.loads((target / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": fc.DEFAULT_SERVERAPP,
        "clientapp": fc.DEFAULT_CLIENTAPP,
    }


def test_check_run_config(tmp_path: Path) -> None:
    target = fc.write_app_dir(tmp_path / "app", {"num-server-rounds": 1, "lr": 0.1})
    fc.check_run_config(target, {"num-server-rounds": 2})
    with pytest.raises(ValueError, match="bogus"):
        fc.check_run_config(target, {"num-server-rounds": 2, "bogus": 1})


def test_flower_env(tmp_path: Path) -> None:
    env = flower_env(tmp_path)
    assert env["FLWR_HOME"] == str(tmp_path.resolve() / "flwr-home")
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0"
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    ports = {
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"],
        env["FLWR_LOCAL_CONTROL_API_PORT"],
    }
    assert len(ports) == 2 and all(p.isdigit() for p in ports)
