"""Federated data: sources (``sources``, ``imagefolder``), partitions (``partition``), feature shift
(``shift``), the ``data`` config that splits a source over clients (``federated_data``) and the
federation it builds (``federation``)."""

from fedcoe_bench.data.federated_data import FederatedData
from fedcoe_bench.data.federation import Client, Federation
from fedcoe_bench.data.imagefolder import ImageFolder
from fedcoe_bench.data.sources import (
    CIFAR10, CIFAR100, MNIST10k, DataError, DataSource, Images, Synthetic, TinyImageNet,
)

__all__ = [
    "CIFAR10", "CIFAR100", "ImageFolder", "MNIST10k", "Synthetic", "TinyImageNet", "DataError", "DataSource",
    "Images", "FederatedData", "Federation", "Client",
]
