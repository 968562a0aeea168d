"""The Flower strategy that schedules a mobiflower fleet (see docs/concepts.md §2)."""

from mobiflower.strategies.config import ConfigError, SideTuningConfig
from mobiflower.strategies.side_tuning import FleetError, SideTuningStrategy

__all__ = ["ConfigError", "FleetError", "SideTuningConfig", "SideTuningStrategy"]
