"""Fleet profiling: every device describes itself, and the side network the fleet can feed is chosen.

Each device answers ``query.profile`` (backbone fingerprint, tapped layers, data sizes, forward speed,
memory, the frozen head state the server's network needs); one that cannot is left out and counted.
A simulated fleet's model may give some tiers another backbone: then every device describes itself
again on its own. The backbone most devices run comes first; the others of its family get their own
input norms and projections (ladder, adapter), or feed the pretrained tail from its cut.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, Callable

import torch
from flwr.common.logger import log
from flwr.serverapp import Grid

from mobiflower.platform.messages import BackboneChoice, ProfileRequest
from mobiflower.platform.pretrained_tail import load_tail_weights
from mobiflower.platform.run_config import as_config
from mobiflower.platform.side_networks import SideNetworkConfig, SideNetworkError
from mobiflower.strategies.config import SideTuningConfig
from mobiflower.strategies.grid_requests import Reply, failed, request_all, why
from mobiflower.strategies.reply_checks import ReplyError, profile_reply
from mobiflower.strategies.round_clock import FleetClock
from mobiflower.strategies.run_state import DeviceState, FleetError, RunState


@dataclass
class ProfiledFleet:
    """What profiling found: the side network to train, the frozen head states it is built on, the
    backbone each node was given (a fleet model's choice) and the fleet clock, if any."""

    side_config: SideNetworkConfig
    frozen: dict[str, torch.Tensor]
    frozen_by: dict[str, dict[str, torch.Tensor]]
    backbones: dict[int, BackboneChoice] = field(default_factory=dict)
    fleet_clock: FleetClock | None = None


def take_profiles(
    replies: dict[int, Reply],
    state: RunState,
    frozen_by: dict[str, dict[str, torch.Tensor]],
    num_labels: int | None = None,
) -> None:
    """Record each device that described itself; a device whose profile failed is left out. ``num_labels``:
    the task's label count, which a device's label shares must match (None: not checked)."""
    for node, reply in sorted(replies.items()):
        try:
            if failed(reply):
                raise RuntimeError(why(reply))
            described = profile_reply(reply, num_labels=num_labels)
        except Exception as err:  # noqa: BLE001 - a device that cannot describe itself is left out
            if not isinstance(err, RuntimeError):  # a reply that failed its checks: counted
                reason = err.reason if isinstance(err, ReplyError) else "profile: unreadable"
                counts = state.profiles_refused.setdefault(f"node {node}", {})
                counts[reason] = counts.get(reason, 0) + 1
            state.events.append(f"profile of node {node} failed: {err}")
            log(WARNING, "node %s failed its profile and is left out: %s", node, err)
            continue
        if described.device_id in {d.device_id for n, d in state.devices.items() if n != node}:
            raise FleetError(
                f"two SuperNodes claim {described.device_id}: give each its own partition-id "
                f"(--node-config 'partition-id=<i> num-partitions=<n>')"
            )
        profile = described.profile()
        dev = DeviceState(
            node_id=node, device_id=described.device_id, profile=profile, train_samples=int(profile["train"])
        )
        state.devices[node] = dev
        frozen_by.setdefault(described.fingerprint, dict(described.frozen))
        log(
            INFO,
            "device %s (node %s): %s, %d train / %d validation / %d test samples, %.1f samples/s, %.0f MB",
            dev.device_id,
            node,
            profile["fingerprint"],
            profile["train"],
            profile["validation"],
            profile["test"],
            profile["forward-samples-per-s"],
            profile["rss-mb"],
        )


def _ask(grid: Grid, nodes: list[int], backbones: dict[int, BackboneChoice], timeout: float) -> dict[int, Reply]:
    requests = [ProfileRequest(backbone=backbones.get(n, BackboneChoice())).to_message(n, timeout) for n in nodes]
    return request_all(grid, requests, timeout)


def _fleet_backbones(fleet_clock: FleetClock, state: RunState) -> dict[int, BackboneChoice]:
    """The backbone a fleet model gives each node's tier (none where it keeps the device's own)."""
    out = {}
    for node, dev in state.devices.items():
        p = fleet_clock.profiles[dev.device_id]
        choice = BackboneChoice(
            model=getattr(p, "backbone", "") or "",
            backbone_layers=int(getattr(p, "backbone_layers", 0) or 0),
            weights=getattr(p, "weights", "") or "",
        )
        if choice.to_config():
            out[node] = choice
    return out


def profile_fleet(
    grid: Grid, config: SideTuningConfig, state: RunState, clock_for: Callable[[list[str]], FleetClock] | None
) -> ProfiledFleet:
    """Profile every connected device into ``state`` and choose the side network they feed."""
    node_ids = sorted(grid.get_node_ids())
    if not node_ids:
        raise FleetError("no devices are connected: start SuperNodes (or set num-supernodes) first")
    frozen_by: dict[str, dict[str, torch.Tensor]] = {}
    labels = config.task.build().num_classes
    take_profiles(_ask(grid, node_ids, {}, config.request_timeout), state, frozen_by, labels)
    if not state.devices:
        raise FleetError(f"none of the {len(node_ids)} devices could be profiled: {state.events}")
    fleet_clock, backbones = None, {}
    if clock_for is not None:
        fleet_clock = clock_for(sorted(d.device_id for d in state.devices.values()))
        backbones = _fleet_backbones(fleet_clock, state)
        if backbones:  # every device describes itself again, those devices with their backbone
            frozen_by.clear()
            profiled, state.devices = sorted(state.devices), {}  # one that fails now is left out
            take_profiles(_ask(grid, profiled, backbones, config.request_timeout), state, frozen_by, labels)
            if not state.devices:
                raise FleetError(
                    f"none of the {len(profiled)} devices could be profiled on the fleet's backbones: {state.events}"
                )
        for dev in state.devices.values():
            p = fleet_clock.profiles[dev.device_id]
            log(
                INFO,
                "fleet %s: %s is a %s device (uplink %s Mbit/s, speed %s, availability %s)",
                config.fleet,
                dev.device_id,
                p.tier,
                getattr(p, "uplink_mbps", "?"),
                getattr(p, "speed", "?"),
                p.availability,
            )
    side_config, frozen = _side_network(config, state, frozen_by)
    return ProfiledFleet(side_config, frozen, frozen_by, backbones, fleet_clock)


def _side_network(
    cfg: SideTuningConfig, state: RunState, frozen_by: dict[str, dict[str, torch.Tensor]]
) -> tuple[SideNetworkConfig, dict[str, torch.Tensor]]:
    """The side network's config for this fleet, and the frozen head state it is built on."""
    by_fingerprint: dict[str, list[DeviceState]] = {}
    for dev in state.devices.values():
        by_fingerprint.setdefault(dev.fingerprint, []).append(dev)
    # the backbone most devices run (on a tie, the deepest) comes first
    primary = min(
        by_fingerprint, key=lambda fp: (-len(by_fingerprint[fp]), -int(by_fingerprint[fp][0].profile["num-layers"]), fp)
    )
    first = by_fingerprint[primary][0].profile
    if cfg.family == "tail":
        frozen, others, tail_keys = public_tail(cfg, str(first["model"]), primary, by_fingerprint)
        layers = [int(tail_keys.pop("cut")) - 1]
    else:
        frozen, others, tail_keys = frozen_by[primary], _side_backbones(primary, by_fingerprint), {}
        layers = [int(x) for x in first["layers"]]
    side_config = SideNetworkConfig(
        hidden_size=int(first["hidden-size"]),
        layers=layers,
        fingerprint=str(first["fingerprint"]),
        family=cfg.family,
        head=cfg.head,
        num_classes=max(1, cfg.task.build().num_classes),
        reduction=cfg.reduction,
        dropout=cfg.dropout,
        norm_eps=float(first["norm-eps"]),
        feature_token="last" if first["is-decoder"] else "first",
        bits=cfg.bits,
        group_size=64 if cfg.bits >= 8 else 32,
        token_policy=cfg.frame_token_policy,
        extra={"model": str(first["model"]), "task": as_config(cfg.task)},
        backbones=others,
        **tail_keys,
    )
    return side_config, frozen


def _side_backbones(primary: str, by_fingerprint: dict[str, list[DeviceState]]) -> dict[str, list[int]]:
    """A ladder / adapter network's further backbones: their taps, slot by slot (one family only)."""
    first = by_fingerprint[primary][0].profile
    others: dict[str, list[int]] = {}
    for fp, devs in by_fingerprint.items():
        if fp == primary:
            continue
        desc = devs[0].profile
        if int(desc["hidden-size"]) != int(first["hidden-size"]) or len(desc["layers"]) != len(first["layers"]):
            raise FleetError(
                f"the devices run backbones that one side network cannot serve: {primary} (width "
                f"{first['hidden-size']}, {len(first['layers'])} taps) and {fp} (width {desc['hidden-size']}, "
                f"{len(desc['layers'])} taps); a heterogeneous fleet needs one family: the same hidden size "
                f"and the same num-taps (set num-taps for every device)"
            )
        others[fp] = [int(x) for x in desc["layers"]]
    if others:
        log(
            INFO,
            "heterogeneous fleet: %s on %s; %s",
            primary,
            [d.device_id for d in by_fingerprint[primary]],
            "; ".join(
                f"{fp} taps {layers} on {[d.device_id for d in by_fingerprint[fp]]}" for fp, layers in others.items()
            ),
        )
    return others


def public_tail(
    cfg: SideTuningConfig, model: str, primary: str, by_fingerprint: dict[str, list[DeviceState]]
) -> tuple[dict[str, torch.Tensor], dict[str, list[int]], dict[str, Any]]:
    """The pretrained tail's public weights (loaded here, from ``model``), checked against every
    device's backbone; every device sends block ``cut - 1``, whatever its depth or precision."""
    try:
        public = load_tail_weights(model, cfg.tail_cut, lm_head=cfg.head == "lm")
        for fp, devs in by_fingerprint.items():
            try:
                public.check_device(fp)
            except SideNetworkError as err:
                raise FleetError(f"devices {[d.device_id for d in devs]}: {err}") from None
    except SideNetworkError as err:
        raise FleetError(str(err)) from None
    others = {fp: [public.cut - 1] for fp in by_fingerprint if fp != primary}
    total = int(public.backbone_config["num_hidden_layers"])
    shallow = {
        d.device_id: int(d.profile["num-layers"])
        for devs in by_fingerprint.values()
        for d in devs
        if int(d.profile["num-layers"]) < total
    }
    if shallow:
        raise FleetError(
            f"devices {shallow} (id: blocks) run fewer than the model's {total} blocks: they could "
            f"feed the tail, but not run blocks {public.cut}..{total - 1} with the delivered adapter "
            "for their own inference. Use family 'ladder' or 'adapter' for a fleet of mixed depths, "
            "or give every device the whole model"
        )
    log(
        INFO,
        "pretrained tail: devices forward blocks 0..%d, the server trains blocks %d..%d of %s with LoRA (r %d, %s)",
        public.cut - 1,
        public.cut,
        total - 1,
        public.fingerprint,
        cfg.lora_r,
        cfg.lora_target_modules,
    )
    keys = {
        "backbone_config": public.backbone_config,
        "lora_rank": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_targets": cfg.lora_target_list,
        "cut": public.cut,
    }
    return public.weights, others, keys
