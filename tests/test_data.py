"""Splits and partitions: the bundled task's pools, flwr-datasets partitioners, a device's own held-out shares."""

import collections

import numpy as np
import pytest

from mobiflower.clients.partitions import natural_partition, partition, share_of_pools
from mobiflower.platform.data import (
    DataError,
    Example,
    Splits,
    split_corpus,
    split_own,
    subsample,
    task_samples,
    users_by_size,
)


def _fake(n=1000, pos=0.6, offset=0):
    return [Example(id=offset + i, text=f"t{i}", label=int(i < n * pos)) for i in range(n)]


def _ids(part):
    return [e.id for e in part]


def test_split_is_stratified_deterministic_and_disjoint():
    ex = _fake()
    a, b = split_corpus(ex, seed=3), split_corpus(ex, seed=3)
    assert [e.id for e in a.test] == [e.id for e in b.test]
    ids = [set(e.id for e in part) for part in (a.train, a.validation, a.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == len(ex)
    for part in (a.train, a.validation, a.test):
        share = sum(e.label for e in part) / len(part)
        assert abs(share - 0.6) < 0.02


def test_subsample_balanced():
    got = subsample(_fake(), 100, seed=1)
    assert len(got) == 100 and sum(e.label for e in got) == 50
    with pytest.raises(ValueError, match="cannot take"):
        subsample(_fake(100, pos=0.1), 50)


def test_partition_iid_and_dirichlet():
    ex = _fake()
    iid = partition(ex, 4, "iid", seed=0)
    assert sorted(e.id for p in iid for e in p) == list(range(1000))
    assert sorted(map(len, iid)) == [250] * 4
    order = np.random.default_rng(0).permutation(1000)  # the hand-written partitioner's draw, before flwr-datasets
    assert [_ids(p) for p in iid] == [sorted(int(i) for i in chunk) for chunk in np.array_split(order, 4)]
    skewed = partition(ex, 4, "dirichlet", alpha=0.1, seed=0)
    assert sorted(e.id for p in skewed for e in p) == list(range(1000))
    assert all(len(p) >= 10 for p in skewed)  # flwr-datasets redraws until every device has 10
    shares = [sum(e.label for e in p) / len(p) for p in skewed]
    assert max(shares) - min(shares) > 0.5  # alpha 0.1: devices dominated by one label
    assert partition(ex, 4, "dirichlet", alpha=0.1, seed=0)[0] == skewed[0]
    assert partition(ex, 4, "dirichlet", alpha=0.1, seed=1)[0] != skewed[0]
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(ex, 2, "zipf")
    with pytest.raises(DataError, match="cannot give 5 devices"):
        partition(ex[:4], 5)
    with pytest.raises(DataError, match="splits by label"):
        partition([Example(id=i, text="x") for i in range(10)], 2, "dirichlet")


def test_partition_shuffles_first_so_a_sorted_file_does_not_make_skewed_devices():
    ex = _fake(600, pos=0.5)  # sorted by label: the first 300 are positive
    for share in partition(ex, 3, "iid", seed=5):
        assert 0.35 < sum(e.label for e in share) / len(share) < 0.65
    assert [_ids(p) for p in partition(ex, 3, "iid", seed=5)] != [_ids(p) for p in partition(ex, 3, "iid", seed=6)]


def test_dirichlet_takes_the_first_draw_when_no_draw_gives_every_device_enough():
    ex = _fake(300, pos=0.5)
    parts = partition(ex, 24, "dirichlet", alpha=0.05, seed=0)  # far too many devices for alpha 0.05
    assert sorted(e.id for p in parts for e in p) == list(range(300))
    assert min(map(len, parts)) < 10  # the minimum could not be met: the first draw stands, no error
    assert parts == partition(ex, 24, "dirichlet", alpha=0.05, seed=0)


def test_natural_partition_gives_one_device_per_user_most_samples_first():
    users = ["ann"] * 5 + ["bob"] * 9 + ["cy"] * 2 + [""] * 3 + ["dee"] * 5
    ex = [Example(id=i, text=f"t{i}", user=u) for i, u in enumerate(users)]
    assert users_by_size(ex) == [("bob", 9), ("ann", 5), ("dee", 5), ("cy", 2)]
    every = natural_partition(ex)
    assert [u for u, _ in every] == ["bob", "ann", "dee", "cy"]
    for user, share in every:
        assert {e.user for e in share} == {user} and len(share) == users.count(user)
    top = natural_partition(ex, 2)
    assert [(u, sorted(_ids(s))) for u, s in top] == [(u, sorted(_ids(s))) for u, s in every[:2]]
    with pytest.raises(DataError, match="has 4 users, not 5"):
        natural_partition(ex, 5)
    with pytest.raises(DataError, match="user-column"):
        natural_partition(_fake(10))


def test_a_devices_own_split_by_fractions():
    ex = [Example(id=i, text=f"t{i}", label=i % 3) for i in range(100)]
    a, b = split_own(ex, 0.1, 0.2, seed=4), split_own(list(reversed(ex)), 0.1, 0.2, seed=4)
    assert (len(a.train), len(a.validation), len(a.test)) == (70, 10, 20)
    assert (_ids(a.train), _ids(a.validation), _ids(a.test)) == (_ids(b.train), _ids(b.validation), _ids(b.test))
    assert sorted(_ids(a.train) + _ids(a.validation) + _ids(a.test)) == list(range(100))
    assert _ids(split_own(ex, 0.1, 0.2, seed=5).test) != _ids(a.test)
    for part in (a.validation, a.test):  # every label held out in proportion
        counts = collections.Counter(e.label for e in part)
        assert max(counts.values()) - min(counts.values()) <= 1 and len(counts) == 3
    tiny = [split_own(ex[:n], 0.1, 0.1) for n in (1, 2, 3, 4)]
    assert [(len(s.train), len(s.validation), len(s.test)) for s in tiny] == [
        (1, 0, 0),
        (2, 0, 0),
        (1, 1, 1),
        (2, 1, 1),
    ]
    assert len(split_own(ex, 0.0, 0.0).train) == 100
    with pytest.raises(DataError, match="sum below 1"):
        split_own(ex, 0.5, 0.5)


def test_shares_of_the_bundled_pools_keep_their_counts_and_each_devices_label_mix():
    pools = Splits(train=_fake(400, 0.5), validation=_fake(100, 0.5, offset=1000), test=_fake(200, 0.5, offset=2000))
    iid = [share_of_pools(pools, i, 4, "iid", 0.1, seed=0) for i in range(4)]
    for name, size in (("train", 100), ("validation", 25), ("test", 50)):
        assert [len(getattr(s, name)) for s in iid] == [size] * 4
        assert sorted(e.id for s in iid for e in getattr(s, name)) == sorted(_ids(getattr(pools, name)))
    skewed = [share_of_pools(pools, i, 4, "dirichlet", 0.1, seed=3) for i in range(4)]
    for name in ("train", "validation", "test"):
        assert sorted(e.id for s in skewed for e in getattr(s, name)) == sorted(_ids(getattr(pools, name)))
    for share in skewed:  # a device's held-out samples follow its own label mix
        own = sum(e.label for e in share.train) / len(share.train)
        held = share.validation + share.test
        if len(held) >= 20:
            assert abs(sum(e.label for e in held) / len(held) - own) < 0.2


def test_real_corpus_counts(real_assets):
    splits = task_samples(train=None, validation=None, test=None)
    total = len(splits.train) + len(splits.validation) + len(splits.test)
    assert total == 12808
    labels = collections.Counter(e.label for e in splits.train + splits.validation + splits.test)
    assert labels == {1: 7403, 0: 5405}
    small = task_samples(200, 50, 100)
    assert len(small.train) == 200 and sum(e.label for e in small.train) == 100


def test_the_bundled_job_shares_the_same_pools_with_the_same_counts_per_device(real_assets):
    from mobiflower.clients.device_setup import DeviceSetup

    pools = task_samples(2000, 500, 1000, seed=0)
    shares = [DeviceSetup.from_configs({}, {"partition-id": i, "num-partitions": 4}).data() for i in range(4)]
    for name, per_device in (("train", 500), ("validation", 125), ("test", 250)):
        assert [len(getattr(s, name)) for s in shares] == [per_device] * 4
        assert sorted(e.id for s in shares for e in getattr(s, name)) == sorted(_ids(getattr(pools, name)))
    report = DeviceSetup.from_configs({}, {"partition-id": 1, "num-partitions": 4}).data_report().as_dict()
    assert (report["scheme"], report["seed"], report["train-samples"], report["train"]) == ("iid", 0, 2000, 500)


@pytest.mark.real_model
def test_the_bundled_jobs_device_split_is_the_one_it_always_had(real_assets):
    """flwr-datasets' partitioners give each device of the bundled job the very samples (and stream order)
    the hand-written partitioner gave it, so its figures stay comparable (ids pinned from that code)."""
    pools = task_samples(2000, 500, 1000, 0)
    first = [share_of_pools(pools, i, 4, "iid", 0.1, 0) for i in range(4)]
    assert [_ids(s.train[:3]) for s in first] == [
        [6757, 6123, 4291],
        [10088, 10450, 7237],
        [459, 6876, 12690],
        [12667, 5847, 9113],
    ]
    assert [_ids(s.test[:2]) for s in first] == [[9920, 3620], [6380, 4978], [1995, 12789], [8740, 7105]]
