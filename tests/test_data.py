"""Splits and partitions of the bundled task."""

import collections

import pytest

from mobiflower.platform.data import Example, partition, split_corpus, subsample, task_samples


def _fake(n=1000, pos=0.6):
    return [Example(id=i, text=f"t{i}", label=int(i < n * pos)) for i in range(n)]


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
    assert max(map(len, iid)) - min(map(len, iid)) <= 1
    skewed = partition(ex, 8, "dirichlet", alpha=0.1, seed=0)
    assert sorted(e.id for p in skewed for e in p) == list(range(1000))
    assert all(skewed)
    shares = [sum(e.label for e in p) / len(p) for p in skewed]
    assert max(shares) - min(shares) > 0.5  # alpha 0.1: devices dominated by one label
    assert partition(ex, 8, "dirichlet", alpha=0.1, seed=0)[0] == skewed[0]
    with pytest.raises(ValueError, match="unknown partition scheme"):
        partition(ex, 2, "zipf")


def test_real_corpus_counts(real_assets):
    splits = task_samples(train=None, validation=None, test=None)
    total = len(splits.train) + len(splits.validation) + len(splits.test)
    assert total == 12808
    labels = collections.Counter(e.label for e in splits.train + splits.validation + splits.test)
    assert labels == {1: 7403, 0: 5405}
    small = task_samples(200, 50, 100)
    assert len(small.train) == 200 and sum(e.label for e in small.train) == 100
