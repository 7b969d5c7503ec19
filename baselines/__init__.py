"""Baseline federated methods, one class per file, each a subclass of FederatedMethod."""

from baselines.fedavg import FedAvg

__all__ = ["FedAvg"]
