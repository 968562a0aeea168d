"""On-device baselines (LoRA, full fine-tuning, zero-shot) end to end on a tiny random Llama, for both tasks:
the bundled 2-label job, a 3-label classification, and causal-LM (same scored tokens as side-tuning)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mobiflower.platform.data import Splits
from mobiflower.platform.tasks import CausalLMTask, ClassificationTask, Example, TaskError
from mobiflower.simulations.baselines import on_device as baselines
from mobiflower.simulations.baselines.on_device import (
    RESULT_KEYS,
    BaselineConfig,
    lora_fields,
    result_keys,
    run_baseline,
)

SIZES = dict(train_samples=32, validation_samples=16, test_samples=16, batch_size=8)
HIDDEN, LAYERS, R = 32, 2, 8
LORA_PARAMS = LAYERS * 2 * R * (HIDDEN + HIDDEN) + 2 * HIDDEN  # A and B of q and v per block, plus the 2-way head


CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def llama_path(tmp_path_factory):
    """A tiny random Llama whose tokenizer has a chat template (needs no bundled asset)."""
    from transformers import AutoTokenizer

    from mobiflower.platform.tiny import make_tiny_model

    path = make_tiny_model("llama", tmp_path_factory.mktemp("baselines") / "llama", hidden=HIDDEN, layers=LAYERS)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def small_llama(llama_path, real_assets):
    return llama_path


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
    from_run = BaselineConfig.with_task(
        "lora", {"task": "causal-lm", "max-length": 128, "num-server-rounds": 3}, epochs=2
    )
    assert from_run.task_config.build() == CausalLMTask(max_length=128) and from_run.epochs == 2
    with pytest.raises(TaskError, match="needs a {text} slot"):
        BaselineConfig("lora", prompt_template="no slot")
    assert baselines.lora_targets_for("gpt2") == ["c_attn"]
    assert baselines.lora_targets_for("opt") == ["q_proj", "v_proj"]


def test_tuning_picks_lr_and_epochs_on_validation_and_scores_test_once(small_llama, monkeypatch):
    scored = []
    original = baselines.evaluate_task

    def spy(model, tokenizer, examples, *args, **kwargs):
        scores = original(model, tokenizer, examples, *args, **kwargs)
        scored.append((len(examples), scores.result()["accuracy"]))
        return scores

    monkeypatch.setattr(baselines, "evaluate_task", spy)
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


# ---- tasks ---------------------------------------------------------------------------------------
LM_TEXTS = ("the cat sat on the mat and the dog sat on the log. " * 2, "one two three four five six seven. " * 2)


def _lm_splits() -> Splits:
    """Repeated texts (what a model can learn fast): train, validation and test hold the same two."""
    return Splits(
        *[[Example(base + i, text=LM_TEXTS[i % 2]) for i in range(n)] for base, n in ((0, 16), (100, 4), (200, 4))]
    )


def test_causal_lm_lora_lowers_perplexity_on_the_scored_tokens(llama_path, monkeypatch):
    built = {}
    original = baselines.build_classifier
    monkeypatch.setattr(baselines, "build_classifier", lambda *a, **k: built.setdefault("model", original(*a, **k)))
    lm = dict(model=llama_path, task="causal-lm", max_length=48, batch_size=8)
    zero = run_baseline(BaselineConfig("zero-shot", **lm), progress=False, splits=_lm_splits())
    result = run_baseline(BaselineConfig("lora", epochs=2, lrs=(1e-4, 2e-2), **lm), progress=False, splits=_lm_splits())
    assert set(result_keys(CausalLMTask())) <= set(result) and result["task"] == "causal-lm"
    assert result["metrics"] == {
        "primary": "perplexity",
        "names": ["perplexity", "loss", "token-accuracy"],
        "higher_is_better": False,
    }
    assert "test_accuracy" not in result
    # the same scored tokens: every text token but the first (48 tokens of each sample, the first not predicted)
    assert result["test_count"] == zero["test_count"] == 4 * 47
    assert result["zero_shot_perplexity"] == pytest.approx(zero["test_perplexity"])
    assert result["zero_shot_loss"] == pytest.approx(math.log(zero["test_perplexity"]))
    # learnt the repeated texts (as far as rank-8 q/v adapters on a random 32-wide model go: about 268 -> 229)
    assert result["validation_perplexity"] < 0.9 * zero["validation_perplexity"]
    assert result["test_perplexity"] < 0.9 * result["zero_shot_perplexity"]
    assert 0.0 <= result["zero_shot_token_accuracy"] < result["test_token_accuracy"] <= 1.0
    # tuning keeps the lowest validation perplexity (lower is better for this task)
    trials = result["tuning"]["trials"]
    best = min(trials, key=lambda t: (t["validation_perplexity"], t["epoch"]))
    assert (result["lr"], result["epochs"]) == (best["lr"], best["epoch"]) and best["lr"] == 2e-2
    assert result["tuning"]["rule"].startswith("lowest validation perplexity")
    trainable = [n for n, p in built["model"].named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)  # the LM head stays frozen
    assert result["trainable_parameters"] == LAYERS * 2 * R * (HIDDEN + HIDDEN)


def test_baselines_score_exactly_the_side_tuning_tokens(llama_path):
    """The baselines encode a sample as the side-tuning device does (same ids, same scored tokens), their
    labels shifted by one are the frame's next-token targets, and their loss is transformers' own."""
    from transformers import AutoModelForCausalLM

    from mobiflower.clients.runtime import DeviceRuntime
    from mobiflower.platform.backbone import Backbone
    from mobiflower.platform.classifier import (
        collate,
        encode_examples,
        load_tokenizer,
        next_token_targets,
        task_logits,
    )
    from mobiflower.platform.tasks import task_loss

    examples = [
        Example(0, text="plain text, every token scored"),
        Example(1, prompt="Q: two and two? A:", completion=" four"),
        Example(2, text="x" * 80),  # cut to max-length
        Example(3, messages=(("user", "hi"), ("assistant", "hello there"), ("user", "bye"), ("assistant", "ok"))),
    ]
    task = CausalLMTask(max_length=40)
    tokenizer = load_tokenizer(llama_path)
    ours = encode_examples(tokenizer, task, examples)
    device = DeviceRuntime(Backbone.load(llama_path, num_taps=1, max_length=40), task=task).encode_samples(examples)
    assert [(e.ids, e.scored) for e in ours] == [(e.ids, e.scored) for e in device]
    assert not any(ours[1].scored[:5]) and ours[1].scored[-1] and len(ours[2].ids) == 40
    assert 0 < sum(ours[3].scored) < len(ours[3].ids)  # assistant turns only

    batch = collate(ours, examples, task, tokenizer.pad_token_id)
    targets = next_token_targets(batch["labels"])
    width = batch["input_ids"].shape[1]
    for row, enc in enumerate(ours):
        assert targets[row].tolist() == enc.next_token_targets(width)
    counts = [len(e.ids) for e in ours]
    frame_values = task.frame_targets(examples, ours, counts)["values"]
    assert sum((targets[row, :n].tolist() for row, n in enumerate(counts)), []) == frame_values

    model = AutoModelForCausalLM.from_pretrained(llama_path).eval()
    with torch.no_grad():
        reference = model(**batch).loss  # transformers shifts the labels itself
        logits, scored_targets = task_logits(model, batch, task)
        assert logits.shape[0] == sum(t != -100 for t in frame_values)
        assert task_loss(logits, scored_targets).item() == pytest.approx(reference.item(), rel=1e-5)

    # classification too: the rendered prompt, truncated on the left, as the device encodes it
    labelled = [Example(i, text=f"sample {i} " * (i + 1), label=i % 3) for i in range(4)]
    task3 = ClassificationTask(("red", "green", "blue"), "Colour of: {text}\nAnswer:", max_length=24)
    device = DeviceRuntime(Backbone.load(llama_path, num_taps=1, max_length=24), task=task3).encode_samples(labelled)
    assert [e.ids for e in encode_examples(tokenizer, task3, labelled)] == [e.ids for e in device]


def test_three_label_classification_baseline(llama_path):
    labels = (0, 1, 2, 2, 1, 0, 1, 2)
    texts = ("a red apple", "green grass", "blue sky", "deep blue sea", "green leaf", "red fire", "lime", "navy")

    def split(base: int, n: int) -> list[Example]:
        return [Example(base + i, text=texts[i % 8], label=labels[i % 8]) for i in range(n)]

    task_keys = dict(task="classification", labels="red,green,blue", prompt_template="Colour of: {text}\nAnswer:")
    config = BaselineConfig("lora", model=llama_path, max_length=32, batch_size=8, lr=1e-3, **task_keys)
    result = run_baseline(config, progress=False, splits=Splits(split(0, 24), split(100, 9), split(200, 9)))
    assert set(result_keys(ClassificationTask(("red", "green", "blue")))) <= set(result)
    for key in ("test_accuracy", "test_macro_f1", "validation_accuracy", "zero_shot_accuracy", "zero_shot_macro_f1"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["task"] == "classification" and result["config"]["labels"] == "red,green,blue"
    assert result["trainable_parameters"] == LORA_PARAMS + HIDDEN  # a 3-way head: one more row than the bundled 2

    with pytest.raises(TaskError, match="label 3, outside the task's 3 labels"):
        bad = Splits(split(0, 8) + [Example(99, text="pink", label=3)], split(100, 3), split(200, 3))
        run_baseline(config, progress=False, splits=bad)
    with pytest.raises(TaskError, match="at least two distinct labels"):
        BaselineConfig("lora", labels="red")
    from mobiflower.platform.classifier import build_classifier, load_tokenizer
    from mobiflower.platform.tiny import make_tiny_model

    bert = str(make_tiny_model("bert", Path(llama_path).parent / "bert", hidden=HIDDEN, layers=LAYERS))
    with pytest.raises(TaskError, match="needs a decoder"):
        build_classifier(bert, "lora", load_tokenizer(bert), task=CausalLMTask())


def test_lora_fields_give_a_baseline_the_lora_shape_a_bench_sets_and_nothing_else():
    assert lora_fields({"lr": 1e-3}) == {}
    fields = lora_fields({"lora-r": "16", "lora-alpha": 32, "lora-target-modules": "q_proj, v_proj,o_proj"})
    assert fields == {"lora_r": 16, "lora_alpha": 32.0, "lora_targets": ("q_proj", "v_proj", "o_proj")}
    config = BaselineConfig("lora", task="causal-lm", **fields)
    assert (config.lora_r, config.lora_targets) == (16, ("q_proj", "v_proj", "o_proj"))
