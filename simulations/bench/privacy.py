"""``mobiflower bench privacy``: attack our own frames, per configuration and defense, with the task's price.

Why: what a curious server holding the public weights reconstructs from the frames it receives is
the privacy a user gets; it has to be measured on the frames the devices actually send, not argued.
For each configuration (family, cut, bit-width) and each device defense
(:mod:`mobiflower.platform.state_defense`) the bench builds the bundled job's frames with
``DeviceRuntime.make_frame``, decodes them as the server does, runs the attacks of
:mod:`mobiflower.simulations.bench.privacy_attacks` (trained on public speeches put through the same
template, lower blocks, defense and codec: an attacker who knows the run's settings), and side-tunes
the configuration's side network on the same defended frames to price the defense in test accuracy
(:mod:`mobiflower.simulations.bench.privacy_measure` does one row).

The accuracy runs are small (hundreds of samples, on 2 cores); the undefended run is measured the
same way in the same call, so the comparison is fair, but a figure from a few hundred test samples
has a standard error of 2-3 points: the bigger sizes are options. This module holds the settings
and the report and imports nothing heavy (the CLI reads its defaults).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

Log = Callable[[str], None]

DEFAULT_DEFENSES = ("clip=160,noise=0.05", "window=8")
"""The defenses tried on the first configuration by default (besides none): ``clip=C,noise=Z,window=K,keep-first=N``."""


@dataclass
class PrivacyBenchSettings:
    """Sizes of one bench run (the defaults finish in minutes on 2 cores)."""

    model: str = "smollm2-135m"
    weights: str | None = "fp32"  # the device's prepared copy (lean forward); None: as transformers loads it
    train_samples: int = 256  # devices' training samples: frames the attacks read, and the side-tuning set
    test_samples: int = 256
    public_samples: int = 1000  # speech pieces the attacker trains on (about 40 tokens each, 5,804 in all)
    vocab: int = 8192  # the attack's vocabulary: the public text's most frequent tokens
    mlp_hidden: int = 1024
    mlp_epochs: int = 3
    mlp_budget_s: float = 30.0  # the MLP stops after the epoch that passes this
    search_samples: int = 3  # devices' test samples the white-box search attacks
    search_topk: int = 16  # candidates per position: the MLP inverse's best
    search_wide: int = (
        256  # both inverses' best, tried too where none of those matches (farther than a right token lies)
    )
    search_budget_s: float = 30.0  # per configuration and defense
    epochs: int = 4  # side-tuning epochs, every row alike (a window's frames need more than the tail's 2)
    chunk_size: int = 128
    seed: int = 0
    threads: int | None = None
    accuracy: str = "first"  # side-tune (for accuracy) on: "first" (the defended configuration), "all", "none"
    # parse_exposure specs, the defended one first; None: privacy_measure.default_configs
    configs: tuple[str, ...] | None = None
    defenses: tuple[str, ...] = (
        DEFAULT_DEFENSES  # each clip=C,noise=Z,window=K,keep-first=N (privacy_measure.parse_defense)
    )
    label_epsilons: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 3.0, 5.0)


def run_privacy_bench(settings: PrivacyBenchSettings, log: Log = lambda m: None) -> dict:
    """Every configuration undefended, the first one under each defense too, and what a label-private
    run's residuals reveal (from the first configuration's trained network)."""
    from mobiflower.simulations.bench.privacy_measure import measure_all

    t0 = time.perf_counter()
    measured = measure_all(settings, log)
    config = asdict(settings)
    return {
        "config": {**config, "samples": settings.train_samples, "batch_size": None},
        **measured,
        "acceptance": acceptance(measured["rows"]),
        "wall_s": time.perf_counter() - t0,
    }


def acceptance(rows: Sequence[dict]) -> dict:
    """The issue's line on the default configuration: a defense whose learned inverse (the better of
    linear and MLP) reads at most 10% of own tokens, with accuracy within 3 points of the undefended
    run (clean test states, and frames as sent), measured the same way."""
    default = [r for r in rows if r["exposure"] == rows[0]["exposure"]]
    base = default[0]
    out: dict[str, Any] = {"undefended_recovery": _recovery(base), "defenses": []}
    for r in default[1:]:
        entry = {"defense": r["defense"]["label"], "recovery": _recovery(r), "bag": (r.get("bag") or {}).get("recall")}
        if "accuracy" in r and "accuracy" in base:
            for key in ("clean", "sent"):
                entry[f"accuracy_drop_{key}"] = base["accuracy"][key] - r["accuracy"][key]
                entry[f"meets_{key}"] = entry["recovery"] <= 0.10 and entry[f"accuracy_drop_{key}"] <= 0.03
        out["defenses"].append(entry)
    return out


def _recovery(row: dict) -> float | None:
    inv = row.get("inverse")
    return None if inv is None else max(inv["linear"]["token"], inv["mlp"]["token"])


# ---- report ----------------------------------------------------------------------------------------------
def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(result: dict) -> str:
    """The rows as a Markdown table, then the label-private figures and the acceptance line."""
    head = (
        "| configuration | defense | bytes/sample | rows/sample | inverse linear % | inverse MLP % (in vocab) | "
        "chance % | sentences % | white-box % (samples) | bag of words % (chance) | acc clean % | acc as sent % | "
        "mu per row |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        inv, search, bag, acc = r.get("inverse"), r.get("search"), r.get("bag"), r.get("accuracy") or {}
        mu = r["defense"].get("mu")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["exposure"]["name"],
                    r["defense"]["label"],
                    f"{r['bytes_per_sample']:.0f}",
                    f"{r['rows_per_sample']:.1f}",
                    _pct(inv and inv["linear"]["token"]),
                    "-" if not inv else f"{_pct(inv['mlp']['token'])} ({_pct(inv['mlp']['in_vocab'])})",
                    _pct(inv and inv["prior"]),
                    _pct(inv and max(inv["linear"]["sentence"], inv["mlp"]["sentence"])),
                    "-" if not search else f"{_pct(search['token'])} ({search['samples']})",
                    "-" if not bag else f"{_pct(bag['recall'])} ({_pct(bag['prior_recall'])})",
                    _pct(acc.get("clean")),
                    _pct(acc.get("sent")),
                    "-" if mu is None else f"{mu:.3g}",
                ]
            )
            + " |"
        )
    lines += _label_lines(result.get("label_private")) + _acceptance_lines(result["acceptance"])
    return "\n".join(lines)


def _label_lines(labels: list[dict] | None) -> list[str]:
    if not labels:
        return []
    lines = ["", "Label-private runs: share of true labels the server reads (epsilon: label-epsilon)"]
    for e in labels:
        lines.append(
            f"  epsilon {e['epsilon']:<4g} keep {e['keep_probability']:.3f}: from the residual {_pct(e['residual'])}%, "
            f"with its own prediction {_pct(e['with_prediction'])}%, prediction alone {_pct(e['prediction_only'])}%"
        )
    return lines


def _acceptance_lines(acc: dict) -> list[str]:
    lines = [
        "",
        f"Default configuration, undefended: learned inverse reads {_pct(acc['undefended_recovery'])}% of own tokens",
    ]
    for d in acc["defenses"]:
        drops = ", ".join(
            f"accuracy {-100 * d[k]:+.1f} pts ({k.rsplit('_', 1)[1]}): {'PASS' if d['meets_' + k.rsplit('_', 1)[1]] else 'FAIL'}"
            for k in ("accuracy_drop_clean", "accuracy_drop_sent")
            if k in d
        )
        bag = "" if d.get("bag") is None else f", bag of words {_pct(d['bag'])}%"
        lines.append(f"  {d['defense']}: inverse {_pct(d['recovery'])}% (want <= 10){bag}; {drops}")
    return lines


def _shown_recovery(row: dict) -> float | None:
    """What the plot puts on a row's x axis: the better inverse where every position is sent, else the
    bag of words (which is all a window or a last-token frame lets the attacks read)."""
    if row.get("bag"):
        return row["bag"]["recall"]
    return _recovery(row)


def plot(result: dict, path: str):
    """Recovery against accuracy, one point per configuration and defense; the label-private figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mobiflower.simulations.bench.common import save_figure

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.5))
    for i, r in enumerate(result["rows"]):
        acc = r.get("accuracy") or {}
        x = _shown_recovery(r)
        if "clean" not in acc or x is None:
            continue
        color = f"C{i % 10}"
        ax.plot([100 * x] * 2, [100 * acc["clean"], 100 * acc["sent"]], color=color, lw=0.8)
        ax.scatter(100 * x, 100 * acc["clean"], color=color, marker="s" if r.get("bag") else "o")
        ax.scatter(100 * x, 100 * acc["sent"], facecolors="none", edgecolors=color, marker="s" if r.get("bag") else "o")
        ax.annotate(f"{r['exposure']['name']}\n{r['defense']['label']}", (100 * x, 100 * acc["clean"]), fontsize=6)
    base = (result["rows"][0].get("accuracy") or {}).get("clean")
    if base is not None:
        ax.axhline(100 * base - 3, color="grey", ls=":", lw=0.8)
    ax.axvline(10, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("own tokens recovered, % (o: best learned inverse per position; s: bag of words)")
    ax.set_ylabel("test accuracy, % (filled: clean states; hollow: frames as sent)")
    ax.set_title("what the server reads against what the task keeps (lines: 10% and undefended - 3 pts)", fontsize=9)
    for key, label in (("residual", "from the residual"), ("with_prediction", "with its own prediction")):
        pts = result.get("label_private") or []
        bx.plot([p["epsilon"] for p in pts], [100 * p[key] for p in pts], marker="o", label=label)
    bx.set_xlabel("label-epsilon")
    bx.set_ylabel("true labels read by the server, %")
    bx.set_title("label-private runs", fontsize=9)
    bx.legend(fontsize=8)
    cfg = result["config"]
    title = f"{cfg['model']}: {cfg['train_samples']} train / {cfg['test_samples']} test samples, {cfg['public_samples']} public pieces"
    return save_figure(fig, result, path, title=title)


__all__ = ["DEFAULT_DEFENSES", "PrivacyBenchSettings", "format_table", "plot", "run_privacy_bench"]
