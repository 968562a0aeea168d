"""Per-device side networks under a memory budget: paged to disk and back, exactly."""

from __future__ import annotations

import hashlib

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.data import Example
from mobiflower.platform.frames import decode_frame
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig, SideNetworkError, update_digest
from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
from mobiflower.platform.trainer import TrainConfig

DEVICES = 6


def _device_frames(backbone: Backbone, forward: ForwardConfig) -> dict[str, list]:
    """Two frames of 10 samples for each of the six devices."""
    frames: dict[str, list] = {}
    for d in range(DEVICES):
        runtime = DeviceRuntime(backbone, forward, device_id=f"device-{d}")
        frames[f"device-{d}"] = []
        for part in range(2):
            examples = [
                Example(
                    id=1000 * d + 10 * part + i,
                    text=("great fun " if (i + d) % 2 else "bad dull ") * 3,
                    label=(i + d) % 2,
                )
                for i in range(10)
            ]
            frame, _ = runtime.make_frame(examples)
            frames[f"device-{d}"].append(decode_frame(runtime.encode(frame)))
    return frames


@pytest.fixture(scope="module")
def six_devices(tiny_llama):
    """Six devices' frames (two each) from one tiny backbone, and the side-network recipe."""
    backbone = Backbone.load(tiny_llama, num_taps=2)
    frames = _device_frames(backbone, ForwardConfig(bits=8))
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=backbone.layers,
        fingerprint=backbone.fingerprint,
        family="ladder",
        reduction=1,
        dropout=0.3,
    )
    return frames, config, backbone.frozen_head_state(lm_head=False)


def _store(six_devices, tmp_path, budget_mb: float = 0.0) -> SideNetworkStore:
    frames, config, frozen = six_devices

    def make():
        torch.manual_seed(0)
        return build_side_network(config, frozen)

    return SideNetworkStore(
        StoreConfig(mode="per-device", memory_budget_mb=budget_mb),
        make,
        TrainConfig(lr=3e-3, epochs=3, batch_size=4, average_epochs=2),
        {d: sum(f.num_samples for f in fs) for d, fs in frames.items()},
        chunk_size=10,
        page_dir=tmp_path / "pages",
    )


def _run(store: SideNetworkStore, frames) -> None:
    """Two streamed frames per device (interleaved across devices), two cached epochs, FedAvg, one more."""
    for part in range(2):
        for device, device_frames in frames.items():
            store.ingest(device, device_frames[part])
    store.train_epoch()
    store.update_average()
    store.train_epoch()
    store.load_all(store.average_networks({d: 20 for d in frames}))
    store.train_epoch()
    store.update_average()


def _digests(store: SideNetworkStore) -> dict[str, str]:
    def average(trainer) -> str:
        h = hashlib.sha256()
        update_digest(h, trainer.average)
        return h.hexdigest()

    return {key: (trainer.state_digest(), trainer.step, average(trainer)) for key, trainer in store.trainers.items()}


def test_a_budget_pages_trainers_out_and_training_is_bit_identical(six_devices, tmp_path):
    frames = six_devices[0]
    torch.manual_seed(123)
    unbounded = _store(six_devices, tmp_path / "a")
    _run(unbounded, frames)
    reference = _digests(unbounded)
    reference_store = unbounded.state_digest()
    one = max(t.resident_bytes() for t in unbounded.trainers.values())
    assert unbounded.paging()["page_outs"] == 0

    budget_mb = 2.5 * one / 2**20  # two trainers fit, never three
    torch.manual_seed(123)
    paged = _store(six_devices, tmp_path / "b", budget_mb=budget_mb)
    _run(paged, frames)
    stats = paged.paging()
    assert stats["page_outs"] >= 20 and stats["page_ins"] >= 20  # every epoch cycles the six through memory
    assert stats["peak_resident_mb"] <= budget_mb and stats["resident"] <= 2
    assert len(list((tmp_path / "b" / "pages").iterdir())) == DEVICES
    assert _digests(paged) == reference  # weights, optimizer moments, step, tail average: bit for bit
    assert paged.state_digest() == reference_store  # and the activation caches' contents


def test_streamed_average_equals_flowers_fedavg(six_devices, tmp_path):
    frames = six_devices[0]
    store = _store(six_devices, tmp_path, budget_mb=6.0)
    for device, device_frames in frames.items():
        store.ingest(device, device_frames[0])
    weights = {d: 10 + i for i, d in enumerate(frames)}
    records = [
        RecordDict(
            {
                "net": ArrayRecord(
                    torch_state_dict={k: v.clone() for k, v in store.trainers[d].net.state_dict().items()}
                ),
                "stats": MetricRecord({"num-examples": w}),
            }
        )
        for d, w in weights.items()
    ]
    flower = aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()
    ours = store.average_networks(weights)
    assert set(ours) == set(flower)
    for key in ours:
        torch.testing.assert_close(ours[key], flower[key], rtol=1e-6, atol=1e-7)


def test_a_budget_smaller_than_one_network_says_what_to_raise(six_devices, tmp_path):
    frames = six_devices[0]
    store = _store(six_devices, tmp_path, budget_mb=0.001)
    with pytest.raises(SideNetworkError, match="raise side-memory-mb"):
        store.ingest("device-0", frames["device-0"][0])
    with pytest.raises(SideNetworkError, match="cannot hold every device network"):
        store.device_networks()


def test_checkpoint_of_a_paged_store_restores_every_device(six_devices, tmp_path):
    frames = six_devices[0]
    store = _store(six_devices, tmp_path / "a", budget_mb=6.0)
    for device, device_frames in frames.items():
        store.ingest(device, device_frames[0])
    store.train_epoch()
    before = {k: t.state_digest() for k, t in store.trainers.items()}
    store.save(tmp_path / "ckpt")
    restored = _store(six_devices, tmp_path / "b", budget_mb=6.0)
    restored.load(tmp_path / "ckpt")
    assert {k: t.state_digest() for k, t in restored.trainers.items()} == before


@pytest.fixture(scope="module")
def six_tail_devices(tiny_llama):
    """The same six devices feeding a pretrained tail: block 1's output for every real token."""
    from mobiflower.platform.pretrained_tail import load_tail_weights

    backbone = Backbone.load(tiny_llama, layers=[1])
    public = load_tail_weights(tiny_llama, 2)
    frames = _device_frames(backbone, ForwardConfig(bits=8, token_policy="nonpad"))
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=[1],
        fingerprint=backbone.fingerprint,
        family="tail",
        token_policy="nonpad",
        backbone_config=public.backbone_config,
        lora_rank=4,
    )
    return frames, config, public.weights


def test_paged_tails_train_bit_identically_and_share_their_frozen_blocks(six_tail_devices, tmp_path):
    frames = six_tail_devices[0]
    torch.manual_seed(123)
    unbounded = _store(six_tail_devices, tmp_path / "a")
    _run(unbounded, frames)
    reference, reference_store = _digests(unbounded), unbounded.state_digest()
    blocks = {t.net.tail.base_model.model.layers[0].mlp.up_proj.weight.data_ptr() for t in unbounded.trainers.values()}
    assert len(blocks) == 1  # six device networks, one copy of the public blocks

    one = max(t.footprint_bytes() for t in unbounded.trainers.values())
    torch.manual_seed(123)
    paged = _store(six_tail_devices, tmp_path / "b", budget_mb=2.5 * one / 2**20)
    _run(paged, frames)
    assert paged.paging()["page_outs"] >= 20
    assert _digests(paged) == reference and paged.state_digest() == reference_store


def test_hybrid_tails_personalise_the_head_over_the_shared_adapter(six_tail_devices, tmp_path):
    frames, config, frozen = six_tail_devices

    def make():
        torch.manual_seed(0)
        return build_side_network(config, frozen)

    store = SideNetworkStore(
        StoreConfig(mode="hybrid", personal_epochs=2),
        make,
        TrainConfig(lr=3e-3, epochs=2, batch_size=4, average_epochs=0),
        {d: 20 for d in frames},
        chunk_size=10,
    )
    for device, device_frames in frames.items():
        for frame in device_frames:
            store.ingest(device, frame)
    store.train_epoch()
    store.personalize(["device-0", "device-1"])
    shared = store.trainers["shared"].net.state_dict()
    for device in ("device-0", "device-1"):
        own = store.network_for(device).state_dict()
        assert not torch.equal(own["head.weight"], shared["head.weight"])  # the personal head moved
        lora = [k for k in own if "lora_" in k]
        assert lora and all(torch.equal(own[k], shared[k]) for k in lora)  # over the shared trunk
