"""A causal-LM tail on the device: the delivered adapter (PEFT, CAUSAL_LM) generates and scores text there
exactly as stock transformers + PEFT do with it, the device scores the tokens training frames carry, and
`mobiflower generate` / `mobiflower infer` each take their own kind of adapter and refuse the other."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from mobiflower.clients.generation import LocalGenerator
from mobiflower.clients.inference import TailLanguageModel, installed_model, pad_ids
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.frames import IGNORE_INDEX
from mobiflower.platform.pretrained_tail import load_tail_weights, save_peft_adapter
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig
from mobiflower.platform.tasks import CausalLMTask, Example, scored_targets
from mobiflower.platform.trainer import SideTrainer, TrainConfig
from mobiflower.simulations.cli import main

CUT = 2  # the tiny llama has 4 blocks: the device runs 0..1, the server trains LoRA on 2..3
SAMPLES = [
    Example(id=0, text="the cat sat on the mat"),
    Example(id=1, prompt="Q: what is two and two? A:", completion=" four, of course"),
    Example(id=2, text="a longer piece of text, so that the others are padded in a batch with it"),
    Example(id=3, prompt="Say hi:", completion=" hi"),
]


def _randomized(net):
    """LoRA B starts at zero (the adapter is a no-op): give every trainable tensor values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return net


@pytest.fixture(scope="module")
def lm_tail(tiny_llama, tmp_path_factory):
    """A causal-LM tail with random LoRA, its delivered adapter folder, and a classification adapter."""
    backbone = Backbone.load(tiny_llama, layers=[CUT - 1])
    public = load_tail_weights(tiny_llama, CUT, lm_head=True)
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=[CUT - 1],
        fingerprint=backbone.fingerprint,
        family="tail",
        head="lm",
        token_policy="nonpad",
        bits=16,
        backbone_config=public.backbone_config,
        lora_rank=4,
        lora_alpha=8.0,
        extra={"model": tiny_llama, "task": {"task": "causal-lm"}},
    )
    net = _randomized(build_side_network(config, public.weights)).eval()
    root = tmp_path_factory.mktemp("adapters")
    folder = save_peft_adapter(config, net.state_dict(), root / "lm", dtype=torch.float32)
    cls_config = dataclasses.replace(config, head="classification", extra={"model": tiny_llama})
    cls_net = _randomized(build_side_network(cls_config, load_tail_weights(tiny_llama, CUT).weights))
    cls_folder = save_peft_adapter(cls_config, cls_net.state_dict(), root / "cls")
    return backbone, config, net, folder, cls_folder


@pytest.fixture(scope="module")
def stock_peft(lm_tail):
    """Stock transformers + PEFT with the delivered adapter: no mobiflower code on the model path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, config, _, folder, _ = lm_tail
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config.extra["model"]), str(folder)).eval()


def test_greedy_generation_matches_stock_peft_token_for_token(lm_tail, stock_peft):
    _, config, _, folder, _ = lm_tail
    pieces: list[str] = []
    with LocalGenerator.load(folder, match_training_precision=False) as generator:
        ids = generator.prompt_ids("the cat sat on")
        ours = generator.generate_ids(ids, max_new_tokens=24, on_text=pieces.append)
        alone = generator.generate_ids(ids, max_new_tokens=24, adapter=False)
        eos, pad = generator.tokenizer.eos_token_id, generator.tokenizer.pad_token_id
    prompt = torch.tensor([ids])
    settings = dict(do_sample=False, max_new_tokens=24, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad():
        theirs = stock_peft.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings)
        with stock_peft.disable_adapter():
            plain = stock_peft.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings)
    assert len(ours.token_ids) >= 8
    assert ours.token_ids == theirs[0, len(ids) :].tolist()
    assert alone.token_ids == plain[0, len(ids) :].tolist()  # adapter=False is the backbone alone
    assert ours.token_ids != alone.token_ids  # ... and the adapter is not a no-op
    assert "".join(pieces) == ours.text and ours.prompt_tokens == len(ids)


def test_sampling_is_repeatable_by_seed_and_leaves_the_global_rng(lm_tail):
    _, _, _, folder, _ = lm_tail
    with LocalGenerator.load(folder) as generator:
        state = torch.random.get_rng_state()
        a = generator.generate("hello", max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3)
        b = generator.generate("hello", max_new_tokens=12, temperature=1.5, top_p=0.95, seed=3)
        c = generator.generate("hello", max_new_tokens=12, temperature=1.5, top_p=0.95, seed=4)
        assert torch.equal(torch.random.get_rng_state(), state)
        hooks = list(generator.adapter.handles)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert hooks and generator.adapter.handles == []  # closed: the hooks came off


def test_device_logits_equal_stock_peft_and_score_what_frames_carry(lm_tail, stock_peft):
    backbone, config, net, folder, _ = lm_tail
    lm = TailLanguageModel.load(folder, backbone=backbone, match_training_precision=False)
    try:
        ours, targets = lm.scored_logits(SAMPLES)
        encoded = lm.encode(SAMPLES)
        frame, _ = DeviceRuntime(
            backbone, ForwardConfig(bits=16, token_policy="nonpad"), task=CausalLMTask()
        ).make_frame(SAMPLES)
        batch = SideTrainer(net, TrainConfig(device="cpu")).decode(frame).batch(list(range(len(SAMPLES))))
        by_id = {e.id: e for e in SAMPLES}
        in_frame_order, frame_targets = lm.scored_logits([by_id[i] for i in batch.sample_ids])
    finally:
        lm.close()
    ids, mask = pad_ids([e.ids for e in encoded], backbone.pad_token_id)
    want = torch.as_tensor([e.next_token_targets(ids.shape[1]) for e in encoded])
    with torch.no_grad():
        full = stock_peft(input_ids=ids, attention_mask=mask).logits
    theirs = full[want != IGNORE_INDEX]
    assert torch.equal(targets, want[want != IGNORE_INDEX])
    assert ours.shape == theirs.shape and torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    # the server trains on the frame's targets: the very tokens the device scores, in the same order
    assert torch.equal(frame_targets, scored_targets(batch.targets))
    with torch.no_grad():  # fp16 states on the wire (bits 16)
        assert torch.allclose(net(batch), in_frame_order, atol=2e-3)


def test_device_evaluation_is_the_loss_computed_independently(lm_tail, stock_peft):
    from mobiflower.clients.client_app import evaluate_stats

    backbone, config, net, folder, _ = lm_tail
    lm = installed_model(backbone, config, net.state_dict(), match_training_precision=False)
    try:
        assert isinstance(lm, TailLanguageModel)
        result = lm.evaluate(SAMPLES, batch_size=2)
        encoded = lm.encode(SAMPLES)
    finally:
        lm.close()
    assert set(result) == {"metrics", "zero_shot", "count", "samples", "seconds"}
    assert list(result["metrics"]) == ["perplexity", "loss", "token-accuracy"]
    ids, mask = pad_ids([e.ids for e in encoded], backbone.pad_token_id)
    targets = torch.as_tensor([e.next_token_targets(ids.shape[1]) for e in encoded])
    with torch.no_grad():
        tuned = stock_peft(input_ids=ids, attention_mask=mask).logits
        with stock_peft.disable_adapter():
            alone = stock_peft(input_ids=ids, attention_mask=mask).logits
    for got, logits in ((result["metrics"], tuned), (result["zero_shot"], alone)):
        loss = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))
        assert got["loss"] == pytest.approx(loss, rel=1e-5)
        assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)
        right = (logits.argmax(-1) == targets)[targets != IGNORE_INDEX].float().mean()
        assert got["token-accuracy"] == pytest.approx(float(right))
    assert result["count"] == int((targets != IGNORE_INDEX).sum()) and result["samples"] == len(SAMPLES)
    assert result["metrics"]["loss"] != pytest.approx(result["zero_shot"]["loss"])
    stats = evaluate_stats(result, lm.task.metric_names)
    assert stats["zero-shot-perplexity"] == result["zero_shot"]["perplexity"] and stats["count"] == result["count"]
    assert {"perplexity", "loss", "token-accuracy", "zero-shot-loss", "samples", "seconds"} <= set(stats)


def test_round_trip_changes_the_tuned_scores_not_the_backbone_alone(lm_tail):
    backbone, config, net, _, _ = lm_tail
    with torch.no_grad():
        before = backbone.base(*pad_ids([[5, 6, 7, 8]], backbone.pad_token_id)).last_hidden_state
    results = []
    for bits in (16, 2):
        lm = installed_model(backbone, dataclasses.replace(config, bits=bits, group_size=32), net.state_dict())
        results.append(lm.evaluate(SAMPLES[:2], zero_shot=True))
        lm.close()
    assert results[0]["metrics"]["loss"] != pytest.approx(results[1]["metrics"]["loss"])
    assert results[0]["zero_shot"] == results[1]["zero_shot"]
    with torch.no_grad():  # every hook came off the shared backbone
        after = backbone.base(*pad_ids([[5, 6, 7, 8]], backbone.pad_token_id)).last_hidden_state
    assert torch.equal(before, after)


def test_cli_generate_streams_text_and_each_command_refuses_the_other_adapter(lm_tail, capsys, tmp_path, monkeypatch):
    _, _, _, folder, cls_folder = lm_tail
    monkeypatch.setenv("MOBIFLOWER_HOME", str(tmp_path))  # the int8 copy of the tiny model is built here
    assert (
        main(["generate", "the cat", "--adapter", str(folder), "--max-new-tokens", "10", "--weight-precision", "int8"])
        == 0
    )
    out, err = capsys.readouterr()
    with LocalGenerator.load(folder, weights="int8", weights_dir=tmp_path / "models") as generator:
        want = generator.generate("the cat", max_new_tokens=10)
    assert out == want.text + "\n" and want.token_ids and "tokens/s" in err

    assert main(["generate", "the cat", "--adapter", str(cls_folder)]) == 2
    assert "classification adapter" in capsys.readouterr().err
    assert main(["infer", "a fine film", "--adapter", str(folder)]) == 2
    assert "this adapter generates text: use mobiflower generate" in capsys.readouterr().err
    assert main(["infer", "a fine film", "--adapter", str(cls_folder)]) == 0
    assert "a fine film" in capsys.readouterr().out
