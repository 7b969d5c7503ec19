"""Partitions: how a pool of labelled samples is dealt out to clients.

Every function here is a pure function of its arguments (the seed included), so every method in a
benchmark sees exactly the same clients. A scheme returns an *owner* array (the client of every
sample), computed with whole-array numpy operations: 1,000,000 samples over 100,000 clients take
about a second, with no per-client Python and no redraws.

    >>> owner = iid(np.repeat(np.arange(3), 10), num_clients=4, seed=0, min_size=5)
    >>> np.bincount(owner).tolist()
    [7, 8, 7, 8]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcoe_bench.errors import DataError

TRAIN, VAL, TEST = 0, 1, 2  # the codes of Partition.part
SERVER = -1  # the client code of the server's validation split


@dataclass
class Partition:
    """Where every pool sample goes: its client (``SERVER`` for the server's validation split) and
    its part of that client's data (``TRAIN``, ``VAL`` or ``TEST``); the cold-start client ids; and
    every client's feature-shift cluster (None: one cluster).

    Two arrays of the pool's length describe any number of clients, so the cached file does not
    grow with the federation beyond one int32 and one int8 per sample (and one int per client).
    """

    client: np.ndarray  # int32 [N]
    part: np.ndarray  # int8 [N]
    cold: list[int]
    cluster: np.ndarray | None = None  # int64 [clients]

    def grouped(self, num_clients: int) -> tuple[np.ndarray, list[int]]:
        """Pool indices sorted by (client, part), ascending within each group, and the group bounds:
        group ``g = 3 * (client + 1) + part`` is ``order[bounds[g] : bounds[g + 1]]``.

        Example:
            >>> p = Partition(np.array([1, 0, SERVER, 0]), np.array([TEST, TRAIN, VAL, TEST]), [])
            >>> order, bounds = p.grouped(2)
            >>> order.tolist(), bounds
            ([2, 1, 3, 0], [0, 0, 1, 1, 2, 2, 3, 3, 3, 4])
        """
        key = 3 * (self.client.astype(np.int64) + 1) + self.part
        order = np.argsort(key, kind="stable")
        counts = np.bincount(key, minlength=3 * (num_clients + 1))
        return order, [0, *np.cumsum(counts).tolist()]

    def indices(self, client: int, part: int) -> np.ndarray:
        """The pool indices of one client's part (ascending); a per-client view for tests and tools."""
        return np.flatnonzero((self.client == client) & (self.part == part))


def client_weights(num_clients: int, quantity_skew: float, rng: np.random.Generator) -> np.ndarray:
    """Relative client sizes: w_k ~ LogNormal(0, sigma) with sigma = ``quantity_skew`` (FedLab's
    unbalanced split; PFLlib's quantity skew), all ones when it is 0 (no random numbers drawn).
    A scheme deals each client a share of the pool proportional to w_k, so std(log size) ~ sigma."""
    if quantity_skew <= 0:
        return np.ones(num_clients)
    return rng.lognormal(0.0, quantity_skew, num_clients)


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_size: int = 10, quantity_skew: float = 0.0) -> np.ndarray:
    """Label-skewed split: for every class c, its samples go to clients in proportions q_c ~ Dir(alpha)
    (Hsu, Qi & Brown, 2019), scaled by the client weights of :func:`client_weights`:
    share of client k in class c = q_ck w_k / sum_j q_cj w_j.

    Smaller alpha means more skew (alpha -> 0: one class per client; alpha -> inf: IID). Drawn once;
    clients below ``min_size`` are then filled from the largest clients (:func:`fill_min_size`)
    instead of redrawing, so the cost does not grow with the number of clients.

    Example:
        >>> owner = dirichlet(np.repeat(np.arange(4), 50), num_clients=5, alpha=0.5, seed=0, min_size=5)
        >>> len(owner), int(np.bincount(owner, minlength=5).min()) >= 5
        (200, True)
    """
    if alpha <= 0:
        raise DataError(f"data.alpha must be > 0 (got {alpha}); smaller values mean more label skew, e.g. --data.alpha 0.3")
    _check_sizes(len(labels), num_clients, min_size)
    rng = np.random.default_rng(seed)
    order, per_class = _by_class(labels, rng)
    q = rng.dirichlet(np.full(num_clients, alpha), size=len(per_class))  # [classes, clients]
    q *= client_weights(num_clients, quantity_skew, rng)
    counts = _deal(per_class, np.repeat(np.arange(len(per_class)), num_clients), q.ravel())
    owner = np.empty(len(labels), dtype=np.int64)
    owner[order] = np.repeat(np.tile(np.arange(num_clients), len(per_class)), counts)
    return fill_min_size(owner, num_clients, min_size, rng)


def classes(labels: np.ndarray, num_clients: int, classes_per_client: int, seed: int,
            min_size: int = 1, quantity_skew: float = 0.0) -> np.ndarray:
    """Pathological split (PFLlib's ``pat``, FedLab's k classes per client): every client holds
    exactly ``classes_per_client`` = k classes, and every class is held by floor or ceil(Kk / C)
    clients (:func:`_class_sets`). Each holder of a class gets
    ceil(min_size / k) of its samples, so every client reaches ``min_size`` without moving samples
    between classes; the rest of the class goes to its holders in proportion to the client weights.

    Example:
        >>> labels = np.repeat(np.arange(5), 20)
        >>> owner = classes(labels, num_clients=6, classes_per_client=2, seed=0, min_size=4)
        >>> sorted({len(np.unique(labels[owner == k])) for k in range(6)})
        [2]
    """
    classes_ = np.unique(labels)
    c, k = len(classes_), classes_per_client
    if not 1 <= k <= c:
        raise DataError(f"data.classes_per_client must be in [1, {c}] for {c} classes (got {k})")
    if num_clients * k < c:
        raise DataError(f"{num_clients} clients with data.classes_per_client {k} cannot hold all {c} classes; "
                        f"raise data.classes_per_client or data.num_clients")
    rng = np.random.default_rng(seed)
    order, per_class = _by_class(labels, rng)
    pair_class = _class_sets(num_clients, k, c, rng).ravel()
    pair_client = np.repeat(np.arange(num_clients), k)
    by_class = np.argsort(pair_class, kind="stable")
    pair_class, pair_client = pair_class[by_class], pair_client[by_class]
    held = np.bincount(pair_class, minlength=c)
    floor = -(-max(min_size, 1) // k)  # ceil: k classes of `floor` samples reach min_size
    spare = per_class - floor * held
    if (spare < 0).any():
        j = int(np.argmin(spare))
        raise DataError(f"class {classes_[j]} has {per_class[j]} samples for {held[j]} clients that need {floor} each "
                        f"(data.min_size {min_size} over data.classes_per_client {k}); lower data.num_clients or "
                        f"data.min_size, or raise data.classes_per_client")
    weights = client_weights(num_clients, quantity_skew, rng)[pair_client]
    counts = floor + _deal(spare, pair_class, weights)
    owner = np.empty(len(labels), dtype=np.int64)
    owner[order] = np.repeat(pair_client, counts)
    return owner


def _class_sets(num_clients: int, k: int, c: int, rng: np.random.Generator) -> np.ndarray:
    """[clients, k] distinct classes per client, each class in floor or ceil(Kk / C) rows: the rows
    read k at a time from a sequence of independent random orders of the C classes (so each class
    is used once per order), and a row that spans two orders and so holds a class twice swaps its
    second copy with a random slot of another row where the swap creates no repeat either way."""
    orders = -(-num_clients * k // c)
    sets = np.argsort(rng.random((orders, c)), axis=1).ravel()[: num_clients * k].reshape(num_clients, k)
    srt = np.sort(sets, axis=1)
    for a in np.flatnonzero((srt[:, 1:] == srt[:, :-1]).any(axis=1)).tolist():  # at most one row per order
        row = sets[a].tolist()
        for j in [j for j in range(k) if row[j] in row[:j]]:
            while True:
                b, jb = int(rng.integers(num_clients)), int(rng.integers(k))
                other = sets[b].tolist()
                if other[jb] not in row and row[j] not in other:
                    row[j], sets[b, jb] = other[jb], row[j]
                    break
        sets[a] = row
    return sets


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int,
           min_size: int = 1) -> np.ndarray:
    """Pathological split (McMahan et al., 2017): sort by label, cut into equal shards, deal
    ``shards_per_client`` random shards to each client, so a client sees about that many classes."""
    pieces = num_clients * shards_per_client
    if len(labels) < pieces:
        raise DataError(f"{len(labels)} samples cannot be cut into {pieces} shards ({num_clients} clients x "
                        f"data.shards_per_client {shards_per_client}); lower data.num_clients or "
                        f"data.shards_per_client")
    _check_sizes(len(labels), num_clients, min_size)
    rng = np.random.default_rng(seed)
    deal = rng.permutation(pieces)
    owner_of_piece = np.empty(pieces, dtype=np.int64)
    owner_of_piece[deal] = np.repeat(np.arange(num_clients), shards_per_client)
    size, extra = divmod(len(labels), pieces)  # np.array_split's sizes: the first `extra` shards one longer
    piece_of_rank = np.repeat(np.arange(pieces), np.full(pieces, size) + (np.arange(pieces) < extra))
    owner = np.empty(len(labels), dtype=np.int64)
    owner[np.argsort(labels, kind="stable")] = owner_of_piece[piece_of_rank]
    return fill_min_size(owner, num_clients, min_size, rng)


def iid(labels: np.ndarray, num_clients: int, seed: int, min_size: int = 1,
        quantity_skew: float = 0.0) -> np.ndarray:
    """Uniformly random split; client sizes proportional to the client weights of
    :func:`client_weights` (near-equal parts without quantity skew)."""
    _check_sizes(len(labels), num_clients, min_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    weights = client_weights(num_clients, quantity_skew, rng)
    counts = _deal(np.array([len(labels)]), np.zeros(num_clients, dtype=np.int64), weights)
    owner = np.empty(len(labels), dtype=np.int64)
    owner[order] = np.repeat(np.arange(num_clients), counts)
    return fill_min_size(owner, num_clients, min_size, rng)


def fill_min_size(owner: np.ndarray, num_clients: int, min_size: int, rng: np.random.Generator) -> np.ndarray:
    """Give every client at least ``min_size`` samples by moving random samples away from the
    largest clients only: the largest are cut down to a common level L >= min_size (water-filling),
    so no client is touched that did not hold more than L, and a lifted client takes a block of one
    donor's samples, so it keeps a skewed label mix. Needs ``len(owner) >= num_clients * min_size``.

    Example:
        >>> fill_min_size(np.array([0, 0, 0, 0, 0, 1]), 3, 2, np.random.default_rng(0)).tolist().count(0)
        2
    """
    sizes = np.bincount(owner, minlength=num_clients)
    need = np.maximum(min_size - sizes, 0)
    short = int(need.sum())
    if short == 0:
        return owner
    excess = lambda level: int(np.maximum(sizes - level, 0).sum())
    lo, hi = min_size, int(sizes.max())  # excess(lo) >= short by counting; excess(hi) = 0 < short
    while hi - lo > 1:  # the highest level whose excess still covers the shortfall
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if excess(mid) >= short else (lo, mid)
    take = np.maximum(sizes - hi, 0)
    at_level = np.flatnonzero(sizes >= hi)  # each gives one more sample until the shortfall is met
    take[rng.choice(at_level, short - int(take.sum()), replace=False)] += 1
    order, start = _by_group(owner, num_clients, rng)
    rank = np.arange(len(owner)) - start[owner[order]]
    moving = order[rank < take[owner[order]]]  # grouped by donor
    owner = owner.copy()
    owner[moving] = np.repeat(np.arange(num_clients), need)
    return owner


def split_local(owner: np.ndarray, num_clients: int, train_fraction: float, val_fraction: float,
                rng: np.random.Generator) -> np.ndarray:
    """The part (``TRAIN``/``VAL``/``TEST``) of every sample of every client, drawn uniformly at
    random within each client, not per class (so a client's test labels are a sample of its data,
    not a copy of its label proportions).

    A client of n samples keeps round(val_fraction n) for validation (at most n - 2), then
    round(train_fraction m) of the m others for train and the rest for test, at least one each.

    Example:
        >>> part = split_local(np.zeros(10, dtype=int), 1, 0.8, 0.1, np.random.default_rng(0))
        >>> np.bincount(part).tolist()
        [7, 1, 2]
    """
    n = np.bincount(owner, minlength=num_clients)
    if num_clients and n.min() < 2:
        raise DataError(f"client {int(np.argmin(n))} holds {int(n.min())} sample(s), too few for a local train and "
                        f"test split; raise data.min_size to 2 or more")
    n_val = np.minimum(np.floor(val_fraction * n + 0.5).astype(np.int64), n - 2)
    rest = n - n_val
    n_train = np.clip(np.floor(train_fraction * rest + 0.5).astype(np.int64), 1, rest - 1)
    order, start = _by_group(owner, num_clients, rng)
    who = owner[order]
    rank = np.arange(len(owner)) - start[who]
    part = np.empty(len(owner), dtype=np.int8)
    part[order] = np.where(rank < n_train[who], TRAIN, np.where(rank < n_train[who] + n_val[who], VAL, TEST))
    return part


def _by_group(group: np.ndarray, num_groups: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices sorted by group, in random order within each group, and each group's first position."""
    shuffled = rng.permutation(len(group))
    order = shuffled[np.argsort(group[shuffled], kind="stable")]
    sizes = np.bincount(group, minlength=num_groups)
    return order, np.cumsum(sizes) - sizes


def _by_class(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices sorted by class (ascending label), random within a class, and each class's size."""
    _, inverse, per_class = np.unique(labels, return_inverse=True, return_counts=True)
    order, _ = _by_group(inverse.ravel(), len(per_class), rng)
    return order, per_class


def _deal(totals: np.ndarray, group: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Split ``totals[g]`` items over the entries of group g (``group`` sorted, every group non-empty)
    in proportion to ``weights``: entry i gets floor(T F_i) - floor(T F_{i-1}) with F the cumulative
    share within its group, so the counts sum to T exactly and each is within one of T w_i / sum w."""
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    cum = np.cumsum(weights, dtype=np.float64)
    before = np.r_[0.0, cum][starts]
    total_w = np.r_[cum[starts[1:] - 1], cum[-1]] - before
    gid = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(group)]))
    t = np.asarray(totals, dtype=np.int64)
    cut = np.minimum(np.floor((cum - before[gid]) / total_w[gid] * t[gid]).astype(np.int64), t[gid])
    cut[np.r_[starts[1:] - 1, len(group) - 1]] = t  # the last entry closes its group exactly
    prev = np.r_[0, cut[:-1]]
    prev[starts] = 0
    return cut - prev


def _check_sizes(samples: int, parts: int, min_size: int) -> None:
    if parts < 1:
        raise DataError(f"data.num_clients must be >= 1 (got {parts})")
    if samples < parts * max(min_size, 1):
        raise DataError(
            f"{samples} samples cannot give {parts} clients {max(min_size, 1)} samples each; "
            f"lower data.num_clients or data.min_size"
        )
