"""Side networks for a fleet (shared, per-device, hybrid), FedAvg through Flower, the message vocabulary."""

from __future__ import annotations

import pytest
import torch

from mobiflower.clients.device_setup import DeviceSetup, DeviceSetupError, device_share, examples_at
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform import messages as m
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.data import Example, Splits
from mobiflower.platform.frames import decode_frame
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig, SideNetworkError
from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
from mobiflower.platform.trainer import TrainConfig
from mobiflower.strategies.config import ConfigError, SideTuningConfig


def _examples(n: int, offset: int = 0) -> list[Example]:
    return [
        Example(id=offset + i, text=("good fun " if i % 2 else "dull bad ") * (1 + i % 3), label=i % 2)
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def fleet_frames(tiny_llama):
    """Two devices' frames from one tiny backbone: device-0 mostly label 0, device-1 mostly label 1."""
    backbone = Backbone.load(tiny_llama, num_taps=2)
    frames = {}
    for d in (0, 1):  # device d holds mostly label d (every sixth sample the other label)
        labels = [d if i % 6 else 1 - d for i in range(24)]
        examples = [
            Example(id=100 * d + i, text=("great fun " if y else "bad dull ") * 3, label=y)
            for i, y in enumerate(labels)
        ]
        runtime = DeviceRuntime(backbone, ForwardConfig(bits=8), device_id=f"device-{d}")
        frame, _ = runtime.make_frame(examples)
        frames[f"device-{d}"] = decode_frame(runtime.encode(frame))
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=backbone.layers,
        fingerprint=backbone.fingerprint,
        family="ladder",
        reduction=4,
        dropout=0.0,
    )
    frozen = backbone.frozen_head_state(lm_head=False)
    return frames, config, frozen


def _store(mode: str, fleet_frames, **kw) -> SideNetworkStore:
    frames, config, frozen = fleet_frames

    def make():
        torch.manual_seed(0)
        return build_side_network(config, frozen)

    return SideNetworkStore(
        StoreConfig(mode=mode, **kw),
        make,
        TrainConfig(lr=3e-3, epochs=4, batch_size=8),
        {d: f.num_samples for d, f in frames.items()},
        chunk_size=24,
    )


def test_shared_store_trains_one_network_on_every_device(fleet_frames):
    frames = fleet_frames[0]
    store = _store("shared", fleet_frames)
    for device, frame in frames.items():
        store.ingest(device, frame)
    assert len(store.trainers) == 1 and store.trainers["shared"].cache.num_samples == 48
    assert store.network_for("device-0") is store.network_for("device-1")
    assert store.train_epoch()["samples"] == 48


def test_per_device_store_keeps_networks_apart_and_fedavg_weights_by_samples(fleet_frames):
    frames = fleet_frames[0]
    store = _store("per-device", fleet_frames)
    before = {d: n.state_dict()["up.weight"].clone() for d, n in store.device_networks().items()}
    assert torch.equal(before["device-0"], before["device-1"])  # same start, so averaging is meaningful
    store.ingest("device-0", frames["device-0"])
    assert store.trainers["device-1"].cache.num_samples == 0
    nets = store.device_networks()
    assert not torch.equal(nets["device-0"].state_dict()["up.weight"], nets["device-1"].state_dict()["up.weight"])
    store.ingest("device-1", frames["device-1"])
    w0, w1 = (nets[d].state_dict()["up.weight"].clone() for d in ("device-0", "device-1"))
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    records = [
        RecordDict(
            {
                "net": ArrayRecord(torch_state_dict={k: v.detach() for k, v in nets[d].state_dict().items()}),
                m.STATS_KEY: MetricRecord({"num-examples": n}),
            }
        )
        for d, n in (("device-0", 30), ("device-1", 10))
    ]
    averaged = aggregate_arrayrecords(records, "num-examples")  # the strategy's FedAvg of device networks
    store.load_all(averaged.to_torch_state_dict())
    expected = 0.75 * w0 + 0.25 * w1
    for net in store.device_networks().values():
        assert torch.allclose(net.state_dict()["up.weight"], expected, atol=1e-6)


def test_hybrid_personal_heads_differ_but_share_the_trunk(fleet_frames):
    frames = fleet_frames[0]
    store = _store("hybrid", fleet_frames, personal_epochs=5, personal_lr=1e-2)
    for device, frame in frames.items():
        store.ingest(device, frame)
    store.personalize()
    p0, p1 = store.network_for("device-0"), store.network_for("device-1")
    shared = store.trainers["shared"].net.state_dict()
    for name, value in p0.state_dict().items():
        if name.startswith("head."):
            assert not torch.equal(value, p1.state_dict()[name])
        else:
            assert torch.equal(value, shared[name]) and torch.equal(value, p1.state_dict()[name])


def _head(net) -> torch.Tensor:
    """Every personal (``head.``) parameter of ``net``, flattened into one copy."""
    return torch.cat([v.detach().flatten().clone() for k, v in net.state_dict().items() if k.startswith("head.")])


def test_hybrid_keeps_the_personal_epochs_that_score_best_on_validation(fleet_frames):
    """With a validation score each device keeps its best epoch count: 0 is the trunk itself, a score that
    only improves keeps every epoch, a minimum in between keeps the network as it was after that epoch."""
    frames = fleet_frames[0]

    def personalized(scores: dict[str, list[float]]):
        store = _store("hybrid", fleet_frames, personal_epochs=4, personal_lr=1e-2)
        for device, frame in frames.items():
            store.ingest(device, frame)
        calls: dict[str, int] = {}
        seen: dict[str, list[torch.Tensor]] = {}

        def validate(device, net):  # scripted scores; records the head it was shown after each epoch
            calls[device] = calls.get(device, 0) + 1
            seen.setdefault(device, []).append(_head(net))
            return scores[device][calls[device] - 1]

        store.personalize(validate=validate)
        return store, seen

    store, seen = personalized({"device-0": [1.0, 2.0, 3.0, 4.0, 5.0], "device-1": [5.0, 4.0, 3.0, 2.0, 1.0]})
    assert store.personal_epochs_kept == {"device-0": 0, "device-1": 4}
    head = lambda d: _head(store.network_for(d))  # noqa: E731
    assert torch.equal(head("device-0"), _head(store.trainers["shared"].net))
    assert torch.equal(head("device-1"), seen["device-1"][4]) and not torch.equal(head("device-1"), seen["device-1"][0])

    store, seen = personalized({"device-0": [3.0, 2.0, 1.0, 2.0, 3.0], "device-1": [3.0, 3.0, 3.0, 3.0, 3.0]})
    assert store.personal_epochs_kept == {"device-0": 2, "device-1": 0}  # a tie keeps the fewer epochs
    assert torch.equal(_head(store.network_for("device-0")), seen["device-0"][2])
    assert not torch.equal(seen["device-0"][2], seen["device-0"][4])


def test_hybrid_without_a_validation_score_keeps_every_epoch(fleet_frames):
    frames = fleet_frames[0]
    store = _store("hybrid", fleet_frames, personal_epochs=2)
    for device, frame in frames.items():
        store.ingest(device, frame)
    store.personalize(validate=lambda device, net: None)  # devices with no validation frames
    assert store.personal_epochs_kept == {"device-0": 2, "device-1": 2}


def test_hybrid_needs_the_cache(fleet_frames):
    frames, config, frozen = fleet_frames
    with pytest.raises(SideNetworkError, match="activation cache"):
        SideNetworkStore(
            StoreConfig(mode="hybrid"),
            lambda: build_side_network(config, frozen),
            TrainConfig(cache_bytes=0),
            {"device-0": 1},
            chunk_size=8,
        )


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(SideNetworkError, match="per-device"):
        StoreConfig(mode="federated")


def test_run_config_parsing_and_errors():
    cfg = SideTuningConfig.from_run_config(
        {"mode": "per-device", "aggregate-every": 2, "activation-cache": False, "lr": 1, "unrelated-device-key": "x"}
    )
    assert (cfg.mode, cfg.aggregate_every, cfg.activation_cache, cfg.lr) == ("per-device", 2, False, 1.0)
    assert cfg.as_dict()["aggregate-every"] == 2
    with pytest.raises(ConfigError, match="aggregate-every"):
        SideTuningConfig.from_run_config({"aggregate-every": 2})  # shared mode has nothing to average
    with pytest.raises(ConfigError, match="in-flight"):
        SideTuningConfig.from_run_config({"in-flight": 0})
    with pytest.raises(ConfigError, match="num-server-rounds='many'"):
        SideTuningConfig.from_run_config({"num-server-rounds": "many"})
    with pytest.raises(ConfigError, match="activation-cache"):
        SideTuningConfig.from_run_config({"mode": "hybrid", "activation-cache": False})


def test_frame_travels_raw_and_networks_round_trip(fleet_frames):
    frames, config, frozen = fleet_frames
    blob = bytes(range(256)) * 3
    record = m.frame_record(blob)
    assert m.frame_bytes(record) == blob and m.array_bytes(record) == len(blob)  # no serialization header
    net = build_side_network(config, frozen)
    weights, net_config = m.network_records(net)
    back = m.network_from_records(weights, net_config, frozen)
    again, _ = m.network_records(back)  # what travels is half precision: the round trip is exact
    assert m.records_digest(again, net_config) == m.records_digest(weights, net_config)
    assert m.records_digest(m.network_records(net, dtype=None)[0], net_config) != m.records_digest(weights, net_config)
    assert back.config == net.config


def test_device_setup_from_flower_configs():
    with pytest.raises(DeviceSetupError, match="node-config"):
        DeviceSetup.from_configs({}, {})
    with pytest.raises(DeviceSetupError, match="partition-id=3"):
        DeviceSetup.from_configs({}, {"partition-id": 3, "num-partitions": 2})
    with pytest.raises(DeviceSetupError, match="partitioning"):
        DeviceSetup.from_configs({"partitioning": "random"}, {"partition-id": 0, "num-partitions": 2})
    setup = DeviceSetup.from_configs(
        {"train-samples": 10, "partitioning": "dirichlet"}, {"partition-id": 1, "num-partitions": 2}
    )
    assert (setup.train_samples, setup.partitioning, setup.device_id) == (10, "dirichlet", "device-1")


def test_device_shares_are_disjoint_and_cover_the_splits():
    splits = Splits(train=_examples(60), validation=_examples(20, 100), test=_examples(30, 200))
    shares = [device_share(splits, i, 3, "iid", 0.1, seed=0) for i in range(3)]
    for name in ("train", "validation", "test"):
        ids = [e.id for s in shares for e in getattr(s, name)]
        assert sorted(ids) == sorted(e.id for e in getattr(splits, name))
    assert [e.id for e in examples_at(shares[0].train, len(shares[0].train) - 1, 2)] == [
        shares[0].train[-1].id,
        shares[0].train[0].id,
    ]  # the cursor wraps into the next epoch


@pytest.mark.parametrize("mode", ["shared", "per-device"])
def test_learning_rate_schedule_ends_exactly_at_the_last_step(fleet_frames, mode):
    frames = fleet_frames[0]
    store = _store(mode, fleet_frames)  # 4 epochs: one streamed, three from the cache
    for device, frame in frames.items():
        store.ingest(device, frame)
    for _ in range(3):
        store.train_epoch()
    for trainer in store.trainers.values():
        assert trainer.step == trainer.total_steps
        assert trainer.scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)


def test_tail_average_is_the_mean_of_the_last_epochs_weights(fleet_frames):
    frames = fleet_frames[0]
    store = _store("shared", fleet_frames)  # 4 epochs, average over the last min(5, 4) of them
    trainer = store.trainers["shared"]
    snapshots = []
    for device, frame in frames.items():
        store.ingest(device, frame)
    for epoch in range(1, 5):
        if epoch > 1:
            store.train_epoch()
        assert store.averaging(epoch) == (epoch > trainer.config.epochs - trainer.config.average_epochs)
        store.update_average()
        snapshots.append(trainer.net.state_dict()["up.weight"].clone())
    assert store.use_average()
    assert torch.allclose(trainer.net.state_dict()["up.weight"], torch.stack(snapshots).mean(0), atol=1e-6)
