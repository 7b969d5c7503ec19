"""How a data source is split over clients: the ``data`` section of a config, which builds a :class:`~fedcoe_bench.data.federation.Federation`."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from fedcoe_bench.data import shift as shifts
from fedcoe_bench.data.federation import Client, Federation
from fedcoe_bench.data.partition import (
    SERVER, VAL, Partition, classes, dirichlet, iid, shards, split_local,
)
from fedcoe_bench.data.sources import SOURCES, DataError, DataSource


class FederatedData:
    """How a data source is split over clients.

    First a seeded ``val_fraction`` share of the pool, at most as many samples as the global test
    split, is set aside as the server's validation split (no client holds it; the global test split
    is the source's own; the cap keeps its evaluation no dearer than the test's, whatever the pool). The rest is dealt out to
    ``num_clients`` clients by ``scheme``; ``cold_start_fraction`` of them are held out as new
    clients; and every client's data is split uniformly at random into local train / validation /
    test (:func:`~fedcoe_bench.data.partition.split_local`).

    With ``shift``, the clients are then assigned to ``clusters`` balanced, seeded clusters
    (:func:`~fedcoe_bench.data.shift.assign_clusters`; label skew applies inside them, since the
    partition comes first), and every image a client holds carries its cluster's transform. Every
    client of a cluster in ``held_out_clusters`` is a cold-start client (a domain no training client
    has); ``cold_start_fraction`` then applies to the clients of the other clusters.

    Args:
        source: where the images come from (``mnist10k``, ``cifar10``, ``cifar100``,
            ``tinyimagenet``, ``synthetic``, or any :class:`DataSource` subclass given by class path).
        scheme: ``dirichlet`` (label skew with concentration ``alpha``), ``classes`` (exactly
            ``classes_per_client`` classes per client), ``shards`` (``shards_per_client``
            label-sorted shards each) or ``iid``.
        alpha: Dirichlet concentration, > 0; smaller is more skewed.
        num_clients: all clients, training and cold-start together.
        cold_start_fraction: share of clients held out entirely as new clients, in [0, 1).
        train_fraction: per-client local train share of what validation leaves; the rest is the
            client's local test split.
        val_fraction: share of the pool for the server's validation split, and of each client's
            data for its local validation split, in [0, 1); 0 turns validation off.
        cold_start_shots: labelled samples per present class a cold-start client takes from its
            local train split to fine-tune on (``cold_start_ft_acc``, see ``loop.cold_start_steps``).
        min_size: the fewest samples a client may get; met by moving samples from the largest
            clients, never by redrawing.
        shards_per_client: shards per client for ``scheme: shards``.
        classes_per_client: k for ``scheme: classes``.
        quantity_skew: sigma of log-normal client sizes, w_k ~ LogNormal(0, sigma) (FedLab, PFLlib);
            0 = sizes set by the scheme alone. Applies to ``dirichlet``, ``classes`` and ``iid``.
        shift: ``none``, ``rotate`` (cluster k of C rotated by 360 k / C degrees: 0/90/180/270 for
            C = 4), ``invert`` (255 - x in odd clusters), ``noise`` (Gaussian noise, std 100 k / (C - 1)
            grey levels, fixed per sample by the seed), ``relabel`` (a concept shift: images unchanged,
            cluster k's labels moved to (y + k) mod K), or the path of a user's transform: a function
            ``f(images, cluster, clusters, seed) -> images`` on uint8 ``[N, C, H, W]`` tensors (or a
            class whose instances, made without arguments, are one); see :mod:`fedcoe_bench.data.shift`.
        clusters: C, the number of clusters (with ``shift``).
        held_out_clusters: clusters whose clients are all cold-start clients (with ``shift``).
        cache_dir: where partitions are cached, keyed by a hash of everything that defines them.
    """

    def __init__(self, source: DataSource | str = "mnist10k", scheme: str = "dirichlet", alpha: float = 0.3,
                 num_clients: int = 50, cold_start_fraction: float = 0.2, train_fraction: float = 0.8,
                 val_fraction: float = 0.1, cold_start_shots: int = 5, min_size: int = 10, shards_per_client: int = 2,
                 classes_per_client: int = 2, quantity_skew: float = 0.0, shift: str = "none",
                 clusters: int = 4, held_out_clusters: list[int] = [],  # noqa: B006 (read, never mutated)
                 cache_dir: str = os.path.join("~", ".cache", "fedcoe_bench", "partitions")):
        if isinstance(source, str):
            if "." in source:  # a class path that jsonargparse could not import
                module = source.rpartition(".")[0]
                raise DataError(f"data.source '{source}' cannot be imported (is module '{module}' on the "
                                f"Python path? run from its folder or set PYTHONPATH)")
            if source not in SOURCES:
                raise DataError(f"unknown data.source '{source}'; choose one of {', '.join(SOURCES)} or give a DataSource class path")
            source = SOURCES[source]()
        if scheme not in SCHEMES:
            raise DataError(f"unknown data.scheme '{scheme}'; choose {', '.join(SCHEMES)}")
        if scheme == "dirichlet" and alpha <= 0:
            raise DataError(f"data.alpha must be > 0 (got {alpha}); smaller values mean more label skew, e.g. --data.alpha 0.3")
        if num_clients < 1:
            raise DataError(f"data.num_clients must be >= 1 (got {num_clients})")
        if not 0 <= cold_start_fraction < 1:
            raise DataError(f"data.cold_start_fraction must be in [0, 1) (got {cold_start_fraction})")
        if not 0 < train_fraction < 1:
            raise DataError(f"data.train_fraction must be in (0, 1) (got {train_fraction})")
        if not 0 <= val_fraction < 1:
            raise DataError(f"data.val_fraction must be in [0, 1) (got {val_fraction}); e.g. --data.val_fraction 0.1")
        if cold_start_shots < 1:
            raise DataError(f"data.cold_start_shots must be >= 1 (got {cold_start_shots}); to drop the fine-tuned "
                            f"cold-start column set loop.cold_start_steps 0")
        if quantity_skew < 0:
            raise DataError(f"data.quantity_skew must be >= 0 (got {quantity_skew}); 0 is off, 1 a strong spread")
        if quantity_skew > 0 and scheme == "shards":
            raise DataError("data.quantity_skew does not apply to data.scheme shards (equal shards); "
                            "use dirichlet, classes or iid")
        self.transform = shifts.resolve(shift)
        if self.transform is not None and not 1 <= clusters <= num_clients:
            raise DataError(f"data.clusters must be in [1, data.num_clients={num_clients}] (got {clusters})")
        held = sorted(set(held_out_clusters))
        if held and self.transform is None:
            raise DataError("data.held_out_clusters needs a feature shift to hold out (clusters differ only by "
                            "their transform); set --data.shift, e.g. rotate")
        if held and not 0 <= held[0] <= held[-1] < clusters:
            bad = held[0] if held[0] < 0 else held[-1]
            raise DataError(f"data.held_out_clusters names cluster {bad}, but data.clusters {clusters} has "
                            f"clusters 0 to {clusters - 1}")
        if held and len(held) == clusters:
            raise DataError(f"data.held_out_clusters holds out all {clusters} clusters, which leaves no training "
                            f"client; hold out fewer")
        self.shift, self.clusters, self.held_out_clusters = shift, clusters, held
        self.source, self.scheme, self.alpha = source, scheme, alpha
        self.num_clients, self.cold_start_fraction = num_clients, cold_start_fraction
        self.train_fraction, self.val_fraction, self.min_size = train_fraction, val_fraction, min_size
        self.cold_start_shots = cold_start_shots
        self.shards_per_client, self.classes_per_client = shards_per_client, classes_per_client
        self.quantity_skew, self.cache_dir = quantity_skew, cache_dir

    @property
    def num_cold_start(self) -> int:
        """Cold-start clients drawn by ``cold_start_fraction`` (with held-out clusters: besides their
        clients, drawn from the others; see :meth:`split`)."""
        return _half_up(self.cold_start_fraction * self.num_clients)

    def key(self, seed: int) -> str:
        shift_keys = ("shift", "transform", "clusters", "held_out_clusters")
        # the shots are drawn at evaluation (Federation.shots), so they are no part of the partition
        spec = {k: v for k, v in vars(self).items() if k not in ("source", "cache_dir", "cold_start_shots", *shift_keys)}
        if self.transform is not None:  # the clusters are part of the partition (the transform is not)
            spec.update(clusters=self.clusters, held_out_clusters=self.held_out_clusters)
        spec.update(source=self.source.fingerprint(), seed=seed, version=3)
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def split(self, labels: np.ndarray, seed: int, server_val_max: int | None = None) -> Partition:
        """Pure function of (labels, config, seed): every pool sample's client and part, the
        cold-start client ids and every client's cluster; the server's validation split holds at
        most ``server_val_max`` samples (the global test split's size, in :meth:`setup`)."""
        n, k = len(labels), self.num_clients
        min_size = max(self.min_size, 2)  # a client needs a local train and a local test sample
        size = int(self.val_fraction * n + 0.5)
        size = size if server_val_max is None else min(size, server_val_max)
        server_val = np.random.default_rng([seed, 2]).choice(n, size, replace=False)
        dealt = np.ones(n, dtype=bool)
        dealt[server_val] = False
        dealt = np.flatnonzero(dealt)
        if len(dealt) < k * min_size:
            aside = f" ({n - len(dealt)} set aside by data.val_fraction {self.val_fraction})" if len(dealt) < n else ""
            raise DataError(f"the pool's {n} samples{aside} cannot give {k} clients {min_size} samples each; "
                            f"lower data.num_clients or data.min_size, or use a larger data.source")
        y = labels[dealt]
        if self.scheme == "dirichlet":
            owner = dirichlet(y, k, self.alpha, seed, min_size, self.quantity_skew)
        elif self.scheme == "classes":
            owner = classes(y, k, self.classes_per_client, seed, min_size, self.quantity_skew)
        elif self.scheme == "shards":
            owner = shards(y, k, self.shards_per_client, seed, min_size)
        else:
            owner = iid(y, k, seed, min_size, self.quantity_skew)
        cluster = (np.zeros(k, dtype=np.int64) if self.transform is None
                   else shifts.assign_clusters(k, self.clusters, seed))
        held = np.isin(cluster, self.held_out_clusters)
        rest = np.flatnonzero(~held)  # all clients without held-out clusters: the same draw as before them
        rng = np.random.default_rng([seed, 1])
        drawn = rest[rng.choice(len(rest), _half_up(self.cold_start_fraction * len(rest)), replace=False)]
        cold = sorted(np.flatnonzero(held).tolist() + drawn.tolist())
        if len(cold) == k:
            raise DataError("no training clients left: lower data.cold_start_fraction, raise data.num_clients"
                            + (" or hold out fewer data.held_out_clusters" if held.any() else ""))
        client = np.full(n, SERVER, dtype=np.int32)
        client[dealt] = owner
        part = np.full(n, VAL, dtype=np.int8)
        part[dealt] = split_local(owner, k, self.train_fraction, self.val_fraction, rng)
        return Partition(client, part, cold, cluster)

    def setup(self, seed: int, device: torch.device | str = "cpu") -> Federation:
        """The federation of ``seed`` on ``device``; feature shift, if any, already applied."""
        images = self.source.load()
        labels = images.train_y.numpy()
        partition = self._cached_split(labels, seed, len(images.test_y))
        order, bounds = partition.grouped(self.num_clients)
        index = torch.from_numpy(order).to(device)  # one transfer; every client slices it
        cluster = partition.cluster.tolist()
        make = lambda i: Client(i, index, tuple(bounds[3 * i + 3 : 3 * i + 7]), cluster[i])
        cold = set(partition.cold)
        clients = [make(i) for i in range(self.num_clients) if i not in cold]
        fed = Federation(images, clients, [make(i) for i in partition.cold], self.source.num_classes, device,
                         val=index[bounds[VAL] : bounds[VAL + 1]], cold_start_shots=self.cold_start_shots)
        if self.transform is not None:
            owner = torch.from_numpy(partition.client.astype(np.int64))
            sample_cluster = torch.where(owner >= 0, torch.from_numpy(partition.cluster)[owner.clamp_min(0)], -1)
            fed.apply_shift(self.transform, self.shift, self.clusters, sample_cluster, seed, self.held_out_clusters)
        return fed

    def _cached_split(self, labels: np.ndarray, seed: int, server_val_max: int) -> Partition:
        path = Path(self.cache_dir).expanduser() / f"{self.key(seed)}.npz"
        if path.exists():
            try:
                with np.load(path) as z:
                    # files from before clusters existed share the key of a partition without shift
                    cluster = z["cluster"] if "cluster" in z.files else np.zeros(self.num_clients, dtype=np.int64)
                    cached = Partition(z["client"], z["part"], z["cold"].tolist(), cluster)
                if len(cached.client) == len(cached.part) == len(labels) and len(cluster) == self.num_clients:
                    return cached
            except (OSError, KeyError, ValueError):
                pass  # a damaged cache file is recomputed, never trusted
        partition = self.split(labels, seed, server_val_max)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, client=partition.client, part=partition.part,
                     cold=np.asarray(partition.cold, dtype=np.int64), cluster=partition.cluster)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs recomputation
        return partition


SCHEMES = ("dirichlet", "classes", "shards", "iid")


def _half_up(x: float) -> int:
    return int(x + 0.5)  # not Python's half-to-even
