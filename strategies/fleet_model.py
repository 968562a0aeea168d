"""Fleet models: what each device of a simulated fleet is like, and a virtual clock for its work.

A fleet is a TOML file of device tiers (``strategies/fleets/<name>.toml``, or any path):

.. code-block:: toml

    name = "mixed-phones"
    description = "..."

    [[tier]]
    name = "flagship"
    share = 0.25            # of the fleet (or count = N)
    uplink-mbps = 40.0
    downlink-mbps = 200.0
    latency-ms = 20.0
    speed = 1.0             # forward speed relative to the machine that measures (2.0 = twice as fast)
    memory-mb = 8192
    availability = 1.0      # chance a request is answered (1.0: always)
    backbone = ""           # a model ref of the same family for this tier ("" = the run's model)
    backbone-layers = 0     # > 0: these devices run only the first N blocks (a layer-truncated backbone)
    weight-precision = ""   # these devices' backbone weight precision: fp32, bf16, int8, int4 ("" = the run's)
    activation-cache = true # false: these devices opt out of the server's activation cache

:func:`load_fleet` reads and checks one (every error names the file, the tier and the key);
:meth:`FleetModel.devices` deals the tiers out to ``n`` devices. :class:`VirtualClock` turns measured
compute seconds and byte counts into the times a device with that profile would take: transfers
cost latency plus bytes over bandwidth, a device does one forward at a time, a slower device
stretches the compute measured on this machine by ``1 / speed``. With it, time-to-accuracy of a
fleet of phones can be measured honestly on one machine: every virtual second is derived from
something measured here, scaled by the profile.
"""

from __future__ import annotations

import hashlib
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from mobiflower.platform.run_config import refuse_retired

FLEETS_DIR = Path(__file__).resolve().parent / "fleets"
TIER_KEYS = {
    "name",
    "share",
    "count",
    "uplink-mbps",
    "downlink-mbps",
    "latency-ms",
    "speed",
    "memory-mb",
    "availability",
    "backbone",
    "backbone-layers",
    "weight-precision",
    "activation-cache",
}


class FleetModelError(ValueError):
    """A fleet file or profile is invalid; the message names the file, the tier and the key."""


@dataclass(frozen=True)
class DeviceProfile:
    """One device's links, speed, memory, availability and backbone."""

    tier: str
    uplink_mbps: float
    downlink_mbps: float
    latency_ms: float = 30.0
    speed: float = 1.0
    memory_mb: float = 4096.0
    availability: float = 1.0
    backbone: str = ""  # a model ref of the run model's family ("" = the run's model)
    backbone_layers: int = 0  # > 0: the device runs only the first N blocks (a layer-truncated backbone)
    activation_cache: bool = True  # False: the device opts out; the server keeps none of its activations
    weights: str = ""  # the device's backbone weight precision ("" = the run's `weight-precision`)

    def upload_s(self, nbytes: int) -> float:
        """Seconds to send ``nbytes`` up: one latency plus the bytes at the uplink rate."""
        return self.latency_ms / 1e3 + nbytes * 8 / (self.uplink_mbps * 1e6)

    def download_s(self, nbytes: int) -> float:
        """Seconds to receive ``nbytes``: one latency plus the bytes at the downlink rate."""
        return self.latency_ms / 1e3 + nbytes * 8 / (self.downlink_mbps * 1e6)

    def compute_s(self, measured_s: float) -> float:
        """Seconds this device takes for work measured at ``measured_s`` on this machine."""
        return measured_s / self.speed


@dataclass
class FleetModel:
    """Named tiers of devices; ``devices(n)`` deals them out to a fleet of ``n``."""

    name: str
    description: str
    tiers: list[tuple[DeviceProfile, float | int]]  # (profile, share in (0, 1] or a count)
    source: str = ""

    def devices(self, n: int) -> list[DeviceProfile]:
        """``n`` device profiles: tiers with a count get that many, the rest share what is left by
        their shares (largest remainders), in tier order so device i's tier is stable."""
        if n < 1:
            raise FleetModelError(f"a fleet needs at least one device, not {n}")
        counted = {i: int(w) for i, (_, w) in enumerate(self.tiers) if isinstance(w, int)}
        fixed = sum(counted.values())
        if fixed > n:
            raise FleetModelError(
                f"fleet {self.name!r}: its tiers' counts add up to {fixed}, more than the {n} devices "
                f"asked for: ask for at least {fixed} devices, or give tiers a share instead"
            )
        shared = {i: float(w) for i, (_, w) in enumerate(self.tiers) if not isinstance(w, int)}
        total = sum(shared.values())
        rest = n - fixed
        quotas = {i: rest * w / total for i, w in shared.items()} if total else {}
        counts = {**counted, **{i: math.floor(q) for i, q in quotas.items()}}
        left = n - sum(counts.values())
        for i in sorted(quotas, key=lambda i: (-(quotas[i] - math.floor(quotas[i])), i))[:left]:
            counts[i] += 1
        out: list[DeviceProfile] = []
        for i, (profile, _) in enumerate(self.tiers):
            out += [profile] * counts.get(i, 0)
        if len(out) != n:
            raise FleetModelError(
                f"fleet {self.name!r} has no tier with a share to fill {n} devices: give a tier a share"
            )
        return out

    def profiles_for(self, device_ids: Sequence[str]) -> dict[str, DeviceProfile]:
        """Each device id its profile: ids sorted by the number they end with (``device-3`` -> 3),
        then dealt the tiers as :meth:`devices` does, so the same fleet gives the same device the
        same profile in every method of a benchmark."""

        def key(device_id: str) -> tuple[int, str]:
            digits = re.search(r"(\d+)$", device_id)
            return (int(digits.group(1)) if digits else -1, device_id)

        ordered = sorted(device_ids, key=key)
        return dict(zip(ordered, self.devices(len(ordered))))

    def uplink_span(self) -> float:
        """Fastest uplink over slowest: how uneven the fleet's uplinks are."""
        ups = [p.uplink_mbps for p, _ in self.tiers]
        return max(ups) / min(ups)


def _number(value: Any, where: str, key: str, low: float, high: float = math.inf, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FleetModelError(f"{where}: {key} must be a number, got {value!r}")
    if (value <= low if low_open else value < low) or value > high:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        raise FleetModelError(
            f"{where}: {key} = {value!r} must be {bound}" + (f" and <= {high:g}" if high < math.inf else "")
        )
    return float(value)


def parse_fleet(table: Mapping[str, Any], source: str = "<fleet>") -> FleetModel:
    """A :class:`FleetModel` from a parsed TOML table; :class:`FleetModelError` says what to fix."""
    if not isinstance(table.get("name"), str) or not table["name"]:
        raise FleetModelError(f'{source}: a fleet needs a name (name = "...")')
    tiers = table.get("tier")
    if not isinstance(tiers, list) or not tiers:
        raise FleetModelError(f"{source}: a fleet needs at least one [[tier]]")
    names: set[str] = set()
    out = [_parse_tier(tier, i, source, names) for i, tier in enumerate(tiers)]
    return FleetModel(str(table["name"]), str(table.get("description", "")), out, source)


def _parse_tier(tier: object, i: int, source: str, names: set[str]) -> tuple[DeviceProfile, float | int]:
    """One [[tier]] table: its device profile and its weight (a share of the fleet, or a count)."""
    where = f"{source}, tier {i + 1}"
    if not isinstance(tier, dict):
        raise FleetModelError(f"{where}: must be a table ([[tier]])")
    refuse_retired(tier, FleetModelError, own=TIER_KEYS, where=where)
    unknown = sorted(set(tier) - TIER_KEYS)
    if unknown:
        raise FleetModelError(f"{where}: unknown key(s) {unknown}; a tier takes {sorted(TIER_KEYS)}")
    name = tier.get("name")
    if not isinstance(name, str) or not name:
        raise FleetModelError(f"{where}: needs a name")
    where = f"{source}, tier {name!r}"
    if name in names:
        raise FleetModelError(f"{where}: two tiers have this name")
    names.add(name)
    if ("share" in tier) == ("count" in tier):
        raise FleetModelError(f"{where}: give exactly one of share (a fraction of the fleet) or count (devices)")
    if "count" in tier:
        count = tier["count"]
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise FleetModelError(f"{where}: count must be a whole number >= 1, got {count!r}")
        weight: float | int = count
    else:
        weight = _number(tier["share"], where, "share", 0.0, 1.0)
    for key in ("uplink-mbps", "downlink-mbps"):
        if key not in tier:
            raise FleetModelError(f"{where}: needs {key}")
    cache = tier.get("activation-cache", True)
    if not isinstance(cache, bool):
        raise FleetModelError(f"{where}: activation-cache must be true or false, got {cache!r}")
    keep = tier.get("backbone-layers", 0)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        raise FleetModelError(f"{where}: backbone-layers must be a whole number >= 1 (0 = all), got {keep!r}")
    backbone = tier.get("backbone", "")
    if not isinstance(backbone, str):
        raise FleetModelError(f"{where}: backbone must be a model ref string, got {backbone!r}")
    weights = tier.get("weight-precision", "") or ""
    if weights:
        from mobiflower.platform.precision import WeightPrecisionError, normalize_precision

        try:
            weights = normalize_precision(str(weights))
        except WeightPrecisionError as exc:
            raise FleetModelError(f"{where}: weight-precision: {exc}") from None
    profile = DeviceProfile(
        tier=name,
        uplink_mbps=_number(tier["uplink-mbps"], where, "uplink-mbps", 0.0),
        downlink_mbps=_number(tier["downlink-mbps"], where, "downlink-mbps", 0.0),
        latency_ms=_number(tier.get("latency-ms", 30.0), where, "latency-ms", 0.0, low_open=False),
        speed=_number(tier.get("speed", 1.0), where, "speed", 0.0),
        memory_mb=_number(tier.get("memory-mb", 4096.0), where, "memory-mb", 0.0),
        availability=_number(tier.get("availability", 1.0), where, "availability", 0.0, 1.0),
        backbone=backbone,
        backbone_layers=keep,
        activation_cache=cache,
        weights=weights,
    )
    return profile, weight


def load_fleet(name_or_path: str | Path) -> FleetModel:
    """A bundled fleet by name (``uniform``, ``mixed-phones``, ``flaky``, ``mixed-backbones``) or a TOML file by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = FLEETS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in FLEETS_DIR.glob("*.toml"))
        raise FleetModelError(f"no fleet {str(name_or_path)!r}: use one of {known} or a path to a fleet TOML file")
    try:
        table = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise FleetModelError(f"{path}: not valid TOML: {err}") from err
    return parse_fleet(table, str(path))


@dataclass
class VirtualClock:
    """Virtual time of a fleet's work: per-device busy time, links and the server's timeline.

    A forward request to device ``d`` sent at virtual time ``t`` arrives after its download,
    waits while ``d`` is busy with earlier ones (one forward at a time), computes for the
    measured seconds scaled by the profile, and its reply lands after the upload. The server
    trains each landed frame for the seconds measured, one at a time. Unavailable replies are
    drawn from each profile's ``availability`` with a seeded hash, so a fleet run is repeatable.
    """

    profiles: Mapping[str, DeviceProfile]
    seed: int = 0
    device_free: dict[str, float] = field(default_factory=dict)
    server_free: float = 0.0
    device_busy: dict[str, float] = field(default_factory=dict)

    def forward(self, device: str, sent_at: float, request_bytes: int, compute_s: float, reply_bytes: int) -> float:
        """When the reply to a forward request lands at the server, in virtual seconds."""
        profile = self.profiles[device]
        arrives = sent_at + profile.download_s(request_bytes)
        start = max(arrives, self.device_free.get(device, 0.0))
        work = profile.compute_s(compute_s)
        self.device_free[device] = start + work
        self.device_busy[device] = self.device_busy.get(device, 0.0) + work
        return start + work + profile.upload_s(reply_bytes)

    def answers(self, device: str, request: str) -> bool:
        """Whether ``device`` answers ``request`` (same answer for the same seed, device and request)."""
        availability = self.profiles[device].availability
        if availability >= 1.0:
            return True
        digest = hashlib.sha256(f"{self.seed}:{device}:{request}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < availability

    def train(self, landed_at: float, train_s: float) -> float:
        """When the server finishes training on something that landed at ``landed_at``."""
        self.server_free = max(self.server_free, landed_at) + train_s
        return self.server_free
