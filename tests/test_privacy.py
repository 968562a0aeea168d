"""Device defenses on the sent states, and the curious server's attacks on our own frames (issue 27).

The defense must clip and add noise exactly as stated (statistical checks that fail when it does
not); the attacks must run end to end on a model's real frames and read back more than chance
when nothing defends them (a tiny random Llama with a byte tokenizer: its states still carry the
token at each position, which is what the attacks exploit).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import dequantize
from mobiflower.platform.frames import decode_frame
from mobiflower.platform.state_defense import (
    DefenseError,
    StateDefense,
    apply,
    device_defense,
    device_generator,
    from_config,
    privacy_loss,
    window_mask,
)
from mobiflower.platform.tasks import Example
from mobiflower.simulations.bench import privacy_attacks as attacks
from mobiflower.simulations.bench import privacy_measure as pm


# ---- the defense ------------------------------------------------------------------------------------------
def test_clipping_bounds_every_row_and_keeps_its_direction():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(500, 32, generator=g) * torch.linspace(0.1, 10, 500)[:, None]
    out = apply(rows, StateDefense(clip=5.0, keep_first=0))
    norms, before = out.norm(dim=1), rows.norm(dim=1)
    assert float(norms.max()) <= 5.0 * (1 + 1e-5)
    small = before <= 5.0
    torch.testing.assert_close(out[small], rows[small])  # rows inside the ball are untouched
    torch.testing.assert_close(norms[~small], torch.full_like(norms[~small], 5.0))
    cosine = torch.nn.functional.cosine_similarity(out, rows, dim=1)
    assert float(cosine.min()) > 1 - 1e-5


def test_noise_has_the_stated_standard_deviation_and_spares_the_kept_positions():
    """The added noise is N(0, (noise * clip)^2) per coordinate: its std within 2% over 56k draws, its mean
    within 4 standard errors of 0, its coordinates uncorrelated; the first keep_first and the last keep_last
    positions of each sample are sent as they are."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(2000, 32, generator=g)
    rows[:, 0] += 1000.0  # every row far outside the ball: clipped to norm 4
    positions = torch.arange(2000) % 40
    defense = StateDefense(clip=4.0, noise=0.5, keep_first=2, keep_last=3)
    out = apply(rows, defense, torch.Generator().manual_seed(2), positions, torch.full((2000,), 40))
    kept = (positions < 2) | (positions >= 37)
    torch.testing.assert_close(out[kept], rows[kept])
    clipped = apply(rows[~kept], StateDefense(clip=4.0, keep_first=0))
    noise = (out[~kept] - clipped).flatten().double()
    sigma = defense.sigma
    assert sigma == pytest.approx(2.0)
    assert float(noise.std()) == pytest.approx(sigma, rel=0.02)
    assert abs(float(noise.mean())) < 4 * sigma / math.sqrt(len(noise))
    per_coord = (out[~kept] - clipped).T.double()
    corr = torch.corrcoef(per_coord)
    assert float((corr - torch.eye(32, dtype=torch.float64)).abs().max()) < 0.1


def test_noise_depends_on_the_generator_only():
    rows = torch.ones(8, 16)
    d = StateDefense(clip=1.0, noise=1.0, keep_first=0)
    a = apply(rows, d, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, apply(rows, d, torch.Generator().manual_seed(5)))
    assert not torch.equal(apply(rows, d, device_generator()), apply(rows, d, device_generator()))
    assert torch.equal(apply(rows, StateDefense(), None), rows)  # no defense: the rows as they were


def test_window_keeps_the_first_and_the_last_real_tokens():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]])
    got = window_mask(mask, StateDefense(window=2, keep_first=1))
    assert got.int().tolist() == [[1, 0, 0, 0, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0, 0]]
    assert torch.equal(window_mask(mask, StateDefense()), mask.bool())


def test_run_config_keys_and_a_device_that_insists():
    assert from_config({"state-clip": "120", "state-noise": 0.25, "state-window": "0"}) == StateDefense(120, 0.25)
    with pytest.raises(DefenseError, match="state-clip"):
        from_config({"state-noise": 0.1})
    with pytest.raises(DefenseError, match="state-window"):
        from_config({"state-window": -1})
    # the server asks for nothing: the device's node config still gets its defense
    assert device_defense({}, {"state-clip": 100, "state-noise": 0.2}) == StateDefense(100, 0.2)
    # the server asks for more than the device: the stronger of the two, field by field
    server = {"state-clip": 80, "state-noise": 0.5, "state-window": 8}
    assert device_defense(server, {"state-clip": 100, "state-noise": 0.2}) == StateDefense(clip=80, noise=0.5, window=8)
    assert device_defense(server, {"state-keep-first": 0}).keep_first == 0
    assert device_defense({"state-keep-first": 0}, {}).keep_first == 0


def test_privacy_loss_is_the_gaussian_mechanism_of_one_clipped_row():
    assert privacy_loss(StateDefense(clip=1.0))["mu"] is None
    loss = privacy_loss(StateDefense(clip=3.0, noise=2.0), delta=1e-5)
    assert loss["mu"] == pytest.approx(1.0)  # sensitivity 2 * clip over sigma = noise * clip

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    eps, mu = loss["epsilon"], loss["mu"]
    delta = phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)
    assert delta == pytest.approx(1e-5, rel=1e-3)
    assert privacy_loss(StateDefense(clip=1, noise=4.0))["epsilon"] < eps  # more noise, less loss


# ---- the attacks, end to end on a tiny model --------------------------------------------------------------
WORDS = "the a film story actor plot scene great dull funny long short bold quiet warm cold".split()


def _texts(n: int, seed: int) -> list[Example]:
    rng = random.Random(seed)
    return [Example(id=i, text=" ".join(rng.choices(WORDS, k=rng.randint(3, 7))), label=i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_sets(tiny_llama):
    """A tiny Llama's 16-bit frames of 120 public and 24 device texts, tapped at blocks 1 and 3."""
    backbone = Backbone.load(tiny_llama, layers=[1, 3])
    runtime = DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad"))
    public = pm.forward_set(runtime, _texts(120, 1), [1, 3], chunk=64)
    device = pm.forward_set(runtime, [Example(e.id + 1000, e.text, e.label) for e in _texts(24, 2)], [1, 3], 64)
    return backbone, public, device


def _rows(backbone, samples, exposure, defense, seed=0):
    blobs = pm.sent_blobs(samples, exposure, defense, seed)
    return pm.server_rows(blobs, samples, backbone.fingerprint, exposure, defense)


def test_learned_inverse_and_whitebox_search_read_undefended_frames(tiny_sets):
    backbone, public, device = tiny_sets
    exposure = pm.parse_exposure("tail:2:4", backbone.num_layers)
    none = StateDefense()
    pub, dev = _rows(backbone, public, exposure, none)[0], _rows(backbone, device, exposure, none)[0]
    assert dev.own.any() and not dev.own.all()  # the template's tokens are not counted as the text's own
    vocab = attacks.attack_vocab(pub.ids, 64)
    chance = attacks.prior_recovery(pub.ids, dev)
    linear = attacks.fit_linear(pub.states, pub.ids, pm.input_embeddings(backbone))
    got = attacks.token_recovery(linear.topk(dev.states)[:, 0], dev, vocab)
    assert got["token"] > max(0.5, 3 * chance)
    mlp = attacks.fit_mlp(pub.states, pub.ids, vocab, hidden=64, epochs=3, batch_size=64)
    assert attacks.token_recovery(mlp.topk(dev.states)[:, 0], dev, vocab)["token"] > max(0.3, 2 * chance)
    sid = int(dev.sample[0])
    at = dev.sample == sid
    found = attacks.whitebox_search(backbone, 1, dev.states[at], linear.topk(dev.states[at], 8), none, math.inf)
    hits = (torch.as_tensor(found) == dev.ids[at])[dev.own[at]]
    assert float(hits.float().mean()) > 0.5


def test_noise_defense_lowers_what_the_inverse_reads(tiny_sets):
    backbone, public, device = tiny_sets
    exposure = pm.parse_exposure("tail:2:8", backbone.num_layers)
    rates = []
    for defense in (StateDefense(), StateDefense(clip=5.0, noise=2.0)):
        pub, dev = _rows(backbone, public, exposure, defense)[0], _rows(backbone, device, exposure, defense, 1)[0]
        vocab = attacks.attack_vocab(pub.ids, 64)
        linear = attacks.fit_linear(pub.states, pub.ids, pm.input_embeddings(backbone))
        rates.append(attacks.token_recovery(linear.topk(dev.states)[:, 0], dev, vocab)["token"])
    assert rates[1] < rates[0] - 0.2


def test_bag_of_words_and_window_frames(tiny_sets):
    """Frames that send few positions (a window, or the ladder's last token): the per-position inverse has
    nothing of the text to read, the bag-of-words attack runs on the pooled rows."""
    backbone, public, device = tiny_sets
    exposure = pm.parse_exposure("tail:2:4", backbone.num_layers)
    window = StateDefense(window=3)
    dev = _rows(backbone, device, exposure, window)[0]
    lengths = {s: len(ids) for s, ids in device.ids.items()}
    assert len(dev.ids) == sum(min(n, 4) for n in lengths.values())
    ladder = pm.parse_exposure("ladder:2:8", backbone.num_layers)
    pub_rows, dev_rows = (
        _rows(backbone, public, ladder, StateDefense()),
        _rows(backbone, device, ladder, StateDefense()),
    )
    assert [len(r.ids) for r in dev_rows] == [len(device.ids)] * 2  # one row per sample and layer
    vocab = attacks.attack_vocab(torch.tensor([t for ids in public.ids.values() for t in ids]), 64)
    pub_x, pub_ids = pm.pooled(pub_rows, StateDefense())
    dev_x, dev_ids = pm.pooled(dev_rows, StateDefense())
    pub_bags, _ = pm.own_bags(public, pub_ids)
    bags, sizes = pm.own_bags(device, dev_ids)
    scores = attacks.fit_bag_of_words(pub_x, pub_bags, vocab)(dev_x)
    recall = attacks.bag_recovery(scores, bags, sizes, vocab)
    assert 0 < recall <= 1


def test_derived_frame_is_what_make_frame_sends(tiny_sets):
    """Without a defense, a frame derived from the 16-bit states decodes to make_frame's own at that
    bit-width (up to the float16 rounding of the states)."""
    backbone, _, device = tiny_sets
    examples = [Example(e.id + 1000, e.text, e.label) for e in _texts(24, 2)][:8]
    runtime = DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad", bits=8))
    direct, _ = runtime.make_frame(examples, layers=[1])
    clean = pm.forward_set(runtime, examples, [1, 3], 64).frames[0]
    derived = pm.derive_frame(clean, pm.parse_exposure("tail:2:8", 4), StateDefense(), torch.Generator())
    got = decode_frame(derived, expected_fingerprint=backbone.fingerprint)
    assert got.sample_ids == direct.sample_ids and got.token_counts == direct.token_counts
    a, b = dequantize(got.activations[0]), dequantize(direct.activations[0])
    assert float((a - b).norm() / b.norm()) < 0.02


def test_label_recovery_from_residuals():
    rng = np.random.default_rng(0)
    n = 4000
    labels = rng.integers(0, 2, n)
    probs = np.full((n, 2), 0.5, dtype=np.float32)  # a server that has learned nothing yet
    got = {e["epsilon"]: e for e in attacks.label_recovery(probs, labels, [0.0, 1.0, 3.0])}
    assert got[0.0]["residual"] == 1.0  # epsilon 0: every residual names its label
    for eps in (1.0, 3.0):
        keep = math.exp(eps) / (math.exp(eps) + 1)
        assert got[eps]["residual"] == pytest.approx(keep, abs=4 * math.sqrt(keep * (1 - keep) / n))
    assert got[1.0]["prediction_only"] == pytest.approx(0.5, abs=0.05)


def test_bench_privacy_command_end_to_end(real_assets, tiny_llama, tmp_path, capsys):
    """`mobiflower bench privacy` on a tiny model and a few samples: every attack, the side-tuning of the
    defended configuration, the label figures, the table, the JSON and the PNG."""
    import json

    from mobiflower.simulations.cli import main

    out = tmp_path / "privacy.json"
    argv = ["bench", "privacy", "--model", tiny_llama, "--configs", "tail:2:4", "ladder:2:8", "--defenses", "window=4"]
    argv += ["--train-samples", "16", "--test-samples", "8", "--public-samples", "24", "--vocab", "64"]
    argv += ["--mlp-epochs", "1", "--search-samples", "0", "--epochs", "1"]
    argv += ["--label-epsilons", "0", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["exposure"]["name"], r["defense"]["label"]): r for r in result["rows"]}
    assert len(rows) == 3
    base = rows[("tail cut 2, 4-bit", "none")]
    assert base["inverse"]["linear"]["token"] > base["inverse"]["prior"]
    assert "search" not in base  # the white-box search has its own test above
    assert (
        0 <= base["accuracy"]["clean"] <= 1
        and "accuracy" not in rows[("ladder/adapter, last token x 2, 8-bit", "none")]
    )
    window = rows[("tail cut 2, 4-bit", "window 4")]
    assert window["rows_per_sample"] <= 5 and window["inverse"]["linear"]["token"] == 0 and "bag" in window
    assert [e["epsilon"] for e in result["label_private"]] == [0.0, 1.0]
    assert result["label_private"][0]["residual"] == 1.0
    assert out.with_suffix(".png").is_file()
    assert "bag of words" in capsys.readouterr().out


# ---- the defense on the device: make_frame and a fleet run -------------------------------------------------
def test_make_frame_sends_what_the_defense_allows(tiny_sets):
    """The device's own frame under a window and clipping: only the first keep_first and the last window
    real tokens of each sample, every state but the kept first position clipped to the norm; the bench's
    derived frame (what `bench privacy` attacks) is the same frame."""
    backbone, _, _ = tiny_sets
    examples = [Example(e.id + 1000, e.text, e.label) for e in _texts(24, 2)][:8]
    defense = StateDefense(clip=0.12, window=3)
    runtime = DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad", bits=8, defense=defense))
    frame, stats = runtime.make_frame(examples, layers=[1])
    undefended = DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad", bits=8)).make_frame(examples, layers=[1])
    assert float(dequantize(undefended[0].activations[0]).norm(dim=1).median()) > 0.12 * 1.3  # clipping bites
    assert frame.token_counts == [min(n, 4) for n in frame.seq_lengths] and max(frame.seq_lengths) > 4
    assert stats.tokens_sent == sum(frame.token_counts)
    rows = dequantize(frame.activations[0])
    starts = np.concatenate([[0], np.cumsum(frame.token_counts)[:-1]])
    later = torch.ones(len(rows), dtype=torch.bool)
    later[torch.as_tensor(starts)] = False  # position 0 of each sample is sent as it is (keep_first 1)
    assert float(rows[later].norm(dim=1).max()) <= 0.12 * 1.05
    assert float(rows[~later].norm(dim=1).min()) > 0.12 * 1.05  # the first states are sent as they are
    clean = pm.forward_set(DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad")), examples, [1, 3], 64)
    derived = decode_frame(
        pm.derive_frame(clean.frames[0], pm.parse_exposure("tail:2:8", 4), defense, torch.Generator()),
        expected_fingerprint=backbone.fingerprint,
    )
    assert derived.token_counts == frame.token_counts and derived.sample_ids == frame.sample_ids
    a, b = dequantize(derived.activations[0]), rows
    assert float((a - b).norm() / b.norm()) < 0.02


def test_make_frame_noise_is_fresh_on_every_frame(tiny_sets):
    backbone, _, _ = tiny_sets
    examples = [Example(e.id + 1000, e.text, e.label) for e in _texts(8, 3)]
    runtime = DeviceRuntime(
        backbone, ForwardConfig(token_policy="nonpad", bits=8, defense=StateDefense(clip=0.5, noise=0.5))
    )
    first, second = (dequantize(runtime.make_frame(examples, layers=[1])[0].activations[0]) for _ in range(2))
    assert float((first - second).norm()) > 0.1 * float(first.norm())  # not a seed the server could replay


def test_a_device_that_insists_gets_its_defense_whatever_the_server_asks(
    real_assets, tiny_llama, tmp_path, monkeypatch
):
    """A fleet run whose run config asks for no defense: device 0's node config sets a window and a clip,
    and every frame device 0 builds obeys them (device 1's do not); the summary names each device's defense."""
    from inprocess_grid import run_fleet

    from mobiflower.clients import runtime as device_runtime

    built: dict[str, list] = {}
    make_frame = device_runtime.DeviceRuntime.make_frame

    def recording(self, examples, **kwargs):
        frame, stats = make_frame(self, examples, **kwargs)
        built.setdefault(self.device_id, []).append(frame)
        return frame, stats

    monkeypatch.setattr(device_runtime.DeviceRuntime, "make_frame", recording)
    run_config = {"model": tiny_llama, "num-taps": 2, "train-samples": 16, "validation-samples": 8}
    run_config |= {"test-samples": 8, "num-server-rounds": 1, "chunk-size": 8, "token-policy": "nonpad"}
    summary, _ = run_fleet(tmp_path, 2, run_config, node_configs=[{"state-window": 2, "state-clip": 0.1}, {}])
    assert summary["devices"]["device-0"]["state_defense"] == "clip 0.1, window 2"
    assert summary["devices"]["device-1"]["state_defense"] == "none"
    sent = {d: [f for f in frames if f.token_policy == "nonpad"] for d, frames in built.items()}  # not the probe
    for frame in sent["device-0"]:
        assert frame.token_counts == [min(n, 3) for n in frame.seq_lengths]
        rows = dequantize(frame.activations[0])
        first = torch.as_tensor(np.concatenate([[0], np.cumsum(frame.token_counts)[:-1]]))
        later = torch.ones(len(rows), dtype=torch.bool).index_fill_(0, first, False)
        assert float(rows[later].norm(dim=1).max()) <= 0.1 * 1.05  # clipped (position 0 is kept)
    assert any(max(f.seq_lengths) > 3 for f in sent["device-0"])
    for frame in sent["device-1"]:
        assert frame.token_counts == frame.seq_lengths
        assert float(dequantize(frame.activations[0]).norm(dim=1).median()) > 0.15  # not clipped
