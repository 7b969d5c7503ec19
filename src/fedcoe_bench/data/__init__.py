"""Federated data: a source's images dealt out to clients and kept on the device as uint8 tensors."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedcoe_bench.data.partition import dirichlet, iid, shards, split_local
from fedcoe_bench.data.sources import (
    CIFAR10, CIFAR100, MNIST10k, SOURCES, DataError, DataSource, Images, Synthetic,
)

__all__ = [
    "CIFAR10", "CIFAR100", "MNIST10k", "Synthetic", "DataError", "DataSource", "Images",
    "FederatedData", "Federation", "Client",
]


@dataclass
class Client:
    """One client's data: indices into the federation's pool (on the device)."""

    id: int
    train: torch.Tensor
    test: torch.Tensor

    @property
    def num_train(self) -> int:
        return len(self.train)


class Federation:
    """The pool, the global test split and the clients, all on one device.

    Images stay uint8 until a batch is drawn; :meth:`prepare` turns a batch into normalised
    floats and, for natural images during training, applies random crop (pad 4) + flip batched
    on the device: no per-sample Python, no DataLoader.
    """

    def __init__(self, images: Images, clients: list[Client], new_clients: list[Client],
                 num_classes: int, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.pool_x = images.train_x.to(self.device)
        self.pool_y = images.train_y.to(self.device)
        self.test_x = images.test_x.to(self.device)
        self.test_y = images.test_y.to(self.device)
        self.clients = [Client(c.id, c.train.to(self.device), c.test.to(self.device)) for c in clients]
        self.new_clients = [Client(c.id, c.train.to(self.device), c.test.to(self.device)) for c in new_clients]
        self.num_classes = num_classes
        self.augment = images.augment
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(images.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(images.std, device=self.device).view(shape) * 255
        # set by the loop to the model's format (channels-last convolutions want channels-last batches)
        self.memory_format: torch.memory_format = torch.contiguous_format

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """uint8 [B, C, H, W] -> normalised float in :attr:`memory_format`; augments when a generator is
        given and the data asks for it."""
        x = (x.float() - self.mean) / self.std
        if generator is None or not self.augment:
            return x.contiguous(memory_format=self.memory_format)
        b, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        dy = torch.randint(0, 9, (b, 1), generator=generator, device=self.device)
        dx = torch.randint(0, 9, (b, 1), generator=generator, device=self.device)
        flip = torch.rand((b, 1), generator=generator, device=self.device) < 0.5
        cols = torch.arange(w, device=self.device)
        cols = torch.where(flip, w - 1 - cols, cols) + dx
        rows = torch.arange(h, device=self.device) + dy
        batch = torch.arange(b, device=self.device)[:, None, None]
        out = padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return out.contiguous(memory_format=self.memory_format)

    def label_histogram(self, clients: list[Client] | None = None, split: str = "train") -> torch.Tensor:
        """[clients, classes] label counts of each client's ``split`` ('train' or 'test')."""
        clients = self.clients + self.new_clients if clients is None else clients
        return torch.stack([
            torch.bincount(self.pool_y[getattr(c, split)], minlength=self.num_classes) for c in clients
        ]).cpu()


class FederatedData:
    """How a data source is split over clients.

    Args:
        source: where the images come from (``mnist10k``, ``cifar10``, ``cifar100``, ``synthetic``,
            or any :class:`DataSource` subclass given by class path).
        scheme: ``dirichlet`` (label skew with concentration ``alpha``), ``shards``
            (``shards_per_client`` label-sorted shards each) or ``iid``.
        alpha: Dirichlet concentration, > 0; smaller is more skewed.
        num_clients: all clients, training and cold-start together.
        cold_start_fraction: share of clients held out entirely as new clients, in [0, 1).
        train_fraction: per-client local train share; the rest is the client's local test split.
        min_size: the fewest samples a client may get (Dirichlet redraws until it holds).
        cache_dir: where partitions are cached, keyed by a hash of everything that defines them.
    """

    def __init__(self, source: DataSource | str = "mnist10k", scheme: str = "dirichlet", alpha: float = 0.3,
                 num_clients: int = 50, cold_start_fraction: float = 0.2, train_fraction: float = 0.8,
                 min_size: int = 10, shards_per_client: int = 2,
                 cache_dir: str = os.path.join("~", ".cache", "fedcoe_bench", "partitions")):
        if isinstance(source, str):
            if "." in source:  # a class path that jsonargparse could not import
                module = source.rpartition(".")[0]
                raise DataError(f"data.source '{source}' cannot be imported (is module '{module}' on the "
                                f"Python path? run from its folder or set PYTHONPATH)")
            if source not in SOURCES:
                raise DataError(f"unknown data.source '{source}'; choose one of {', '.join(SOURCES)} or give a DataSource class path")
            source = SOURCES[source]()
        if scheme not in ("dirichlet", "shards", "iid"):
            raise DataError(f"unknown data.scheme '{scheme}'; choose dirichlet, shards or iid")
        if scheme == "dirichlet" and alpha <= 0:
            raise DataError(f"data.alpha must be > 0 (got {alpha}); smaller values mean more label skew, e.g. --data.alpha 0.3")
        if num_clients < 1:
            raise DataError(f"data.num_clients must be >= 1 (got {num_clients})")
        if not 0 <= cold_start_fraction < 1:
            raise DataError(f"data.cold_start_fraction must be in [0, 1) (got {cold_start_fraction})")
        if not 0 < train_fraction < 1:
            raise DataError(f"data.train_fraction must be in (0, 1) (got {train_fraction})")
        self.source, self.scheme, self.alpha = source, scheme, alpha
        self.num_clients, self.cold_start_fraction = num_clients, cold_start_fraction
        self.train_fraction, self.min_size, self.shards_per_client = train_fraction, min_size, shards_per_client
        self.cache_dir = cache_dir

    @property
    def num_cold_start(self) -> int:
        return int(self.cold_start_fraction * self.num_clients + 0.5)  # half up, not Python's half-to-even

    @property
    def num_training_clients(self) -> int:
        return self.num_clients - self.num_cold_start

    def key(self, seed: int) -> str:
        spec = {k: v for k, v in vars(self).items() if k not in ("source", "cache_dir")}
        spec.update(source=self.source.fingerprint(), seed=seed, version=1)
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def split(self, labels: np.ndarray, seed: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[int]]:
        """Pure function of (labels, config, seed): [(train_idx, test_idx)] per client, and the ids of
        the cold-start clients."""
        min_size = max(self.min_size, 2)  # a client needs a local train and a local test sample
        if self.scheme == "dirichlet":
            parts = dirichlet(labels, self.num_clients, self.alpha, seed, min_size)
        elif self.scheme == "shards":
            parts = shards(labels, self.num_clients, self.shards_per_client, seed, min_size)
        else:
            parts = iid(labels, self.num_clients, seed, min_size)
        rng = np.random.default_rng([seed, 1])
        cold = sorted(rng.choice(self.num_clients, self.num_cold_start, replace=False).tolist())
        return [split_local(labels, p, self.train_fraction, rng) for p in parts], cold

    def setup(self, seed: int, device: torch.device | str = "cpu") -> Federation:
        images = self.source.load()
        labels = images.train_y.numpy()
        if self.num_training_clients < 1:
            raise DataError("no training clients left: lower data.cold_start_fraction or raise data.num_clients")
        splits, cold = self._cached_split(labels, seed)
        make = lambda i: Client(i, torch.from_numpy(splits[i][0]), torch.from_numpy(splits[i][1]))
        cold_set = set(cold)
        clients = [make(i) for i in range(self.num_clients) if i not in cold_set]
        return Federation(images, clients, [make(i) for i in cold], self.source.num_classes, device)

    def _cached_split(self, labels: np.ndarray, seed: int):
        path = Path(self.cache_dir).expanduser() / f"{self.key(seed)}.npz"
        if path.exists():
            try:
                z = np.load(path)
                n = int(z["num_clients"])
                return [(z[f"train{i}"], z[f"test{i}"]) for i in range(n)], z["cold"].tolist()
            except (OSError, KeyError, ValueError):
                pass  # a damaged cache file is recomputed, never trusted
        splits, cold = self.split(labels, seed)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            arrays = {f"train{i}": tr for i, (tr, _) in enumerate(splits)}
            arrays.update({f"test{i}": te for i, (_, te) in enumerate(splits)})
            tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
            np.savez(tmp, num_clients=len(splits), cold=np.asarray(cold, dtype=np.int64), **arrays)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs recomputation
        return splits, cold
