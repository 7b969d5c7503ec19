"""Partitions: every sample dealt once, min sizes met without redraws (up to 100,000 clients), seeded;
k classes per client; quantity skew; random (unstratified) local train / val / test splits; the
server's validation split; readable errors; the cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fedcoe_bench.data import DataError, FederatedData, Synthetic
from fedcoe_bench.data.partition import (
    SERVER, TEST, TRAIN, VAL, classes, dirichlet, fill_min_size, iid, shards, split_local,
)

LABELS = np.repeat(np.arange(10), 30)  # 300 samples, 10 classes
np.random.default_rng(5).shuffle(LABELS)

SCHEMES = {  # name -> owner = f(labels, num_clients, seed, min_size, quantity_skew)
    "dirichlet-0.1": lambda y, k, s, m, q: dirichlet(y, k, 0.1, s, m, q),
    "dirichlet-0.5": lambda y, k, s, m, q: dirichlet(y, k, 0.5, s, m, q),
    "dirichlet-100": lambda y, k, s, m, q: dirichlet(y, k, 100.0, s, m, q),
    "classes-2": lambda y, k, s, m, q: classes(y, k, 2, s, m, q),
    "classes-3": lambda y, k, s, m, q: classes(y, k, 3, s, m, q),
    "iid": lambda y, k, s, m, q: iid(y, k, s, m, q),
    "shards": lambda y, k, s, m, q: shards(y, k, 2, s, m),
}


def sizes(owner: np.ndarray, num_clients: int) -> np.ndarray:
    return np.bincount(owner, minlength=num_clients)


def classes_held(labels: np.ndarray, owner: np.ndarray, num_clients: int) -> np.ndarray:
    """Number of distinct classes of each client."""
    pairs = np.unique(owner * (labels.max() + 1) + labels)
    return np.bincount(pairs // (labels.max() + 1), minlength=num_clients)


# ---------------------------------------------------------------- every scheme
@pytest.mark.parametrize("scheme, skew", [(s, q) for s in SCHEMES for q in (0.0, 1.0) if not (s == "shards" and q)])
def test_schemes_deal_every_sample_to_one_client_meet_min_size_and_are_seeded(scheme, skew):
    deal = SCHEMES[scheme]
    owner = deal(LABELS, 8, 3, 12, skew)
    assert owner.shape == LABELS.shape and owner.min() >= 0 and owner.max() < 8, "a sample without a valid client"
    assert sizes(owner, 8).min() >= 12
    assert np.array_equal(owner, deal(LABELS, 8, 3, 12, skew)), "not a pure function of the seed"
    assert not np.array_equal(owner, deal(LABELS, 8, 4, 12, skew))


def test_dirichlet_small_alpha_is_more_skewed_than_large_alpha():
    def mean_classes_per_client(alpha):
        return classes_held(LABELS, dirichlet(LABELS, 8, alpha, seed=0, min_size=2), 8).mean()

    assert mean_classes_per_client(0.05) < mean_classes_per_client(100.0)


def test_dirichlet_meets_a_min_size_no_draw_would_reach():
    # 29 of the 30 samples per client at alpha 0.01: the old redraw loop gave up here
    owner = dirichlet(LABELS, num_clients=10, alpha=0.01, seed=0, min_size=29)
    assert sizes(owner, 10).min() >= 29
    with pytest.raises(DataError, match="data.min_size") as info:  # impossible by counting
        dirichlet(LABELS, num_clients=10, alpha=0.5, seed=0, min_size=31)
    assert "300 samples" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("alpha", [0.0, -0.5])
def test_dirichlet_rejects_non_positive_alpha(alpha):
    with pytest.raises(DataError, match="data.alpha"):
        dirichlet(LABELS, 5, alpha, seed=0)
    with pytest.raises(DataError, match="data.alpha"):
        FederatedData(source=Synthetic(samples=100), alpha=alpha)


def test_fill_min_size_lifts_small_clients_from_the_largest_only():
    owner = np.repeat(np.arange(6), [40, 25, 20, 9, 3, 0])  # 97 samples, clients 3, 4, 5 below 10
    filled = fill_min_size(owner, 6, 10, np.random.default_rng(0))
    before, after = sizes(owner, 6), sizes(filled, 6)
    assert after.sum() == before.sum() and after.min() >= 10
    assert after[3:].tolist() == [10, 10, 10], "a short client gets what it lacks, no more"
    # 18 samples move: clients 0 and 1 are cut down to a common level (65 - 18 = 47 = 24 + 23)
    assert after[2] == before[2] == 20 and sorted(after[:2].tolist()) == [23, 24]
    moved = owner != filled
    assert set(owner[moved].tolist()) <= {0, 1} and set(filled[moved].tolist()) <= {3, 4, 5}
    assert np.array_equal(fill_min_size(filled, 6, 10, np.random.default_rng(1)), filled), "nothing to do"


def test_the_partitioner_meets_min_size_at_100000_clients():
    labels = np.random.default_rng(0).integers(0, 10, 1_000_000)
    data = FederatedData(source=Synthetic(samples=1), alpha=0.1, num_clients=100_000, min_size=5,
                         quantity_skew=1.0, cache_dir="unused")
    p = data.split(labels, seed=0)
    dealt = p.client != SERVER
    assert np.bincount(p.client[dealt], minlength=100_000).min() >= 5
    for part in (TRAIN, TEST):
        assert np.bincount(p.client[dealt & (p.part == part)], minlength=100_000).min() >= 1


# ---------------------------------------------------------------- k classes per client, quantity skew
@pytest.mark.parametrize("k", [1, 2, 3, 10])
def test_classes_gives_every_client_exactly_k_classes_and_holds_every_class(k):
    owner = classes(LABELS, num_clients=20, classes_per_client=k, seed=1, min_size=6)
    assert classes_held(LABELS, owner, 20).tolist() == [k] * 20
    assert sizes(owner, 20).min() >= 6
    holders = np.bincount(np.unique(owner * 10 + LABELS) % 10, minlength=10)
    assert holders.min() >= 1 and holders.max() - holders.min() <= 1, "classes spread unevenly"


def test_classes_sets_differ_between_rounds_of_the_class_ring():
    owner = classes(LABELS, num_clients=30, classes_per_client=2, seed=0, min_size=2)
    pairs = {tuple(np.unique(LABELS[owner == c])) for c in range(30)}
    assert len(pairs) > 5, "only the 5 pairs of one round of the ring"


@pytest.mark.parametrize("k, clients, min_size, match", [
    (11, 5, 2, "data.classes_per_client must be in"),
    (1, 9, 2, "cannot hold all 10 classes"),
    (2, 100, 4, "class .* has 30 samples for 20 clients that need 2 each"),
])
def test_classes_refuses_what_it_cannot_deal(k, clients, min_size, match):
    with pytest.raises(DataError, match=match) as info:
        classes(LABELS, clients, k, seed=0, min_size=min_size)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("scheme", ["iid", "classes-3", "dirichlet-100"])
@pytest.mark.parametrize("sigma", [0.5, 1.0])
def test_quantity_skew_gives_log_normal_sizes_of_the_requested_spread(scheme, sigma):
    labels = np.random.default_rng(0).integers(0, 10, 500_000)
    log_sizes = np.log(sizes(SCHEMES[scheme](labels, 2000, 0, 2, sigma), 2000))
    assert abs(log_sizes.std() - sigma) < 0.1 * sigma


def test_without_quantity_skew_iid_parts_are_near_equal():
    owner = iid(LABELS, num_clients=7, seed=0)
    assert sizes(owner, 7).max() - sizes(owner, 7).min() <= 1
    assert len(np.unique(owner[:7])) > 1, "cut in order, not shuffled"


# ---------------------------------------------------------------- shards
def test_shards_cover_the_pool_and_give_each_client_few_classes():
    labels = np.repeat(np.arange(10), 20)  # 20 shards of 10 samples: each shard holds exactly one class
    owner = shards(labels, num_clients=10, shards_per_client=2, seed=0)
    assert sizes(owner, 10).tolist() == [20] * 10
    assert classes_held(labels, owner, 10).max() <= 2


@pytest.mark.parametrize("fn", [lambda: shards(LABELS, 100, 4, seed=0), lambda: iid(LABELS, 301, seed=0)])
def test_shards_and_iid_refuse_more_parts_than_samples(fn):
    with pytest.raises(DataError, match="data.num_clients"):
        fn()


# ---------------------------------------------------------------- local splits
def test_local_splits_are_drawn_at_random_not_per_class():
    labels = np.repeat(np.arange(10), 200)  # 4 clients of 500 samples, 50 per class
    owner = np.arange(2000) % 4
    deviation = 0.0
    for seed in range(3):
        part = split_local(owner, 4, 0.8, 0.1, np.random.default_rng(seed))
        for c in range(4):
            mine, test = owner == c, (owner == c) & (part == TEST)
            share = test.sum() / mine.sum()
            # a stratified split keeps each class's share within rounding (<= 1 sample) in every seed
            got = np.bincount(labels[test], minlength=10) - share * np.bincount(labels[mine], minlength=10)
            deviation = max(deviation, np.abs(got).max())
    assert deviation >= 3


@pytest.mark.parametrize("n", [2, 3, 5, 10, 101])
def test_local_split_sizes_and_one_sample_each_side(n):
    part = split_local(np.zeros(n, dtype=int), 1, 0.8, 0.1, np.random.default_rng(0))
    train, val, test = (int((part == p).sum()) for p in (TRAIN, VAL, TEST))
    assert train >= 1 and test >= 1 and train + val + test == n
    assert val == min(int(0.1 * n + 0.5), n - 2)
    assert train == min(max(int(0.8 * (n - val) + 0.5), 1), n - val - 1)
    assert split_local(np.zeros(n, dtype=int), 1, 0.8, 0.0, np.random.default_rng(0)).tolist().count(VAL) == 0


# ---------------------------------------------------------------- FederatedData.split
def make_data(tmp_path, **kw) -> FederatedData:
    args = dict(source=Synthetic(samples=300), scheme="dirichlet", alpha=0.5, num_clients=10,
                cold_start_fraction=0.2, min_size=10, cache_dir=str(tmp_path))
    return FederatedData(**{**args, **kw})


@pytest.mark.parametrize("scheme", ["dirichlet", "classes", "shards", "iid"])
@pytest.mark.parametrize("fraction", [0.2, 0.3])
def test_split_sets_aside_server_val_holds_out_cold_start_clients_and_splits_each_client(tmp_path, scheme, fraction):
    data = make_data(tmp_path, scheme=scheme, cold_start_fraction=fraction)
    p = data.split(LABELS, seed=4)

    assert len(p.cold) == round(fraction * 10) == data.num_cold_start
    assert len(set(p.cold)) == len(p.cold) and all(0 <= c < 10 for c in p.cold)
    server = p.client == SERVER
    assert server.sum() == 30 and (p.part[server] == VAL).all(), "10% of the pool for the server, all validation"
    assert set(p.client.tolist()) == {SERVER, *range(10)} and set(p.part.tolist()) == {TRAIN, VAL, TEST}
    for c in range(10):
        n = [len(p.indices(c, part)) for part in (TRAIN, VAL, TEST)]
        assert n[0] >= 1 and n[2] >= 1 and n[1] == int(0.1 * sum(n) + 0.5)

    # a pure function of the seed; another seed sets aside other samples and deals them otherwise
    again = data.split(LABELS, seed=4)
    assert again.cold == p.cold and np.array_equal(again.client, p.client) and np.array_equal(again.part, p.part)
    other = data.split(LABELS, seed=5)
    assert not np.array_equal(other.client == SERVER, server) and not np.array_equal(other.part, p.part)


def test_val_fraction_zero_turns_validation_off(tmp_path):
    p = make_data(tmp_path, val_fraction=0.0).split(LABELS, seed=0)
    assert (p.client != SERVER).all() and (p.part != VAL).all()


@pytest.mark.parametrize("kw, key", [(dict(val_fraction=1.0), "data.val_fraction"),
                                     (dict(val_fraction=-0.1), "data.val_fraction"),
                                     (dict(quantity_skew=-1.0), "data.quantity_skew"),
                                     (dict(scheme="shards", quantity_skew=0.5), "data.quantity_skew"),
                                     (dict(scheme="pathological"), "classes")])
def test_bad_data_keys_end_in_one_line_naming_the_key(tmp_path, kw, key):
    with pytest.raises(DataError, match=key) as info:
        make_data(tmp_path, **kw)
    assert "\n" not in str(info.value)


def test_a_pool_that_cannot_fill_the_clients_says_so_in_one_line(tmp_path):
    with pytest.raises(DataError) as info:
        make_data(tmp_path, num_clients=29).split(LABELS, seed=0)  # 270 dealt samples < 29 x 10
    msg = str(info.value)
    assert "300 samples" in msg and "data.val_fraction" in msg and "data.num_clients" in msg and "\n" not in msg


# ---------------------------------------------------------------- FederatedData.setup and the cache
def test_server_val_is_never_larger_than_the_global_test_split(tmp_path):
    # a pool of 3,000 would give 300; the test split has 40, so evaluating validation costs what testing does
    data = make_data(tmp_path, source=Synthetic(samples=3000, test_samples=40))
    fed = data.setup(seed=0)
    assert len(fed.val_y) == len(fed.test_y) == 40
    assert (data.split(data.source.load().train_y.numpy(), seed=0).client == SERVER).sum() == 300  # uncapped


def test_setup_gives_disjoint_splits_server_val_and_cold_start_clients(small_data):
    fed = small_data.setup(seed=0)
    ids, new_ids = [c.id for c in fed.clients], [c.id for c in fed.new_clients]
    assert len(new_ids) == 2 and len(ids) == 8 and sorted(ids + new_ids) == list(range(10))
    pool = small_data.source.load()
    p = small_data.split(pool.train_y.numpy(), seed=0)
    assert new_ids == p.cold
    # every pool sample lies in exactly one place: a client's train, val or test, or the server's val
    places = [c.train for c in fed.clients + fed.new_clients] + [c.val for c in fed.clients + fed.new_clients]
    places += [c.test for c in fed.clients + fed.new_clients]
    server = torch.from_numpy(np.flatnonzero(p.client == SERVER))
    assert torch.equal(torch.cat([*places, server]).sort().values, torch.arange(len(pool.train_y)))
    assert torch.equal(fed.val_x, pool.train_x[server]) and torch.equal(fed.val_y, pool.train_y[server])
    assert len(fed.val_y) == 40 and len(fed.test_y) == 100, "the global test split is the source's own"
    for c in fed.clients + fed.new_clients:
        assert c.train.tolist() == p.indices(c.id, TRAIN).tolist() and c.test.tolist() == p.indices(c.id, TEST).tolist()
        assert c.val.tolist() == p.indices(c.id, VAL).tolist() and c.num_train == len(c.train)


def test_the_cache_is_one_assignment_whatever_the_clients(small_data):
    fed = small_data.setup(seed=0)
    files = list(Path(small_data.cache_dir).glob("*.npz"))
    assert len(files) == 1, "the partition was not cached"
    with np.load(files[0]) as z:
        assert sorted(z.files) == ["client", "cluster", "cold", "part"] and len(z["client"]) == 400
        assert len(z["cluster"]) == 10, "one cluster per client, not per sample"
    again = small_data.setup(seed=0)  # read from the file
    for a, b in zip(fed.clients + fed.new_clients, again.clients + again.new_clients):
        assert a.id == b.id and all(torch.equal(getattr(a, s), getattr(b, s)) for s in ("train", "val", "test"))
    assert torch.equal(fed.val_y, again.val_y)
    files[0].write_bytes(b"damaged")  # recomputed, never trusted
    assert torch.equal(small_data.setup(seed=0).clients[0].test, fed.clients[0].test)


def test_label_histogram_counts_each_clients_split(small_data):
    fed = small_data.setup(seed=0)
    for split in ("train", "val", "test"):
        hist = fed.label_histogram(split=split)
        for row, c in zip(hist, fed.clients + fed.new_clients):
            assert row.tolist() == torch.bincount(fed.pool_y[getattr(c, split)], minlength=10).tolist()
