"""Shared small fixtures. Everything here is sized to run in well under a second on 2 shared CPU cores."""

from __future__ import annotations

import pytest
import torch
from helpers import IndexedSynthetic
from lightning.fabric import Fabric

from fedcoe_bench.cli import main
from fedcoe_bench.data import FederatedData, Synthetic

# The test machine has two cores shared with other jobs: one thread per process avoids oversubscription.
torch.set_num_threads(1)


@pytest.fixture
def small_data(tmp_path) -> FederatedData:
    """10 clients (2 of them cold-start) over 400 synthetic 12x12 images of 10 classes."""
    return FederatedData(source=Synthetic(samples=400, test_samples=100, image_size=12), scheme="dirichlet",
                         alpha=0.5, num_clients=10, cold_start_fraction=0.2, min_size=10,
                         cache_dir=str(tmp_path / "partitions"))


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    """8 clients (6 training, 2 cold-start) over 480 synthetic 12x12 images, seed 0: the methods' unit tests'."""
    data = FederatedData(source=Synthetic(samples=480, test_samples=120, image_size=12), num_clients=8,
                         cache_dir=str(tmp_path_factory.mktemp("partitions")))
    return data.setup(0)


@pytest.fixture
def indexed_fed(tmp_path):
    """A Federation (on CPU) built from :class:`IndexedSynthetic` images: 8 training + 2 cold-start clients."""
    data = FederatedData(source=IndexedSynthetic(samples=400, test_samples=100, image_size=12), alpha=0.5,
                         num_clients=10, cold_start_fraction=0.2, min_size=10,
                         cache_dir=str(tmp_path / "partitions"))
    return data.setup(seed=0)


@pytest.fixture
def fabric() -> Fabric:
    return Fabric(accelerator="cpu", devices=1)


@pytest.fixture
def fit_argv(tmp_path):
    """``fit_argv(run="run", *extra)``: the argv of a small ``fedbench fit`` into ``tmp_path / run``.

    2 rounds, 3 of 8 training clients per round (10 clients, 2 cold-start), 400 synthetic images;
    the partition cache lives in ``tmp_path`` too. Later flags in ``extra`` override earlier ones.
    """

    def make(run: str = "run", *extra: str, source: tuple[str, ...] | None = None) -> list[str]:
        if source is None:
            source = ("--data.source", "synthetic", "--data.source.samples", "400",
                      "--data.source.test_samples", "100")
        return ["fit", *source, "--data.num_clients", "10", "--loop.rounds", "2", "--loop.clients_per_round", "3",
                "--loop.progress", "false", "--fabric.accelerator", "cpu",
                "--data.cache_dir", str(tmp_path / "partitions"), "--run_dir", str(tmp_path / run), *extra]

    return make


@pytest.fixture
def run_cli(capsys):
    """``run_cli(argv) -> (return code, stdout, stderr)`` of ``fedcoe_bench.cli.main``."""

    def run(argv: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = main(argv)
        out, err = capsys.readouterr()
        return rc, out, err

    return run
