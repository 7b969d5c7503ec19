"""Short names of the built-in methods, and the family each belongs to: the one place that lists them.

Kept free of torch imports, so that ``fedbench table`` and ``fedbench --help`` can read it at once.
Tables order their rows by family, then by the order below. A user's method needs no entry: it
is given by class path (``--method my_module.MyMethod``) and named by its lower-cased class name.
"""

from __future__ import annotations

# Table order: one server model, personalization, clustered and mixture models, the headline method.
FAMILIES = ("global", "personalized", "mixture", "fedcoe")

METHODS: dict[str, tuple[str, str]] = {  # short name -> (class path, family)
    "fedavg": ("fedcoe_bench.baselines.fedavg.FedAvg", "global"),
    "fedprox": ("fedcoe_bench.baselines.fedprox.FedProx", "global"),
    "scaffold": ("fedcoe_bench.baselines.scaffold.SCAFFOLD", "global"),
    "fedper": ("fedcoe_bench.baselines.fedper.FedPer", "personalized"),
    "fedrep": ("fedcoe_bench.baselines.fedrep.FedRep", "personalized"),
    "ditto": ("fedcoe_bench.baselines.ditto.Ditto", "personalized"),
    "pfedmoe": ("fedcoe_bench.baselines.pfedmoe.PFedMoE", "personalized"),
    "local": ("fedcoe_bench.baselines.local.Local", "personalized"),
    "ensemble": ("fedcoe_bench.baselines.ensemble.Ensemble", "mixture"),
    "ifca": ("fedcoe_bench.baselines.ifca.IFCA", "mixture"),
    "fedem": ("fedcoe_bench.baselines.fedem.FedEM", "mixture"),
    "fedmix": ("fedcoe_bench.baselines.fedmix.FedMix", "mixture"),
    "fedcoe": ("fedcoe_bench.fedcoe.FedCoE", "fedcoe"),
}

# Where the built-in methods lived before they were installed as fedcoe_bench.baselines.
OLD_PREFIX, NEW_PREFIX = "baselines.", "fedcoe_bench.baselines."


def method_path(name: str) -> str | None:
    """The class path of a short name (any case), or None.

    Example:
        >>> method_path("FedAvg"), method_path("nope")
        ('fedcoe_bench.baselines.fedavg.FedAvg', None)
    """
    entry = METHODS.get(name.lower())
    return entry[0] if entry else None


def short_name(class_path: str) -> str:
    """``fedcoe_bench.baselines.fedper.FedPer`` -> ``fedper``: how tables, run directories and W&B name a class.

    Example:
        >>> short_name("fedcoe_bench.baselines.fedper.FedPer"), short_name("my.Method")
        ('fedper', 'method')
    """
    return str(class_path).rsplit(".", 1)[-1].lower()


def current_path(class_path: str) -> str:
    """A class path as this version names it: the built-in methods' paths from before they moved into
    the package (``baselines.fedavg.FedAvg``) become ``fedcoe_bench.baselines.fedavg.FedAvg``.

    Example:
        >>> current_path("baselines.fedavg.FedAvg"), current_path("my.baselines.X")
        ('fedcoe_bench.baselines.fedavg.FedAvg', 'my.baselines.X')
    """
    return NEW_PREFIX + class_path[len(OLD_PREFIX):] if str(class_path).startswith(OLD_PREFIX) else class_path


def family_order(method: str) -> tuple[int, int]:
    """Sort key of a method's short name: its family's position, then its position in :data:`METHODS`
    (methods the registry does not know come last)."""
    names = list(METHODS)
    if method not in METHODS:
        return len(FAMILIES), len(names)
    return FAMILIES.index(METHODS[method][1]), names.index(method)
