"""The forward-only device runtime: frames per token policy, no autograd anywhere."""

import pytest
import torch

from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.codec import dequantize
from mobiflower.platform.data import Example
from mobiflower.platform.frames import decode_frame
from mobiflower.platform.tasks import BUNDLED_TASK, CausalLMTask

EXAMPLES = [Example(i, "x" * (3 + 5 * i), i % 2) for i in range(5)]


@pytest.fixture(scope="module")
def backbone(tiny_llama):
    return Backbone.load(tiny_llama, num_taps=2)


@pytest.mark.parametrize("policy", ["last", "nonpad", "all"])
def test_frame_per_policy(backbone, policy):
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=8, token_policy=policy, batch_size=2))
    frame, stats = runtime.make_frame(EXAMPLES)
    lengths = [len(backbone.tokenize([BUNDLED_TASK.render(e.text)])["input_ids"][0]) for e in EXAMPLES]
    assert frame.seq_lengths == lengths
    if policy == "last":
        assert frame.token_counts == [1] * 5
    elif policy == "nonpad":
        assert frame.token_counts == lengths
    else:  # padded to the longest of each batch of 2
        assert frame.token_counts == [max(lengths[0:2])] * 2 + [max(lengths[2:4])] * 2 + [lengths[4]]
    assert frame.targets == {"kind": "class", "values": [0, 1, 0, 1, 0], "num_classes": 2}
    assert stats.samples == 5 and stats.tokens_sent == sum(frame.token_counts) and stats.forward_s > 0
    decoded = decode_frame(runtime.encode(frame), expected_fingerprint=backbone.fingerprint)
    assert decoded.sample_ids == [0, 1, 2, 3, 4]
    for q in decoded.activations:
        assert q.shape == (sum(frame.token_counts), backbone.hidden_size)


def test_last_token_rows_match_unbatched_forward(backbone):
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=16, token_policy="last", batch_size=4))
    frame, _ = runtime.make_frame(EXAMPLES)
    for i, example in enumerate(EXAMPLES):
        enc = backbone.tokenize([BUNDLED_TASK.render(example.text)])
        seen = {}
        backbone.forward_taps(enc["input_ids"], enc["attention_mask"], lambda layer, h: seen.__setitem__(layer, h))
        for layer, q in zip(frame.layers, frame.activations):
            torch.testing.assert_close(dequantize(q)[i], seen[layer][0, -1], atol=2e-2, rtol=1e-3)


def test_device_builds_no_autograd_graph(backbone):
    """No parameter requires grad, and nothing the device computes carries a graph."""
    assert not any(p.requires_grad for p in backbone.model.parameters())
    seen = []
    enc = backbone.tokenize(["a"])
    backbone.forward_taps(enc["input_ids"], enc["attention_mask"], lambda _layer, h: seen.append(h))
    for h in seen:
        assert h.grad_fn is None and not h.requires_grad and h.is_inference()
    with torch.enable_grad():  # even with grad mode forced on around it
        runtime = DeviceRuntime(backbone, ForwardConfig())
        frame, _ = runtime.make_frame(EXAMPLES[:2])
    assert all(not dequantize(q).requires_grad for q in frame.activations)


def test_token_targets_and_config_errors(backbone):
    runtime = DeviceRuntime(backbone, ForwardConfig(token_policy="nonpad"), task=CausalLMTask())
    frame, _ = runtime.make_frame(EXAMPLES[:2])
    assert len(frame.targets["values"]) == sum(frame.token_counts)
    assert frame.targets["values"][frame.token_counts[0] - 1] == -100
    with pytest.raises(ValueError, match="bits=3"):
        ForwardConfig(bits=3)
    with pytest.raises(ValueError, match="token_policy"):
        ForwardConfig(token_policy="first")
    with pytest.raises(ValueError, match="next-token targets"):
        DeviceRuntime(backbone, ForwardConfig(token_policy="last"), task=CausalLMTask()).make_frame(EXAMPLES[:1])
