"""On-device baselines (LoRA, full fine-tuning, zero-shot) end to end on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch

from mobiflower.simulations.baselines import on_device as baselines
from mobiflower.simulations.baselines.on_device import RESULT_KEYS, BaselineConfig, run_baseline

SIZES = dict(train_samples=32, validation_samples=16, test_samples=16, batch_size=8)
HIDDEN, LAYERS, R = 32, 2, 8
LORA_PARAMS = LAYERS * 2 * R * (HIDDEN + HIDDEN) + 2 * HIDDEN  # A and B of q and v per block, plus the 2-way head


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory, real_assets):
    from mobiflower.platform.tiny import make_tiny_model

    return str(make_tiny_model("llama", tmp_path_factory.mktemp("baselines") / "llama", hidden=HIDDEN, layers=LAYERS))


def _check_result(result: dict, method: str) -> None:
    assert set(RESULT_KEYS) <= set(result)
    assert result["method"] == method
    for key in ("test_accuracy", "validation_accuracy", "zero_shot_accuracy"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["bits"] == 32 and result["token_policy"] is None and result["bytes_sent"] == 0
    assert result["peak_rss_mb"] > 0


def test_lora_end_to_end_trains_only_adapters_and_head(small_llama, monkeypatch):
    built = {}
    original = baselines.build_classifier

    def capture(*args, **kwargs):
        model = original(*args, **kwargs)
        built["model"] = model
        built["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return model

    monkeypatch.setattr(baselines, "build_classifier", capture)
    result = run_baseline(BaselineConfig("lora", model=small_llama, **SIZES), progress=False)
    _check_result(result, "lora")
    assert result["train_samples"] == 32 and result["epochs"] == 1 and result["lr"] == 5e-4
    assert result["train_s"] > 0 and math.isclose(result["s_per_sample"], result["train_s"] / 32)

    model, before = built["model"], built["before"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".score." in n for n in trainable), sorted(trainable)
    assert result["trainable_parameters"] == LORA_PARAMS
    after = dict(model.named_parameters())
    frozen = [n for n in before if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)  # base weights untouched
    assert any(not torch.equal(before[n], after[n]) for n in trainable if "lora_B" in n)  # adapters trained


def test_full_end_to_end(small_llama):
    result = run_baseline(BaselineConfig("full", model=small_llama, **SIZES), progress=False)
    _check_result(result, "full")
    assert result["lr"] == 2e-5 and result["train_samples"] == 32
    # every backbone weight (tied embeddings counted once) plus the 2-way head
    from transformers import AutoModelForCausalLM

    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(small_llama).model.parameters())
    assert result["trainable_parameters"] == base + 2 * HIDDEN


def test_zero_shot(small_llama):
    result = run_baseline(BaselineConfig("zero-shot", model=small_llama, **SIZES), progress=False)
    _check_result(result, "zero-shot")
    assert result["trainable_parameters"] == 0 and result["train_s"] == 0.0 and result["lr"] is None
    assert result["zero_shot_accuracy"] == result["test_accuracy"]


def test_config_validation():
    with pytest.raises(ValueError, match="method"):
        BaselineConfig("prompt-tuning")
    with pytest.raises(ValueError, match="warmup_frac"):
        BaselineConfig("lora", warmup_frac=1.5)
    assert BaselineConfig("full").resolved_lr == 2e-5
    assert BaselineConfig("lora", lr=1e-3).resolved_lr == 1e-3
    assert BaselineConfig("zero-shot").resolved_lr is None
    assert baselines.lora_targets_for("gpt2") == ["c_attn"]
    assert baselines.lora_targets_for("opt") == ["q_proj", "v_proj"]


def test_tuning_picks_lr_and_epochs_on_validation_and_scores_test_once(small_llama, monkeypatch):
    scored = []
    original = baselines.classifier_accuracy

    def spy(model, tokenizer, examples, *args, **kwargs):
        accuracy = original(model, tokenizer, examples, *args, **kwargs)
        scored.append((len(examples), accuracy))
        return accuracy

    monkeypatch.setattr(baselines, "classifier_accuracy", spy)
    result = run_baseline(
        BaselineConfig("lora", model=small_llama, epochs=2, lrs=(1e-4, 3e-3), **SIZES), progress=False
    )
    tuning = result["tuning"]
    assert [(t["lr"], t["epoch"]) for t in tuning["trials"]] == [(1e-4, 1), (1e-4, 2), (3e-3, 1), (3e-3, 2)]
    best = max(tuning["trials"], key=lambda t: (t["validation_accuracy"], -t["epoch"]))
    assert tuning["selected"] == {"lr": best["lr"], "epochs": best["epoch"]}
    assert (result["lr"], result["epochs"], result["validation_accuracy"]) == (
        best["lr"],
        best["epoch"],
        best["validation_accuracy"],
    )
    # four validation scorings (one per trial), then the test split exactly once, on the selected weights
    assert [n for n, _ in scored] == [16, 16, 16, 16, 16] and scored[-1][1] == result["test_accuracy"]
    with pytest.raises(ValueError, match="positive"):
        BaselineConfig("lora", lrs=(0.0,))
