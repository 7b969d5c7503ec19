"""Baseline federated methods, one class per file, each a subclass of FederatedMethod."""

from baselines.fedavg import FedAvg
from baselines.fedmix import FedMix
from baselines.fedper import FedPer
from baselines.fedprox import FedProx
from baselines.local import Local
from baselines.pfedmoe import PFedMoE

__all__ = ["FedAvg", "FedMix", "FedPer", "FedProx", "Local", "PFedMoE"]
