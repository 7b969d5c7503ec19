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

import errno
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from jsonargparse import ArgumentParser, Namespace

from fedcoe_bench.config import DATA_SHAPE, expand_short_names, fit_parser, method_classes, one_line
from fedcoe_bench.errors import Interrupted, UsageError, UserError
from fedcoe_bench.registry import METHODS, short_name


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
    p.add_argument("files", type=str, nargs="+", help="sweep YAML, e.g. benchmarks/sweeps/mnist10k.yaml; several "
                   "run (and choose) as one")
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
    p.add_argument("--split", type=Literal["test", "val"], default="test",
                   help="test accuracies, or val: the validation accuracies tuning reads")
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


def _run_sweep(parser: ArgumentParser, cfg: Namespace, argv: list[str]) -> int:
    """The grid (:mod:`fedcoe_bench.sweep`), then, for a tuning sweep, its choice on validation
    (:mod:`fedcoe_bench.tuning`; printed, and with ``--export`` written as configs)."""
    from fedcoe_bench import sweep, tuning

    chosen_by = tuning.sweeps_metric(cfg.files)  # before any run: files that choose apart cannot run as one
    if chosen_by is None and cfg.export is not None:
        raise sweep.SweepError(f"--export needs a tuning sweep: {' '.join(cfg.files)} name no validation (val_*) metric")
    runs = sweep.plan_all(cfg.files, cfg.sweep_dir, cfg.logger)
    code = sweep.run_sweep(runs, dry_run=cfg.dry_run)
    if chosen_by is not None:
        tuning.report_selection(" ".join(cfg.files), chosen_by, runs, cfg.export)
    return code


def _results_command(module: str) -> Callable[[ArgumentParser, Namespace, list[str]], int]:
    """The ``command(cfg) -> exit code`` of a results module, imported when it runs."""
    return lambda parser, cfg, argv: importlib.import_module(module).command(cfg)


COMMANDS = {
    "fit": Command("train one method on one setting", fit_parser, _run_fit),
    "eval": Command("evaluate a finished run under other prediction-time settings", eval_parser, _run_eval),
    # partition takes the fit config as it is (only its seed and data keys matter)
    "partition": Command("show how a partition deals classes to clients", fit_parser, _run_partition),
    "sweep": Command("run a W&B grid-sweep file locally, one run after another", sweep_parser, _run_sweep),
    "table": Command("results table: methods x accuracies, mean ± std over seeds", table_parser,
                     _results_command("fedcoe_bench.tables")),
    "plot": Command("figures: accuracy curves, accuracy against cost, per-client spread, partitions", plot_parser,
                    _results_command("fedcoe_bench.plots")),
    "records": Command("copy finished runs' small records (no checkpoints) for the repository", records_parser,
                       lambda parser, cfg, argv: importlib.import_module("fedcoe_bench.results").records_command(cfg)),
}


# ---------------------------------------------------------------------- errors and main
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
