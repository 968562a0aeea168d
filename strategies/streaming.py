"""One streaming round: every working device forwards its training samples, chunk by chunk, while the
server trains on the frames that already landed.

``in_flight`` forward requests per device stay pushed, so a device always has its next chunk queued
while the server trains on the last one. Replies are pulled as they land and handed to a trainer
thread, so pulling never waits for training. A failed request (an error reply, one that fails its
checks, no reply within the timeout, or in a fleet simulation a request the device's availability
misses) is retried ``max-retries`` times, then the device is dropped for the rest of the run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import Message
from flwr.common.logger import log

from mobiflower.platform.messages import CONFIG_KEY, ForwardReply, ForwardRequest
from mobiflower.strategies.fair_queue import FairQueue
from mobiflower.strategies.frame_policy import FrameChoice
from mobiflower.strategies.grid_requests import PollBackoff, config_bytes, push_tracked
from mobiflower.strategies.job import Job
from mobiflower.strategies.reply_checks import forward_reply
from mobiflower.strategies.run_state import DeviceState, FleetError


def forward_request(
    job: Job, node_id: int, planned: ForwardRequest, choice: FrameChoice | None = None
) -> ForwardRequest:
    """A planned chunk as it is sent: ``choice`` (bandwidth adaptation) sets its bit-width and tapped-layer
    prefix; otherwise the run's bits and every layer the device taps."""
    layers = job.layers(job.state.devices[node_id])
    return dataclasses.replace(
        planned,
        bits=choice.bits if choice else job.config.bits,
        layers=tuple(layers[: choice.taps] if choice else layers),
        token_policy=job.config.frame_token_policy,
        batch_size=job.config.device_batch_size,
        backbone=job.backbone(node_id),
    )


def forward_message(job: Job, node_id: int, request: ForwardRequest) -> Message:
    """The request's message; its config counts in the device's bytes down."""
    msg = request.to_message(node_id, job.config.request_timeout, group_id=str(request.round))
    job.state.devices[node_id].add(bytes_down=config_bytes(msg.content[CONFIG_KEY]))
    return msg


class FrameTrainer:
    """The server's trainer thread: devices take turns (fair service), each device's frames in arrival order."""

    def __init__(self, job: Job, rnd: int) -> None:
        self.job, self.rnd = job, rnd
        self.work = FairQueue()
        self.losses: list[tuple[float, int]] = []
        self.frame_log: list[list[float]] = []  # per trained frame: samples, loss, bytes, clock s it landed
        self.train_s = 0.0
        self.errors: list[BaseException] = []
        self.done_at = 0.0
        self.devices_idle = threading.Event()  # every frame has landed: the trainer may take every core
        self.thread = threading.Thread(target=self._loop, name="side-trainer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def put(self, node_id: int, blob: bytes, landed: float) -> None:
        self.work.put((node_id, blob, landed), key=node_id)

    def raise_failure(self) -> None:
        if self.errors:
            raise self.errors[0]

    def wait_idle(self) -> None:
        """The serial baseline: train on a frame before asking for the next."""
        while self.work.unfinished_tasks and self.thread.is_alive():
            time.sleep(0.002)
        self.raise_failure()

    def finish(self) -> None:
        self.devices_idle.set()
        self.work.put(None)
        self.thread.join()
        self.raise_failure()

    def _loop(self) -> None:
        cfg = self.job.config
        torch.set_num_threads(max(1, cfg.server_threads))
        while True:
            item = self.work.get()
            if self.devices_idle.is_set():  # OpenMP thread counts are per thread: the trainer sets its own
                torch.set_num_threads(cfg.cache_threads or os.cpu_count() or 1)
            if item is None:
                self.work.task_done()
                return
            try:
                self._train(*item)
            except BaseException as err:  # noqa: BLE001 - surfaced in the main thread
                self.errors.append(err)
                return
            finally:
                self.done_at = time.perf_counter()
                self.work.task_done()

    def _train(self, node_id: int, blob: bytes, landed: float) -> None:
        job, dev = self.job, self.job.state.devices[node_id]
        result = job.intake.offer(dev.device_id, blob)
        job.clock.trained(landed, float(result.stats.get("seconds", 0.0)) if result.accepted else 0.0)
        if result.accepted:
            job.state.frames_accepted += 1
            self.losses.append((result.stats["loss"], int(result.stats["samples"])))
            self.frame_log.append([int(result.stats["samples"]), result.stats["loss"], len(blob), landed])
            self.train_s += result.stats["seconds"]
        else:
            dev.fail(f"round {self.rnd}: frame refused ({result.reason}): {result.message}")
            log(
                WARNING,
                "frame from %s refused (%s), nothing trained on it: %s",
                dev.device_id,
                result.reason,
                result.message,
            )


@dataclass
class _Pending:
    node_id: int
    request: ForwardRequest
    sent_wall: float


class StreamingRound:
    """Round ``rnd``'s forward requests to every working device (``only``: just these nodes), trained
    on as they land; :meth:`run` returns the round's record."""

    def __init__(self, job: Job, rnd: int, only: set[int] | None = None) -> None:
        self.job, self.rnd, self.config = job, rnd, job.config
        self.plans = self._plan(only)
        self.pending: dict[str, _Pending] = {}
        self.trainer = FrameTrainer(job, rnd)
        self.received = 0

    def _plan(self, only: set[int] | None) -> dict[int, deque[ForwardRequest]]:
        """Each working device's chunks for one pass over its training samples (offsets continue)."""
        plans: dict[int, deque[ForwardRequest]] = {}
        for node_id, dev in self.job.state.working().items():
            if only is not None and node_id not in only:
                continue
            plan: deque[ForwardRequest] = deque()
            remaining = dev.train_samples
            while remaining > 0:
                n = min(self.config.chunk_size, remaining)
                plan.append(ForwardRequest(samples=n, offset=dev.next_offset, round=self.rnd))
                dev.next_offset = (dev.next_offset + n) % dev.train_samples
                remaining -= n
            plans[node_id] = plan
        return plans

    def run(self) -> dict[str, Any]:
        job, cfg, state = self.job, self.config, self.job.state
        t0 = time.perf_counter()
        job.clock.start_round()
        device_s0 = {n: d.busy_s for n, d in state.devices.items()}
        if not cfg.activation_cache:
            job.intake.new_pass()  # every round re-sends every sample
        elif self.rnd > 1:
            job.intake.new_pass(job.intake.uncached)  # devices outside the cache send their samples again
        total = sum(r.samples for plan in self.plans.values() for r in plan)
        self.trainer.start()
        last_log = time.perf_counter()
        backoff = PollBackoff(first=0.002, cap=0.2)  # a device's forward takes seconds: 0.2 s late is little
        while self.pending or self._work_left():
            self.trainer.raise_failure()
            if not self.pending:
                self._top_up()
                continue
            replies = list(job.grid.pull_messages(list(self.pending)))
            if not replies:
                self._expire()
                self._top_up()
                backoff.sleep(landed=False)
                continue
            backoff.reset()
            for reply in replies:
                self._take(reply)
            self._top_up()
            if time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log(
                    INFO,
                    "[round %d] frames landed for %d/%d samples, %d training queued",
                    self.rnd,
                    self.received,
                    total,
                    self.trainer.work.qsize(),
                )
        self.trainer.finish()
        return self._record(t0, device_s0)

    def _record(self, t0: float, device_s0: dict[int, float]) -> dict[str, Any]:
        job, state, trainer = self.job, self.job.state, self.trainer
        if not state.working():
            raise FleetError(f"every device failed in round {self.rnd}: {[d.failures for d in state.devices.values()]}")
        if not trainer.losses:
            raise FleetError(
                f"no frame of round {self.rnd} could be trained on; refusals per device: {job.intake.report()}"
            )
        wall = max(trainer.done_at, t0) - t0
        per_device_s = {n: d.busy_s - device_s0[n] for n, d in state.devices.items()}
        device_s = sum(per_device_s.values())
        state.stream.wall_s += wall
        state.stream.device_s += device_s
        state.stream.slowest_device_s += max(per_device_s.values())
        state.stream.train_s += trainer.train_s
        n = sum(c for _, c in trainer.losses)
        # fsum: exactly rounded whatever order the devices' frames were trained in, so a rerun or a resumed
        # run reports the same loss
        loss = math.fsum(value * count for value, count in trainer.losses) / n if n else float("nan")
        job.clock.end_round()
        return {
            "loss": loss,
            "phase": "stream",
            "stream_wall_s": wall,
            "stream_device_s": device_s,
            "stream_train_s": trainer.train_s,
            "samples": self.received,
            "frame_log": trainer.frame_log,  # the summary plot's loss per frame, in training order
        }

    def _work_left(self) -> bool:
        return any(plan and not self.job.state.devices[n].dropped for n, plan in self.plans.items())

    # ---- sending ------------------------------------------------------------------------------------
    def _top_up(self) -> None:
        """Keep in_flight requests per working device (after replies, retries and timeouts)."""
        busy: dict[int, int] = {}
        owed: dict[int, int] = {}  # samples asked for and not landed yet (the policy's remaining work)
        for entry in self.pending.values():
            busy[entry.node_id] = busy.get(entry.node_id, 0) + 1
            owed[entry.node_id] = owed.get(entry.node_id, 0) + entry.request.samples
        out = []
        for node_id, plan in self.plans.items():
            if not plan or self.job.state.devices[node_id].dropped or busy.get(node_id, 0) >= self.config.in_flight:
                continue
            remaining = owed.get(node_id, 0) + sum(r.samples for r in plan) if self.job.policy else 0
            while plan and busy.get(node_id, 0) < self.config.in_flight:
                choice = self._choose(node_id, remaining)
                out.append((node_id, forward_request(self.job, node_id, plan.popleft(), choice)))
                busy[node_id] = busy.get(node_id, 0) + 1
        self._push(out)

    def _push(self, requests: list[tuple[int, ForwardRequest]]) -> None:
        """Push forward requests and track them; one Flower refuses is a failed request of its device.
        In a fleet simulation a request the device's availability misses is built (its bytes count)
        but not pushed."""
        built = [(forward_message(self.job, n, r), n, r) for n, r in requests]
        if self.job.clock.virtual:
            built = [(msg, n, r) for msg, n, r in built if self._answered(n, r)]
        messages = [msg for msg, _, _ in built]
        by_message = {id(msg): req for msg, _, req in built}
        taken, refused = push_tracked(self.job.grid, messages)
        now = time.perf_counter()
        for mid, msg in taken.items():
            node_id = msg.metadata.dst_node_id
            self.pending[mid] = _Pending(node_id, by_message[id(msg)], now)
            self.job.clock.sent(mid, node_id, config_bytes(msg.content[CONFIG_KEY]))
        for msg in refused:
            self._failed(
                self.job.state.devices[msg.metadata.dst_node_id],
                by_message[id(msg)],
                "Flower refused the request (push failed)",
            )

    def _choose(self, node_id: int, remaining: int) -> FrameChoice | None:
        """The bandwidth policy's choice for a device's next request (None: the run's fixed bits, all layers)."""
        policy = self.job.policy
        if policy is None:
            return None
        dev = self.job.state.devices[node_id]
        if policy.deadline_s <= 0:
            policy.set_deadline({d.device_id: d.train_samples for d in self.job.state.working().values()})
            if policy.deadline_s > 0:
                log(INFO, "[adapt] streaming deadline %.1f s: %s", policy.deadline_s, policy.deadline_reason)
        before = len(policy.decisions)
        choice = policy.decide(dev.device_id, remaining, self.job.clock.elapsed(node_id))
        if len(policy.decisions) > before:
            log(
                INFO,
                "[adapt] %s -> %s: %s",
                dev.device_id,
                choice.describe(self.job.layers(dev)),
                policy.decisions[-1].reason,
            )
        return choice

    def _answered(self, node_id: int, request: ForwardRequest) -> bool:
        """Fleet simulation: whether the device answers this request (its profile's availability, a
        seeded draw). One it misses is not sent; it costs the virtual timeout and is retried like any
        failed request, so no frame is ever produced and then thrown away."""
        dev, fleet = self.job.state.devices[node_id], self.job.clock.fleet
        if fleet.answers(dev.device_id, request.request_id):
            return True
        # the server waits three times what the profile and measured speed say the request takes, plus a
        # second for the links; never more than request-timeout
        rate = max(float(dev.profile.get("forward-samples-per-s", 0.0)), 1e-9)
        expected = fleet.profiles[dev.device_id].compute_s(request.samples / rate)
        wait = min(3.0 * expected + 1.0, self.config.request_timeout)
        self.job.clock.missed(node_id, wait)
        dev.count("unanswered")
        self._failed(
            dev,
            request,
            f"no reply within the {wait:.1f} s virtual timeout (availability "
            f"{fleet.profiles[dev.device_id].availability:g})",
        )
        return False

    # ---- receiving ----------------------------------------------------------------------------------
    def _take(self, reply: Message) -> None:
        mid = reply.metadata.reply_to_message_id
        entry = self.pending.pop(mid, None)
        if entry is None:
            return  # a reply to a request this round already gave up on
        dev = self.job.state.devices[entry.node_id]
        if reply.has_error():
            self._failed(dev, entry.request, f"error {reply.error.code}: {reply.error.reason}")
            return
        try:
            forwarded = forward_reply(reply, entry.request.samples)
        except Exception as err:  # noqa: BLE001 - a reply that fails its checks is a failed request
            why = dev.refuse(err, "forward", record=False)  # _failed records it
            self._failed(dev, entry.request, f"malformed reply: {why}")
            return
        blob = forwarded.frame
        reply_bytes = len(blob) + 8 * len(forwarded.stats)
        dev.add(
            bytes_up=reply_bytes,
            frame_bytes=len(blob),
            frames=1,
            samples_forwarded=forwarded.samples,
            forward_s=forwarded.forward_s,
            busy_s=forwarded.busy_s,
        )
        self.received += forwarded.samples
        landed = self._landed(dev, mid, entry, forwarded, reply_bytes)
        self.trainer.raise_failure()
        self.trainer.put(entry.node_id, blob, landed)
        if not self.config.overlap:
            self.trainer.wait_idle()

    def _landed(self, dev: DeviceState, mid: str, entry: _Pending, forwarded: ForwardReply, reply_bytes: int) -> float:
        """A frame landed: when (clock seconds), and what the bandwidth policy learns from it."""
        landing = self.job.clock.landed(dev.device_id, dev.node_id, mid, forwarded.busy_s, reply_bytes, entry.sent_wall)
        policy = self.job.policy
        if policy is not None:
            request = entry.request
            choice = FrameChoice(len(request.layers or ()), request.bits)
            policy.observe(
                dev.device_id,
                choice,
                forwarded.samples,
                landing.compute_s,
                landing.upload_s,
                len(forwarded.frame),
                landing.latency_s,
            )
            if policy.deadline_s > 0 and self.job.clock.since_round_start(landing.at) > policy.deadline_s:
                self.job.state.late_frames[dev.device_id] = self.job.state.late_frames.get(dev.device_id, 0) + 1
        return landing.at

    def _expire(self) -> None:
        now = time.perf_counter()
        for mid, entry in list(self.pending.items()):
            if now - entry.sent_wall > self.config.request_timeout:
                del self.pending[mid]
                self._failed(
                    self.job.state.devices[entry.node_id],
                    entry.request,
                    f"no reply within {self.config.request_timeout:.0f} s",
                )

    def _failed(self, dev: DeviceState, request: ForwardRequest, why: str) -> None:
        dev.fail(f"forward offset {request.offset}: {why}")
        if dev.dropped:  # a request still in flight when the device was dropped: its samples are lost too
            dev.add(samples_lost=request.samples)
            return
        if request.attempt < self.config.max_retries:
            self.plans.setdefault(dev.node_id, deque()).appendleft(request.retry())
            log(WARNING, "forward request to %s failed (%s); retrying", dev.device_id, why)
        else:
            dev.dropped = True
            unsent = self.plans.pop(dev.node_id, None) or []
            dev.add(samples_lost=request.samples + sum(r.samples for r in unsent))
            log(
                WARNING,
                "device %s dropped for the rest of the run after: %s (%d of its samples lost so far)",
                dev.device_id,
                why,
                dev.samples_lost,
            )
