"""``fedbench``: the command line.

    fedbench fit --config benchmarks/mnist10k_dir0.3.yaml --method fedper --seed 1
    fedbench eval RUN_DIR --name fedcoe-no_cold_start_prior --method.init_args.cold_start_prior false
    fedbench partition --config benchmarks/mnist10k_dir0.3.yaml
    fedbench sweep benchmarks/sweeps/mnist10k.yaml [--sweep_dir runs] [--dry-run]
    fedbench table runs [--format md|csv|latex] [--wandb ENTITY/PROJECT]
    fedbench plot runs [--out runs/plots]

Each subcommand's parser is built only when that subcommand runs: ``fit``'s imports torch and
Lightning (seconds), which ``fedbench --help`` and ``fedbench table`` need not wait for.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fedcoe_bench.errors import Interrupted, UsageError, UserError
from fedcoe_bench.registry import METHODS, current_path, short_name

# The method's input and output shape: taken from the data source (a link), never given by hand.
DATA_SHAPE = ("num_classes", "in_channels", "image_size")


# ---------------------------------------------------------------------- parsers
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


def eval_parser() -> ArgumentParser:
    """The parser of ``fedbench eval``: the fit parser plus the trained run's directory."""
    p = fit_parser()
    p.description = ("Evaluate a finished run's final state, without training, under other prediction-time "
                     "settings (the method's ``serving`` init args, e.g. FedCoE's cold_start_prior and beta); "
                     "the trained run's config.yaml is the base config. Writes a new run directory.")
    p.add_argument("trained", type=str, help="directory of a finished `fedbench fit` run")
    return p


def sweep_parser() -> ArgumentParser:
    """The parser of ``fedbench sweep``."""
    p = ArgumentParser(description="Run a W&B grid-sweep definition locally, without W&B: one `fedbench fit` per "
                       "grid point, each in SWEEP_DIR/<dataset>/<scheme><alpha>/<name or method>/seed<seed>; "
                       "finished runs are skipped.", exit_on_error=False, allow_abbrev=False)
    p.add_argument("file", type=str, help="sweep YAML, e.g. benchmarks/sweeps/mnist10k.yaml")
    p.add_argument("--sweep_dir", type=str, default="runs", help="where the run directories go")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only")
    p.add_argument("--logger", type=Literal["csv", "wandb"], default="csv", help="logger of every run")
    p.add_argument("--export", type=Optional[str], default=None,
                   help="a tuning sweep: also write each chosen setting as a config file in this directory")
    p.add_argument("--debug", type=bool, default=False)
    return p


def table_parser() -> ArgumentParser:
    """The parser of ``fedbench table``."""
    p = ArgumentParser(description="Methods as rows, global / personalized / cold-start accuracy as columns, "
                       "mean ± std over seeds, one table per dataset and alpha.", exit_on_error=False, allow_abbrev=False)
    p.add_argument("dir", nargs="?", default=None, help="runs directory: every summary.json below it")
    p.add_argument("--format", type=Literal["md", "csv", "latex"], default="md", help="markdown, CSV or LaTeX (booktabs)")
    p.add_argument("--wandb", type=str | None, default=None, metavar="ENTITY/PROJECT",
                   help="read the runs of this W&B project instead of a directory")
    p.add_argument("--debug", type=bool, default=False)
    return p


def records_parser() -> ArgumentParser:
    """The parser of ``fedbench records``."""
    p = ArgumentParser(description="Copy every finished run's small records (config, summary, metrics, clients, "
                       "routing, calibration; no checkpoints) to another directory, e.g. benchmarks/results/runs, "
                       "where `fedbench table` rebuilds the tables from them.", exit_on_error=False, allow_abbrev=False)
    p.add_argument("dir", help="runs directory")
    p.add_argument("dest", help="where the records go (the same relative paths)")
    p.add_argument("--debug", type=bool, default=False)
    return p


def plot_parser() -> ArgumentParser:
    """The parser of ``fedbench plot``."""
    p = ArgumentParser(description="PNG figures of the finished runs below a directory.", exit_on_error=False,
                       allow_abbrev=False)
    p.add_argument("dir", type=str, help="runs directory")
    p.add_argument("--out", type=str | None, default=None, help="output folder (default DIR/plots)")
    p.add_argument("--debug", type=bool, default=False)
    return p


@dataclass(frozen=True)
class Command:
    """A subcommand: its one-line help, its parser and what runs it, ``run(parser, cfg, argv) -> exit code``
    (None: 0), with the subcommand's own parser and parsed config."""

    help: str
    parser: Callable[[], ArgumentParser]
    run: Callable[[ArgumentParser, Namespace, list[str]], int | None]


def build_parser(parsers: dict[str, ArgumentParser] | None = None) -> ArgumentParser:
    """The ``fedbench`` parser, with ``parsers`` as the subcommands' parsers. ``None`` builds them all;
    a subcommand missing from ``parsers`` gets an empty one (its line in ``fedbench --help`` stays)."""
    parser = ArgumentParser(prog="fedbench", description="Federated-learning benchmark: global, personalized "
                            "and cold-start accuracy.", exit_on_error=False, allow_abbrev=False)
    sub = parser.add_subcommands()
    for name, command in COMMANDS.items():
        own = command.parser() if parsers is None else parsers.get(name, ArgumentParser())
        sub.add_subcommand(name, own, help=command.help)
    return parser


def _source_attribute(key: str) -> Callable:
    """``data -> data.source.<key>``, named so that --help shows the link readably."""
    def attribute(data):
        return getattr(data.source, key)

    attribute.__name__ = f"source.{key}"
    return attribute


def method_help(name: str) -> str:
    """The settings of the method ``name`` (a short name or class path) as ``--method.init_args.X``, the
    spelling of the README and of config files; the data shape is left out (the data source sets it)."""
    from fedcoe_bench.method import FederatedMethod

    cls = method_classes().get(name.lower())
    if cls is None:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr) if module else None
        except ImportError:
            cls = None
        if not (isinstance(cls, type) and issubclass(cls, FederatedMethod)):
            raise UsageError(f"unknown method '{name}' for --method.help; choose one of "
                             f"{', '.join(METHODS)} or give a class path (module.Class)")
    p = ArgumentParser(prog=f"fedbench fit --method {short_name(cls.__name__)}", exit_on_error=False)
    p.add_class_arguments(cls, "method.init_args", skip=set(DATA_SHAPE), help=f"{cls.__module__}.{cls.__qualname__}")
    return p.format_help()


# ---------------------------------------------------------------------- names and paths
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


# ---------------------------------------------------------------------- the subcommands
def _run_fit(parser: ArgumentParser, cfg: Namespace, argv: list[str]) -> None:
    from fedcoe_bench.experiment import run_experiment

    run_experiment(parser, cfg)


def _run_eval(parser: ArgumentParser, cfg: Namespace, argv: list[str]) -> None:
    from fedcoe_bench.experiment import run_experiment

    trained = cfg.pop("trained")
    if not any(a == "--run_dir" or a.startswith("--run_dir=") for a in argv):
        cfg.run_dir = None  # not the trained run's, which its config.yaml names
    run_experiment(fit_parser(), cfg, trained)  # the fit parser: the stored config.yaml has no `trained`


def _run_partition(parser: ArgumentParser, cfg: Namespace, argv: list[str]) -> None:
    from fedcoe_bench.experiment import partition

    partition(parser, cfg)


def _results_command(module: str) -> Callable[[ArgumentParser, Namespace, list[str]], int]:
    """The ``command(cfg) -> exit code`` of a results module, imported when it runs."""
    return lambda parser, cfg, argv: importlib.import_module(module).command(cfg)


COMMANDS = {
    "fit": Command("train one method on one setting", fit_parser, _run_fit),
    "eval": Command("evaluate a finished run under other prediction-time settings", eval_parser, _run_eval),
    # partition takes the fit config as it is (only its seed and data keys matter)
    "partition": Command("show how a partition deals classes to clients", fit_parser, _run_partition),
    "sweep": Command("run a W&B grid-sweep file locally, one run after another", sweep_parser,
                     _results_command("fedcoe_bench.sweep")),
    "table": Command("results table: methods x accuracies, mean ± std over seeds", table_parser,
                     _results_command("fedcoe_bench.tables")),
    "plot": Command("figures: accuracy curves, per-client spread, partitions", plot_parser,
                    _results_command("fedcoe_bench.plots")),
    "records": Command("copy finished runs' small records (no checkpoints) for the repository", records_parser,
                       lambda parser, cfg, argv: importlib.import_module("fedcoe_bench.results").records_command(cfg)),
}


# ---------------------------------------------------------------------- errors and main
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


def _eval_base_config(argv: list[str]) -> list[str]:
    """``eval RUN ...`` -> ``eval RUN --config RUN/config.yaml ...``: the trained run's config comes first."""
    if len(argv) < 2 or argv[0] != "eval" or argv[1].startswith("-"):
        return argv
    config = Path(argv[1]) / "config.yaml"
    if not config.exists():
        raise UsageError(f"{argv[1]} has no config.yaml; give the directory of a finished `fedbench fit` run")
    return [*argv[:2], "--config", str(config), *argv[2:]]


def main(argv: list[str] | None = None) -> int:
    """``fedbench``: parse ``argv`` and run its subcommand. Returns the exit code: 1 for a user error
    (one line on stderr, no traceback unless ``--debug``), 2 for a parse error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in (["--version"], ["-V"]):
        from fedcoe_bench import version

        print(f"fedbench {version()}")
        return 0
    if os.getcwd() not in sys.path:  # user methods and sources next to the config, as with `python -m`
        sys.path.insert(0, os.getcwd())
    debug = "--debug" in argv or "--debug=true" in argv
    name = argv[0] if argv and argv[0] in COMMANDS else None
    own = None
    try:
        if name in ("fit", "eval") and "--method.help" in argv[:-1]:
            print(method_help(argv[argv.index("--method.help") + 1]), end="")
            return 0
        own = COMMANDS[name].parser() if name else None  # only the parser this call needs
        parser = build_parser({name: own} if name else {})
        cfg = parser.parse_args(expand_short_names(_eval_base_config(argv)))
        return COMMANDS[name].run(own, cfg[name], argv) or 0
    except UserError as err:
        if debug:
            raise
        print(f"fedbench: error: {one_line(err)}", file=sys.stderr)
        return 1
    except Interrupted as err:
        print(f"fedbench: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:  # before training began, or in a command that does not train
        if debug:
            raise
        print("fedbench: interrupted; a run keeps its last checkpoint: run the same command to resume",
              file=sys.stderr)
        return 130
    except OSError as err:
        if debug or err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"fedbench: error: {err.strerror}{where}; every file written before is whole (a run keeps its last "
              f"checkpoint): free space and run the same command again to resume", file=sys.stderr)
        return 1
    except Exception as err:
        from jsonargparse import ArgumentError

        if isinstance(err, ArgumentError) and not debug:
            print(f"fedbench: error: {one_line(err, own)}", file=sys.stderr)
            return 2
        if isinstance(err.__cause__, UserError) and not debug:  # jsonargparse wraps what a linked value raised
            print(f"fedbench: error: {one_line(err.__cause__)}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
