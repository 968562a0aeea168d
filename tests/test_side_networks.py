"""Side networks: both families, both heads, save/load, and that they learn."""

import pytest
import torch

from mobiflower.platform.side_factory import build_side_network, load_side_network
from mobiflower.platform.side_networks import (
    SideNetworkConfig,
    SideNetworkError,
    make_side_batch,
    save_side_network,
    side_network_loss,
)

D = 32
FROZEN = {"final_norm.weight": torch.ones(D), "lm_head.weight": torch.randn(50, D)}


def _batch(policy="last", n=6, lengths=(3, 5, 2, 4, 1, 5), layers=2, targets=None):
    lengths = list(lengths[:n])
    counts = [1] * n if policy == "last" else lengths
    rows = [torch.randn(sum(counts), D) for _ in range(layers)]
    return make_side_batch(rows, counts, lengths, policy, "last", targets, list(range(n)))


@pytest.mark.parametrize("family", ["ladder", "adapter"])
@pytest.mark.parametrize("policy", ["last", "nonpad"])
def test_classification_forward_and_backward(family, policy):
    cfg = SideNetworkConfig(
        hidden_size=D, layers=[1, 3], fingerprint="fp", family=family, reduction=4, token_policy=policy
    )
    net = build_side_network(cfg, FROZEN)
    batch = _batch(policy, targets=torch.tensor([0, 1, 0, 1, 1, 0]))
    logits = net(batch)
    assert logits.shape == (6, 2)
    side_network_loss(logits, batch).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)


def test_padding_does_not_change_a_sample():
    """A sample's logits are the same alone or batched with longer ones (masking works)."""
    cfg = SideNetworkConfig(
        hidden_size=D, layers=[0, 1], fingerprint="fp", family="ladder", reduction=4, token_policy="nonpad"
    )
    net = build_side_network(cfg, FROZEN).eval()
    batch = _batch("nonpad")
    single = make_side_batch([s[0, :3] for s in batch.states], [3], [3], "nonpad")
    torch.testing.assert_close(net(batch)[0], net(single)[0], atol=1e-5, rtol=1e-4)


def test_lm_head_is_frozen_and_causal():
    cfg = SideNetworkConfig(
        hidden_size=D, layers=[0, 1], fingerprint="fp", family="ladder", reduction=4, head="lm", token_policy="nonpad"
    )
    net = build_side_network(cfg, FROZEN)
    batch = _batch("nonpad", targets=torch.randint(0, 50, (20,)))
    logits = net(batch)
    assert logits.shape == (6, 5, 50)
    assert "head.weight" not in dict(net.named_parameters())
    # causal: changing the last token of sample 1 leaves its earlier positions unchanged
    net.eval()
    before = net(batch)[1, :4]
    for s in batch.states:
        s[1, 4] += 10
    torch.testing.assert_close(net(batch)[1, :4], before)
    with pytest.raises(SideNetworkError, match="LM head needs every token"):
        SideNetworkConfig(hidden_size=D, layers=[0], fingerprint="fp", head="lm", token_policy="last")


def test_save_load_roundtrip_and_fingerprint_check(tmp_path):
    cfg = SideNetworkConfig(hidden_size=D, layers=[1, 3], fingerprint="fp-a", family="adapter", reduction=4)
    net = build_side_network(cfg, FROZEN)
    torch.nn.init.normal_(net.ups[0].weight)
    path = save_side_network(net, tmp_path / "side.safetensors")
    loaded = load_side_network(path, FROZEN, fingerprint="fp-a")
    batch = _batch()
    torch.testing.assert_close(net.eval()(batch), loaded(batch))
    assert path.stat().st_size < 4 * sum(p.numel() for p in net.parameters()) + 8192  # no frozen tensors saved
    with pytest.raises(SideNetworkError, match="trained on backbone fp-a"):
        load_side_network(path, FROZEN, fingerprint="fp-b")
    with pytest.raises(SideNetworkError, match="not a side-network file"):
        (tmp_path / "junk").write_bytes(b"junk")
        load_side_network(tmp_path / "junk")


def test_config_errors():
    with pytest.raises(SideNetworkError, match="unknown side-network family"):
        SideNetworkConfig(hidden_size=D, layers=[0], fingerprint="x", family="lora")
    with pytest.raises(SideNetworkError, match="must divide"):
        SideNetworkConfig(hidden_size=30, layers=[0], fingerprint="x", reduction=8)
