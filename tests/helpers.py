"""Helpers shared by the tests (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fedcoe_bench.data import Images, Synthetic


class IndexedSynthetic(Synthetic):
    """Synthetic images whose first two pixels encode the sample's index in the pool (train) or in the
    global test split, so that a test can tell from a batch of *prepared* inputs which samples it holds."""

    def load(self) -> Images:
        images = super().load()
        for x in (images.train_x, images.test_x):
            i = torch.arange(len(x))
            x[:, 0, 0, 0] = (i // 256).to(torch.uint8)
            x[:, 0, 0, 1] = (i % 256).to(torch.uint8)
        return images


def decode_indices(fed, x: torch.Tensor) -> list[int]:
    """Pool indices of the rows of a batch prepared by ``fed.prepare`` from :class:`IndexedSynthetic` images."""
    raw = (x[:, 0, 0, :2] * fed.std.flatten()[0] + fed.mean.flatten()[0]).round().long()
    return (raw[:, 0] * 256 + raw[:, 1]).tolist()


DIMS = {"num_classes": 10, "in_channels": 1, "image_size": 12}  # the shape of the ``fed`` fixture's images


def build(cls, **kwargs):
    """A method shaped for the ``fed`` fixture, from the same initial weights every time (seed 0)."""
    torch.manual_seed(0)
    return cls(**DIMS, **kwargs)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


README = (Path(__file__).parents[1] / "README.md").read_text()


def python_block(filename: str) -> str:
    """The README's python block that starts with the line ``# filename``."""
    match = re.search(rf"```python\n# {re.escape(filename)}\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no python block starting with '# {filename}'"
    return match.group(1)
