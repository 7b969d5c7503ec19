"""How a run is configured: the ``fedbench fit`` parser (method, data, loop, Fabric), short names, and
parse errors as one line. Shared by the command line (:mod:`fedcoe_bench.cli`) and the sweep runner,
which parses every grid point as ``fit`` would."""

from __future__ import annotations

import difflib
import importlib
import re
from typing import Callable, Literal

from jsonargparse import ActionConfigFile, ArgumentParser

from fedcoe_bench.errors import UsageError
from fedcoe_bench.registry import METHODS, current_path, short_name

# The method's input and output shape: taken from the data source (a link), never given by hand.
DATA_SHAPE = ("num_classes", "in_channels", "image_size")


def fit_parser() -> ArgumentParser:
    """The parser of ``fedbench fit`` (also read by ``eval``, ``partition``, ``sweep`` and ``plot``)."""
    from lightning.fabric import Fabric

    from fedcoe_bench.data import FederatedData
    from fedcoe_bench.loop import FederatedLoop
    from fedcoe_bench.method import FederatedMethod

    method_classes()  # every method this package ships is a known subclass in --help

    p = ArgumentParser(description="Train one federated method on one setting.", exit_on_error=False, allow_abbrev=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML config file (later flags override it)")
    p.add_argument("--seed", type=int, default=0, help="seeds the partition, the client sampling and every client")
    p.add_argument("--run_dir", type=str | None, default=None,
                   help="output directory (default runs/<dataset>/<scheme><alpha>/<name or method>/seed<seed>)")
    p.add_argument("--name", type=str | None, default=None,
                   help="label of this setting (e.g. an ablation) in run directories, tables and W&B (default: the method)")
    p.add_subclass_arguments(FederatedMethod, "method", default={"class_path": "fedcoe_bench.baselines.fedavg.FedAvg"},
                             required=False, help="the federated method: a short name (fedavg, fedcoe, ...), a class "
                             "path, or a YAML file such as configs/method/fedcoe.yaml")
    # the group's title would be the first line of the base class's docstring, cut mid-sentence
    p.groups["method"].title = "The federated method"
    p.groups["method"].description = ("its settings: `fedbench fit --method.help fedcoe` (a short name or class path) "
                                      "lists them as --method.init_args.X")
    p.add_class_arguments(FederatedData, "data")
    for key in DATA_SHAPE:
        p.link_arguments("data", f"method.init_args.{key}", compute_fn=_source_attribute(key), apply_on="instantiate")
    p.add_class_arguments(FederatedLoop, "loop")
    # Fabric's own arguments, typed and documented by its signature; built by `fit` with the run's loggers
    p.add_class_arguments(Fabric, "fabric", skip={"plugins", "callbacks", "loggers"}, instantiate=False,
                          help="Lightning Fabric: device, processes and precision")
    p.set_defaults({"fabric.devices": 1, "fabric.precision": "32-true"})
    p.add_argument("--logger", type=Literal["csv", "wandb"], default="csv",
                   help="csv: metrics.csv only; wandb: also Weights & Biases (WANDB_MODE=offline works without account)")
    p.add_argument("--wandb_project", type=str, default="fedcoe-bench")
    # a bare --overwrite means true, as the error that asks for it says
    p.add_argument("--resume", type=bool, nargs="?", const=True, default=True,
                   help="continue an unfinished run found in run_dir")
    p.add_argument("--overwrite", type=bool, nargs="?", const=True, default=False,
                   help="remove what fedbench wrote in run_dir (a run directory: it holds .fedbench-run) and start over")
    p.add_argument("--debug", type=bool, default=False, help="show tracebacks")
    return p


def _source_attribute(key: str) -> Callable:
    """``data -> data.source.<key>``, named so that --help shows the link readably."""
    def attribute(data):
        return getattr(data.source, key)

    attribute.__name__ = f"source.{key}"
    return attribute


def method_classes() -> dict[str, type]:
    """The registry's methods by short name, imported."""
    out = {}
    for name, (path, _) in METHODS.items():
        module, _, attr = path.rpartition(".")
        out[name] = getattr(importlib.import_module(module), attr)
    return out


def _known_sources() -> dict[str, str]:
    """Short names (lower-cased class names) of the imported data sources."""
    from fedcoe_bench.data import DataSource

    out, todo = {}, list(DataSource.__subclasses__())
    while todo:
        cls = todo.pop()
        out.setdefault(cls.__name__.lower(), cls)
        todo += cls.__subclasses__()
    return {name: f"{cls.__module__}.{cls.__qualname__}" for name, cls in out.items()}


def expand_short_names(argv: list[str]) -> list[str]:
    """``--method fedavg`` -> ``--method fedcoe_bench.baselines.fedavg.FedAvg`` (likewise ``--data.source`` and
    their ``.help``); a built-in method's class path from before it moved into the package is rewritten."""
    targets = {"--method": "method", "--method.help": "method", "--data.source": "data.source",
               "--data.source.help": "data.source", "--method.class_path": "method"}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in targets and (eq or i + 1 < len(argv)):
            if not eq:
                i += 1
                value = argv[i]
            known = {n: path for n, (path, _) in METHODS.items()} if targets[key] == "method" else _known_sources()
            path = known.get(value.lower())
            if path is None and "." not in value and not value.startswith("{"):
                raise UsageError(f"unknown {targets[key]} '{value}'; choose one of {', '.join(sorted(known))} "
                                 f"or give a class path (module.Class)")
            out.append(f"{key}={path or current_path(value)}")
        else:
            out.append(arg)
        i += 1
    return out


def one_line(err: BaseException, parser: ArgumentParser | None = None) -> str:
    """A parse error as one line; an unknown ``--key`` gets the closest key of ``parser`` as a hint."""
    msg = " ".join(str(err).split())
    if "does not correspond to a subclass of" in msg:
        path = msg.split("Import path ")[-1].split(" does not")[0]
        return f"{path} is not a subclass of {msg.split('subclass of ')[-1]}; give a class that subclasses it"
    old = re.search(r"class_path '(baselines\.[\w.]+)'", msg)
    if old:  # a config written before the built-in methods moved into the package
        return (f"{old.group(1)} is now {current_path(old.group(1))} (or the short name "
                f"{short_name(old.group(1))}): the built-in methods moved into the package fedcoe_bench.baselines")
    if "unrecognized arguments:" in msg.lower() and parser is not None:
        keys = [f"--{k}" for k in parser.get_defaults().keys()]
        bad = [a.split("=")[0] for a in msg.lower().split("unrecognized arguments:")[-1].split() if a.startswith("--")]
        hints = [f"{b} (did you mean {m[0]}?)" for b in bad if (m := difflib.get_close_matches(b, keys, 1))]
        if hints:
            msg += "; " + ", ".join(hints)
    return msg


