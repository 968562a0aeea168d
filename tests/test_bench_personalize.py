"""`bench personalize` on a tiny random Llama: the speakers with most words (not most paragraphs) become the
devices, each splits its own paragraphs 80/10/10, and every method is scored for every user on the same
tokens; the federated LoRA baseline's adapter is what its local fine-tune starts from."""

from __future__ import annotations

import json

import pytest

from mobiflower.simulations.bench.personalize import (
    FED_FT,
    MODES,
    PersonalizeBench,
    mode_method,
    run_personalize_bench,
    top_speakers,
)
from mobiflower.simulations.bench.personalize_report import format_table

# paragraphs and words per paragraph: by paragraphs dee > ana > cy > ben, by words ben > cy > ana > dee
USERS = {"ana": (14, 3), "ben": (12, 10), "cy": (13, 6), "dee": (20, 1)}
WORDS = "the cat sat on a mat and then it ran far away from home".split()


def _write(path) -> str:
    rows = [
        {"text": " ".join(WORDS[(i + j) % len(WORDS)] for j in range(max(3, words))), "user": user}
        for user, (paragraphs, words) in USERS.items()
        for i in range(paragraphs)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_top_speakers_rank_by_words_not_paragraphs():
    from mobiflower.platform.tasks import Example

    examples = [Example(id=i, text="a b c", user="many") for i in range(5)]
    examples += [Example(id=9, text=" ".join(["w"] * 20), user="long"), Example(id=10, text="x", user="")]
    assert top_speakers(examples, 2) == [("long", 20), ("many", 15)]


def test_every_method_is_scored_per_user_on_the_same_tokens(tiny_llama, tmp_path, monkeypatch):
    from inprocess_grid import run_simulation_in_process

    from mobiflower.simulations import simulate
    from mobiflower.simulations.baselines import fed_lora

    monkeypatch.setattr(simulate, "run_simulation", run_simulation_in_process)
    monkeypatch.setattr(fed_lora, "run_simulation", run_simulation_in_process)
    config = PersonalizeBench(
        model=tiny_llama,
        data=_write(tmp_path / "speeches.jsonl"),
        speakers=2,
        paragraphs=10,
        max_length=24,
        rounds=1,
        tail_lrs=(2e-3,),
        personal_lrs=(1e-3, 2e-3),
        seeds=(0, 1),
        lora_lrs=(1e-3,),
        lora_epochs=1,
        fed_lrs=(1e-3,),
        fed_rounds=1,
        finetune_lrs=(1e-3,),
        finetune_epochs=1,
        side_run_config={"tail-cut": 2, "chunk-size": 8},
        workdir=str(tmp_path / "w"),
        timeout_s=300,
    )
    out = tmp_path / "personalize.json"
    result = run_personalize_bench(config, out=str(out), progress=False)
    speakers = {s["user"]: s for s in result["speakers"]}
    assert list(speakers) == ["ben", "cy"]  # most words, though dee and ana have more paragraphs
    assert all((s["kept"], s["train"], s["validation"], s["test"]) == (10, 8, 1, 1) for s in speakers.values())
    names = {"zero-shot", "on-device LoRA", "fed LoRA", FED_FT, *(mode_method(m) for m in MODES)}
    assert set(result["methods"]) == names
    for m in result["methods"].values():
        assert set(m["per_user"]) == {"ben", "cy"}
        assert all(1.0 < row["test_perplexity"] < 1e5 for row in m["per_user"].values())
    assert result["same_scored_tokens"], result["scored_tokens"]
    hybrid = result["methods"][mode_method("hybrid")]
    assert sorted(hybrid["seeds"]) == [0, 1] and len(hybrid["per_user"]["ben"]["test_perplexity_seeds"]) == 2
    trials = hybrid["lr_trials"]  # hybrid alone tries each personal lr, and the pick is on validation
    assert [(t["lr"], t["personal_lr"]) for t in trials] == [(2e-3, 1e-3), (2e-3, 2e-3)]
    best = min(trials, key=lambda t: t["validation_perplexity"])
    assert (
        hybrid["personal_lr"] == best["personal_lr"] and len(result["methods"][mode_method("shared")]["lr_trials"]) == 1
    )
    assert all(r["personal_lr"] == best["personal_lr"] for r in hybrid["seeds"].values())
    for row in hybrid["per_user"].values():  # each device kept the personal epochs its validation picked
        assert all(kept in range(config.personal_epochs + 1) for kept in row["personal_epochs_seeds"]), row
    assert result["methods"][FED_FT]["adapter"].endswith("adapter.safetensors")
    assert set(result["acceptance"]) == {
        "personal_within_1.02x_of_lora",
        "personal_below_shared",
        "personal_below_zero_shot",
    }
    assert out.exists() and out.with_suffix(".png").exists()
    assert "best personalized mode" in format_table(result)


def test_a_local_fine_tune_starts_from_the_given_adapter(tiny_llama, tmp_path):
    """``BaselineConfig.init_adapter``: the LoRA tensors it trains from are the file's, not fresh ones."""
    import torch
    from safetensors.torch import save_file

    from mobiflower.platform.tasks import CausalLMTask
    from mobiflower.simulations.baselines.lora_model import LoraShape, lora_model, trainable_state
    from mobiflower.simulations.baselines.on_device import BaselineConfig, _start_training, load_tokenizer

    task = CausalLMTask(max_length=24)
    state = {
        k: torch.full_like(v, 0.125)
        for k, v in trainable_state(lora_model(tiny_llama, LoraShape(), 0, task)[0]).items()
    }
    save_file(state, str(tmp_path / "adapter.safetensors"))
    config = BaselineConfig(
        "lora", model=tiny_llama, task="causal-lm", max_length=24, init_adapter=str(tmp_path / "adapter.safetensors")
    )
    model, *_ = _start_training(config, task, tiny_llama, load_tokenizer(tiny_llama), 1e-3, 8)
    assert all(torch.equal(trainable_state(model)[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="init_adapter"):
        BaselineConfig("full", init_adapter=str(tmp_path / "adapter.safetensors"))


class _Stop(Exception):
    """Raised by a stand-in runner once it has seen the run it was given (no fleet runs)."""


def test_c_keys_go_to_every_fleet_run_whose_app_reads_them(tmp_path, monkeypatch):
    from mobiflower.simulations import simulate
    from mobiflower.simulations.baselines import fed_lora
    from mobiflower.simulations.bench.personalize import base_run_config, fed_lora_trial, mobiflower_run

    seen = {}

    def capture(name):
        def run(config, **_):
            seen[name] = config.run_config
            raise _Stop

        return run

    monkeypatch.setattr(simulate, "run_simulate", capture("side"))
    monkeypatch.setattr(fed_lora, "run_fed_lora", capture("fed-lora"))
    config = PersonalizeBench(run_config={"lora-r": 4, "chunk-size": 8, "lora-dropout": 0.1}, workdir=str(tmp_path))
    data = tmp_path / "speakers.jsonl"
    data.write_text(json.dumps({"text": "a b c", "user": "u"}) + "\n")
    base = base_run_config(config, data)
    assert base["lora-r"] == 4 and "chunk-size" not in base and "lora-dropout" not in base  # both apps: lora-r
    for run in (
        lambda: mobiflower_run(config, base, {"d": None}, "shared", 1e-3, 0, None),
        lambda: fed_lora_trial(config, base, {"d": None}, 1e-3),
    ):
        with pytest.raises(_Stop):
            run()
    assert (seen["side"]["lora-r"], seen["side"]["chunk-size"]) == (4, 8) and "lora-dropout" not in seen["side"]
    assert (seen["fed-lora"]["lora-r"], seen["fed-lora"]["lora-dropout"]) == (4, 0.1)
    assert "chunk-size" not in seen["fed-lora"]


def test_c_keys_the_bench_sets_itself_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="bench personalize sets batch-size itself; use --batch-size"):
        PersonalizeBench(run_config={"batch-size": 4})
