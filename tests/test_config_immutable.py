"""A run's config cannot change under it: SideTuningConfig is frozen, and start() overrides on a checked
copy, never on the config it was given (issue 28)."""

import dataclasses

import pytest

from mobiflower.strategies.config import ConfigError, SideTuningConfig
from mobiflower.strategies.run_state import FleetError
from mobiflower.strategies.side_tuning import SideTuningStrategy


class _NoDevices:
    """A Grid with nobody connected: start() takes its config, then stops at profiling."""

    def get_node_ids(self) -> list[int]:
        return []


def test_the_config_is_frozen():
    config = SideTuningConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_server_rounds = 3  # type: ignore[misc]
    assert dataclasses.replace(config, num_server_rounds=3).num_server_rounds == 3 and config.num_server_rounds == 1


def test_start_overrides_a_copy_and_leaves_the_given_config_alone(tmp_path):
    config = SideTuningConfig()
    strategy = SideTuningStrategy(config, tmp_path)
    with pytest.raises(FleetError, match="no devices are connected"):
        strategy.start(_NoDevices(), num_rounds=3, timeout=5.0)
    assert (config.num_server_rounds, config.request_timeout) == (1, 900.0)
    assert (strategy.config.num_server_rounds, strategy.config.request_timeout) == (3, 5.0)


def test_an_override_is_checked_like_the_config():
    strategy = SideTuningStrategy(SideTuningConfig(), "unused")
    with pytest.raises(ConfigError, match="num-server-rounds must be at least 1"):
        strategy.start(_NoDevices(), num_rounds=0)
