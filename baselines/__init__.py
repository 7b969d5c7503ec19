"""Baseline federated methods (the package ``fedcoe_bench.baselines``), one class per file, each a
subclass of :class:`~fedcoe_bench.method.FederatedMethod`; short names in :mod:`fedcoe_bench.registry`."""

from fedcoe_bench.baselines.ditto import Ditto
from fedcoe_bench.baselines.ensemble import Ensemble
from fedcoe_bench.baselines.fedavg import FedAvg
from fedcoe_bench.baselines.fedem import FedEM
from fedcoe_bench.baselines.fedmix import FedMix
from fedcoe_bench.baselines.fedper import FedPer
from fedcoe_bench.baselines.fedprox import FedProx
from fedcoe_bench.baselines.fedrep import FedRep
from fedcoe_bench.baselines.ifca import IFCA
from fedcoe_bench.baselines.local import Local
from fedcoe_bench.baselines.pfedmoe import PFedMoE
from fedcoe_bench.baselines.scaffold import SCAFFOLD

__all__ = ["Ditto", "Ensemble", "FedAvg", "FedEM", "FedMix", "FedPer", "FedProx", "FedRep", "IFCA", "Local", "PFedMoE", "SCAFFOLD"]
