"""Live progress of a ``mobiflower simulate`` run, read from the ServerApp's own log lines.

``flwr run --stream`` hands us the ServerApp's output and nothing else, so the bars show what the
server reports, when it reports it: the number of rounds from the strategy's opening line, the
samples whose frames have landed in the current round from its periodic ``frames landed`` line
(about every 10 s while a round streams; rounds trained from the activation cache stream nothing),
and a finished round from its ``[round r/R]`` line. Every other line is printed above the bars.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from typing import TextIO

from tqdm import tqdm

ROUNDS_DECLARED = re.compile(r"SideTuningStrategy: .*\brounds=(\d+)")
ROUND_DONE = re.compile(r"\[round (\d+)/(\d+)\]")
FRAMES_LANDED = re.compile(r"\[round (\d+)\] frames landed for (\d+)/(\d+) samples")

NOISE = (
    "FutureWarning",
    "warnings.warn",
    "RAY_ACCEL_ENV_VAR",
    "simulation-config",
    "To change federation size",
    "Since flwr 1.32",
    "Manually terminating ClientAppActor",
)
"""Lines of Flower's and Ray's own chatter that say nothing about this run."""


class RunProgress:
    """A line handler for :func:`mobiflower.simulations.flower_run.run_simulation`'s ``on_line``:
    a rounds bar and a streamed-samples bar, updated from the server's log lines; ``close`` ends them."""

    def __init__(self, file: TextIO | None = None, enabled: bool = True) -> None:
        self.file = file if file is not None else sys.stderr
        # on stderr, bars only when it is a terminal (a log file or CI gets the lines alone); a file
        # given explicitly always gets them
        self.disable = None if file is None else False
        self.enabled = enabled
        self.rounds: tqdm | None = None
        self.samples: tqdm | None = None
        self.round = 0

    def _rounds_bar(self, total: int) -> tqdm:
        if self.rounds is None:
            self.rounds = tqdm(
                total=total,
                desc="rounds",
                unit="round",
                file=self.file,
                position=0,
                dynamic_ncols=True,
                disable=self.disable,
            )
        elif self.rounds.total != total:
            self.rounds.total = total
            self.rounds.refresh()
        return self.rounds

    def __call__(self, line: str) -> None:
        if not self.enabled or not line.strip() or any(n in line for n in NOISE):
            return
        if m := ROUNDS_DECLARED.search(line):
            self._rounds_bar(int(m.group(1)))
        elif m := FRAMES_LANDED.search(line):
            rnd, landed, total = (int(g) for g in m.groups())
            if self.samples is None or rnd != self.round:
                if self.samples is not None:
                    self.samples.close()
                self.samples = tqdm(
                    total=total,
                    desc=f"round {rnd} samples streamed",
                    unit="sample",
                    file=self.file,
                    position=1,
                    leave=False,
                    dynamic_ncols=True,
                    disable=self.disable,
                )
                self.round = rnd
            self.samples.update(max(0, landed - self.samples.n))
        elif m := ROUND_DONE.search(line):
            if self.samples is not None:  # the round's frames have all landed: its samples bar is done
                self.samples.close()
                self.samples = None
            bar = self._rounds_bar(int(m.group(2)))
            bar.update(max(0, int(m.group(1)) - bar.n))
        tqdm.write(line.rstrip(), file=self.file)

    def close(self) -> None:
        """End the bars (the last state stays on screen)."""
        for bar in (self.samples, self.rounds):
            if bar is not None:
                bar.close()
        self.samples = self.rounds = None


def line_printer(quiet: bool) -> Callable[[str], None]:
    """Print the run's own lines (no bars), or nothing when ``quiet``."""

    def on_line(line: str) -> None:
        if quiet or not line.strip() or any(n in line for n in NOISE):
            return
        print(line.rstrip(), file=sys.stderr, flush=True)

    return on_line


__all__ = ["NOISE", "RunProgress", "line_printer"]
