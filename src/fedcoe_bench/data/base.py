"""What every data source is: a class with ``load() -> Images`` (see :mod:`fedcoe_bench.data.sources`),
and the decode cache the file-reading sources share."""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Images:
    """Images of one data set: a train pool that is partitioned over clients and a global test split."""

    train_x: torch.Tensor  # uint8 [N, C, H, W]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    augment: bool = False  # random crop + horizontal flip during local training (natural images)


class DataSource:
    """Base class of data sources. Subclasses set the three class attributes and implement ``load``."""

    num_classes: int = 10
    in_channels: int = 1
    image_size: int = 28

    def load(self) -> Images:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__.lower()

    def fingerprint(self) -> dict:
        """What identifies this source's data in a partition's cache key."""
        return {"source": f"{type(self).__module__}.{type(self).__qualname__}", **vars(self)}


def cached_tensors(path: Path, stamp, decode) -> list:
    """What ``decode()`` returns (tensors, or lists of them and of strings), kept in ``path`` with
    ``stamp`` and reused while the stamp is equal; a damaged or unwritable cache only costs decoding again."""
    if path.exists():
        try:
            saved = torch.load(path, weights_only=True)
            if saved["stamp"] == stamp:
                return saved["tensors"]
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, KeyError, TypeError):
            pass
    tensors = list(decode())
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"stamp": stamp, "tensors": tensors}, tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
    return tensors
