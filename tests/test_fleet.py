"""Fleet models: the bundled fleets, the TOML parser's errors, dealing tiers out, the virtual clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mobiflower.strategies.fleet_model import DeviceProfile, FleetModelError, VirtualClock, load_fleet, parse_fleet


def test_the_bundled_fleets_load_and_are_what_their_names_say():
    uniform, mixed, flaky = (load_fleet(n) for n in ("uniform", "mixed-phones", "flaky"))
    assert uniform.uplink_span() == 1.0
    assert [p.tier for p, _ in mixed.tiers] == ["flagship", "mid-range", "budget"]
    assert mixed.uplink_span() >= 20  # the issue: uplinks spanning at least 20x
    assert [p.tier for p in mixed.devices(8)] == ["flagship"] * 2 + ["mid-range"] * 4 + ["budget"] * 2
    assert all(p.availability < 1 for p in flaky.devices(4))
    mixed_backbones = load_fleet("mixed-backbones")
    assert [p.backbone_layers for p in mixed_backbones.devices(4)] == [0, 0, 0, 15]


def test_a_missing_fleet_names_the_ones_there_are(tmp_path):
    with pytest.raises(FleetModelError, match="mixed-phones"):
        load_fleet("no-such-fleet")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n[[tier]\n")
    with pytest.raises(FleetModelError, match="not valid TOML"):
        load_fleet(bad)


def _tier(**overrides):
    return {"name": "t", "share": 1.0, "uplink-mbps": 10.0, "downlink-mbps": 50.0, **overrides}


@pytest.mark.parametrize(
    "table, match",
    [
        ({"tier": [_tier()]}, "needs a name"),
        ({"name": "f"}, "at least one \\[\\[tier\\]\\]"),
        ({"name": "f", "tier": [_tier(uplink=3)]}, "unknown key"),
        ({"name": "f", "tier": [_tier(**{"uplink-mbps": 0})]}, "uplink-mbps = 0 must be > 0"),
        ({"name": "f", "tier": [_tier(**{"uplink-mbps": "fast"})]}, "must be a number"),
        ({"name": "f", "tier": [_tier(availability=1.5)]}, "availability = 1.5 must be > 0 and <= 1"),
        ({"name": "f", "tier": [_tier(count=2)]}, "exactly one of share"),
        ({"name": "f", "tier": [{k: v for k, v in _tier().items() if k != "downlink-mbps"}]}, "needs downlink-mbps"),
        ({"name": "f", "tier": [_tier(), _tier()]}, "two tiers have this name"),
        ({"name": "f", "tier": [_tier(speed=-1)]}, "speed = -1 must be > 0"),
        ({"name": "f", "tier": [_tier(**{"backbone-layers": 1.5})]}, "backbone-layers must be a whole number"),
        ({"name": "f", "tier": [_tier(**{"activation-cache": "no"})]}, "activation-cache must be true or false"),
        ({"name": "f", "tier": [_tier(**{"weight-precision": "fp16"})]}, "weight-precision: .*float16 GEMM on CPU"),
        ({"name": "f", "tier": [_tier(**{"weight-precision": "int3"})]}, "weight-precision: .*int3"),
    ],
)
def test_bad_fleet_files_say_what_to_fix(table, match):
    with pytest.raises(FleetModelError, match=match):
        parse_fleet(table, "fleet.toml")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.floats(0.01, 1.0), st.integers(1, 5)), min_size=1, max_size=5), st.integers(1, 200))
def test_devices_deal_every_tier_its_count_or_share(weights, n):
    tiers = [
        _tier(name=f"t{i}", **({"count": w, "share": None} if isinstance(w, int) else {"share": w}))
        for i, w in enumerate(weights)
    ]
    for tier in tiers:
        if tier["share"] is None:
            del tier["share"]
    fleet = parse_fleet({"name": "f", "tier": tiers})
    fixed = sum(w for w in weights if isinstance(w, int))
    has_share = any(not isinstance(w, int) for w in weights)
    if fixed > n or (not has_share and fixed != n):
        with pytest.raises(FleetModelError):
            fleet.devices(n)
        return
    devices = fleet.devices(n)
    assert len(devices) == n
    counts = {f"t{i}": sum(p.tier == f"t{i}" for p in devices) for i in range(len(weights))}
    shares = {f"t{i}": w for i, w in enumerate(weights) if not isinstance(w, int)}
    total = sum(shares.values())
    for i, w in enumerate(weights):
        if isinstance(w, int):
            assert counts[f"t{i}"] == w
        else:  # largest remainders: within one of the exact quota
            assert abs(counts[f"t{i}"] - (n - fixed) * w / total) < 1


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.text(min_size=1, max_size=8), st.one_of(st.integers(), st.floats(), st.text(), st.booleans()), max_size=6
    )
)
def test_the_parser_never_fails_with_anything_but_a_fleet_error(tier):
    try:
        parse_fleet({"name": "f", "tier": [tier]})
    except FleetModelError:
        pass


def test_the_virtual_clock_scales_measured_work_by_the_profile():
    fast = DeviceProfile("fast", uplink_mbps=40.0, downlink_mbps=200.0, latency_ms=20.0, speed=1.0)
    slow = DeviceProfile("slow", uplink_mbps=1.0, downlink_mbps=10.0, latency_ms=80.0, speed=0.25)
    clock = VirtualClock({"a": fast, "b": slow})
    frame = 300_000  # bytes of one 8-bit frame of 64 samples
    # fast: 20 ms + ~0 down, 2 s compute, 20 ms + 60 ms up
    assert clock.forward("a", 0.0, 1000, 2.0, frame) == pytest.approx(0.02 + 1000 * 8 / 200e6 + 2.0 + 0.02 + 0.06)
    # slow: the same measured work takes 4x as long and the frame 2.4 s to upload
    landed = clock.forward("b", 0.0, 1000, 2.0, frame)
    assert landed == pytest.approx(0.08 + 1000 * 8 / 10e6 + 8.0 + 0.08 + 2.4)
    # one forward at a time: a second request queues behind the first
    second = clock.forward("b", 0.0, 1000, 2.0, frame)
    assert second == pytest.approx(landed + 8.0)
    assert clock.device_busy["b"] == pytest.approx(16.0)
    # the server trains one frame at a time, from when it lands
    assert clock.train(5.0, 1.0) == 6.0 and clock.train(5.5, 1.0) == 7.0 and clock.train(10.0, 1.0) == 11.0


def test_availability_is_drawn_repeatably():
    flaky = load_fleet("flaky").devices(4)
    clock = VirtualClock({f"device-{i}": p for i, p in enumerate(flaky)}, seed=3)
    answers = [clock.answers("device-3", f"r{i}") for i in range(2000)]
    assert answers == [clock.answers("device-3", f"r{i}") for i in range(2000)]
    assert abs(sum(answers) / 2000 - flaky[3].availability) < 0.05


def test_profiles_follow_the_device_number_and_carry_backbone_and_cache_choices():
    big = {k: v for k, v in _tier(name="big", count=1).items() if k != "share"}
    fleet = parse_fleet(
        {"name": "f", "tier": [big, _tier(name="small", **{"backbone-layers": 15, "activation-cache": False})]}
    )
    profiles = fleet.profiles_for(["device-10", "device-2", "device-1"])
    assert [profiles[d].tier for d in ("device-1", "device-2", "device-10")] == ["big", "small", "small"]
    assert profiles["device-10"].backbone_layers == 15 and not profiles["device-10"].activation_cache
    assert profiles["device-1"].backbone_layers == 0 and profiles["device-1"].activation_cache


def test_a_tier_may_choose_its_weight_precision():
    fleet = parse_fleet(
        {
            "name": "f",
            "tier": [_tier(name="small", share=0.5, **{"weight-precision": "8bit"}), _tier(name="big", share=0.5)],
        }
    )
    small, big = fleet.devices(2)
    assert (small.weights, big.weights) == ("int8", "")
