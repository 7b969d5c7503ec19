"""fedcoe-bench: federated-learning benchmark suite on Lightning Fabric."""

__all__ = ["ClientUpdate", "FederatedMethod"]
__version__ = "0.1.0"


def version() -> str:
    """The installed version (package metadata), else ``__version__`` (a source tree run in place)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("fedcoe-bench")
    except PackageNotFoundError:
        return __version__


def __getattr__(name: str):
    # The method contract imports torch and Lightning (seconds): only when it is asked for, so that
    # `fedbench --help` and `fedbench table` start at once.
    if name in __all__:
        from fedcoe_bench import method

        return getattr(method, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
