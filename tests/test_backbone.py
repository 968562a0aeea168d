"""Backbone loading, tapping and fingerprints across model families (tiny random models)."""

import pytest
import torch

from mobiflower.platform.backbone import Backbone, BackboneError, evenly_spaced_layers


def test_evenly_spaced_layers_end_at_last_block():
    assert evenly_spaced_layers(30, 8) == [3, 7, 10, 14, 18, 21, 25, 29]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(12, 1) == [11]
    with pytest.raises(BackboneError, match="cannot tap"):
        evenly_spaced_layers(4, 5)


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2", "qwen2", "bert"])
def test_taps_every_family(tiny_models, family):
    backbone = Backbone.load(tiny_models[family], num_taps=2)
    assert backbone.layers == [1, 3]
    assert not any(p.requires_grad for p in backbone.model.parameters())
    enc = backbone.tokenize(["a short one", "a somewhat longer text here"])
    seen = {}
    final = backbone.forward_taps(
        enc["input_ids"], enc["attention_mask"], lambda i, h: seen.__setitem__(i, h), need_final=True
    )
    assert set(seen) == {1, 3}
    assert seen[3].shape == (2, enc["input_ids"].shape[1], backbone.hidden_size)
    assert final.shape == seen[3].shape
    assert backbone.is_decoder == (family != "bert")


def test_taps_match_hidden_states_and_stop_early(tiny_llama):
    backbone = Backbone.load(tiny_llama, layers=[0, 2])
    enc = backbone.tokenize(["hello world"])
    seen = {}
    assert backbone.forward_taps(enc["input_ids"], enc["attention_mask"], lambda i, h: seen.__setitem__(i, h)) is None
    with torch.no_grad():
        ref = backbone.base(**enc, output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen[0], ref[1])  # hidden_states[0] is the embedding output
    torch.testing.assert_close(seen[2], ref[3])
    calls = []
    backbone.blocks[3].register_forward_hook(lambda *a: calls.append(1))
    backbone.forward_taps(enc["input_ids"], enc["attention_mask"], lambda i, h: None)
    assert not calls, "blocks after the last tap must not run"


def test_fingerprint_is_stable_and_tells_models_apart(tiny_models):
    a = Backbone.load(tiny_models["llama"])
    b = Backbone.load(tiny_models["llama"])
    c = Backbone.load(tiny_models["qwen2"])
    assert a.fingerprint == b.fingerprint
    assert a.fingerprint != c.fingerprint
    assert a.fingerprint.startswith("llama-d64-L4-float32-")
    with torch.no_grad():
        b.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    from mobiflower.platform.hf_model import weights_digest

    assert weights_digest(b.model) != a.identity.digest


def test_bad_layers_and_missing_model(tiny_llama, tmp_path):
    with pytest.raises(BackboneError, match="strictly increasing"):
        Backbone.load(tiny_llama, layers=[2, 1])
    with pytest.raises(BackboneError, match="strictly increasing"):
        Backbone.load(tiny_llama, layers=[0, 9])
    with pytest.raises(BackboneError, match="cannot load model"):
        Backbone.load(str(tmp_path / "nope"))
