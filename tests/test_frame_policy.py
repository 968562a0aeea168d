"""Bandwidth adaptation: the policy's choices, prefix-tapped frames on the server, and fleet simulations.

The policy is checked on hand-computed numbers; the side network, trainer and intake on frames that
tap a prefix of the layers; two tiny-model Flower simulations check the whole loop on the bundled
fleets: on ``mixed-phones`` the slow devices adapt (logged with reasons) and the run reports its
accuracy against virtual time; on ``flaky`` every frame that arrived is trained or counted.
"""

from __future__ import annotations

import math

import pytest
import torch

from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideBatch, SideNetworkConfig, SideNetworkError
from mobiflower.strategies.config import ConfigError, SideTuningConfig
from mobiflower.strategies.frame_policy import FrameChoice, FramePolicy

LAYERS = [3, 7, 11, 15]  # a 16-block model tapped at 4 layers: 2 taps compute 8/16 of the forward


def _policy(**kw) -> FramePolicy:
    return FramePolicy(LAYERS, **kw)


def test_choices_run_from_full_fidelity_down_to_the_floor():
    policy = _policy()
    assert policy.full == FrameChoice(4, 8)
    assert policy.choices == [
        FrameChoice(4, 8),
        FrameChoice(4, 4),
        FrameChoice(3, 8),
        FrameChoice(3, 4),
        FrameChoice(2, 8),
        FrameChoice(2, 4),
    ]  # min taps: half of 4; min bits 4
    assert policy.depth(2) == 0.5 and policy.depth(4) == 1.0
    assert [c.bits for c in _policy(min_bits=2).choices[:3]] == [8, 4, 2]
    with pytest.raises(ValueError, match="adapt-min-taps=5"):
        _policy(min_taps=5)


def test_a_device_that_fits_keeps_full_fidelity_and_a_slow_one_steps_down():
    policy = _policy(deadline_s=100.0)
    # fast: 0.1 s/sample compute at full depth, frames of 100 B/sample at 4 taps x 8 bits, 1000 B/s up
    policy.observe("fast", FrameChoice(4, 8), samples=10, compute_s=1.0, upload_s=1.0, frame_bytes=1000)
    assert policy.seconds_per_sample("fast", FrameChoice(4, 8)) == pytest.approx(0.1 + 0.1)
    assert policy.decide("fast", remaining_samples=400, elapsed_s=0.0) == FrameChoice(4, 8)  # 80 s <= 100 s
    assert policy.decisions == []  # no change, nothing logged
    # slow: 0.4 s/sample compute; full fidelity needs 400 x 0.5 = 200 s; 4-bit 180 s; 3 taps ... 2 taps 4-bit:
    # 400 x (0.4 x 0.5 + 0.1 x 0.25) = 90 s fits (2 taps 8-bit: 400 x 0.25 = 100 s fits first)
    policy.observe("slow", FrameChoice(4, 8), samples=10, compute_s=4.0, upload_s=1.0, frame_bytes=1000)
    assert policy.decide("slow", remaining_samples=400, elapsed_s=0.0) == FrameChoice(2, 8)
    assert policy.decisions[-1].device == "slow" and "100.0 s at 8-bit, 2/4 layers" in policy.decisions[-1].reason
    # too late for anything: the cheapest choice, and the reason says late frames are still trained
    assert policy.decide("slow", remaining_samples=400, elapsed_s=95.0) == FrameChoice(2, 4)
    assert "cannot make" in policy.decisions[-1].reason and "late frames still trained" in policy.decisions[-1].reason


def test_the_deadline_is_the_median_device_at_full_fidelity_once_all_were_seen():
    policy = _policy()
    policy.seed("a", 0.1)
    policy.set_deadline({"a": 100, "b": 100, "c": 100})
    assert policy.deadline_s == 0  # b and c not measured yet
    policy.seed("b", 0.2)
    policy.seed("c", 0.4)
    policy.set_deadline({"a": 100, "b": 100, "c": 100})
    assert policy.deadline_s == pytest.approx(20.0) and "median" in policy.deadline_reason
    assert policy.decide("a", 100, 0.0) == FrameChoice(4, 8)
    assert policy.decide("c", 100, 0.0) == FrameChoice(2, 8)  # 100 x 0.4 x 0.5 = 20 s (uplink unknown yet)
    fixed = _policy(deadline_s=5.0)
    fixed.seed("a", 1.0)
    fixed.set_deadline({"a": 10})
    assert fixed.deadline_s == 5.0 and "run config" in fixed.deadline_reason


def test_the_run_config_checks_the_adaptation_keys():
    assert SideTuningConfig.from_run_config({"adapt": "true", "fleet": "mixed-phones"}).adapt
    with pytest.raises(ConfigError, match="adapt-min-bits=3"):
        SideTuningConfig(adapt_min_bits=3)
    with pytest.raises(ConfigError, match="eval-split='train'"):
        SideTuningConfig(eval_split="train")
    with pytest.raises(ConfigError, match="deadline-s=-1"):
        SideTuningConfig(deadline_s=-1)


def test_a_side_network_reads_a_prefix_of_its_layers_and_refuses_more():
    cfg = SideNetworkConfig(hidden_size=16, layers=LAYERS, fingerprint="fp", family="ladder", reduction=4)
    assert cfg.accepts_layers([3, 7]) and cfg.accepts_layers(LAYERS)
    assert not cfg.accepts_layers([7, 11]) and not cfg.accepts_layers([]) and not cfg.accepts_layers(LAYERS + [19])
    net = build_side_network(cfg)
    states = [torch.randn(2, 1, 16) for _ in LAYERS]

    def batch(k):
        return SideBatch(states[:k], torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, dtype=torch.long))

    assert net(batch(2)).shape == (2, 2) and net(batch(4)).shape == (2, 2)
    assert not torch.allclose(net.eval()(batch(2)), net.eval()(batch(4)))  # the upper layers matter
    with pytest.raises(SideNetworkError, match="1 to 4 tapped layers"):
        net(SideBatch(states + states[:1], torch.ones(2, 1, dtype=torch.bool), torch.zeros(2, dtype=torch.long)))


def test_cached_epochs_mix_full_and_prefix_frames(tiny_llama):
    from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
    from mobiflower.platform.backbone import Backbone
    from mobiflower.platform.data import Example
    from mobiflower.platform.trainer import SideTrainer, TrainConfig

    backbone = Backbone.load(tiny_llama, num_taps=4)
    layers = list(backbone.layers)
    examples = [Example(id=i, text=f"sample {i} is {'good' if i % 2 else 'bad'}", label=i % 2) for i in range(24)]
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=8, batch_size=8))
    full, _ = runtime.make_frame(examples[:12])
    prefix, _ = runtime.make_frame(examples[12:], layers=layers[:2], config=ForwardConfig(bits=4, batch_size=8))
    assert prefix.layers == layers[:2] and prefix.nbytes() < full.nbytes() / 3
    cfg = SideNetworkConfig(
        hidden_size=backbone.hidden_size, layers=layers, fingerprint=backbone.fingerprint, family="ladder", reduction=4
    )
    trainer = SideTrainer(build_side_network(cfg), TrainConfig(batch_size=8, epochs=2, lr=1e-3))
    trainer.ingest(full)
    trainer.ingest(prefix)
    stats = trainer.train_epoch()
    assert stats["samples"] == 24 and math.isfinite(stats["loss"])
    assert trainer.step == 2 + 2 + 3  # two ingest passes of 12, then 24 / 8: one step per minibatch, mixed or not


def test_a_step_over_parts_is_the_step_over_the_whole_batch():
    from mobiflower.platform.trainer import SideTrainer, TrainConfig, _concat_batches

    cfg = SideNetworkConfig(hidden_size=16, layers=LAYERS, fingerprint="fp", family="ladder", reduction=4, dropout=0.0)
    torch.manual_seed(0)
    nets = [build_side_network(cfg) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())

    def make(n):
        return SideBatch(
            [torch.randn(n, 1, 16) for _ in LAYERS],
            torch.ones(n, 1, dtype=torch.bool),
            torch.zeros(n, dtype=torch.long),
            torch.randint(0, 2, (n,)),
        )

    a, b = make(5), make(3)
    whole, parts = (SideTrainer(net, TrainConfig(batch_size=8, epochs=1, lr=1e-2, device="cpu")) for net in nets)
    loss_whole = whole.train_batch(_concat_batches([a, b]))
    loss_parts = parts.train_batch([a, b])
    assert loss_parts == pytest.approx(loss_whole, rel=1e-5)
    for (name, p), q in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
