"""Partitions: how a pool of labelled samples is dealt out to clients.

Every function here is a pure function of its arguments (the seed included), so every method in a
benchmark sees exactly the same clients.
"""

from __future__ import annotations

import numpy as np

from fedcoe_bench.errors import DataError


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 10, max_draws: int = 100) -> list[np.ndarray]:
    """Label-skewed split: for every class c, its samples go to clients in proportions q_c ~ Dir(alpha).

    Smaller alpha means more skew (alpha -> 0: one class per client; alpha -> inf: IID). A draw in
    which some client gets fewer than ``min_size`` samples is redrawn, at most ``max_draws`` times
    (Hsu, Qi & Brown, 2019; Wang et al., 2020).

    Example:
        >>> parts = dirichlet(np.repeat(np.arange(4), 50), num_clients=5, alpha=0.5, seed=0, min_size=5)
        >>> sorted(np.concatenate(parts).tolist()) == list(range(200))
        True
    """
    if alpha <= 0:
        raise DataError(f"data.alpha must be > 0 (got {alpha}); smaller values mean more label skew, e.g. --data.alpha 0.3")
    _check_sizes(len(labels), num_clients, min_size)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_draws):
        shares: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            q = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(q)[:-1] * len(idx)).astype(int)
            for i, part in enumerate(np.split(idx, cuts)):
                shares[i].append(part)
        parts = [np.sort(np.concatenate(s)) for s in shares]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(
        f"no Dirichlet({alpha}) partition of {len(labels)} samples over {num_clients} clients gave every "
        f"client >= {min_size} samples in {max_draws} draws; raise data.alpha, lower data.num_clients "
        f"or lower data.min_size"
    )


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int,
           min_size: int = 1) -> list[np.ndarray]:
    """Pathological split (McMahan et al., 2017): sort by label, cut into equal shards, deal
    ``shards_per_client`` random shards to each client, so a client sees about that many classes."""
    _check_sizes(len(labels), num_clients * shards_per_client, min_size)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    pieces = np.array_split(order, num_clients * shards_per_client)
    deal = rng.permutation(len(pieces)).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[j] for j in row])) for row in deal]


def iid(labels: np.ndarray, num_clients: int, seed: int, min_size: int = 1) -> list[np.ndarray]:
    """Uniformly random split into near-equal parts."""
    _check_sizes(len(labels), num_clients, min_size)
    order = np.random.default_rng(seed).permutation(len(labels))
    return [np.sort(p) for p in np.array_split(order, num_clients)]


def _check_sizes(samples: int, parts: int, min_size: int) -> None:
    if parts < 1:
        raise DataError(f"data.num_clients must be >= 1 (got {parts})")
    if samples < parts * max(min_size, 1):
        raise DataError(
            f"{samples} samples cannot give {parts} clients (or shards) {max(min_size, 1)} samples each; "
            f"lower data.num_clients or data.min_size"
        )


def split_local(labels: np.ndarray, idx: np.ndarray, train_fraction: float,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split one client's indices into local train / local test, stratified by class where a class has
    at least two samples; every client keeps at least one sample on each side."""
    train, test = [], []
    for c in np.unique(labels[idx]):
        own = rng.permutation(idx[labels[idx] == c])
        k = round(train_fraction * len(own)) if len(own) > 1 else 1
        train.append(own[:k])
        test.append(own[k:])
    train, test = np.concatenate(train), np.concatenate(test)
    if len(test) == 0:  # all classes singletons: move one sample over
        train, test = train[:-1], train[-1:]
    if len(train) == 0:
        train, test = test[:1], test[1:]
    return np.sort(train), np.sort(test)
