"""Scoring the side networks, and delivering them.

Periodic validation runs on the server from frames each device forwarded once and the server kept
(``eval-on = "server"``: no network travels down), or on the devices, each sent its network. The
final test is always on the devices, with the network they installed: delivery sends each device its
network (``train.deliver``) and keeps the device's receipt.

Every figure is the run's task's (:mod:`mobiflower.platform.tasks`): each device reports the task's
metrics by name with ``count``, what they are averaged over (samples, or scored tokens), and the fleet's
figures combine the devices weighted by it (:func:`~mobiflower.platform.tasks.combine_metrics`: a
perplexity is ``exp`` of the fleet's token-weighted loss, not a mean of perplexities).
"""

from __future__ import annotations

import dataclasses
import math
from logging import INFO
from typing import Any, Callable, Iterable, Mapping

from flwr.app import Message
from flwr.common.logger import log

from mobiflower.platform import messages as m
from mobiflower.platform.intake import Refusal, run_limits
from mobiflower.platform.messages import DeliverRequest, EvaluateRequest, ForwardRequest
from mobiflower.platform.run_summary import format_metric
from mobiflower.platform.side_networks import SideNetwork
from mobiflower.platform.tasks import Task, combine_metrics
from mobiflower.platform.trainer import DecodedFrame, decode_for, evaluate_network
from mobiflower.strategies.grid_requests import Reply, config_bytes, failed, request_all, why
from mobiflower.strategies.job import Job
from mobiflower.strategies.reply_checks import delivery_receipt, evaluate_reply, forward_reply
from mobiflower.strategies.streaming import forward_message, forward_request


def fleet_figures(task: Task, per_device: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The fleet's figures from its devices' checked ones: each task metric and its zero-shot figure
    (``zero-shot-<m>``) combined over the devices weighted by their ``count``; ``samples`` and ``count``
    summed. NaN for a metric no device has (no device at all: every metric NaN, counts 0)."""
    parts = list(per_device.values())
    weights = [float(p["count"]) for p in parts]
    out: dict[str, float] = dict(combine_metrics(task, [(p, w) for p, w in zip(parts, weights)]))
    zero_shot = [({n: p.get(f"zero-shot-{n}", math.nan) for n in task.metric_names}, w) for p, w in zip(parts, weights)]
    out.update({f"zero-shot-{n}": v for n, v in combine_metrics(task, zero_shot).items()})
    out["samples"] = sum(int(p.get("samples", 0)) for p in parts)
    out["count"] = sum(int(w) for w in weights)
    return out


def describe(task: Task, result: Mapping[str, Any]) -> str:
    """``perplexity 23.41 (device-0 22.10, device-1 24.90)``: the primary metric, fleet and per device."""
    name = task.primary
    devices = ", ".join(f"{d} {format_metric(name, s[name])}" for d, s in sorted(result["per_device"].items()))
    return f"{name} {format_metric(name, result[name])} ({devices})"


def evaluate_requests(job: Job, rnd: int, request: EvaluateRequest) -> Iterable[Message]:
    """One evaluate request per working device, carrying that device's side network unless the device
    scores what it installed (built lazily, as the send window frees)."""
    for node_id, dev in list(job.state.working().items()):
        network = None if request.installed else m.network_records(job.store.network_for(dev.device_id))
        msg = dataclasses.replace(request, network=network, backbone=job.backbone(node_id)).to_message(
            node_id, job.config.request_timeout, group_id=str(rnd)
        )
        sent_network = msg.content.array_records.get(m.NETWORK_KEY)
        dev.add(
            bytes_down=(m.array_bytes(sent_network) if sent_network is not None else 0)
            + config_bytes(msg.content[m.CONFIG_KEY])
        )
        yield msg


class Evaluator:
    """Scores the current networks; keeps each device's server-side evaluation frames once forwarded."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.task = job.config.task.build()  # the run's task: what every reply is checked and scored for
        self._frames: dict[tuple[str, int], dict[str, list[DecodedFrame]]] = {}

    def evaluate(
        self, rnd: int, split: str, max_samples: int | None = None, installed: bool | None = None, final: bool = False
    ) -> dict[str, Any]:
        """Score the networks on ``split`` (at most ``max_samples`` per device; 0 or None = all): on the
        server from kept frames (``eval-on``), or on the devices; the ``final`` test always on the devices."""
        cfg = self.job.config
        if not final and cfg.eval_on == "server" and not cfg.label_private:
            return self._on_server(rnd, split, int(max_samples or 0))
        request = EvaluateRequest(split=split, max_samples=max_samples, installed=installed)
        replies = request_all(
            self.job.grid, evaluate_requests(self.job, rnd, request), cfg.request_timeout, window=cfg.send_window
        )
        per_device = {}
        for node, reply in replies.items():
            dev = self.job.state.devices[node]
            if failed(reply):
                dev.fail(f"evaluate ({split}): {why(reply)}")
                continue
            held = int(dev.profile.get(split, 0))  # the most samples the device can score
            limit = int(max_samples or 0)
            try:  # each reply checked once, against the run's task and what its device holds
                scored = evaluate_reply(reply, self.task, min(held, limit) if limit else held)
            except Exception as err:  # noqa: BLE001 - a reply that fails its checks counts for nothing
                dev.refuse(err, f"evaluate ({split})")
                continue
            per_device[dev.device_id] = dict(scored.stats)
        result = {**fleet_figures(self.task, per_device), "per_device": per_device}
        log(INFO, "[round %d] on-device %s %s", rnd, split, describe(self.task, result))
        return result

    def personal_validation(self) -> Callable[[str, SideNetwork], float | None] | None:
        """Hybrid's ``personal-select = "validation"``: how a device's personal network scores on that
        device's validation frames (forwarded once and kept, as server-side validation does), the task's
        primary metric signed so that lower is better; None for a device without them. None when personal
        epochs are not selected (``"last"``), or the server may not see targets (label-private)."""
        cfg = self.job.config
        if cfg.personal_select != "validation" or cfg.label_private:
            return None
        frames = self._frames_for("validation", cfg.eval_samples)
        sign = -1.0 if self.task.higher_is_better else 1.0

        def score(device: str, net: SideNetwork) -> float | None:
            if device not in frames:
                return None
            where = next(net.parameters()).device
            stats = evaluate_network(net, frames[device], where, mixed_precision=cfg.train_precision)
            return sign * float(stats[self.task.primary])

        return score

    def _frames_for(self, split: str, limit: int) -> dict[str, list[DecodedFrame]]:
        """Each working device's ``split`` samples (at most ``limit``; 0 = all), forwarded once as one frame
        each and kept: the server scores every later network on them, and no network travels down.

        Their upload counts in each device's bytes up (``eval_bytes_up`` says how much of it), and on a fleet
        clock the slowest device's forward and upload of them advance the virtual time, validation frames
        only: a test split is the benchmark's own measurement, not the method's cost.
        """
        if (split, limit) in self._frames:
            return self._frames[(split, limit)]
        job = self.job
        messages, counts = [], {}
        for node_id, dev in job.state.working().items():
            count = min(int(dev.profile.get(split, 0)), limit) if limit else int(dev.profile.get(split, 0))
            if count > 0:
                counts[node_id] = count
                request = forward_request(job, node_id, ForwardRequest(samples=count, offset=0, split=split))
                messages.append(forward_message(job, node_id, request))
        frames: dict[str, list[DecodedFrame]] = {}
        slowest = 0.0
        for node, reply in request_all(
            job.grid, messages, job.config.request_timeout, window=job.config.send_window
        ).items():
            decoded = self._eval_frame(node, reply, split, counts[node])
            if decoded is None:
                continue
            dev, (frame, blob_bytes, busy) = job.state.devices[node], decoded
            frames[dev.device_id] = [frame]
            if job.clock.fleet is not None:
                profile = job.clock.fleet.profiles[dev.device_id]
                slowest = max(slowest, profile.compute_s(busy) + profile.upload_s(blob_bytes))
        if split == "validation" and job.clock.virtual:
            job.clock.advance(slowest)
        log(
            INFO,
            "%s frames for server-side evaluation: %d samples from %d devices",
            split,
            sum(len(f) for fs in frames.values() for f in fs),
            len(frames),
        )
        self._frames[(split, limit)] = frames
        return frames

    def _eval_frame(self, node: int, reply: Reply, split: str, count: int) -> tuple[DecodedFrame, int, float] | None:
        """A device's evaluation frame, checked by the intake (not its replay and repeat checks: it trains
        nothing) and counted; None when it failed."""
        job = self.job
        dev = job.state.devices[node]
        what = f"forward ({split} frames for evaluation)"
        if failed(reply):
            dev.fail(f"{what}: {why(reply)}")
            return None
        try:
            forwarded = forward_reply(reply, count)
            blob = forwarded.frame
            frame = job.intake.inspect(blob, run_limits(job.side_config, count))
            decoded = decode_for(job.side_config, frame)
        except Refusal as refusal:
            reason = f"evaluation frame: {refusal.reason}"
            dev.refused(reason, f"{what}: refused ({refusal.reason}): {refusal.message}")
            return None
        except Exception as err:  # noqa: BLE001 - a reply that fails its checks is a failed request
            dev.refuse(err, what)
            return None
        dev.add(bytes_up=len(blob))
        dev.count("eval_bytes_up", len(blob))
        if split == "test":  # a test curve is the benchmark's measurement, not the method's cost
            dev.count("test_curve_bytes_up", len(blob))
        busy = forwarded.busy_s
        if split == "validation":
            dev.add(busy_s=busy)
        return decoded, len(blob), busy

    def _on_server(self, rnd: int, split: str, limit: int) -> dict[str, Any]:
        """Score each device's network on its kept ``split`` frames, on the server."""
        frames = self._frames_for(split, limit)
        per_device = {}
        for dev in self.job.state.working().values():
            if dev.device_id not in frames:
                continue
            net = self.job.store.network_for(dev.device_id)
            stats = evaluate_network(
                net,
                frames[dev.device_id],
                next(net.parameters()).device,
                mixed_precision=self.job.config.train_precision,
            )
            per_device[dev.device_id] = {
                **{name: float(stats[name]) for name in self.task.metric_names},
                "count": int(stats["count"]),
                "samples": sum(len(f) for f in frames[dev.device_id]),
            }
        result = {**fleet_figures(self.task, per_device), "per_device": per_device}
        log(INFO, "[round %d] server-side %s %s", rnd, split, describe(self.task, result))
        return result


def deliver(job: Job) -> None:
    """Send each working device its side network and check its receipt (``delivered`` per device)."""

    def deliveries() -> Iterable[Message]:  # built one by one as the send window frees
        for node_id, dev in list(job.state.working().items()):
            weights, net_cfg = m.network_records(job.store.network_for(dev.device_id))
            dev.add(bytes_down=m.array_bytes(weights) + config_bytes(net_cfg))
            dev.delivered_digest = m.records_digest(weights, net_cfg)
            yield DeliverRequest((weights, net_cfg), job.backbone(node_id)).to_message(
                node_id, job.config.request_timeout
            )

    for node, reply in request_all(
        job.grid, deliveries(), job.config.request_timeout, window=job.config.send_window
    ).items():
        dev = job.state.devices[node]
        if failed(reply):
            dev.fail(f"delivery: {why(reply)}")
            dev.metrics["delivered"] = 0
            continue
        try:
            receipt = delivery_receipt(reply)
        except Exception as err:  # noqa: BLE001 - no receipt to trust: not delivered
            dev.refuse(err, "delivery")
            dev.metrics["delivered"] = 0
            continue
        dev.metrics["delivered"] = int(receipt.digest == dev.delivered_digest)
        dev.metrics["delivered_path"] = receipt.path
    log(
        INFO,
        "delivered side networks to %d devices",
        sum(int(d.metrics.get("delivered", 0)) for d in job.state.devices.values()),
    )
