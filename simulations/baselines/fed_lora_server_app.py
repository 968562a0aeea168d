"""The federated on-device LoRA baseline's ServerApp: FedAvg rounds, a final test, ``summary.json``.

It builds the same PEFT model the devices build for the run's task (so the initial adapters, and a
classifier's head, come from one seeded initialisation), runs :class:`FedLoraStrategy` (Flower's FedAvg) for ``num-server-rounds`` rounds with
on-device evaluation after each (the task's metrics), scores the final adapters on every device's
test split, and writes the run summary to ``run-dir`` (default ``$MOBIFLOWER_HOME/runs/fed-lora-<run id>``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from mobiflower.platform.assets import home as mobiflower_home
from mobiflower.platform.atomic import atomic_file
from mobiflower.platform.run_config import as_config
from mobiflower.platform.tasks import BUNDLED_TASK, Task, TaskConfig
from mobiflower.simulations.baselines.fed_lora_strategy import FedLoraConfig, FedLoraStrategy

app = ServerApp()


def run_dir_for(config: FedLoraConfig, run_id: int) -> Path:
    if config.run_dir:
        return Path(config.run_dir).expanduser()
    home = mobiflower_home()
    return home / "runs" / f"fed-lora-{run_id}"


def initial_arrays(model: str, config: FedLoraConfig, task: Task = BUNDLED_TASK) -> tuple[ArrayRecord, int]:
    """The global adapters (+ head) before round 1, and the trainable parameter count."""
    from mobiflower.platform.hf_model import resolve_model
    from mobiflower.simulations.baselines.lora_model import LoraShape, lora_model, trainable_state

    shape = LoraShape.from_config(config.device_config())
    net, _ = lora_model(resolve_model(model), shape, config.seed, task)
    state = trainable_state(net)
    return ArrayRecord(torch_state_dict=state), sum(t.numel() for t in state.values())


def write_json(summary: dict, run_dir: Path) -> Path:
    """``summary.json`` written atomically (NaN/Inf as null)."""
    from mobiflower.platform.run_summary import _clean

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "summary.json"
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(_clean(summary), indent=2, default=str))
    return path


def write_adapter(arrays: ArrayRecord, run_dir: Path) -> Path:
    """The final global adapters (+ head) as ``adapter.safetensors``: what a local fine-tune per user starts
    from (``BaselineConfig.init_adapter``: federated LoRA, then personalized on each device)."""
    from safetensors.torch import save_file

    path = run_dir / "adapter.safetensors"
    with atomic_file(path) as tmp:
        save_file(arrays.to_torch_state_dict(), str(tmp))
    return path


@app.main()
def main(grid: Grid, context: Context) -> None:
    t0 = time.perf_counter()
    config = FedLoraConfig.from_run_config(context.run_config)
    task_config = TaskConfig.from_run_config(context.run_config)
    task = task_config.build()
    model = str(context.run_config.get("model", "smollm2-135m"))
    arrays, trainable = initial_arrays(model, config, task)
    from mobiflower.simulations.baselines import lora_model

    lora_model._MODELS.clear()  # the server only needed the initial weights: free the backbone
    strategy = FedLoraStrategy(config, task)
    result = strategy.start(
        grid,
        arrays,
        num_rounds=config.num_server_rounds,
        timeout=config.request_timeout,
        train_config=ConfigRecord(),
        evaluate_config=ConfigRecord(),
    )
    final_arrays = result.arrays if len(result.arrays) else arrays  # no round aggregated: the initial ones
    final = strategy.evaluate_final(grid, final_arrays) if config.final_eval else None
    summary = strategy.summary_record(final, final_arrays, trainable, time.perf_counter() - t0)
    summary["model"] = model
    summary["task_config"] = as_config(task_config)  # the run config's task keys
    run_dir = run_dir_for(config, grid.run.run_id)
    summary["adapter_path"] = str(write_adapter(final_arrays, run_dir))
    write_json(summary, run_dir)
