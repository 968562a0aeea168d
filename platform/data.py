"""Samples, splits and device partitions: the bundled Rotten Tomatoes pools, and how any data set is
shared across a simulated fleet.

Labels of the bundled corpus: 0 = negative ("rotten"), 1 = positive ("fresh"). Every example keeps a
stable integer id (its row among the labelled rows of the corpus, or its row in a user's file), so
frames can name samples without carrying text.

Partitions come from ``flwr-datasets`` partitioners (what FlowerTune apps use), not from code of our
own: ``iid`` (:class:`IidPartitioner`), ``dirichlet`` over labels (:class:`DirichletPartitioner`) and
``natural``, one device per user (:class:`NaturalIdPartitioner`). Each is seeded, so every device of a
run computes the same split on its own and no coordinator has to hand out samples.
"""

from __future__ import annotations

import bz2
import csv
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from mobiflower.platform.tasks import Example

LABEL_NAMES = ("negative", "positive")
_CATEGORY_TO_LABEL = {"rotten": 0, "fresh": 1}
SCHEMES = ("iid", "dirichlet", "natural")


class DataError(ValueError):
    """Data that cannot become a device's samples; the message names the file, column or row and says
    what to do about it."""


class NoTrainingData(DataError):
    """A device whose share of the data holds no training sample: it cannot take part in the run."""


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


# ---- the bundled Rotten Tomatoes pools ----------------------------------------------------------------
def load_corpus(path: str | Path | None = None) -> list[Example]:
    """All 12,808 labelled snippets (the corpus's plot summaries are skipped)."""
    if path is None:
        from mobiflower.platform.assets import resolve_corpus

        path = resolve_corpus()
    examples: list[Example] = []
    with bz2.open(path, "rt", encoding="utf-8", newline="") as handle:
        for row in csv.DictReader(handle):
            label = _CATEGORY_TO_LABEL.get(row["category"])
            if label is not None and row["text"].strip():
                examples.append(Example(id=len(examples), text=row["text"], label=label))
    return examples


def split_corpus(examples: Sequence[Example], val_frac: float = 0.1, test_frac: float = 0.1, seed: int = 0) -> Splits:
    """Stratified train / validation / test split, the same for a given seed on every machine."""
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError(f"val_frac={val_frac} and test_frac={test_frac} must be in [0, 1) and sum below 1")
    rng = random.Random(seed)
    train, val, test = [], [], []
    for label in sorted({e.label for e in examples}):
        group = [e for e in examples if e.label == label]
        rng.shuffle(group)
        n_test, n_val = round(len(group) * test_frac), round(len(group) * val_frac)
        test += group[:n_test]
        val += group[n_test : n_test + n_val]
        train += group[n_test + n_val :]
    for part in (train, val, test):
        part.sort(key=lambda e: e.id)
    return Splits(train=train, validation=val, test=test)


def subsample(examples: Sequence[Example], n: int | None, seed: int = 0, balanced: bool = True) -> list[Example]:
    """``n`` examples in a seeded random order; ``balanced`` takes equal counts per label."""
    pool = list(examples)
    rng = random.Random(seed)
    if n is None or n >= len(pool):
        rng.shuffle(pool)
        return pool
    if n <= 0:
        raise ValueError(f"sample count must be positive, got {n}")
    if not balanced:
        return rng.sample(pool, n)
    labels = sorted({e.label for e in pool})
    picked: list[Example] = []
    for i, label in enumerate(labels):
        group = [e for e in pool if e.label == label]
        want = n // len(labels) + (1 if i < n % len(labels) else 0)
        if want > len(group):
            raise ValueError(f"cannot take {want} examples of label {label}: only {len(group)} exist")
        picked += rng.sample(group, want)
    rng.shuffle(picked)
    return picked


def task_samples(
    train: int | None = 2000,
    validation: int | None = 500,
    test: int | None = 1000,
    seed: int = 0,
    path: str | Path | None = None,
) -> Splits:
    """The samples every method of one comparison uses: balanced draws from the fixed splits.

    The split itself is fixed (seed 0); ``seed`` only picks which samples of each split are used,
    so every method with the same arguments trains and is scored on exactly the same snippets.
    """
    splits = split_corpus(load_corpus(path))
    return Splits(
        train=subsample(splits.train, train, seed=seed),
        validation=subsample(splits.validation, validation, seed=seed),
        test=subsample(splits.test, test, seed=seed),
    )


# ---- a device's own held-out samples ------------------------------------------------------------------
def held_out_count(n: int, fraction: float) -> int:
    """How many of ``n`` samples a fraction holds out: rounded, and at least one when the fraction is
    positive and ``n >= 3`` (so a small device still has something to be scored on, and trains on one)."""
    count = round(n * fraction)
    return 1 if count == 0 and fraction > 0 and n >= 3 else count


def split_own(examples: Sequence[Example], validation: float = 0.1, test: float = 0.1, seed: int = 0) -> Splits:
    """A device's own samples into train / validation / test by seeded fractions.

    Labels are spread evenly over the three parts (each label's samples are shuffled and interleaved by
    their rank within the label before the cut), so a small labelled device keeps its label mix in its
    held-out parts. Training samples come in a seeded random order (streamed chunks mix labels);
    held-out ones by id. The same samples and seed give the same split on every machine.
    """
    if not (0 <= validation < 1 and 0 <= test < 1 and validation + test < 1):
        raise DataError(
            f"validation-fraction={validation} and test-fraction={test} must each be in [0, 1) and sum below 1"
        )
    rng = random.Random(seed)
    groups: dict[int, list[Example]] = {}
    for e in sorted(examples, key=lambda e: e.id):
        groups.setdefault(e.label, []).append(e)
    keyed = []
    for label, group in sorted(groups.items()):
        rng.shuffle(group)
        keyed += [((j + 0.5) / len(group), label, e) for j, e in enumerate(group)]
    order = [e for *_, e in sorted(keyed, key=lambda k: (k[0], k[1]))]
    n_test, n_val = held_out_count(len(order), test), held_out_count(len(order), validation)
    while n_test + n_val >= len(order) and n_test + n_val:  # at least one sample is left to train on
        n_val, n_test = (n_val - 1, n_test) if n_val >= n_test else (n_val, n_test - 1)
    train = order[n_test + n_val :]
    rng.shuffle(train)
    by_id = lambda part: sorted(part, key=lambda e: e.id)  # noqa: E731
    return Splits(train=train, validation=by_id(order[n_test : n_test + n_val]), test=by_id(order[:n_test]))


def users_by_size(examples: Sequence[Example]) -> list[tuple[str, int]]:
    """Every user with samples and how many, most samples first (ties by user id): the order devices of a
    natural partition take (``num_devices = N``: the N users with most samples)."""
    counts = Counter(e.user for e in examples if e.user)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))
