"""`mobiflower compare`: runs that differ only in their training seed are summarized together."""

import json

from mobiflower.simulations.cli import main
from mobiflower.simulations.compare import seed_groups


def _run(acc: float, train_seed: int, seed: int = 0, lr: float = 1e-3, method: str = "mobiflower") -> dict:
    return {
        "method": method,
        "family": "tail",
        "test_accuracy": acc,
        "zero_shot_accuracy": float("nan"),
        "config": {"seed": seed, "train_seed": train_seed, "lr": lr, "workdir": f"runs/w{train_seed}"},
    }


def test_training_seeds_of_one_configuration_form_one_group():
    groups = seed_groups([("a", _run(0.85, 0)), ("b", _run(0.87, 1)), ("c", _run(0.86, 2))])
    assert len(groups) == 1
    g = groups[0]
    assert g["files"] == ["a", "b", "c"] and g["label"] == "mobiflower/tail"
    assert abs(g["mean"] - 0.86) < 1e-12 and abs(g["sd"] - 0.01) < 1e-12
    assert (g["min"], g["max"]) == (0.85, 0.87)


def test_another_split_learning_rate_or_method_is_another_group():
    groups = seed_groups(
        [
            ("a", _run(0.85, 0)),
            ("b", _run(0.86, 0, seed=1)),
            ("c", _run(0.87, 0, lr=2e-3)),
            ("d", _run(0.88, 0, method="lora")),
            ("e", {"method": "x", "test_accuracy": 0.5}),
        ]
    )
    assert [g["files"] for g in groups] == [["a"], ["b"], ["c"], ["d"], ["e"]]
    assert all(g["sd"] == 0.0 for g in groups)


def test_compare_prints_the_seed_summary(tmp_path, capsys):
    files = []
    for i, acc in enumerate((0.85, 0.87)):
        path = tmp_path / f"r{i}.json"
        path.write_text(json.dumps(_run(acc, i)))
        files.append(str(path))
    assert main(["compare", *files]) == 0
    out = capsys.readouterr().out
    assert "training seed" in out and "0.8600" in out
