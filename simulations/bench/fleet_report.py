"""``mobiflower bench fleet``'s reading of its runs: the target (federated LoRA's final accuracy minus a
margin), each method's time to it, the ratios and the verdicts against :data:`ACCEPTANCE` (computed
from the measured numbers, ``n/a`` with the reason where a run leaves one undecided), the table and
the figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from mobiflower.simulations.bench.common import fmt as _num
from mobiflower.simulations.bench.common import ratio, save_figure

FED_LORA, EIGHT_BIT, ADAPTIVE = "fed-lora", "mobiflower-8bit", "mobiflower-adaptive"
METHODS = (ADAPTIVE, EIGHT_BIT, FED_LORA)  # table and plot order
PASS, FAIL, NA = "PASS", "FAIL", "n/a"
TOLERANCE = 1e-9  # float slack for "at least" comparisons of accuracies and ratios


@dataclass(frozen=True)
class Acceptance:
    """The issue's acceptance bounds, in one place."""

    target_margin: float = 0.01  # target = fed-LoRA final accuracy minus this
    max_accuracy_drop_vs_fed_lora: float = 0.005  # adaptive's final accuracy (mean over seeds) at most this below
    max_compute_vs_fed_lora: float = 0.2  # adaptive's device compute at most this fraction of fed-LoRA's
    max_bytes_vs_fed_lora: float = 0.5  # ... and its bytes up + down
    speedup_vs_fed_lora: float = 3.0  # adaptive reaches the target at least this many times sooner
    speedup_vs_8bit: float = 1.5
    max_accuracy_drop_vs_8bit: float = 0.01  # adaptive's final accuracy at most this much below 8-bit's


ACCEPTANCE = Acceptance()


def time_to_target(curve: Sequence[Mapping[str, Any]], target: float | None) -> float | None:
    """Virtual seconds of the first curve point at or above ``target``; None if none is (or no target)."""
    if target is None:
        return None
    for point in curve:
        accuracy = point.get("accuracy")
        if accuracy is not None and accuracy >= target - TOLERANCE:
            return float(point["virtual_s"])
    return None


def _verdict(verdict: str, measured: Any, want: str, reason: str = "", applies_to: str = "") -> dict[str, Any]:
    return {"verdict": verdict, "measured": measured, "want": want, "reason": reason, "applies_to": applies_to}


def _speedup_verdict(methods: Mapping[str, dict[str, Any]], slow: str, fast: str, bound: float) -> dict[str, Any]:
    """Is ``fast`` at least ``bound`` times sooner to the target than ``slow``?

    A ``fast`` that never reached the target fails. A ``slow`` that never reached it ran its whole
    virtual time without doing so, which bounds its time-to-target from below: the verdict passes
    if even that bound clears ``bound``, else the run cannot tell (n/a).
    """
    want = f">= {bound:g}x"
    f, s = methods[fast], methods[slow]
    if not f.get("completed") or not s.get("completed"):
        failed = [n for n in (fast, slow) if not methods[n].get("completed")]
        return _verdict(NA, None, want, f"{' and '.join(failed)} did not complete")
    if f["time_to_target_s"] is None:
        return _verdict(FAIL, None, want, f"{fast} never reached the target")
    if s["time_to_target_s"] is None:
        floor = ratio(s["virtual_total_s"], f["time_to_target_s"])
        if floor is not None and floor >= bound - TOLERANCE:
            return _verdict(
                PASS,
                floor,
                want,
                f"{slow} never reached the target in its {s['virtual_total_s']:.1f} "
                f"virtual s; the speedup is at least {floor:.3g}x",
            )
        return _verdict(
            NA,
            floor,
            want,
            f"{slow} never reached the target; its run's length only bounds the "
            f"speedup from below ({'-' if floor is None else format(floor, '.3g')}x)",
        )
    measured = ratio(s["time_to_target_s"], f["time_to_target_s"])
    if measured is None:  # the fast method was at the target at virtual time 0
        return _verdict(PASS if s["time_to_target_s"] > 0 else NA, None, want, f"{fast} reached the target at 0 s")
    return _verdict(PASS if measured >= bound - TOLERANCE else FAIL, measured, want)


def _set_time_to(figures: dict[str, Any], key: str, target: float | None) -> None:
    """``figures[key]``: virtual seconds to ``target``; over several seeds, each run's and the slowest
    (``None`` if any seed never got there)."""
    runs = figures.get("seed_runs")
    if not runs:
        figures[key] = time_to_target(figures.get("curve", []), target)
        return
    for run in runs:
        run[key] = time_to_target(run.get("curve", []), target)
    times = [run[key] for run in runs]
    figures[key] = None if None in times else max(times)


def _drop_verdict(drop: float | None, bound: float, other: str, reason: str = "") -> dict[str, Any]:
    """Is adaptive's final accuracy at most ``bound`` below ``other``'s (``drop`` = adaptive - other)?"""
    want = f">= -{bound:g} (adaptive - {other})"
    if drop is None:
        return _verdict(NA, None, want, "a method has no final accuracy")
    return _verdict(PASS if drop >= -bound - TOLERANCE else FAIL, drop, want, reason)


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Target, time-to-target per method, ratios and verdicts, from the methods' measured figures."""
    methods = result["methods"]
    a = ACCEPTANCE
    baseline = methods[FED_LORA].get("final_accuracy")
    target = None if baseline is None else baseline - a.target_margin
    for figures in methods.values():
        _set_time_to(figures, "time_to_target_s", target)
        figures["reached_target"] = figures["time_to_target_s"] is not None
    ada, eight, lora = methods[ADAPTIVE], methods[EIGHT_BIT], methods[FED_LORA]
    ratios = _ratios(ada, eight, lora)
    # Not the issue's target: the accuracy every method reaches (the lowest final accuracy minus the
    # margin), so speed can be compared even when one method's ceiling is below the other's target.
    finals = [f["final_accuracy"] for f in methods.values() if f.get("final_accuracy") is not None]
    common = min(finals) - a.target_margin if len(finals) == len(methods) else None
    for figures in methods.values():
        _set_time_to(figures, "time_to_common_target_s", common)
    result["common_target_accuracy"] = common
    ratios["fed_lora_over_adaptive_time_to_common_target"] = ratio(
        lora["time_to_common_target_s"], ada["time_to_common_target_s"]
    )
    ratios["8bit_over_adaptive_time_to_common_target"] = ratio(
        eight["time_to_common_target_s"], ada["time_to_common_target_s"]
    )
    verdicts = _speed_verdicts(methods, target)
    ratios["adaptive_over_fed_lora_total_bytes"] = ratio(_total_bytes(ada), _total_bytes(lora))
    ratios["adaptive_over_fed_lora_device_compute"] = ratio(ada["device_compute_s"], lora["device_compute_s"])
    verdicts.update(_cost_verdicts(ratios, ada["completed"] and lora["completed"]))
    seeds = len(ada.get("seed_runs") or [ada])
    verdicts["adaptive_within_0.5pt_of_fed_lora_accuracy"] = _drop_verdict(
        ratios["adaptive_minus_fed_lora_accuracy"],
        a.max_accuracy_drop_vs_fed_lora,
        "fed-lora",
        f"adaptive's mean over {seeds} training seeds" if seeds > 1 else "one training seed",
    )
    verdicts["adaptive_within_1pt_of_8bit_accuracy"] = _drop_verdict(
        ratios["adaptive_minus_8bit_accuracy"], a.max_accuracy_drop_vs_8bit, "8bit"
    )
    for verdict in verdicts.values():
        verdict["applies_to"] = "mixed-phones"
    incomplete = [n for n, f in methods.items() if not f.get("completed")]
    verdicts["runs_completed"] = _verdict(
        PASS if not incomplete else FAIL,
        len(methods) - len(incomplete),
        f"{len(methods)} of {len(methods)}",
        f"did not complete: {', '.join(incomplete)}" if incomplete else "",
        "flaky",
    )
    verdicts["no_arrived_frame_lost"] = _frames_verdict(methods)
    return {**result, "target_accuracy": target, "ratios": ratios, "verdicts": verdicts}


def _ratios(ada: Mapping[str, Any], eight: Mapping[str, Any], lora: Mapping[str, Any]) -> dict[str, float | None]:
    """Adaptive against the others: time to target, device compute, bytes up, accuracy gaps."""

    def gap(x: float | None, y: float | None) -> float | None:
        return None if x is None or y is None else x - y

    return {
        "fed_lora_over_adaptive_time_to_target": ratio(lora["time_to_target_s"], ada["time_to_target_s"]),
        "8bit_over_adaptive_time_to_target": ratio(eight["time_to_target_s"], ada["time_to_target_s"]),
        "fed_lora_over_adaptive_device_compute": ratio(lora["device_compute_s"], ada["device_compute_s"]),
        "fed_lora_over_adaptive_device_compute_measured": ratio(
            lora["device_compute_measured_s"], ada["device_compute_measured_s"]
        ),
        "fed_lora_over_adaptive_bytes_up": ratio(lora["bytes_up"], ada["bytes_up"]),
        "8bit_over_adaptive_bytes_up": ratio(eight["bytes_up"], ada["bytes_up"]),
        "adaptive_minus_fed_lora_accuracy": gap(ada["final_accuracy"], lora["final_accuracy"]),
        "adaptive_minus_8bit_accuracy": gap(ada["final_accuracy"], eight["final_accuracy"]),
    }


def _speed_verdicts(methods: Mapping[str, dict[str, Any]], target: float | None) -> dict[str, dict[str, Any]]:
    """Does adaptive reach the target this many times sooner than fed-lora and than 8-bit?"""
    verdicts: dict[str, dict[str, Any]] = {}
    no_target = "fed-lora has no final accuracy, so there is no target"
    for key, slow, bound in (
        ("adaptive_3x_sooner_than_fed_lora", FED_LORA, ACCEPTANCE.speedup_vs_fed_lora),
        ("adaptive_1.5x_sooner_than_8bit", EIGHT_BIT, ACCEPTANCE.speedup_vs_8bit),
    ):
        verdicts[key] = (
            _verdict(NA, None, f">= {bound:g}x", no_target)
            if target is None
            else _speedup_verdict(methods, slow, ADAPTIVE, bound)
        )
    return verdicts


def _total_bytes(f: Mapping[str, Any]) -> float | None:
    """Up + down, delivery included (mobiflower's bytes_down holds its deliveries already)."""
    if f.get("bytes_up") is None or f.get("bytes_down") is None:
        return None
    return f["bytes_up"] + f["bytes_down"] + f.get("bytes_down_delivery", 0)


def _cost_verdicts(ratios: Mapping[str, float | None], both_completed: bool) -> dict[str, dict[str, Any]]:
    """Is adaptive's device compute and total traffic at most the bounds' multiples of fed-lora's?"""
    a = ACCEPTANCE
    verdicts: dict[str, dict[str, Any]] = {}
    for key, measured, bound in (
        (
            f"adaptive_device_compute_le_{a.max_compute_vs_fed_lora:g}x_fed_lora",
            ratios["adaptive_over_fed_lora_device_compute"],
            a.max_compute_vs_fed_lora,
        ),
        (
            f"adaptive_total_bytes_le_{a.max_bytes_vs_fed_lora:g}x_fed_lora",
            ratios["adaptive_over_fed_lora_total_bytes"],
            a.max_bytes_vs_fed_lora,
        ),
    ):
        want = f"<= {bound:g} (adaptive / fed-lora)"
        verdicts[key] = (
            _verdict(NA, None, want, "a method did not complete or has no figure")
            if measured is None or not both_completed
            else _verdict(PASS if measured <= bound + TOLERANCE else FAIL, measured, want)
        )
    return verdicts


def _frames_verdict(methods: Mapping[str, dict[str, Any]]) -> dict[str, Any]:
    """Every frame that arrived was either accepted or refused (and counted): none vanished."""
    want = "0 (arrived - accepted - refused)"
    counts, missing, lost = {}, [], []
    for name in (EIGHT_BIT, ADAPTIVE):
        f = methods[name]
        if None in (f.get("frames"), f.get("frames_accepted"), f.get("frames_refused")):
            missing.append(name)
            continue
        unaccounted = f["frames"] - f["frames_accepted"] - f["frames_refused"]
        counts[name] = {
            "frames": f["frames"],
            "accepted": f["frames_accepted"],
            "refused": f["frames_refused"],
            "unaccounted": unaccounted,
        }
        if unaccounted:
            lost.append(f"{name}: {unaccounted}")
    if lost:
        return _verdict(FAIL, counts, want, "frames unaccounted for: " + ", ".join(lost), "flaky")
    if missing:
        return _verdict(
            NA,
            counts,
            want,
            f"no frame counts from {', '.join(missing)} (run failed or predates frames_accepted)",
            "flaky",
        )
    return _verdict(PASS, counts, want, "", "flaky")


# ------------------------------------------------------------------------------------------
# table and figure


def format_table(result: dict[str, Any]) -> str:
    """The methods side by side, then every verdict with what it measured."""
    settings = result["settings"]
    tiers: dict[str, int] = {}
    for tier in settings["profiles"].values():
        tiers[tier] = tiers.get(tier, 0) + 1
    target = result["target_accuracy"]
    lines = [
        f"fleet {result['fleet']}: {settings['devices']} devices ("
        + ", ".join(f"{n} {t}" for t, n in tiers.items())
        + f"); target accuracy {_num(target, '.4f')} "
        f"(fed-lora final - {result['settings']['acceptance']['target_margin']:g})",
        "",
        f"{'method':<26} {'final acc':>9} {'to target s':>12} {'to common s':>12} {'virtual s':>10} "
        f"{'compute s':>10} {'measured s':>10} {'MB up':>8} {'MB down':>8} {'frames acc/ref':>15}",
    ]
    for name, f in result["methods"].items():
        lines += _method_lines(name, f, target)
    lines += [
        "",
        f"to common s: virtual seconds to {_num(result.get('common_target_accuracy'), '.4f')}, the lowest "
        f"final accuracy minus the margin (not the issue's target; it compares speed where every method "
        f"gets there)",
    ]
    tuning = result["tuning"]
    side = result.get("side_tuning") or {"mode": "default", "lr": None}
    lines += [
        "",
        f"fed-lora: lr {tuning['lr']:g}, {tuning['local_epochs']} "
        f"local epochs ({'given' if tuning['mode'] == 'given' else 'tuned on validation'}); mobiflower: "
        + ("the app's default lr" if side["mode"] == "default" else f"lr {side['lr']:g} (tuned on validation)"),
        "(virtual seconds of training only: evaluation traffic and compute excluded; compute s = virtual "
        "device compute, measured s = the same on this machine)",
        "",
        "Verdicts",
    ]
    lines += _verdict_lines(result["verdicts"])
    return "\n".join(lines)


def _method_lines(name: str, f: Mapping[str, Any], target: float | None) -> list[str]:
    """A method's row of the table (and one per training seed when it is a mean over seeds)."""
    if not f.get("completed") and f.get("error"):
        return [f"{name:<20} failed: {f['error'].splitlines()[0]}"]
    ttt = "never" if f["time_to_target_s"] is None and target is not None else _num(f["time_to_target_s"], ".1f")
    frames = (
        "-"
        if f.get("frames") is None
        else f"{f['frames']} ({_num(f.get('frames_accepted'), 'd')}/{_num(f.get('frames_refused'), 'd')})"
    )
    common = _num(f.get("time_to_common_target_s"), ".1f")
    label = name + (" (mean)" if f.get("seed_runs") else "")
    lines = [
        f"{label:<26} {_num(f['final_accuracy'], '.4f'):>9} {ttt:>12} {common:>12} "
        f"{_num(f['virtual_total_s'], '.1f'):>10} "
        f"{_num(f['device_compute_s'], '.1f'):>10} {_num(f['device_compute_measured_s'], '.1f'):>10} "
        f"{_num(f['bytes_up'] and f['bytes_up'] / 1e6, '.2f'):>8} "
        f"{_num(f['bytes_down'] and f['bytes_down'] / 1e6, '.2f'):>8} {frames:>15}"
    ]
    for run in f.get("seed_runs", []):
        ttt = (
            "never"
            if run.get("time_to_target_s") is None and target is not None
            else _num(run.get("time_to_target_s"), ".1f")
        )
        lines.append(
            f"  train-seed {run['train_seed']:<14} {_num(run['final_accuracy'], '.4f'):>9} {ttt:>12} "
            f"{_num(run.get('time_to_common_target_s'), '.1f'):>12} {_num(run['virtual_total_s'], '.1f'):>10}"
        )
    return lines


def _verdict_lines(verdicts: Mapping[str, dict[str, Any]]) -> list[str]:
    """Every verdict with what it measured (frame counts spelled out per method)."""
    lines: list[str] = []
    for key, v in verdicts.items():
        measured = v["measured"]
        counts = measured if isinstance(measured, dict) else None
        shown = str(sum(c["unaccounted"] for c in counts.values())) if counts is not None else _num(measured, ".3g")
        reason = f"  ({v['reason']})" if v["reason"] else ""
        lines.append(f"  {key:<44} {shown:>9}   want {v['want']:<32} {v['verdict']}  [{v['applies_to']}]{reason}")
        for name, c in (counts or {}).items():
            lines.append(f"    {name}: {c['frames']} frames arrived, {c['accepted']} accepted, {c['refused']} refused")
    return lines


def plot(result: dict[str, Any], path: str) -> Path:
    """Accuracy against virtual time for each method, the target as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    positive = []
    for name, f in result["methods"].items():
        points = [p for p in f.get("curve", []) if p.get("accuracy") is not None]
        if not points:
            continue
        xs, ys = [p["virtual_s"] for p in points], [p["accuracy"] for p in points]
        positive += [x for x in xs if x > 0]
        # steps: a method's accuracy is known at its evaluations and holds until the next one
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, drawstyle="steps-post", label=name)
        if f.get("time_to_target_s") is not None:
            ax.axvline(f["time_to_target_s"], color=line.get_color(), linestyle=":", linewidth=1)
    if result.get("target_accuracy") is not None:
        ax.axhline(result["target_accuracy"], color="grey", linestyle="--", label="target")
    if positive:
        ax.set_xscale("log")  # "k times sooner" reads as a fixed distance
    ax.set_xlabel("virtual seconds of training (log)")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=8)
    s = result["settings"]
    return save_figure(
        fig,
        result,
        path,
        title=f"fleet {result['fleet']}: {s['devices']} devices, {s['train_samples']} training samples",
    )


__all__ = ["summarize", "format_table", "plot"]
