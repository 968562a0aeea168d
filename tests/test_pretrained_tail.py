"""The pretrained tail: the server's copy of the upper blocks, what it saves, delivery as a PEFT
adapter that loads onto the stock transformers model, and the device's local inference with it."""

from __future__ import annotations

import pytest
import torch

from mobiflower.clients.inference import LocalClassifier, TailClassifier, installed_model
from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.data import Example
from mobiflower.platform.pretrained_tail import (
    check_device_fingerprint,
    load_tail_weights,
    read_peft_adapter,
    save_peft_adapter,
)
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig, SideNetworkError
from mobiflower.platform.tasks import BUNDLED_TASK
from mobiflower.platform.trainer import SideTrainer, TrainConfig

CUT = 2  # the tiny llama has 4 blocks: the device runs 0..1, the server 2..3


def _examples(n: int) -> list[Example]:
    words = ["good", "bad", "great", "awful", "fine film", "dull plot and weak acting"]
    return [Example(id=i, text=f"{words[i % len(words)]} {'really ' * (i % 4)}", label=i % 2) for i in range(n)]


@pytest.fixture(scope="module")
def tail_setup(tiny_llama):
    backbone = Backbone.load(tiny_llama, layers=[CUT - 1])
    public = load_tail_weights(tiny_llama, CUT)
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=[CUT - 1],
        fingerprint=backbone.fingerprint,
        family="tail",
        token_policy="nonpad",
        bits=16,
        backbone_config=public.backbone_config,
        lora_rank=4,
        lora_alpha=8.0,
        extra={"model": tiny_llama},
    )
    return backbone, public, config


def _randomized(net):
    """LoRA B starts at zero (the tail is the backbone exactly); give every trainable tensor values."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    return net


def test_fresh_tail_continues_the_backbone_exactly(tail_setup):
    backbone, public, config = tail_setup
    assert public.fingerprint == backbone.fingerprint  # the server's public weights are the device's
    net = build_side_network(config, public.weights).eval()
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=16, token_policy="nonpad"))
    frame, _ = runtime.make_frame(_examples(6))
    trainer = SideTrainer(net, TrainConfig(device="cpu"))
    batch = trainer.decode(frame).batch(list(range(6)))
    by_id = {e.id: e for e in _examples(6)}
    enc = backbone.tokenize(
        [BUNDLED_TASK.render(by_id[i].text) for i in batch.sample_ids]
    )  # a frame lists samples by length
    with torch.no_grad():
        tail = net.tail(inputs_embeds=batch.states[0], attention_mask=batch.mask.long()).last_hidden_state
        full = backbone.base(**enc).last_hidden_state
    # bits=16 frames carry fp16 states: equal up to half precision
    assert torch.allclose(tail[batch.mask], full[enc["attention_mask"].bool()], atol=2e-3, rtol=1e-3)


def test_state_holds_only_the_trainable_part(tail_setup):
    _, public, config = tail_setup
    net = build_side_network(config, public.weights)
    state = net.state_dict()
    assert set(state) == {n for n, p in net.named_parameters() if p.requires_grad}
    assert any("lora_A" in k for k in state) and "head.weight" in state
    assert sum(v.numel() for v in state.values()) == net.num_trainable()
    with pytest.raises(SideNetworkError, match="another cut, rank"):
        net.load_state_dict({**state, "tail.extra": torch.zeros(1)})
    other = build_side_network(SideNetworkConfig(**{**config.__dict__, "lora_rank": 2}), public.weights)
    with pytest.raises(RuntimeError):  # same names, other shapes: torch's own check
        other.load_state_dict(state)


def test_tail_trains_and_checkpoints(tail_setup, tmp_path):
    backbone, public, config = tail_setup
    torch.manual_seed(0)
    trainer = SideTrainer(
        build_side_network(config, public.weights),
        TrainConfig(lr=1e-2, epochs=6, batch_size=8, device="cpu", average_epochs=0),
    )
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=8, token_policy="nonpad"))
    frame, _ = runtime.make_frame(_examples(32))
    first = trainer.ingest(frame)["loss"]
    losses = [trainer.train_epoch()["loss"] for _ in range(5)]
    assert losses[-1] < first
    digest = trainer.state_digest()
    trainer.save_checkpoint(tmp_path / "ckpt")
    again = SideTrainer(build_side_network(config, public.weights), TrainConfig(device="cpu", epochs=6))
    again.load_checkpoint(tmp_path / "ckpt")
    assert again.state_digest() == digest
    assert (tmp_path / "ckpt" / "side_network.safetensors").stat().st_size < 200_000  # no frozen blocks saved


def test_device_fingerprints_are_checked_against_the_public_weights(tail_setup, tiny_models):
    backbone, public, _ = tail_setup
    check_device_fingerprint(public, backbone.fingerprint)
    shallow = backbone.fingerprint.replace("-L4-", "-L1-")
    with pytest.raises(SideNetworkError, match="lower tail-cut"):
        check_device_fingerprint(public, shallow)
    other = Backbone.load(tiny_models["qwen2"]).fingerprint
    with pytest.raises(SideNetworkError, match="must run that model"):
        check_device_fingerprint(public, other)
    changed = backbone.fingerprint[:-4] + "0000"
    with pytest.raises(SideNetworkError, match="does not carry the public weights"):
        check_device_fingerprint(public, changed)


def test_tail_refuses_what_it_cannot_build(tail_setup, tiny_models):
    _, public, config = tail_setup
    with pytest.raises(SideNetworkError, match="nonpad"):
        build_side_network(SideNetworkConfig(**{**config.__dict__, "token_policy": "last"}), public.weights)
    with pytest.raises(SideNetworkError, match="no block for the server"):
        load_tail_weights(config.extra["model"], 4)
    opt = load_tail_weights  # a family without llama's block names is refused by name
    with pytest.raises(SideNetworkError, match="llama-family"):
        opt(tiny_models["opt"], 2)


def test_delivered_adapter_loads_with_peft_alone_and_matches_local_inference(tail_setup, tmp_path):
    """The acceptance test: PEFT + stock transformers, no mobiflower code on the model path."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    backbone, public, config = tail_setup
    net = _randomized(build_side_network(config, public.weights))
    folder = save_peft_adapter(config, net.state_dict(), tmp_path / "adapter", dtype=torch.float32)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}

    prompts = [BUNDLED_TASK.render(e.text) for e in _examples(5)]
    ours = TailClassifier.load(folder, backbone=backbone, match_training_precision=False)
    try:
        local, _ = ours.logits([e.text for e in _examples(5)])  # the task's prompt is applied there
    finally:
        ours.close()

    stock = AutoModelForSequenceClassification.from_pretrained(config.extra["model"], num_labels=2)
    stock.config.pad_token_id = backbone.pad_token_id
    peft_model = PeftModel.from_pretrained(stock, str(folder)).eval()
    enc = backbone.tokenize(prompts)
    with torch.no_grad():
        theirs = peft_model(**enc).logits
    assert torch.allclose(local, theirs, atol=1e-4), (local, theirs)
    assert not torch.allclose(local, torch.zeros_like(local))

    # and the server's own network agrees on the same inputs
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=16, token_policy="nonpad"))
    frame, _ = runtime.make_frame(_examples(5))
    batch = SideTrainer(net.eval(), TrainConfig(device="cpu")).decode(frame).batch(list(range(5)))
    with torch.no_grad():  # fp16 states in the frame; the frame lists its samples by length
        assert torch.allclose(net(batch), local[batch.sample_ids], atol=2e-3)


def test_adapter_runs_on_quantized_backbones_and_comes_off(tail_setup, tmp_path):
    backbone, public, config = tail_setup
    net = _randomized(build_side_network(config, public.weights))
    texts = [e.text for e in _examples(4)]
    enc = backbone.tokenize([BUNDLED_TASK.render(t) for t in texts])
    with torch.no_grad():
        before = backbone.base(**enc).last_hidden_state
    reference = installed_model(backbone, config, net.state_dict(), match_training_precision=False)
    want, _ = reference.logits(texts)
    reference.close()
    for precision in ("int8", "int4"):
        quantized = Backbone.load(config.extra["model"], weights=precision, weights_dir=str(tmp_path / "w"))
        classifier = installed_model(quantized, config, net.state_dict(), match_training_precision=False)
        got, _ = classifier.logits(texts)
        classifier.close()
        assert classifier.adapter.handles == []
        # a tiny random model quantizes badly at 4 bits; what matters is that the adapter runs on it
        assert torch.allclose(got, want, atol=0.1 if precision == "int8" else 1.0), precision
    # the hooks came off: the plain backbone forward is what it was before the adapter went on
    with torch.no_grad():
        after = backbone.base(**enc).last_hidden_state
    assert torch.equal(before, after)
    assert isinstance(reference, LocalClassifier)


def test_device_evaluation_reports_the_task_metrics(tail_setup):
    """Every installed model answers evaluate() with the same keys: the task's metrics, the backbone's
    zero-shot answer where there is one (a decoder's verbalizers; none through a tail), count, samples."""
    from transformers import AutoModelForCausalLM

    backbone, public, config = tail_setup
    examples = _examples(12)
    tail = installed_model(backbone, config, _randomized(build_side_network(config, public.weights)).state_dict())
    ladder_config = SideNetworkConfig(
        hidden_size=backbone.hidden_size, layers=[1, 3], fingerprint=backbone.fingerprint, family="ladder"
    )
    frozen = backbone.frozen_head_state(lm_head=False)
    ladder = installed_model(backbone, ladder_config, build_side_network(ladder_config, frozen).state_dict())
    assert isinstance(tail, TailClassifier) and type(ladder) is LocalClassifier
    results = []
    for model in (tail, ladder):
        side, _ = model.logits([e.text for e in examples])
        result = model.evaluate(examples, batch_size=5)
        model.close()
        assert set(result) == {"metrics", "zero_shot", "count", "samples", "seconds"}
        assert list(result["metrics"]) == ["accuracy", "macro-f1"] and result["count"] == result["samples"] == 12
        labels = torch.tensor([e.label for e in examples])
        assert result["metrics"]["accuracy"] == pytest.approx(float((side.argmax(-1) == labels).float().mean()))
        results.append(result)
    assert results[0]["zero_shot"] == {}  # the tail's forward ends in the adapter
    stock = AutoModelForCausalLM.from_pretrained(config.extra["model"]).eval()
    enc = backbone.tokenize([BUNDLED_TASK.render(e.text) for e in examples])
    with torch.no_grad():
        last = stock(**enc).logits[torch.arange(12), enc["attention_mask"].sum(1) - 1]
    answer = last[:, backbone.verbalizer_ids(BUNDLED_TASK.verbalizers)].argmax(-1)
    assert results[1]["zero_shot"]["accuracy"] == pytest.approx(float((answer == labels).float().mean()))
    held = [c for c in (0, 1) if ((answer == c) | (labels == c)).any()]  # labels held or predicted
    f1 = [2 * int(((answer == c) & (labels == c)).sum()) / int((answer == c).sum() + (labels == c).sum()) for c in held]
    assert results[1]["zero_shot"]["macro-f1"] == pytest.approx(sum(f1) / len(f1))


def test_adapter_folder_round_trips(tail_setup, tmp_path):
    _, public, config = tail_setup
    net = _randomized(build_side_network(config, public.weights))
    folder = save_peft_adapter(config, net.state_dict(), tmp_path / "a")
    back_config, tensors = read_peft_adapter(folder)
    assert back_config == config
    assert all(v.dtype == torch.float32 for v in tensors.values())  # read back as fp32, stored as fp16
    with pytest.raises(SideNetworkError, match="not a delivered"):
        read_peft_adapter(tmp_path)


def test_the_strategy_refuses_a_fleet_the_tail_cannot_serve(tail_setup, tiny_models, tmp_path):
    from mobiflower.strategies.config import SideTuningConfig
    from mobiflower.strategies.fleet_profile import public_tail
    from mobiflower.strategies.run_state import DeviceState, FleetError

    backbone, _, config = tail_setup
    model, fp = config.extra["model"], backbone.fingerprint
    whole = DeviceState(1, "device-0", {"fingerprint": fp, "num-layers": 4}, 8)
    weights, others, keys = public_tail(SideTuningConfig(), model, fp, {fp: [whole]})
    assert keys["cut"] == 2 and others == {} and "layers.2.self_attn.q_proj.weight" in weights

    shallow_fp = fp.replace("-L4-", "-L2-")  # a layer-truncated copy: it can feed block 1's output, not run 2..3
    shallow = DeviceState(2, "device-1", {"fingerprint": shallow_fp, "num-layers": 2}, 8)
    with pytest.raises(FleetError, match="fewer than the model's 4 blocks.*family 'ladder'"):
        public_tail(SideTuningConfig(), model, fp, {fp: [whole], shallow_fp: [shallow]})
    other_fp = Backbone.load(tiny_models["qwen2"]).fingerprint
    other = DeviceState(3, "device-2", {"fingerprint": other_fp, "num-layers": 4}, 8)
    with pytest.raises(FleetError, match="device-2.*must run that model"):
        public_tail(SideTuningConfig(), model, fp, {fp: [whole], other_fp: [other]})
