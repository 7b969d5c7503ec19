"""Partitions: disjoint, covering, seeded; readable errors; cold-start clients and local splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedcoe_bench.data import DataError, FederatedData, Synthetic
from fedcoe_bench.data.partition import dirichlet, iid, shards

LABELS = np.repeat(np.arange(10), 30)  # 300 samples, 10 classes
np.random.default_rng(5).shuffle(LABELS)


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    """Every index 0..n-1 lies in exactly one part."""
    joined = np.concatenate(parts)
    assert len(joined) == n, "some index is missing or repeated"
    assert np.array_equal(np.sort(joined), np.arange(n))


# ---------------------------------------------------------------- Dirichlet
@pytest.mark.parametrize("alpha", [0.1, 0.5, 100.0])
def test_dirichlet_parts_are_disjoint_cover_the_pool_and_respect_min_size(alpha):
    parts = dirichlet(LABELS, num_clients=8, alpha=alpha, seed=3, min_size=12)
    assert len(parts) == 8
    assert_exact_cover(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 12


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    def mean_classes_per_client(alpha):
        return np.mean([len(np.unique(LABELS[p])) for p in dirichlet(LABELS, 8, alpha, seed=0, min_size=2)])

    assert mean_classes_per_client(0.05) < mean_classes_per_client(100.0)


def test_dirichlet_is_a_pure_function_of_the_seed():
    a = dirichlet(LABELS, 8, 0.3, seed=11, min_size=5)
    b = dirichlet(LABELS, 8, 0.3, seed=11, min_size=5)
    c = dirichlet(LABELS, 8, 0.3, seed=12, min_size=5)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def test_dirichlet_impossible_min_size_raises_a_readable_data_error():
    # more than samples / clients per client: impossible by counting
    with pytest.raises(DataError, match="data.min_size") as info:
        dirichlet(LABELS, num_clients=10, alpha=0.5, seed=0, min_size=31)
    assert "300 samples" in str(info.value) and "\n" not in str(info.value)
    # possible by counting, but no draw at alpha=0.01 gives every client 29 of 30 samples per client
    with pytest.raises(DataError, match="data.alpha") as info:
        dirichlet(LABELS, num_clients=10, alpha=0.01, seed=0, min_size=29, max_draws=20)
    msg = str(info.value)
    assert "29" in msg and "data.min_size" in msg and "\n" not in msg


@pytest.mark.parametrize("alpha", [0.0, -0.5])
def test_dirichlet_rejects_non_positive_alpha(alpha):
    with pytest.raises(DataError, match="data.alpha"):
        dirichlet(LABELS, 5, alpha, seed=0)
    with pytest.raises(DataError, match="data.alpha"):
        FederatedData(source=Synthetic(samples=100), alpha=alpha)


# ---------------------------------------------------------------- shards and IID
def test_shards_cover_the_pool_and_give_each_client_few_classes():
    labels = np.repeat(np.arange(10), 20)  # 20 shards of 10 samples: each shard holds exactly one class
    parts = shards(labels, num_clients=10, shards_per_client=2, seed=0)
    assert_exact_cover(parts, len(labels))
    assert all(len(p) == 20 for p in parts)
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)
    again = shards(labels, num_clients=10, shards_per_client=2, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again))


def test_iid_covers_the_pool_with_near_equal_parts():
    parts = iid(LABELS, num_clients=7, seed=0)
    assert_exact_cover(parts, len(LABELS))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert not np.array_equal(np.concatenate(parts), np.arange(len(LABELS)))  # shuffled, not cut in order


@pytest.mark.parametrize("fn", [lambda: shards(LABELS, 100, 4, seed=0), lambda: iid(LABELS, 301, seed=0)])
def test_shards_and_iid_refuse_more_parts_than_samples(fn):
    with pytest.raises(DataError, match="data.num_clients"):
        fn()


# ---------------------------------------------------------------- FederatedData.split
@pytest.mark.parametrize("scheme", ["dirichlet", "shards", "iid"])
@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_split_holds_out_cold_start_clients_and_splits_each_client_locally(tmp_path, scheme, fraction):
    data = FederatedData(source=Synthetic(samples=300), scheme=scheme, alpha=0.5, num_clients=10,
                         cold_start_fraction=fraction, train_fraction=0.8, min_size=10,
                         cache_dir=str(tmp_path))
    splits, cold = data.split(LABELS, seed=4)

    assert len(splits) == 10
    assert len(cold) == round(fraction * 10) == data.num_cold_start
    assert len(set(cold)) == len(cold) and all(0 <= c < 10 for c in cold)

    # the client's part, as the scheme deals it (split() enforces a min size of at least 2)
    if scheme == "dirichlet":
        parts = dirichlet(LABELS, 10, 0.5, 4, 10)
    elif scheme == "shards":
        parts = shards(LABELS, 10, 2, 4, 10)
    else:
        parts = iid(LABELS, 10, 4, 10)
    for (train, test), part in zip(splits, parts):
        assert len(train) >= 1 and len(test) >= 1
        assert not np.intersect1d(train, test).size, "local train and test overlap"
        assert np.array_equal(np.sort(np.concatenate([train, test])), part), "local splits must cover the part"
        # stratified: per class, the train share is the train fraction up to rounding (and one moved sample)
        for c in np.unique(LABELS[part]):
            n_c = int((LABELS[part] == c).sum())
            assert abs(int((LABELS[train] == c).sum()) - 0.8 * n_c) <= 1.5
    assert_exact_cover([np.concatenate(s) for s in splits], len(LABELS))

    # a pure function of the seed; another seed deals different clients or another cold-start set
    again, cold_again = data.split(LABELS, seed=4)
    assert cold_again == cold and all(np.array_equal(a[0], b[0]) for a, b in zip(splits, again))
    other, cold_other = data.split(LABELS, seed=5)
    assert cold_other != cold or any(not np.array_equal(a[0], b[0]) for a, b in zip(splits, other))


def test_setup_puts_cold_start_clients_aside(small_data):
    fed = small_data.setup(seed=0)
    ids = [c.id for c in fed.clients]
    new_ids = [c.id for c in fed.new_clients]
    assert len(new_ids) == 2 and len(ids) == 8
    assert sorted(ids + new_ids) == list(range(10))
    _, cold = small_data.split(small_data.source.load().train_y.numpy(), seed=0)
    assert new_ids == cold
    # the cached partition (second setup reads the file) is the same partition
    assert list(Path(small_data.cache_dir).glob("*.npz")), "the partition was not cached"
    again = small_data.setup(seed=0)
    for a, b in zip(fed.clients + fed.new_clients, again.clients + again.new_clients):
        assert a.id == b.id and a.train.tolist() == b.train.tolist() and a.test.tolist() == b.test.tolist()
