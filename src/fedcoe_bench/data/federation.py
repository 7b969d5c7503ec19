"""A federation: a source's images dealt out to clients and kept on the device as uint8 tensors."""

from __future__ import annotations

import numpy as np
import torch

from fedcoe_bench.data import shift as shifts
from fedcoe_bench.data.sources import Images


class Client:
    """One client's data: pool indices (on the device), drawn at random from the client's samples
    into ``train`` (a cold-start client's unlabeled inputs), ``val`` (validation, for tuning; empty
    for a client of fewer than five samples at the default share) and ``test``; and its
    feature-shift ``cluster`` (0 without ``data.shift``), whose transform all its images carry.

    The three are consecutive slices of one index tensor, shared by all clients of a federation and
    sliced on access, so 100,000 clients cost 100,000 small objects, not 300,000 tensors.

    Example:
        >>> c = Client(7, torch.tensor([4, 9, 2, 5, 1]), (0, 2, 3, 5))
        >>> c.train.tolist(), c.val.tolist(), c.test.tolist(), c.num_train
        ([4, 9], [2], [5, 1], 2)
    """

    __slots__ = ("id", "index", "bounds", "cluster")

    def __init__(self, id: int, index: torch.Tensor, bounds: tuple[int, int, int, int], cluster: int = 0):
        self.id, self.index, self.bounds, self.cluster = id, index, bounds, cluster

    @property
    def train(self) -> torch.Tensor:
        return self.index[self.bounds[0] : self.bounds[1]]

    @property
    def val(self) -> torch.Tensor:
        return self.index[self.bounds[1] : self.bounds[2]]

    @property
    def test(self) -> torch.Tensor:
        return self.index[self.bounds[2] : self.bounds[3]]

    @property
    def num_train(self) -> int:
        return self.bounds[1] - self.bounds[0]


class Federation:
    """The pool, the server's validation split (``val_x``, ``val_y``: pool samples no client holds),
    the global test split and the clients, all on one device.

    Images stay uint8 until a batch is drawn; :meth:`prepare` turns a batch into normalised
    floats and, for natural images during training, applies random crop (pad 4) + flip batched
    on the device: no per-sample Python, no DataLoader.

    With feature shift (:meth:`apply_shift`) the pool holds every sample as its owner's cluster
    sees it, and ``test_x_by_cluster`` / ``val_x_by_cluster`` hold the global test and server
    validation splits under every cluster's transform (``test_x``, ``val_x``: untransformed), with
    their labels ``test_y_by_cluster`` / ``val_y_by_cluster`` (moved only by a concept shift).
    Without it there is one cluster, whose views are ``test_x`` and ``val_x`` themselves.

    A cold-start client labels ``cold_start_shots`` samples per class of its local train split
    (:meth:`shots`) to fine-tune on; the rest stays unlabeled.
    """

    def __init__(self, images: Images, clients: list[Client], new_clients: list[Client],
                 num_classes: int, device: torch.device | str = "cpu", val: torch.Tensor | None = None,
                 cold_start_shots: int = 5):
        self.device = torch.device(device)
        self.cold_start_shots = cold_start_shots
        self.pool_x = images.train_x.to(self.device)
        self.pool_y = images.train_y.to(self.device)
        self.test_x = images.test_x.to(self.device)
        self.test_y = images.test_y.to(self.device)
        val = (torch.empty(0, dtype=torch.long) if val is None else val).to(self.device)
        self.val_x, self.val_y = self.pool_x[val], self.pool_y[val]
        self.clients, self.new_clients = clients, new_clients  # their indices already on `device`
        self.num_classes = num_classes
        self.num_clusters, self.held_out_clusters = 1, ()
        self.test_x_by_cluster, self.val_x_by_cluster = [self.test_x], [self.val_x]
        self.test_y_by_cluster, self.val_y_by_cluster = [self.test_y], [self.val_y]
        everyone = clients + new_clients
        self.client_cluster = torch.zeros(max((c.id for c in everyone), default=-1) + 1, dtype=torch.long)  # by id
        self.client_cluster[[c.id for c in everyone]] = torch.tensor([c.cluster for c in everyone], dtype=torch.long)
        self.augment = images.augment
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(images.mean, device=self.device).view(shape) * 255
        self.std = torch.tensor(images.std, device=self.device).view(shape) * 255

    def apply_shift(self, transform, name: str, num_clusters: int, sample_cluster: torch.Tensor, seed: int,
                    held_out_clusters=()) -> None:
        """Transform, once, every pool sample by its owner's cluster (``sample_cluster``: one per
        pool sample, -1 for the server's validation split, which no client owns) and make the
        global test and server validation splits under every cluster's transform; labels too, where
        the transform moves them (:mod:`fedcoe_bench.data.shift`)."""
        self.num_clusters, self.held_out_clusters = num_clusters, tuple(held_out_clusters)
        sample_cluster = sample_cluster.to(self.device)
        run = lambda x, k, part: shifts.apply(transform, x, k, num_clusters, shifts.derived_seed(seed, part), name)
        label = lambda y, k: shifts.apply_labels(transform, y, k, num_clusters, self.num_classes, name)
        for k in range(num_clusters):
            mask = sample_cluster == k
            if mask.any():
                self.pool_x[mask] = run(self.pool_x[mask], k, 0)
                self.pool_y[mask] = label(self.pool_y[mask], k)
        self.test_x_by_cluster = [run(self.test_x, k, 1) for k in range(num_clusters)]
        self.val_x_by_cluster = [run(self.val_x, k, 2) for k in range(num_clusters)]
        self.test_y_by_cluster = [label(self.test_y, k) for k in range(num_clusters)]
        self.val_y_by_cluster = [label(self.val_y, k) for k in range(num_clusters)]

    def clusters_of(self, client_ids) -> torch.Tensor:
        """The clusters of the clients with these ids (int64, on CPU)."""
        return self.client_cluster[torch.as_tensor(list(client_ids), dtype=torch.long)]

    def prepare(self, x: torch.Tensor, generator: torch.Generator | None = None,
                memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
        """uint8 [B, C, H, W] -> normalised float in ``memory_format`` (the model's: channels-last
        convolutions want channels-last batches); augments when a generator is given and the data asks
        for it."""
        x = (x.float() - self.mean) / self.std
        if generator is None or not self.augment:
            return x.contiguous(memory_format=memory_format)
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
        return out.contiguous(memory_format=memory_format)

    def batches(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator,
                memory_format: torch.memory_format = torch.contiguous_format):
        """``steps`` training mini-batches ``(x, y)`` of uint8 images ``x`` and labels ``y`` (a client's
        samples, gathered once by the caller): passes over a fresh
        permutation each (drawn from ``generator``, which also drives augmentation), cut into
        ``batch_size`` chunks, the last of a pass partial, so ``epochs * ceil(len(y) / batch_size)``
        steps are that many epochs. Local training and the fine-tuned cold start both draw from here.

        Example:
            >>> images = Images(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.arange(5),
            ...                 torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), (0.0,), (1.0,))
            >>> fed = Federation(images, [], [], 5)
            >>> [len(y) for _, y in fed.batches(fed.pool_x, fed.pool_y, 2, 4, torch.Generator().manual_seed(0))]
            [2, 2, 1, 2]
        """
        order = y[:0]
        for _ in range(steps):
            if len(order) == 0:
                order = torch.randperm(len(y), generator=generator, device=self.device)
            take, order = order[:batch_size], order[batch_size:]
            yield self.prepare(x[take], generator, memory_format), y[take]

    def shots(self, client: Client, seed: int) -> torch.Tensor:
        """Pool indices of the labelled shots of a (cold-start) client: ``cold_start_shots`` samples
        of each class present in its local train split (all of a class that has fewer), drawn at
        random, a function of (``seed``, client id) only.

        Example:
            >>> images = Images(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 2, 2]),
            ...                 torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1, dtype=torch.long), (0.0,), (1.0,))
            >>> c = Client(0, torch.arange(6), (0, 6, 6, 6))
            >>> fed = Federation(images, [], [c], 3, cold_start_shots=2)
            >>> sorted(fed.pool_y[fed.shots(c, 0)].tolist()), torch.equal(fed.shots(c, 0), fed.shots(c, 0))
            ([0, 0, 1, 2, 2], True)
        """
        idx = client.train
        rng = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, client.id, 0x5407]).generate_state(1)[0]))
        perm = torch.randperm(len(idx), generator=rng).to(idx.device)
        y = self.pool_y[idx[perm]]
        ys, order = torch.sort(y, stable=True)  # grouped by class, in random order within each
        rank = torch.arange(len(ys), device=ys.device) - torch.searchsorted(ys, ys)
        return idx[perm[order[rank < self.cold_start_shots]]]

    def label_histogram(self, clients: list[Client] | None = None, split: str = "train") -> torch.Tensor:
        """[clients, classes] label counts of each client's ``split`` ('train', 'val' or 'test')."""
        clients = self.clients + self.new_clients if clients is None else clients
        idx = [getattr(c, split) for c in clients]
        sizes = torch.tensor([len(i) for i in idx], device=self.device)
        row = torch.repeat_interleave(torch.arange(len(idx), device=self.device), sizes)
        cell = row * self.num_classes + self.pool_y[torch.cat(idx)] if idx else row
        return torch.bincount(cell, minlength=len(idx) * self.num_classes).view(len(idx), self.num_classes).cpu()
