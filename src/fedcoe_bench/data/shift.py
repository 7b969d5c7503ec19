"""Feature shift: clients in clusters whose images carry their cluster's transform.

A *transform* is any callable ``f(x, cluster, clusters, seed) -> x'`` that takes uint8 images
``[N, C, H, W]`` (on whatever device the federation lives on) of cluster ``cluster`` out of
``clusters`` and returns uint8 images of the same shape; ``seed`` fixes any randomness it draws.
:class:`~fedcoe_bench.data.FederatedData` applies it once, when the federation is built (every
pool sample by its owner's cluster, the global test and server validation splits under every
cluster), never per training step. A user's transform is given by its path (``my_module.my_shift``,
or a class whose instances, made without arguments, are such callables).

A transform may also move labels (a *concept* shift): if it has a method ``labels(y, cluster,
clusters, num_classes) -> y'`` (int64 labels in ``[0, num_classes)``, same shape), every label a
client of ``cluster`` holds and the global test and server validation labels under that cluster
become ``y'``. Then the same image means different classes in different clusters, which no single
model can serve: only what knows a client's cluster (a personal model, an assignment by fit) can::

    >>> x = torch.arange(4, dtype=torch.uint8).view(1, 1, 2, 2)
    >>> rotate(x, 1, 4, seed=0).flatten().tolist()  # 90 degrees counter-clockwise
    [1, 3, 0, 2]
    >>> invert(x, 1, 2, seed=0).flatten().tolist(), invert(x, 0, 2, seed=0).flatten().tolist()
    ([255, 254, 253, 252], [0, 1, 2, 3])
    >>> relabel.labels(torch.tensor([0, 1, 9]), 2, 4, num_classes=10).tolist()  # cluster 2: y + 2 mod 10
    [2, 3, 1]
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np
import torch

from fedcoe_bench.errors import DataError

Transform = Callable[[torch.Tensor, int, int, int], torch.Tensor]

NOISE_STD = 100.0  # grey levels of the last cluster's Gaussian noise; cluster 0 stays clean


def rotate(x: torch.Tensor, cluster: int, clusters: int, seed: int) -> torch.Tensor:
    """Rotation by :math:`360^\\circ k / C` counter-clockwise (0/90/180/270 for C = 4; exact for
    multiples of 90), same size, corners filled with 0: torchvision's ``rotate`` on uint8 tensors."""
    from torchvision.transforms.v2 import functional as F

    angle = 360.0 * cluster / clusters
    return x if angle == 0 else F.rotate(x, angle)


def invert(x: torch.Tensor, cluster: int, clusters: int, seed: int) -> torch.Tensor:
    """:math:`255 - x` for odd clusters, unchanged for even ones."""
    return 255 - x if cluster % 2 else x


def noise(x: torch.Tensor, cluster: int, clusters: int, seed: int) -> torch.Tensor:
    """Additive Gaussian noise of std :math:`\\sigma_k = 100\\, k / (C - 1)` grey levels (cluster 0
    clean), drawn from a generator seeded by (seed, cluster), so a sample's noise is fixed by the
    seed; rounded and clamped to [0, 255]."""
    std = NOISE_STD * cluster / max(clusters - 1, 1)
    if std == 0:
        return x
    g = torch.Generator(device=x.device).manual_seed(derived_seed(seed, cluster))
    eps = torch.randn(x.shape, generator=g, device=x.device)
    return (x.float() + std * eps).round_().clamp_(0, 255).to(torch.uint8)


class Relabel:
    """Concept shift: images unchanged, cluster k's labels moved by k, :math:`y \\to (y + k) \\bmod K`
    for K classes (every label of every cluster but 0 changes while k < K), as clustered FL's label
    swaps (Sattler et al., 2020): the benchmark on which one model cannot fit every cluster."""

    def __call__(self, x: torch.Tensor, cluster: int, clusters: int, seed: int) -> torch.Tensor:
        return x

    def labels(self, y: torch.Tensor, cluster: int, clusters: int, num_classes: int) -> torch.Tensor:
        return (y + cluster) % num_classes


relabel = Relabel()
SHIFTS: dict[str, Transform] = {"rotate": rotate, "invert": invert, "noise": noise, "relabel": relabel}


def derived_seed(*parts: int) -> int:
    """One 32-bit seed from several integers (numpy's SeedSequence), e.g. (run seed, cluster)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def resolve(shift: str) -> Transform | None:
    """The transform named by ``data.shift``: None for ``none``, a built-in, or a user's callable
    (a function, or a class instantiated without arguments) imported from its path."""
    if shift == "none":
        return None
    if shift in SHIFTS:
        return SHIFTS[shift]
    if "." not in shift:
        raise DataError(f"unknown data.shift '{shift}'; choose none, {', '.join(SHIFTS)} or give the path of a "
                        f"transform f(images, cluster, clusters, seed) -> images (module.function)")
    module, _, name = shift.rpartition(".")
    try:
        obj = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise DataError(f"data.shift '{shift}' cannot be imported (is module '{module}' on the Python path "
                        f"and does it define '{name}'?)") from None
    obj = obj() if isinstance(obj, type) else obj
    if not callable(obj):
        raise DataError(f"data.shift '{shift}' is not callable; give a function f(images, cluster, clusters, seed)")
    return obj


def apply(transform: Transform, x: torch.Tensor, cluster: int, clusters: int, seed: int, name: str) -> torch.Tensor:
    """``transform(x, cluster, clusters, seed)``, checked to return uint8 images of ``x``'s shape."""
    out = transform(x, cluster, clusters, seed)
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == x.shape):
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"data.shift '{name}' returned {got} for uint8 {tuple(x.shape)}; a transform must "
                        f"return uint8 images of the shape it was given")
    return out


def apply_labels(transform, y: torch.Tensor, cluster: int, clusters: int, num_classes: int,
                 name: str) -> torch.Tensor:
    """``transform.labels(y, cluster, clusters, num_classes)`` where the transform moves labels (else
    ``y``), checked to return labels of ``y``'s shape in ``[0, num_classes)``."""
    move = getattr(transform, "labels", None)
    if move is None:
        return y
    out = move(y, cluster, clusters, num_classes)
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.int64 and out.shape == y.shape
            and (not len(out) or 0 <= int(out.min()) <= int(out.max()) < num_classes)):
        got = f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"data.shift '{name}'.labels returned {got} for int64 {tuple(y.shape)}; it must return "
                        f"int64 labels of the shape it was given, in [0, {num_classes})")
    return out


def assign_clusters(num_clients: int, clusters: int, seed: int) -> np.ndarray:
    """The cluster of every client: a seeded random order of the clients dealt round-robin, so
    cluster sizes differ by at most one.

    Example:
        >>> np.bincount(assign_clusters(10, 4, seed=0)).tolist()
        [3, 3, 2, 2]
    """
    cluster = np.empty(num_clients, dtype=np.int64)
    cluster[np.random.default_rng([seed, 3]).permutation(num_clients)] = np.arange(num_clients) % clusters
    return cluster
