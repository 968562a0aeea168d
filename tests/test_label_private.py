"""Label-private training: residuals replace labels; what they hide (with epsilon) and what they do not."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mobiflower.platform.label_private import (
    ResidualError,
    check_probabilities,
    device_secret,
    keep_probability,
    label_from_residual,
    noisy_label,
    residuals,
)

SECRET = device_secret([(i, f"text {i}", i % 2) for i in range(10)])


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 16), st.integers(2, 5), st.integers(0, 2**31))
def test_residual_backprop_equals_cross_entropy_gradient(n, k, seed):
    """Backpropagating r / n through the logits gives the mean cross-entropy's gradient exactly."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, k, (n,), generator=g)
    torch.nn.functional.cross_entropy(logits, labels).backward()
    expected = logits.grad.clone()
    logits.grad = None
    probs = logits.detach().softmax(-1).numpy()
    r = residuals(probs, labels.tolist(), list(range(n)), k, epsilon=0.0, secret=SECRET)
    (logits * torch.as_tensor(r, dtype=torch.float64)).sum().div(n).backward()
    torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_without_noise_a_residual_still_names_its_label():
    """Stated plainly in the docs: epsilon 0 keeps labels off the wire, not out of reach."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    probs = rng.dirichlet([1, 1], 500)
    r = residuals(probs, labels.tolist(), list(range(500)), 2, epsilon=0.0, secret=SECRET)
    assert (label_from_residual(r) == labels).all()


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 2.0])
def test_randomized_response_hides_labels_at_the_rate_epsilon_allows(epsilon):
    rng = np.random.default_rng(1)
    n = 4000
    labels = rng.integers(0, 2, n)
    probs = rng.dirichlet([1, 1], n)
    r = residuals(probs, labels.tolist(), list(range(n)), 2, epsilon=epsilon, secret=SECRET)
    recovered = (label_from_residual(r) == labels).mean()
    expected = math.exp(epsilon) / (math.exp(epsilon) + 1)
    assert keep_probability(epsilon, 2) == pytest.approx(expected)
    assert abs(recovered - expected) < 0.03  # 4000 samples: 3 points is > 4 standard deviations


def test_noisy_labels_are_fixed_per_sample_and_keyed_by_the_devices_secret():
    """Asking again in a later epoch gets the same answer, so averaging cannot remove the noise."""
    first = [noisy_label(1, i, 2, 1.0, SECRET) for i in range(200)]
    assert first == [noisy_label(1, i, 2, 1.0, SECRET) for i in range(200)]
    other = device_secret([(0, "another device", 0)])
    assert first != [noisy_label(1, i, 2, 1.0, other) for i in range(200)]


@pytest.mark.parametrize(
    "probs, match",
    [
        (np.full((2, 3), 1 / 3), "shape"),
        (np.array([[0.5, 0.6], [0.5, 0.5]]), "in \\[0, 1\\]|sum to 1"),
        (np.array([[np.nan, 1.0], [0.5, 0.5]]), "finite"),
        (np.array([[0.2, 0.2], [0.5, 0.5]]), "sum to 1"),
        (np.array([[1, 0], [0, 1]]), "floating point"),
    ],
)
def test_malformed_probabilities_are_refused(probs, match):
    with pytest.raises(ResidualError, match=match):
        check_probabilities(probs, 2, 2)


# ---- the trainer: residual steps train exactly as labelled ones ------------------------------


def _frames_and_net(tiny_llama):
    from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
    from mobiflower.platform.backbone import Backbone
    from mobiflower.platform.data import Example
    from mobiflower.platform.frames import decode_frame
    from mobiflower.platform.side_factory import build_side_network
    from mobiflower.platform.side_networks import SideNetworkConfig

    backbone = Backbone.load(tiny_llama, num_taps=2)
    examples = [
        Example(id=i, text=("great fun " if i % 3 else "bad dull ") * 3, label=int(i % 3 > 0)) for i in range(24)
    ]
    frames = {}
    for targets in ("class", "none"):
        runtime = DeviceRuntime(
            backbone, ForwardConfig(bits=8, targets="task" if targets == "class" else "none"), device_id="device-0"
        )
        frame, _ = runtime.make_frame(examples)
        frames[targets] = decode_frame(runtime.encode(frame))
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=backbone.layers,
        fingerprint=backbone.fingerprint,
        family="ladder",
        reduction=4,
        dropout=0.3,
    )
    frozen = backbone.frozen_head_state(lm_head=False)

    def make():
        torch.manual_seed(0)
        return build_side_network(config, frozen)

    return examples, frames, make


def test_a_label_private_trainer_learns_what_a_labelled_one_does(tiny_llama):
    from mobiflower.platform.trainer import SideTrainer, TrainConfig

    examples, frames, make = _frames_and_net(tiny_llama)
    assert frames["none"].targets == {"kind": "none"}  # nothing about labels in the frame
    labels = {e.id: e.label for e in examples}
    train = TrainConfig(lr=3e-3, epochs=3, batch_size=8)
    asked: list[int] = []

    def oracle(sample_ids, probs):  # what a device computes: p - onehot(y), for its own samples
        asked.extend(sample_ids)
        return residuals(probs.numpy(), [labels[i] for i in sample_ids], sample_ids, 2, 0.0, SECRET)

    torch.manual_seed(7)
    labelled = SideTrainer(make(), train, total_steps=9)
    labelled.ingest(frames["class"])
    labelled.train_epoch()
    labelled.train_epoch()
    torch.manual_seed(7)
    private = SideTrainer(make(), train, total_steps=9, residuals=oracle)
    private.ingest(frames["none"])
    private.train_epoch()
    private.train_epoch()
    assert sorted(asked) == sorted(3 * [e.id for e in examples])  # every sample, once per epoch
    for key, value in labelled.net.state_dict().items():
        torch.testing.assert_close(private.net.state_dict()[key], value, rtol=1e-4, atol=1e-6)


def test_without_an_oracle_a_labelless_frame_cannot_train(tiny_llama):
    from mobiflower.platform.side_networks import SideNetworkError
    from mobiflower.platform.trainer import SideTrainer, TrainConfig

    _, frames, make = _frames_and_net(tiny_llama)
    with pytest.raises(SideNetworkError, match="no targets"):
        SideTrainer(make(), TrainConfig(), total_steps=3).ingest(frames["none"])


# ---- a fleet run (in-process: tests/inprocess_grid.py) --------------------------------------------


def test_label_private_fleet_trains_without_labels_reaching_the_server(real_assets, tiny_llama, tmp_path):
    from inprocess_grid import run_fleet

    from mobiflower.platform.frames import decode_frame

    capture = tmp_path / "capture"
    run_config = {
        "model": tiny_llama,
        "num-taps": 2,
        "train-samples": 32,
        "validation-samples": 8,
        "test-samples": 16,
        "num-server-rounds": 2,
        "chunk-size": 8,
        "batch-size": 8,
        "eval-every": 1,
        "reduction": 4,
        "label-private": True,
        "label-epsilon": 1.0,
        "capture-dir": str(capture),
    }
    summary, _ = run_fleet(tmp_path / "sim", 2, run_config)
    for device in summary["devices"].values():
        assert not device["failures"] and device["samples_trained"] == 16
        # shared mode: 32 samples in batches of 8 for 2 epochs = 8 steps; each asks the devices it touches
        assert 4 <= device["residual_requests"] <= 8
        assert device["test_samples"] == 8
    for partition in (0, 1):
        kinds = {
            f.name.split("-", 1)[1].removesuffix(".bin") for f in (capture / f"partition-{partition}").glob("*.bin")
        }
        assert "train-residual" in kinds
    # what the server kept of every frame (its activation cache on disk): no labels anywhere
    cached = sorted((tmp_path / "sim" / "run").glob("cache/*/*.frame"))
    assert len(cached) == 4
    for path in cached:
        assert decode_frame(path.read_bytes()).targets == {"kind": "none"}


def test_label_private_settings_that_cannot_work_fail_first():
    from mobiflower.strategies.config import ConfigError, SideTuningConfig

    with pytest.raises(ConfigError, match="cannot run mode 'hybrid'"):
        SideTuningConfig(mode="hybrid", label_private=True)
    with pytest.raises(ConfigError, match="only applies to a label-private run"):
        SideTuningConfig(label_epsilon=1.0)
    with pytest.raises(ConfigError, match=">= 0"):
        SideTuningConfig(label_private=True, label_epsilon=-1.0)


def test_the_intake_refuses_labels_in_a_private_run_and_labelless_frames_in_a_normal_one(tiny_llama):
    from mobiflower.platform.frames import encode_frame
    from mobiflower.platform.intake import FrameIntake
    from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
    from mobiflower.platform.trainer import TrainConfig

    _, frames, make = _frames_and_net(tiny_llama)
    config = make().config
    for private, sent, reason in ((True, "class", "labels in a label-private run"), (False, "none", "labels withheld")):
        store = SideNetworkStore(
            StoreConfig(),
            make,
            TrainConfig(),
            {"device-0": 24},
            chunk_size=24,
            residuals=(lambda ids, p: p) if private else None,
        )
        intake = FrameIntake(store, config, label_private=private)
        before = store.state_digest()
        result = intake.offer("device-0", encode_frame(frames[sent]))
        assert not result.accepted and result.reason == reason and result.field == "targets"
        assert store.state_digest() == before and intake.owners == {}
