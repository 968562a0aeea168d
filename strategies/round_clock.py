"""The run's clock: virtual seconds of a simulated fleet, or the wall seconds a deployment measures.

In a simulation with a ``fleet``, each device's transfers and compute take what its profile says
(derived from the compute it measured and the bytes it sent), so time-to-accuracy is honest on one
machine; without one, the clock is the training wall time and a frame lands when it is pulled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Mapping, Protocol


class LinkProfile(Protocol):
    """What the strategy reads of a simulated device's profile (``strategies.fleet_model.DeviceProfile``)."""

    tier: str
    latency_ms: float
    availability: float
    activation_cache: bool

    def upload_s(self, nbytes: int) -> float: ...

    def compute_s(self, measured_s: float) -> float: ...


class FleetClock(Protocol):
    """A virtual clock of a simulated fleet (``strategies.fleet_model.VirtualClock``)."""

    profiles: Mapping[str, LinkProfile]
    device_busy: dict[str, float]

    def forward(self, device: str, sent_at: float, request_bytes: int, compute_s: float, reply_bytes: int) -> float: ...

    def answers(self, device: str, request: str) -> bool: ...

    def train(self, landed_at: float, train_s: float) -> float: ...


@dataclass(frozen=True)
class Landing:
    """When a frame landed (clock seconds) and what it cost: the device's compute, the upload, the latency."""

    at: float
    compute_s: float
    upload_s: float
    latency_s: float


class RoundClock:
    """The run's time (``now``) and, within a streaming round, when each device may next be sent a
    request, when each pushed request left, the last landing and the server's trainer."""

    def __init__(self, fleet: FleetClock | None = None) -> None:
        self.fleet = fleet
        self.now = 0.0  # virtual seconds of training so far (a fleet simulation); wall seconds otherwise
        self.upload_s: dict[str, float] = {}  # per device, virtual upload seconds over the run
        self.start_round()

    @property
    def virtual(self) -> bool:
        return self.fleet is not None

    def start_round(self) -> None:
        self._v0, self._t0 = self.now, time.perf_counter()
        self._landed = self._server = self.now
        self._ready: dict[int, float] = {}
        self._sent: dict[str, tuple[float, int]] = {}

    def since_round_start(self, at: float) -> float:
        return at - self._v0

    def elapsed(self, node_id: int) -> float:
        """How far into the round a device's next request goes out."""
        if self.virtual:
            return self._ready.get(node_id, self._v0) - self._v0
        return time.perf_counter() - self._t0

    def sent(self, message_id: str, node_id: int, request_bytes: int) -> None:
        """A request left: its virtual send time and size, for when its reply lands."""
        if self.virtual:
            self._sent[message_id] = (self._ready.get(node_id, self._v0), request_bytes)

    def missed(self, node_id: int, wait_s: float) -> None:
        """A request the device will not answer: it costs the device ``wait_s`` before the next one."""
        self._ready[node_id] = self._ready.get(node_id, self._v0) + wait_s

    def landed(
        self, device: str, node_id: int, message_id: str, busy_s: float, reply_bytes: int, sent_wall: float
    ) -> Landing:
        """A frame landed: when, and its compute and upload (from the profile's link in a simulation, or
        the wall time around the device's work in a deployment)."""
        v_sent, request_bytes = self._sent.pop(message_id, (self._v0, 0))
        if self.fleet is not None:
            profile = self.fleet.profiles[device]
            at = self.fleet.forward(device, v_sent, request_bytes, busy_s, reply_bytes)
            upload = profile.upload_s(reply_bytes)
            landing = Landing(at, profile.compute_s(busy_s), upload, profile.latency_ms / 1e3)
            self.upload_s[device] = self.upload_s.get(device, 0.0) + upload
        else:
            now = time.perf_counter()
            landing = Landing(self._v0 + now - self._t0, busy_s, max(0.0, now - sent_wall - busy_s), 0.0)
        self._ready[node_id] = max(self._ready.get(node_id, self._v0), landing.at)
        self._landed = max(self._landed, landing.at)
        return landing

    def trained(self, landed_at: float, train_s: float) -> None:
        """The server trained on a frame that landed at ``landed_at`` (one frame at a time)."""
        if self.fleet is not None:
            self._server = self.fleet.train(landed_at, train_s)

    def end_round(self) -> None:
        """A streaming round ends when its last frame landed and was trained on."""
        if self.fleet is not None:
            self.now = max(self._landed, self._server)

    def advance(self, seconds: float) -> None:
        """Server-side work after streaming (a cached epoch) or device work outside a round (virtual)."""
        self.now += seconds
