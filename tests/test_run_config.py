"""Run config and node config into typed dataclasses: one path for the server and the device, and
pyproject's ``[tool.flwr.app.config]`` (what ``flwr run .`` reads) declaring exactly what they read."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from mobiflower.clients.device_setup import RUN_CONFIG_KEYS, DeviceSetup, DeviceSetupError
from mobiflower.platform.run_config import as_config, flag, typed_fields
from mobiflower.platform.state_defense import run_config_defaults
from mobiflower.strategies.config import ConfigError, SideTuningConfig

APP_ONLY = {"delivery-dir": "", "capture-dir": ""}  # read by the ClientApp itself (delivery folder, audit capture)


def test_pyproject_declares_every_key_the_apps_read_with_their_defaults():
    declared = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    config = declared["tool"]["flwr"]["app"]["config"]
    device = {k: v for k, v in as_config(DeviceSetup(), RUN_CONFIG_KEYS).items() if k in RUN_CONFIG_KEYS.values()}
    expected = {**device, **SideTuningConfig().as_dict(), **run_config_defaults(), **APP_ONLY}
    assert config == expected
    assert {k: type(v) for k, v in config.items()} == {k: type(v) for k, v in expected.items()}


def test_values_convert_to_their_fields_types_and_bad_ones_name_the_key():
    cfg = SideTuningConfig.from_run_config(
        {"num-server-rounds": "3", "lr": 1, "overlap": "no", "adapt": "TRUE", "fleet": 5, "model": "not a strategy key"}
    )
    assert (cfg.num_server_rounds, cfg.lr, cfg.overlap, cfg.adapt, cfg.fleet) == (3, 1.0, False, True, "5")
    with pytest.raises(ConfigError, match=r"run config num-server-rounds='many' is not a valid int"):
        SideTuningConfig.from_run_config({"num-server-rounds": "many"})
    with pytest.raises(DeviceSetupError, match=r"run config num-taps='x' is not a valid int"):
        DeviceSetup.from_configs({"num-taps": "x"}, {"partition-id": 0, "num-partitions": 1})
    with pytest.raises(DeviceSetupError, match=r"max-tokens=-1 must be >= 1"):
        DeviceSetup.from_configs({}, {"partition-id": 0, "num-partitions": 1, "max-tokens": -1})
    assert [flag(v) for v in ("1", "on", " Yes ", True, 1, "false", "0", "", False, 0)] == [True] * 5 + [False] * 5


def test_the_device_reads_its_run_keys_and_its_own_node_config():
    setup = DeviceSetup.from_configs(
        {"num-taps": 4, "device-threads": 2, "weight-precision": "fp32", "seed": 3},
        {"partition-id": 2, "num-partitions": 3, "weight-precision": "int8", "backbone-layers": 2},
    )
    assert (setup.num_taps, setup.threads, setup.seed, setup.partition_id, setup.num_partitions) == (4, 2, 3, 2, 3)
    assert (setup.weights, setup.backbone_layers) == ("int8", 2)  # the node's own choice wins
    assert (
        DeviceSetup.from_configs(
            {"weight-precision": "int8"}, {"partition-id": 0, "num-partitions": 1, "weight-precision": ""}
        ).weights
        == "int8"
    )
    with pytest.raises(DeviceSetupError, match=r"partition-id=0 must be in \[0, num-partitions=0\)"):
        DeviceSetup.from_configs({}, {"partition-id": 0, "num-partitions": 0})
    assert typed_fields(DeviceSetup, {"num-taps": None}) == {}  # None sets nothing
