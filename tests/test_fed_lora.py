"""The federated on-device LoRA baseline: Flower's FedAvg over PEFT adapters, in the side-tuning harness.

Unit tests check the strategy's averaging and accounting on hand-made replies and the tuning
helper's choice; 2-device runs (tiny random Llama, bundled data) through the runner with the app
in-process check the whole app for both tasks: it completes, averages what the devices sent,
counts exactly the bytes that travelled, each device trains on its own, disjoint partition, and a
causal-LM run trains adapters only and reports perplexity over the scored tokens. Accuracy is not
the point (random backbone).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from mobiflower.clients.device_setup import DeviceSetup
from mobiflower.platform.tasks import CausalLMTask
from mobiflower.simulations.baselines.fed_lora_strategy import (
    FedLoraConfig,
    FedLoraConfigError,
    FedLoraStrategy,
    combined_metrics,
    linear_probe,
    record_bytes,
)


@pytest.fixture
def task_identity(monkeypatch):
    """Messages built outside a running ServerApp need the process's task identity set."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class _Grid:
    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def _arrays(seed: int) -> ArrayRecord:
    rng = np.random.default_rng(seed)
    return ArrayRecord(
        {
            "lora_A": Array(rng.standard_normal((4, 8)).astype(np.float32)),
            "score": Array(rng.standard_normal((2, 8)).astype(np.float32)),
        }
    )


def _train_reply(request: Message, seed: int, examples: int, train_s: float, device: str) -> Message:
    arrays = _arrays(seed)
    metrics = MetricRecord(
        {
            "num-examples": examples,
            "train-s": train_s,
            "train-cpu-s": train_s,
            "load-s": 0.0,
            "loss": 0.5,
            "steps": 1,
            "adapter-bytes": record_bytes(arrays),
            "peak-rss-mb": 1.0,
            "samples-seen": examples,
            "rss-mb": 1.0,
        }
    )
    info = ConfigRecord({"device-id": device, "partition-id": int(device[-1]), "samples-digest": "x"})
    return Message(RecordDict({"arrays": arrays, "metrics": metrics, "device": info}), reply_to=request)


def test_fedavg_is_the_sample_weighted_mean_and_bytes_are_the_records(task_identity):
    strategy = FedLoraStrategy(FedLoraConfig(devices=2, num_server_rounds=4, lr=1e-3))
    global_arrays = _arrays(0)
    requests = list(strategy.configure_train(1, global_arrays, ConfigRecord(), _Grid([11, 22])))
    assert len(requests) == 2
    sent = requests[0].content["config"]
    assert sent["lr"] == pytest.approx(1e-3) and sent["local-epochs"] == 1 and sent["lora-r"] == 8
    replies = [
        _train_reply(requests[0], 1, 30, 2.0, "device-0"),
        _train_reply(requests[1], 2, 10, 5.0, "device-1"),
        Message(Error(code=0, reason="out of memory"), reply_to=requests[1]),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)

    for key in ("lora_A", "score"):
        expected = (30 * _arrays(1)[key].numpy() + 10 * _arrays(2)[key].numpy()) / 40
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    rec = strategy.history[1]
    assert rec["aggregate_probe"] == pytest.approx(rec["expected_probe"], rel=1e-5, abs=1e-5)  # float32 sums
    assert rec["aggregate_probe"] == pytest.approx(linear_probe(arrays))
    size = record_bytes(global_arrays)
    assert size == (4 * 8 + 2 * 8) * 4 + 2 * 128  # float32 values + one .npy header per array, as Flower sends them
    assert rec["bytes_down"] == 2 * size and rec["bytes_up"] == 2 * size  # the failed reply sent nothing
    assert rec["device_compute_s"] == pytest.approx(7.0) and rec["device_compute_max_s"] == pytest.approx(5.0)
    assert [f["reason"] for f in strategy.failures] == ["out of memory"]

    evals = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), _Grid([11, 22])))
    assert evals[0].content["config"]["split"] == "validation"
    replies = [
        Message(RecordDict({"metrics": MetricRecord({"accuracy": acc, "num-examples": n})}), reply_to=req)
        for req, acc, n in ((evals[0], 1.0, 3), (evals[1], 0.0, 1))
    ]
    assert strategy.aggregate_evaluate(1, replies)["accuracy"] == pytest.approx(0.75)  # 3 of 4 samples, not 0.5
    assert strategy.history[1]["bytes_down_eval"] == 2 * size


def test_learning_rate_schedule_and_config_errors():
    cosine = FedLoraConfig(num_server_rounds=4, lr=1.0)
    assert [round(cosine.lr_at(r), 4) for r in (1, 2, 3, 4)] == [1.0, 0.8536, 0.5, 0.1464]
    assert FedLoraConfig(num_server_rounds=4, lr=0.5, lr_schedule="constant").lr_at(4) == 0.5
    parsed = FedLoraConfig.from_run_config({"local-epochs": 3, "final-eval": "false", "lr": 1, "model": "x"})
    assert parsed.local_epochs == 3 and parsed.final_eval is False and parsed.lr == 1.0
    with pytest.raises(FedLoraConfigError, match="lr-schedule='step' must be one of"):
        FedLoraConfig(lr_schedule="step")
    with pytest.raises(FedLoraConfigError, match="eval-split='train'"):
        FedLoraConfig(eval_split="train")

    from mobiflower.simulations.baselines.fed_lora import FedLoraRun

    with pytest.raises(ValueError, match="unknown run-config key.*learning-rate"):
        FedLoraRun(run_config={"learning-rate": 0.1})
    with pytest.raises(ValueError, match="local-epochs=0"):
        FedLoraRun(run_config={"local-epochs": 0})


def test_tuning_chooses_on_validation_only():
    from mobiflower.simulations.baselines.fed_lora import FedLoraRun, tune_fed_lora

    seen = []

    def runner(run: FedLoraRun) -> dict:
        cfg = run.run_config
        seen.append(cfg)
        score = {(1e-4, 1): 0.6, (1e-3, 1): 0.8, (1e-4, 2): 0.7, (1e-3, 2): 0.8}[(cfg["lr"], cfg["local-epochs"])]
        return {"final_validation_accuracy": score, "device_compute_s": 10.0 * cfg["local-epochs"]}

    result = tune_fed_lora(
        FedLoraRun(devices=2, run_config={"num-server-rounds": 3}), [1e-4, 1e-3], [1, 2], runner=runner
    )
    assert len(result["trials"]) == 4
    assert all(
        c["eval-split"] == "validation" and c["final-eval"] is False and c["num-server-rounds"] == 3 for c in seen
    )
    assert (result["best"]["lr"], result["best"]["local-epochs"]) == (1e-3, 1)  # tie: the cheaper one


def test_device_refuses_an_adapter_of_another_shape(tiny_llama):
    from mobiflower.simulations.baselines.lora_model import LoraShape, load_trainable, lora_model, trainable_state

    model, _ = lora_model(tiny_llama, LoraShape(r=4))
    state = trainable_state(model)
    assert any("lora_A" in k for k in state) and any("score" in k for k in state)
    load_trainable(model, ArrayRecord(torch_state_dict=state).to_torch_state_dict())
    wrong = dict(state)
    wrong.pop(next(k for k in state if "lora_B" in k))
    with pytest.raises(ValueError, match="1 tensors missing.*same model, lora-r"):
        load_trainable(model, wrong)


def test_two_device_fed_lora_simulation(real_assets, tiny_llama, tmp_path, monkeypatch):
    """The whole baseline through its runner, ``run_fed_lora``: the app folder it writes, the run config it
    passes, the summary it reads back and writes out; ``flwr run`` itself is the in-process stand-in
    (tests/inprocess_grid.py), the side-tuning app's tests run the real one."""
    from inprocess_grid import run_simulation_in_process

    from mobiflower.simulations.baselines import fed_lora
    from mobiflower.simulations.baselines.lora_model import samples_digest

    run_config = {
        "model": tiny_llama,
        "train-samples": 32,
        "validation-samples": 16,
        "test-samples": 16,
        "num-server-rounds": 2,
        "batch-size": 8,
        "lora-r": 4,
    }
    monkeypatch.setattr(fed_lora, "run_simulation", run_simulation_in_process)
    run = fed_lora.FedLoraRun(devices=2, workdir=str(tmp_path), timeout_s=300, run_config=run_config)
    summary = fed_lora.run_fed_lora(run, out=str(tmp_path / "fed.json"))
    assert summary["simulation"]["status"] == "finished:completed"
    assert json.loads((tmp_path / "fed.json").read_text())["final_accuracy"] == summary["final_accuracy"]
    assert 0.0 <= summary["final_accuracy"] <= 1.0 and summary["final_accuracy_split"] == "test"

    adapter = summary["adapter_bytes"]
    # float32 adapters + head, plus the .npy header Flower puts on each array, nothing else
    assert adapter == summary["trainable_parameters"] * 4 + 128 * summary["adapter_tensors"]
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and not summary["failures"]
    for r in rounds:
        assert r["aggregated"] and r["aggregate_probe"] == pytest.approx(r["expected_probe"], rel=1e-5, abs=1e-5)
        assert r["bytes_up"] == r["bytes_down"] == r["bytes_down_eval"] == 2 * adapter
        assert all(d["bytes_up"] == d["adapter_bytes"] == adapter for d in r["devices"].values())
        assert r["device_compute_max_s"] == max(d["train_s"] for d in r["devices"].values()) > 0
        assert 0.0 <= r["validation_accuracy"] <= 1.0
    assert rounds[1]["global_probe"] == pytest.approx(rounds[0]["aggregate_probe"], rel=1e-6)  # round 2 starts there
    assert summary["bytes_up"] == summary["bytes_down"] == 4 * adapter
    assert summary["bytes_down_eval"] == 6 * adapter  # 2 validation rounds + the final test, 2 devices each
    assert summary["bytes_down_delivery"] == 2 * adapter  # the final adapter, on each of the 2 devices
    assert summary["device_compute_s"] == pytest.approx(sum(r["device_compute_s"] for r in rounds))

    # each device trained on its own partition, the one the side-tuning ClientApp would give it
    node = {"num-partitions": 2}
    shares = [DeviceSetup.from_configs(run_config, {**node, "partition-id": i}).data() for i in (0, 1)]
    ids = [{e.id for e in s.train} for s in shares]
    assert not ids[0] & ids[1] and len(ids[0] | ids[1]) == 32
    for i, share in enumerate(shares):
        recorded = rounds[0]["devices"][f"device-{i}"]
        assert recorded["samples_digest"] == samples_digest(share.train)
        assert recorded["num_examples"] == len(share.train)
    assert sum(d["test_samples"] for d in summary["devices"].values()) == 16


def test_causal_lm_metrics_are_combined_over_scored_tokens(task_identity):
    """Loss and token accuracy weighted by each device's scored tokens; perplexity exp of that loss."""
    strategy = FedLoraStrategy(FedLoraConfig(devices=2), CausalLMTask())
    evals = list(strategy.configure_evaluate(1, _arrays(0), ConfigRecord(), _Grid([11, 22])))
    stats = [
        {"perplexity": np.exp(2.0), "loss": 2.0, "token-accuracy": 0.5, "num-examples": 3, "count": 300},
        {"perplexity": np.exp(4.0), "loss": 4.0, "token-accuracy": 0.1, "num-examples": 3, "count": 100},
    ]
    replies = [Message(RecordDict({"metrics": MetricRecord(m)}), reply_to=r) for r, m in zip(evals, stats)]
    combined = strategy.aggregate_evaluate(1, replies)
    assert combined["loss"] == pytest.approx(2.5) and combined["perplexity"] == pytest.approx(np.exp(2.5))
    assert combined["token-accuracy"] == pytest.approx(0.4)
    record = strategy.history[1]
    assert (
        record["validation_perplexity"] == pytest.approx(np.exp(2.5))
        and record["perplexity"] == record["validation_perplexity"]
    )
    assert sorted(d["validation_loss"] for d in record["devices"].values()) == [2.0, 4.0]
    empty = Message(RecordDict({"metrics": MetricRecord({"num-examples": 0, "count": 0})}), reply_to=evals[0])
    assert combined_metrics(CausalLMTask(), [empty]) is None  # no device scored a token
    summary = strategy.summary_record(None, _arrays(0), 0, 1.0)
    assert summary["task"] == "causal-lm" and summary["metrics"]["primary"] == "perplexity"
    assert summary["final_split"] == "validation" and "test_perplexity" not in summary  # no final test ran
    assert summary["final_perplexity"] == summary["final_validation_perplexity"] == pytest.approx(np.exp(2.5))
    assert "final_accuracy" not in summary


def test_causal_lm_fed_lora_round_in_process(real_assets, tiny_llama, tmp_path, monkeypatch):
    """One causal-LM round of the whole baseline (the bundled snippets as plain text, every token scored):
    the devices train and send LoRA adapters only (the LM head stays frozen), and score perplexity over
    exactly the tokens side-tuning scores."""
    from inprocess_grid import run_simulation_in_process

    from mobiflower.simulations.baselines import fed_lora

    run_config = {
        "model": tiny_llama,
        "task": "causal-lm",
        "max-length": 24,
        "train-samples": 8,
        "validation-samples": 4,
        "test-samples": 4,
        "num-server-rounds": 1,
        "batch-size": 4,
        "lora-r": 4,
    }
    monkeypatch.setattr(fed_lora, "run_simulation", run_simulation_in_process)
    run = fed_lora.FedLoraRun(devices=2, workdir=str(tmp_path), timeout_s=300, run_config=run_config)
    summary = fed_lora.run_fed_lora(run)
    assert summary["simulation"]["status"] == "finished:completed" and not summary["failures"]
    assert summary["task"] == "causal-lm" and summary["task_config"]["max-length"] == 24
    assert summary["final_split"] == "test" and "final_accuracy" not in summary
    assert summary["final_perplexity"] == pytest.approx(np.exp(summary["final_loss"]))
    assert 1.0 < summary["final_perplexity"] < 1e4 and 0.0 <= summary["final_token_accuracy"] <= 1.0
    assert 1.0 < summary["rounds"][0]["validation_perplexity"] < 1e4
    # adapters only: q and v of each of the 4 blocks, A (4 x 64) and B (64 x 4), no head
    assert summary["trainable_parameters"] == 4 * 2 * (4 * 64 + 64 * 4) and summary["adapter_tensors"] == 16
    assert {d["test_samples"] for d in summary["devices"].values()} == {2}
    assert all(1.0 < d["test_perplexity"] < 1e4 for d in summary["devices"].values())

    # the fleet's test figure is over exactly the tokens side-tuning scores on the devices' test samples
    from mobiflower.clients.device_setup import DeviceSetup

    expected = 0
    for i in (0, 1):
        setup = DeviceSetup.from_configs(run_config, {"num-partitions": 2, "partition-id": i})
        test = setup.data().test
        encoded = setup.runtime().encode_samples(test)
        targets = setup.task.frame_targets(test, encoded, [len(e.ids) for e in encoded])["values"]
        expected += sum(t != -100 for t in targets)
    assert sum(d["test_count"] for d in summary["devices"].values()) == summary["test_count"] == expected > 0
    assert summary["test_perplexity"] == summary["final_perplexity"]
