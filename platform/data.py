"""The bundled sentiment data: Rotten Tomatoes snippets, splits and device partitions.

Labels: 0 = negative ("rotten"), 1 = positive ("fresh"). Every example keeps a stable integer id
(its row among the labelled rows of the corpus), so frames can name samples without carrying text.
Splits are deterministic and stratified; partitions across devices are IID or Dirichlet non-IID by
label, both seeded.
"""

from __future__ import annotations

import bz2
import csv
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from mobiflower.platform.tasks import Example

LABEL_NAMES = ("negative", "positive")
_CATEGORY_TO_LABEL = {"rotten": 0, "fresh": 1}


@dataclass(frozen=True)
class Splits:
    train: list[Example]
    validation: list[Example]
    test: list[Example]


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


def partition(
    examples: Sequence[Example], num_devices: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[list[Example]]:
    """Split ``examples`` across devices: ``iid`` (shuffled, equal sizes) or ``dirichlet`` by label.

    The Dirichlet scheme draws, for each label, the share each device gets from Dir(alpha): small
    alpha gives devices dominated by one label. Every device gets at least one example.
    """
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if len(examples) < num_devices:
        raise ValueError(f"cannot give {num_devices} devices at least one example each from {len(examples)}")
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        order = rng.permutation(len(examples))
        return [[examples[i] for i in sorted(chunk)] for chunk in np.array_split(order, num_devices)]
    if scheme != "dirichlet":
        raise ValueError(f"unknown partition scheme {scheme!r}: use 'iid' or 'dirichlet'")
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    parts: list[list[int]] = [[] for _ in range(num_devices)]
    for label in sorted({e.label for e in examples}):
        idx = np.array([i for i, e in enumerate(examples) if e.label == label])
        rng.shuffle(idx)
        shares = rng.dirichlet([alpha] * num_devices)
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for device, chunk in enumerate(np.split(idx, cuts)):
            parts[device] += chunk.tolist()
    # No device may be empty: move one example from the largest partition to each empty one.
    for device in range(num_devices):
        if not parts[device]:
            donor = max(range(num_devices), key=lambda d: len(parts[d]))
            parts[device].append(parts[donor].pop())
    return [[examples[i] for i in sorted(p)] for p in parts]


def partition_like(
    examples: Sequence[Example], reference: Sequence[Sequence[Example]], seed: int = 0
) -> list[list[Example]]:
    """Split held-out ``examples`` across devices with the label mix each device has in ``reference``.

    A device's validation and test samples must look like its own training data (that is what
    "its own held-out data" means under a non-IID split): each label's held-out examples are dealt
    to devices in proportion to how many of that label each holds in ``reference``. A device with
    none of a label gets none of it; with an empty reference a label is dealt evenly.
    """
    rng = np.random.default_rng(seed + 7919)
    parts: list[list[Example]] = [[] for _ in reference]
    for label in sorted({e.label for e in examples}):
        pool = [e for e in examples if e.label == label]
        rng.shuffle(pool)
        counts = np.array([sum(1 for e in ref if e.label == label) for ref in reference], dtype=float)
        shares = counts / counts.sum() if counts.sum() else np.full(len(reference), 1 / len(reference))
        cuts = np.round(np.cumsum(shares)[:-1] * len(pool)).astype(int)
        for device, chunk in enumerate(np.split(np.arange(len(pool)), cuts)):
            parts[device] += [pool[i] for i in chunk]
    return [sorted(p, key=lambda e: e.id) for p in parts]


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
