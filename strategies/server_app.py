"""The side-tuning ServerApp: reads the run config and hands the fleet to :class:`SideTuningStrategy`.

Run it with ``flwr run .`` (simulation or a deployment connection) or ``mobiflower simulate``.
The summary (``summary.json``, ``summary.png``), checkpoints and the delivered side networks go
to ``run-dir`` (default ``$MOBIFLOWER_HOME/runs/<run id>``).
"""

from __future__ import annotations

import os
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from mobiflower.strategies.config import SideTuningConfig
from mobiflower.strategies.side_tuning import SideTuningStrategy

app = ServerApp()


def run_dir_for(config: SideTuningConfig, run_id: int) -> Path:
    if config.run_dir:
        return Path(config.run_dir).expanduser()
    home = Path(os.environ.get("MOBIFLOWER_HOME", Path.home() / ".cache" / "mobiflower")).expanduser()
    return home / "runs" / str(run_id)


def fleet_clock(config: SideTuningConfig):
    """With ``fleet`` in the run config (a bundled fleet's name or a fleet TOML file), a factory of that
    fleet model's virtual clock for the profiled device ids; without it, None: the strategy uses the
    times it measures."""
    if not config.fleet:
        return None
    from mobiflower.strategies.fleet_model import VirtualClock, load_fleet

    fleet = load_fleet(config.fleet)  # a FleetModelError names the file, tier and key, before any device is asked
    return lambda device_ids: VirtualClock(fleet.profiles_for(device_ids), seed=config.seed)


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = SideTuningConfig.from_run_config(context.run_config)
    strategy = SideTuningStrategy(
        config, run_dir_for(config, grid.run.run_id), dict(context.run_config), clock_for=fleet_clock(config)
    )
    strategy.start(grid)
