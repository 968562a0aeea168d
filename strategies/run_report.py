"""The run summary: the task's figures, per-device accounting, streaming efficiency, traffic, the
curve of the task's metrics against (virtual or wall) time, and every bandwidth decision with its reason."""

from __future__ import annotations

import json
import math
import os
from logging import WARNING
from typing import Any

from flwr.common.logger import log

from mobiflower.platform.run_summary import metric_key
from mobiflower.platform.tasks import Task
from mobiflower.strategies.job import Job
from mobiflower.strategies.run_state import RunState


def time_report(job: Job) -> dict[str, Any]:
    """Time-to-quality material: the curve of the task's metrics against virtual seconds (a fleet
    simulation) or training wall seconds (no fleet), device compute as the fleet would spend it, and every
    bandwidth decision with its reason. Evaluation is a measurement: it costs no virtual time."""
    state, fleet, policy = job.state, job.clock.fleet, job.policy
    devices: dict[str, dict[str, Any]] = {}
    for dev in state.devices.values():
        entry: dict[str, Any] = {
            "late_frames": state.late_frames.get(dev.device_id, 0),
            "unanswered": int(dev.metrics.get("unanswered", 0)),
        }
        if fleet is not None:
            entry.update(
                tier=fleet.profiles[dev.device_id].tier,
                compute_s=fleet.device_busy.get(dev.device_id, 0.0),
                upload_s=job.clock.upload_s.get(dev.device_id, 0.0),
            )
        if policy is not None:
            layers = job.layers(dev)
            entry["decisions"] = [d.as_dict(layers) for d in policy.decisions if d.device == dev.device_id]
            entry["final_choice"] = {
                "bits": policy.choice(dev.device_id).bits,
                "taps": policy.choice(dev.device_id).taps,
            }
        devices[dev.device_id] = entry
    return {
        "fleet": job.config.fleet,
        "adapt": job.config.adapt,
        "clock": "virtual" if fleet else "wall",
        "curve": state.curve,
        "total_s": job.clock.now,
        "device_compute_s": (
            sum(fleet.device_busy.values()) if fleet else sum(d.busy_s for d in state.devices.values())
        ),
        "deadline_s": policy.deadline_s if policy else None,
        "deadline_reason": policy.deadline_reason if policy else "",
        "devices": devices,
    }


def task_report(task: Task, final: dict[str, Any], state: RunState) -> dict[str, Any]:
    """The task's figures, under names that say which metric they are (``m`` with dashes as underscores):
    ``test_<m>`` and ``zero_shot_<m>`` over every device's test split (the devices weighted by what each
    scored), ``initial_test_<m>`` (the untrained network's, None when not measured),
    ``mean_device_test_<m>`` (unweighted over the devices that reported), and the samples and count
    the test scored."""
    out: dict[str, Any] = {
        "task": task.name,
        "metrics": {
            "primary": task.primary,
            "names": list(task.metric_names),
            "higher_is_better": task.higher_is_better,
        },
    }
    keys = [(name, metric_key(name)) for name in task.metric_names]
    out.update({f"test_{key}": final[name] for name, key in keys})
    out.update({f"zero_shot_{key}": final.get(f"zero-shot-{name}", math.nan) for name, key in keys})
    initial = state.initial or {}
    out.update({f"initial_test_{key}": initial.get(name) for name, key in keys})
    for _, key in keys:
        tested = [d.metrics[f"test_{key}"] for d in state.devices.values() if f"test_{key}" in d.metrics]
        out[f"mean_device_test_{key}"] = sum(tested) / len(tested) if tested else math.nan
    out["test_samples"], out["test_count"] = final.get("samples", 0), final.get("count", 0)
    return out


def run_report(
    job: Job, final: dict[str, Any], train_wall: float, run_wall: float, run_config: dict[str, Any]
) -> dict[str, Any]:
    """The whole run's summary (what ``summary.json`` holds)."""
    state, store, intake = job.state, job.store, job.intake
    totals = state.stream
    device_s = sum(d.busy_s for d in state.devices.values())
    per_device = {
        d.device_id: {
            **d.account(),
            "frames_refused": dict(intake.refused.get(d.device_id, {})),
            "samples_trained": int(intake.accepted_samples.get(d.device_id, 0)),
        }
        for d in state.devices.values()
    }
    overflow = {k: c["rejected"] for k, c in store.cache_counts().items() if c["rejected"]}
    if overflow:
        state.events.append(
            f"activation cache full (cache-mb={job.config.cache_mb}): frames trained once and "
            f"not kept for later rounds: {overflow}"
        )
        log(WARNING, "%s", state.events[-1])
    # Devices work in parallel, so the device side's critical path is the slowest device's
    # forward time; 1.0 means the streaming wall time equals the slower of the two sides.
    slowest = totals.slowest_device_s
    efficiency = max(slowest, totals.train_s) / totals.wall_s if totals.wall_s else float("nan")
    trainer = next(iter(store.trainers.values()))
    return {
        **task_report(job.config.task.build(), final, state),
        "devices": per_device,
        "pipeline_efficiency": efficiency,
        "stream_wall_s": totals.wall_s,
        "stream_device_forward_s": totals.device_s,
        "stream_slowest_device_forward_s": slowest,
        "stream_server_train_s": totals.train_s,
        "device_forward_s": device_s,
        "server_train_s": store.train_seconds,
        "train_wall_s": train_wall,
        "run_wall_s": run_wall,
        "bytes_up": sum(d.bytes_up for d in state.devices.values()),
        "bytes_down": sum(d.bytes_down for d in state.devices.values()),
        "frame_bytes": sum(d.frame_bytes for d in state.devices.values()),
        "frames": sum(d.frames for d in state.devices.values()),
        "frames_accepted": state.frames_accepted,
        "frames_refused": sum(sum(c.values()) for c in intake.refused.values()),
        "replies_refused": sum(sum(d.replies_refused.values()) for d in state.devices.values()),
        "profiles_refused": state.profiles_refused,
        "virtual": time_report(job),
        "rounds": state.rounds,
        "config": job.config.as_dict(),
        "run_config": dict(run_config),
        "side_network": json.loads(job.side_config.to_json()),
        "trainable_parameters": trainer.net.num_trainable(),
        "events": state.events,
        "server_device": str(trainer.device),
        "cpu_count": os.cpu_count(),
    }
