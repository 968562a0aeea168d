"""One side-tuning job's working parts, built once the fleet is profiled: the side networks and their
trainers, the frame intake, the bandwidth policy and the clock, with the grid and the run state."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from flwr.serverapp import Grid

from mobiflower.platform.intake import FrameIntake, SampleOwners, run_limits
from mobiflower.platform.messages import BackboneChoice
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig
from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
from mobiflower.platform.trainer import TrainConfig
from mobiflower.strategies.config import SideTuningConfig
from mobiflower.strategies.fleet_profile import ProfiledFleet
from mobiflower.strategies.frame_policy import FramePolicy
from mobiflower.strategies.residuals import ResidualOracle
from mobiflower.strategies.round_clock import FleetClock, RoundClock
from mobiflower.strategies.run_state import DeviceState, RunState


@dataclass
class Job:
    """What the round loop, a streaming round, evaluation and delivery work on."""

    config: SideTuningConfig
    grid: Grid
    run_dir: Path
    state: RunState
    side_config: SideNetworkConfig
    store: SideNetworkStore
    intake: FrameIntake
    clock: RoundClock
    policy: FramePolicy | None = None
    backbones: dict[int, BackboneChoice] = field(default_factory=dict)  # per node: the backbone a fleet model gives it

    def backbone(self, node_id: int) -> BackboneChoice:
        return self.backbones.get(node_id, BackboneChoice())

    def layers(self, dev: DeviceState) -> list[int]:
        """The layers a device taps for the side network (its own backbone's)."""
        return self.side_config.layers_for(dev.fingerprint)


def build_job(config: SideTuningConfig, grid: Grid, run_dir: Path, state: RunState, fleet: ProfiledFleet) -> Job:
    """The side networks, their trainers and the frame intake for a profiled fleet (a fresh run starts from
    an empty activation cache; a resume loads the checkpoint into them afterwards)."""
    cfg = config
    owners = SampleOwners()  # the intake records who sent each sample; residual requests read it
    oracle = ResidualOracle(grid, state, fleet.backbones, cfg.request_timeout, owners) if cfg.label_private else None
    store = _store(cfg, run_dir, state, fleet, oracle)
    net = store.network_for(next(iter(state.devices.values())).device_id)
    log(
        INFO,
        "%s side network(s), mode %s: %s trainable parameters each, training on %s",
        cfg.family,
        cfg.mode,
        f"{net.num_trainable():,}",
        next(iter(store.trainers.values())).device,
    )
    cache_dir = run_dir / "cache"
    if not cfg.resume:
        shutil.rmtree(cache_dir, ignore_errors=True)  # a fresh run starts from an empty cache
    intake = FrameIntake(
        store,
        fleet.side_config,
        run_limits(fleet.side_config, cfg.chunk_size),
        persist_dir=cache_dir if cfg.activation_cache else None,
        label_private=cfg.label_private,
        uncached=_opt_outs(cfg, state, fleet.fleet_clock),
        owners=owners,
    )
    return Job(
        cfg,
        grid,
        run_dir,
        state,
        fleet.side_config,
        store,
        intake,
        RoundClock(fleet.fleet_clock),
        policy=_policy(cfg, fleet.side_config, state, fleet.fleet_clock) if cfg.adapt else None,
        backbones=fleet.backbones,
    )


def _store(
    cfg: SideTuningConfig, run_dir: Path, state: RunState, fleet: ProfiledFleet, oracle: ResidualOracle | None
) -> SideNetworkStore:
    """The side networks and their trainers (label-private ones ask ``oracle`` for residuals)."""
    train = TrainConfig(
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        epochs=cfg.num_server_rounds,
        batch_size=cfg.batch_size,
        seed=cfg.training_seed,
        cache_bytes=cfg.cache_mb << 20 if cfg.activation_cache else 0,
        average_epochs=cfg.average_epochs,
        mixed_precision=cfg.train_precision,
    )

    def make_net():
        torch.manual_seed(cfg.training_seed)  # the side network's initial weights are part of the run's seed
        return build_side_network(fleet.side_config, fleet.frozen, fleet.frozen_by)

    pages = run_dir / "pages"
    shutil.rmtree(pages, ignore_errors=True)  # paged trainers of an earlier process; a resume loads the checkpoint
    return SideNetworkStore(
        StoreConfig(
            mode=cfg.mode,
            personal_epochs=cfg.personal_epochs,
            personal_lr=cfg.personal_lr,
            memory_budget_mb=cfg.side_memory_mb,
            # causal-LM has no trainable head: a device's personal part is a fine-tuned copy of the shared LoRA
            **({"personal_parts": ("tail.",), "personal_restart": True} if cfg.head == "lm" else {}),
        ),
        make_net,
        train,
        {d.device_id: d.train_samples for d in state.devices.values()},
        cfg.chunk_size,
        page_dir=pages,
        residuals=oracle,
    )


def _opt_outs(cfg: SideTuningConfig, state: RunState, fleet: FleetClock | None) -> frozenset[str]:
    """Devices outside the activation cache (their own choice, or their tier's): trained on, not kept.
    Each device's profile says whether it is in."""
    uncached = sorted(
        d.device_id
        for d in state.devices.values()
        if not bool(d.profile.get("activation-cache", True))
        or (fleet is not None and not fleet.profiles[d.device_id].activation_cache)
    )
    for dev in state.devices.values():
        dev.profile["activation-cache"] = dev.device_id not in uncached
    if not (uncached and cfg.activation_cache):
        return frozenset()
    log(
        INFO,
        "devices %s opted out of the activation cache: their frames are trained on and not kept, and "
        "they forward their samples again every round",
        ", ".join(uncached),
    )
    return frozenset(uncached)


def _policy(
    cfg: SideTuningConfig, side_config: SideNetworkConfig, state: RunState, fleet: FleetClock | None
) -> FramePolicy:
    """The bandwidth policy, seeded with each device's profiled forward speed (compute known before any frame)."""
    policy = FramePolicy(
        side_config.layers,
        full_bits=cfg.bits,
        min_bits=cfg.adapt_min_bits,
        min_taps=cfg.adapt_min_taps,
        deadline_s=cfg.deadline_s,
        layers_of={d.device_id: side_config.layers_for(d.fingerprint) for d in state.devices.values()},
    )
    for dev in state.devices.values():
        rate = float(dev.profile.get("forward-samples-per-s", 0.0))
        if rate > 0:
            per_sample = 1.0 / rate
            policy.seed(
                dev.device_id, fleet.profiles[dev.device_id].compute_s(per_sample) if fleet is not None else per_sample
            )
    return policy
