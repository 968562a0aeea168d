"""The server trainer learns from frames, checkpoints exactly, and refuses foreign frames."""

import pytest
import torch

from mobiflower.platform.codec import quantize
from mobiflower.platform.frames import Frame
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig, SideNetworkError
from mobiflower.platform.trainer import SideTrainer, TrainConfig

D, LAYERS = 64, [1, 3]


def _frame(n, start, bits=8, seed=0, fingerprint="fp"):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    direction = torch.randn(D, generator=torch.Generator().manual_seed(123))
    acts = []
    for _ in LAYERS:
        x = torch.randn(n, D, generator=g) + 1.5 * (2 * labels[:, None] - 1) * direction
        acts.append(quantize(x, bits))
    return Frame(
        fingerprint=fingerprint,
        layers=LAYERS,
        token_policy="last",
        sample_ids=list(range(start, start + n)),
        token_counts=[1] * n,
        seq_lengths=[5] * n,
        targets={"kind": "class", "values": labels.tolist(), "num_classes": 2},
        activations=acts,
    )


def _trainer(seed=0, epochs=3):
    torch.manual_seed(seed)
    cfg = SideNetworkConfig(hidden_size=D, layers=LAYERS, fingerprint="fp", reduction=8)
    net = build_side_network(cfg, {"final_norm.weight": torch.ones(D)})
    return SideTrainer(net, TrainConfig(lr=3e-3, epochs=epochs, batch_size=16, seed=seed, device="cpu"), total_steps=60)


def test_learns_from_quantized_frames():
    trainer = _trainer()
    test = [_frame(200, 10_000, seed=99)]
    before = trainer.evaluate(test)["accuracy"]
    for i in range(4):
        trainer.ingest(_frame(64, i * 64, bits=4, seed=i))
    for _ in range(3):
        trainer.train_epoch()
    after = trainer.evaluate(test)["accuracy"]
    assert after > 0.9 and after > before
    assert trainer.cache.num_samples == 256


def test_checkpoint_resume_is_exact(tmp_path):
    frames = [_frame(32, i * 32, seed=i) for i in range(4)]
    a = _trainer()
    for f in frames[:2]:
        a.ingest(f)
    a.save_checkpoint(tmp_path / "ckpt")
    b = _trainer(seed=5)
    b.load_checkpoint(tmp_path / "ckpt")
    assert b.state_digest() == a.state_digest() and b.step == a.step
    torch.manual_seed(1)
    a.rng.seed(1)
    for f in frames[2:]:
        a.ingest(f)
    torch.manual_seed(1)
    b.rng.seed(1)
    for f in frames[2:]:
        b.ingest(f)
    assert b.state_digest() == a.state_digest()


def test_rejects_frames_of_another_backbone():
    trainer = _trainer()
    digest = trainer.state_digest()
    with pytest.raises(SideNetworkError, match="cannot train a side network"):
        trainer.ingest(_frame(8, 0, fingerprint="other"))
    assert trainer.state_digest() == digest and trainer.cache.num_samples == 0


def test_cache_is_bounded():
    trainer = _trainer()
    trainer.cache.max_bytes = _frame(32, 0).kept_nbytes() * 2  # payload and header content, as kept
    for i in range(3):
        trainer.ingest(_frame(32, i * 32, seed=i))
    assert trainer.cache.num_samples == 64 and trainer.cache.rejected == 1


def test_the_cache_changes_only_through_its_methods_and_its_count_follows():
    """Frames and the bytes they count move together (truncate, replace); outsiders get a read-only view."""
    trainer = _trainer()
    cache = trainer.cache
    decoded = [trainer.decode(_frame(8, i * 8, seed=i)) for i in range(3)]
    for d in decoded:
        assert cache.add(d)
    assert len(cache) == 3 and cache.nbytes == sum(d.frame.kept_nbytes() for d in decoded)
    cache.truncate(1)
    assert cache.frames == (decoded[0],) and cache.nbytes == decoded[0].frame.kept_nbytes()
    cache.replace(decoded[1:], rejected=5)
    assert cache.frames == tuple(decoded[1:]) and cache.rejected == 5
    assert cache.nbytes == sum(d.frame.kept_nbytes() for d in decoded[1:])
    with pytest.raises(AttributeError):
        cache.nbytes = 0
    with pytest.raises(AttributeError):
        cache.frames.append(decoded[0])


def test_length_grouping_keeps_every_sample_once_and_cuts_padding():
    import random as _random

    from mobiflower.platform.trainer import _grouped_by_length

    rng = _random.Random(0)
    lengths = [rng.randint(5, 80) for _ in range(1000)]
    order = list(range(1000))
    rng.shuffle(order)
    batches = _grouped_by_length(order, lengths, 16, _random.Random(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(1 <= len(b) <= 16 for b in batches)

    def padded(bs):
        return sum(max(lengths[i] for i in b) * len(b) for b in bs)

    plain = [order[k : k + 16] for k in range(0, 1000, 16)]
    assert padded(batches) < 0.8 * padded(plain)
    assert batches != sorted(batches, key=lambda b: lengths[b[0]])  # batch order is shuffled, not by length
