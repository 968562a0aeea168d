"""Causal-LM through the pretrained tail, core only (no Flower): what the device's frames carry, the
tail's loss against the stock model's, the intake's refusals of hostile token targets, personalisation."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_frames import join, split

from mobiflower.clients.runtime import DeviceRuntime, ForwardConfig
from mobiflower.platform.backbone import Backbone
from mobiflower.platform.frames import IGNORE_INDEX, encode_frame
from mobiflower.platform.intake import FrameIntake, run_limits
from mobiflower.platform.pretrained_tail import load_tail_weights
from mobiflower.platform.side_factory import build_side_network
from mobiflower.platform.side_networks import SideNetworkConfig
from mobiflower.platform.side_store import SideNetworkStore, StoreConfig
from mobiflower.platform.tasks import CausalLMTask, Example, TaskConfig, TaskError, combine_metrics
from mobiflower.platform.trainer import SideTrainer, TrainConfig, evaluate_network

CUT = 2
PROPERTY = settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def _texts(n: int, start: int = 0) -> list[Example]:
    words = ["the cat sat on the mat", "a dog ran far", "we the people", "of the people by the people"]
    return [Example(id=start + i, text=f"{words[i % 4]} {'and so on ' * (i % 3)}") for i in range(n)]


@pytest.fixture(scope="module")
def lm_setup(tiny_llama):
    backbone = Backbone.load(tiny_llama, layers=[CUT - 1])
    public = load_tail_weights(tiny_llama, CUT, lm_head=True)
    config = SideNetworkConfig(
        hidden_size=backbone.hidden_size,
        layers=[CUT - 1],
        fingerprint=backbone.fingerprint,
        family="tail",
        head="lm",
        token_policy="nonpad",
        bits=8,
        backbone_config=public.backbone_config,
        lora_rank=4,
        lora_alpha=8.0,
        extra={"model": tiny_llama, "task": {"task": "causal-lm"}},
    )
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=8, token_policy="nonpad", batch_size=4), task=CausalLMTask())
    return backbone, public, config, runtime


def _store(public, config, mode: str = "shared", **store) -> SideNetworkStore:
    return SideNetworkStore(
        StoreConfig(mode, **store),
        lambda: build_side_network(config, public.weights),
        TrainConfig(epochs=2, batch_size=4, lr=5e-3, cache_bytes=1 << 30),
        {"device-0": 64, "device-1": 64},
        chunk_size=8,
    )


def test_frames_carry_the_next_token_of_scored_positions_only(lm_setup):
    backbone, _, _, runtime = lm_setup
    plain = Example(id=1, text="the cat sat on the mat")
    completion = Example(id=2, prompt="Q: who sat? A:", completion=" the cat")
    frame, _ = runtime.make_frame([plain, completion])
    by_id = dict(zip(frame.sample_ids, np.split(np.asarray(frame.targets["values"]), np.cumsum(frame.token_counts))))
    ids = backbone.segment_ids([plain.text])[0]
    assert by_id[1].tolist() == ids[1:] + [IGNORE_INDEX]  # every next token of a plain text, none past its end
    prompt_ids, answer_ids = backbone.segment_ids([completion.prompt, completion.completion])
    expect = [IGNORE_INDEX] * (len(prompt_ids) - 1) + answer_ids + [IGNORE_INDEX]
    assert by_id[2].tolist() == expect  # the prompt is forwarded (its states are sent) but never scored
    assert frame.token_counts[frame.sample_ids.index(2)] == len(prompt_ids) + len(answer_ids)


def test_the_tails_loss_is_the_stock_models_loss_on_the_same_tokens(lm_setup, tiny_llama):
    """A fresh tail (LoRA B = 0) on 16-bit states is the backbone: its loss equals transformers' own."""
    from transformers import AutoModelForCausalLM

    backbone, public, config, _ = lm_setup
    exact = dataclasses.replace(config, bits=16)
    runtime = DeviceRuntime(backbone, ForwardConfig(bits=16, token_policy="nonpad", batch_size=4), task=CausalLMTask())
    examples = [Example(id=i, prompt="Q: say it", completion=f" the answer is {i}") for i in range(3)]
    frame, _ = runtime.make_frame(examples)
    trainer = SideTrainer(build_side_network(exact, public.weights), TrainConfig())
    ours = trainer.evaluate([frame])
    stock = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    losses, tokens = [], 0
    for enc in runtime.encode_samples(examples):
        ids = torch.tensor([enc.ids])
        labels = torch.tensor([[t if s else IGNORE_INDEX for t, s in zip(enc.ids, enc.scored)]])
        n = int((labels[0, 1:] != IGNORE_INDEX).sum())
        with torch.no_grad():
            losses.append(float(stock(input_ids=ids, labels=labels).loss) * n)
        tokens += n
    assert ours["count"] == tokens
    assert ours["loss"] == pytest.approx(sum(losses) / tokens, rel=1e-4)
    assert ours["perplexity"] == pytest.approx(math.exp(ours["loss"]), rel=1e-9)


def test_the_tail_learns_a_repeated_text(lm_setup):
    _, public, config, runtime = lm_setup
    frame, _ = runtime.make_frame(_texts(8))
    trainer = SideTrainer(build_side_network(config, public.weights), TrainConfig(lr=3e-2, batch_size=4, epochs=8))
    before = trainer.evaluate([frame])
    trainer.ingest(frame)
    for _ in range(7):
        trainer.train_epoch()
    after = trainer.evaluate([frame])
    assert after["perplexity"] < 0.7 * before["perplexity"]
    assert after["token-accuracy"] > before["token-accuracy"]


def test_hybrid_personalises_a_copy_of_the_shared_lora(lm_setup):
    _, public, config, runtime = lm_setup
    store = _store(public, config, "hybrid", personal_parts=("tail.",), personal_restart=True, personal_epochs=2)
    frames = {
        d: runtime.make_frame(_texts(8, start=100 * i), meta={"device_id": d})[0]
        for i, d in enumerate(["device-0", "device-1"])
    }
    for device, frame in frames.items():
        store.ingest(device, frame)
    store.personalize()
    shared = store.trainers["shared"].net.state_dict()
    for device in frames:
        own = store.network_for(device).state_dict()
        assert set(own) == set(shared)
        assert any(not torch.equal(own[k], shared[k]) for k in own)  # fine-tuned on its own frames
    assert not any(
        torch.equal(store.network_for("device-0").state_dict()[k], store.network_for("device-1").state_dict()[k])
        for k in shared
        if "lora_B" in k
    )


@pytest.fixture(scope="module")
def lm_intake(lm_setup):
    _, public, config, runtime = lm_setup
    store = _store(public, config)
    intake = FrameIntake(store, config, run_limits(config, 8))
    assert intake.vocab_size == public.weights["lm_head.weight"].shape[0]
    assert intake.offer("device-0", encode_frame(runtime.make_frame(_texts(4))[0])).accepted
    return intake, runtime


@pytest.mark.parametrize("case", ["outside", "short mask", "nothing scored", "class labels"])
def test_hostile_token_targets_are_refused_alone(lm_intake, case):
    intake, runtime = lm_intake
    frame, _ = runtime.make_frame(_texts(4, start=1000 + 10 * len(case)))
    values = list(frame.targets["values"])
    if case == "outside":
        values[3] = intake.vocab_size
        reason = "token outside the vocabulary"
    elif case == "short mask":
        values = values[:-1]
        reason = "invalid targets.values"
    elif case == "nothing scored":
        values = [IGNORE_INDEX] * len(values)
        reason = "nothing to score"
    else:
        frame.targets = {"kind": "class", "values": [0] * 4, "num_classes": 2}
        reason = "wrong targets"
    if case == "short mask":  # the device's encoder refuses it: forge the bytes, as a hostile device would
        header, payload = split(encode_frame(frame))
        header["targets"]["values"] = values
        blob = join(header, payload)
    else:
        if case != "class labels":
            frame.targets = {"kind": "tokens", "values": values}
        blob = encode_frame(frame)
    digest, cached = intake.store.state_digest(), intake.store.trainers["shared"].cache.num_samples
    result = intake.offer("device-0", blob)
    assert not result.accepted and result.reason == reason
    assert intake.store.trainers["shared"].cache.num_samples == cached
    assert intake.store.state_digest() == digest


@PROPERTY
@given(
    data=st.lists(st.integers(-100, 400), min_size=1, max_size=12),
    one_row=st.booleans(),
)
def test_no_accepted_token_frame_can_break_a_later_epoch(lm_intake, data, one_row):
    """Whatever targets an LM frame carries, the intake refuses it or every later cached epoch trains; a
    well-formed one is taken (a frame with one row per sample was once laid out as class labels)."""
    intake, runtime = lm_intake
    start = 5000 + 10 * next(_FRESH)  # fresh sample ids: a repeat of delivered samples is refused for that
    frame, _ = runtime.make_frame(_texts(4, start=start))
    if one_row:  # every sample sends one token: one target per sample, as many as there are samples
        frame = dataclasses.replace(
            frame,
            token_counts=[1] * 4,
            seq_lengths=[1] * 4,
            activations=[_first_rows(a, frame.token_counts) for a in frame.activations],
        )
    rows = sum(frame.token_counts)
    values = [v if v >= 0 else IGNORE_INDEX for v in (data * rows)[:rows]]
    frame.targets = {"kind": "tokens", "values": values}
    valid = any(v != IGNORE_INDEX for v in values) and max(values) < intake.vocab_size
    result = intake.offer("device-1", encode_frame(frame))
    assert result.accepted == valid, result.message  # a well-formed frame is taken, whatever its shape
    if result.accepted:
        assert np.isfinite(intake.store.train_epoch()["loss"])


def test_a_minibatch_that_scores_no_token_takes_no_step_and_the_epoch_loss_stays_finite(lm_setup):
    """Samples with every target unscored (a prompt whose completion max-length cut away) are valid in a
    frame that scores other samples; a minibatch of only such samples has no loss: it takes no step, and
    the epoch's loss is the mean of the steps taken (a NaN from it once made the whole epoch's NaN)."""
    from mobiflower.platform.frames import decode_frame
    from mobiflower.platform.trainer import decode_for

    _, public, config, runtime = lm_setup
    frame, _ = runtime.make_frame(_texts(4, start=9000))
    last = frame.token_counts[-1]
    values = list(frame.targets["values"])
    frame.targets = {"kind": "tokens", "values": [IGNORE_INDEX] * (len(values) - last) + values[-last:]}
    net = build_side_network(config, public.weights)
    before = {k: v.clone() for k, v in net.state_dict().items() if "lora" in k}
    trainer = SideTrainer(net, TrainConfig(epochs=1, batch_size=1, lr=5e-3, cache_bytes=1 << 30), total_steps=4)
    trainer.cache.add(decode_for(config, decode_frame(runtime.encode(frame))))
    stats = trainer.train_epoch()
    assert math.isfinite(stats["loss"]) and trainer.step == 1  # one scored sample: one step of four batches
    after = net.state_dict()
    assert all(torch.isfinite(after[k]).all() for k in before)
    assert any(not torch.equal(before[k], after[k]) for k in before)


_FRESH = itertools.count()


def _first_rows(quantized, counts):
    from mobiflower.platform.codec import dequantize, quantize

    rows = dequantize(quantized)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return quantize(rows[torch.as_tensor(starts)], quantized.bits, quantized.group_size, quantized.rotation)


def test_task_config_errors_say_what_to_change():
    with pytest.raises(TaskError, match="task='translation' is unknown"):
        TaskConfig(task="translation")
    with pytest.raises(TaskError, match="at least two distinct labels"):
        TaskConfig(labels="yes")
    with pytest.raises(TaskError, match=r"\{text\} slot"):
        TaskConfig(prompt_template="no slot here")


def test_fleet_perplexity_is_exp_of_the_token_weighted_loss():
    task = CausalLMTask()
    a, b = (
        {"loss": 1.0, "perplexity": math.e, "token-accuracy": 0.5},
        {"loss": 3.0, "perplexity": math.e**3, "token-accuracy": 0.1},
    )
    out = combine_metrics(task, [(a, 300), (b, 100)])
    assert out["loss"] == pytest.approx(1.5)
    assert out["perplexity"] == pytest.approx(math.exp(1.5))  # not the mean of the two perplexities
    assert out["token-accuracy"] == pytest.approx(0.4)


def test_evaluate_network_reports_the_task_metrics(lm_setup):
    _, public, config, runtime = lm_setup
    frame, _ = runtime.make_frame(_texts(4, start=900))
    from mobiflower.platform.trainer import decode_for

    out = evaluate_network(build_side_network(config, public.weights), [decode_for(config, frame)])
    assert set(out) == {"perplexity", "loss", "token-accuracy", "count"}
    assert out["count"] == sum(1 for v in frame.targets["values"] if v != IGNORE_INDEX)
