"""How a simulated fleet's data is split over its devices, with ``flwr-datasets`` partitioners.

IID and Dirichlet (over labels) partitions, one device per user (``NaturalIdPartitioner``), and a
device's share of the bundled job's fixed pools. This is the devices' side of a simulation (a real
device reads its own file and needs none of it), and it speaks Flower's data library, so it lives in
``clients/``, not in the Flower-free core.
"""

from __future__ import annotations

import contextlib
import io
import random
import warnings
from typing import Sequence

import numpy as np

from mobiflower.platform.data import DataError, Splits, users_by_size
from mobiflower.platform.tasks import Example

DIRICHLET_MIN_SIZE = 10
"""Samples each device should get from a Dirichlet draw (flwr-datasets redraws up to 10 times to meet
it); where no draw does (small alpha, many devices) the first draw stands and a device left with no
training samples says so (:class:`mobiflower.platform.data.NoTrainingData`)."""


def _table(columns: dict[str, list]):
    """A Hugging Face dataset of the columns a partitioner reads (row positions, labels, users)."""
    import datasets

    datasets.disable_progress_bars()
    return datasets.Dataset.from_dict(columns)


def partition(
    examples: Sequence[Example], num_devices: int, scheme: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[list[Example]]:
    """Split ``examples`` across devices with a ``flwr-datasets`` partitioner: ``iid`` (equal sizes) or
    ``dirichlet`` over labels (small alpha: devices dominated by a few labels). The samples are put in a
    seeded random order first (numpy's permutation for ``seed``), so a file sorted by label or by user
    does not hand device 0 its first rows; each device's samples come back in their original order.
    (``iid`` over that permutation gives every device the samples the hand-written partitioner of the
    bundled job gave it before flwr-datasets: the bundled job's split is unchanged.)"""
    if scheme not in ("iid", "dirichlet"):
        raise ValueError(f"unknown partition scheme {scheme!r}: use 'iid' or 'dirichlet' (or natural_partition)")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    if len(examples) < num_devices:
        raise DataError(f"cannot give {num_devices} devices at least one sample each from {len(examples)} samples")
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(examples))]
    if scheme == "iid":
        from flwr_datasets.partitioner import IidPartitioner

        parts = _assign(IidPartitioner(num_partitions=num_devices), _table({"at": order}), num_devices)
    else:
        parts = _dirichlet(examples, order, num_devices, alpha, seed)
    return [[examples[i] for i in sorted(part)] for part in parts]


def _assign(partitioner, table, num_devices: int) -> list[list[int]]:
    partitioner.dataset = table
    return [partitioner.load_partition(d)["at"][:] for d in range(num_devices)]


def _dirichlet(examples: Sequence[Example], order: list[int], num_devices: int, alpha: float, seed: int):
    """Dirichlet(alpha) shares of each label per device (flwr-datasets' DirichletPartitioner)."""
    from flwr_datasets.partitioner import DirichletPartitioner

    if alpha <= 0:
        raise DataError(f"dirichlet-alpha={alpha} must be > 0")
    labels = [examples[i].label for i in order]
    if min(labels) < 0:
        raise DataError("partitioning = 'dirichlet' splits by label and these samples have none: use iid or natural")
    table = _table({"at": order, "label": labels})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flwr-datasets warns on every redraw
        for min_size in (DIRICHLET_MIN_SIZE, 0):
            partitioner = DirichletPartitioner(
                num_devices, "label", alpha, min_partition_size=min_size, self_balancing=False, seed=seed
            )
            try:
                return _assign(partitioner, table, num_devices)
            except ValueError:  # no draw met the minimum: take the first draw as it is
                continue
    raise AssertionError("unreachable: a minimum size of 0 is always met")


def natural_partition(examples: Sequence[Example], num_devices: int = 0) -> list[tuple[str, list[Example]]]:
    """One device per user (``NaturalIdPartitioner`` over the user column): device ``i`` is the user with
    the ``i``-th most samples, ``num_devices = 0`` takes every user. Samples without a user belong to no
    device. Returns ``(user, samples)`` per device."""
    ranked = users_by_size(examples)
    if not ranked:
        raise DataError(
            "partitioning = 'natural' needs a user id per sample and these samples have none: "
            "set user-column to the column that names who wrote each row"
        )
    if num_devices > len(ranked):
        raise DataError(
            f"partitioning = 'natural' gives one device per user and the data has {len(ranked)} users, "
            f"not {num_devices}: run {len(ranked)} devices or fewer (the users with most samples)"
        )
    chosen = [user for user, _ in ranked[: num_devices or len(ranked)]]
    wanted = set(chosen)
    at = [i for i, e in enumerate(examples) if e.user in wanted]
    from flwr_datasets.partitioner import NaturalIdPartitioner

    partitioner = NaturalIdPartitioner(partition_by="user")
    partitioner.dataset = _table({"at": at, "user": [examples[i].user for i in at]})
    assert partitioner.num_partitions == len(chosen)  # builds its device -> user map
    device_of = {user: d for d, user in partitioner.partition_id_to_natural_id.items()}
    with contextlib.redirect_stderr(io.StringIO()):  # the partitioner draws a progress bar
        parts = {user: partitioner.load_partition(device_of[user])["at"][:] for user in chosen}
    return [(user, [examples[i] for i in parts[user]]) for user in chosen]


def share_of_pools(splits: Splits, partition_id: int, num_partitions: int, scheme: str, alpha: float, seed: int):
    """Device ``partition_id``'s share of fixed train / validation / test pools (the bundled job's).

    ``iid`` splits each pool on its own (every device gets an equal share of each); ``dirichlet``
    partitions the three pools together, so a device's held-out samples are those of its own share
    that came from the held-out pools and follow its own label mix.
    """
    if scheme == "iid":
        pools = (splits.train, splits.validation, splits.test)
        train, validation, test = (
            partition(pool, num_partitions, "iid", seed=seed + k)[partition_id] for k, pool in enumerate(pools)
        )
    else:
        pooled = [*splits.train, *splits.validation, *splits.test]
        mine = partition(pooled, num_partitions, scheme, alpha, seed)[partition_id]
        held = {e.id for e in splits.validation}, {e.id for e in splits.test}
        train = [e for e in mine if e.id not in held[0] and e.id not in held[1]]
        validation = [e for e in mine if e.id in held[0]]
        test = [e for e in mine if e.id in held[1]]
    train = list(train)
    random.Random(seed * 1009 + partition_id).shuffle(train)  # chunks mix labels: streamed batches are not one-class
    return Splits(train=train, validation=list(validation), test=list(test))
