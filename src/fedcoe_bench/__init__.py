"""fedcoe-bench: federated-learning benchmark suite on Lightning Fabric."""

__all__ = ["ClientUpdate", "FederatedMethod"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The method contract imports torch and Lightning (seconds): only when it is asked for, so that
    # `fedbench --help` and `fedbench table` start at once.
    if name in __all__:
        from fedcoe_bench import method

        return getattr(method, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
