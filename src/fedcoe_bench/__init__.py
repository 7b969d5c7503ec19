"""fedcoe-bench: federated-learning benchmark suite on Lightning Fabric."""

from fedcoe_bench.method import ClientUpdate, FederatedMethod

__all__ = ["ClientUpdate", "FederatedMethod"]
__version__ = "0.1.0"
