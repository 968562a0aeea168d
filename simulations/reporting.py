"""Small helpers the benchmarks share for their printed tables."""

from __future__ import annotations


def acceptance_lines(result: dict, acceptance: dict, width: int = 30) -> list[str]:
    """One line per acceptance check: the measured ratio, the wanted bound, and PASS / FAIL / n/a.

    ``acceptance`` maps a check's name to ``(ratio key, operator, threshold)``; the verdicts are the
    booleans the benchmark stored under ``result["acceptance"]`` (measured, never asserted).
    """
    ratios, verdicts = result.get("ratios", {}), result.get("acceptance", {})
    lines = ["Ratios and acceptance"]
    for name, (key, op, threshold) in acceptance.items():
        verdict = verdicts.get(name)
        mark = "n/a" if verdict is None else ("PASS" if verdict else "FAIL")
        value = ratios.get(key)
        shown = "-" if value is None else format(value, ".3g")
        lines.append(f"  {key:<{width}}{shown:>10}   want {op} {threshold:<6g} {mark}")
    return lines
