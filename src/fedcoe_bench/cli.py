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
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fedcoe_bench.errors import ConfigError, Interrupted, TrainingDiverged, UserError
from fedcoe_bench.registry import METHODS, current_path, short_name
from fedcoe_bench.runs import CHECKPOINT_NEUTRAL_KEYS, RunDir, config_diff, result_line

# The method's input and output shape: taken from the data source (a link), never given by hand.
DATA_SHAPE = ("num_classes", "in_channels", "image_size")


class UsageError(UserError):
    """A command-line or config mistake."""


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


def stored_config(parser: ArgumentParser, cfg: Namespace) -> dict:
    """The config as a run directory stores it (``summary.json``, checkpoints) and sweeps compare it:
    jsonargparse's JSON dump, every key but the link targets (the method's shape is the data's)."""
    return json.loads(parser.dump(cfg, format="json", skip_unset=False))


def default_run_dir(cfg: Namespace) -> str:
    """``runs/<dataset>/<scheme><alpha>[-<shift>]/<name or method>/seed<seed>``."""
    from fedcoe_bench.results import shift_label

    src = cfg.data.source
    dataset = short_name(src.class_path) if isinstance(src, Namespace) else str(src)
    scheme = cfg.data.scheme + (str(cfg.data.alpha) if cfg.data.scheme == "dirichlet" else "")
    shift = shift_label(cfg.data.shift, cfg.data.clusters, cfg.data.held_out_clusters)
    scheme += f"-{shift}" if shift else ""  # e.g. dirichlet0.3-rotate4-held3: not the unshifted runs' folder
    name = cfg.get("name") or short_name(cfg.method.class_path)
    return os.path.join("runs", dataset, scheme, name, f"seed{cfg.seed}")


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def load_trained(trained: str, config: dict, serving: tuple[str, ...], run: RunDir) -> dict:
    """The final checkpoint of the finished run in ``trained``, if ``config`` differs from its config in
    ``name`` and the ``serving`` init args only (other differences are refused: training read them) and
    ``run`` is another directory, named apart from it."""
    source = RunDir(trained)
    if not source.is_finished() or not source.checkpoint_path.exists():
        raise UsageError(f"{trained} holds no finished run with a checkpoint.pt; give the directory of a finished "
                         f"`fedbench fit` run")
    trained_config = json.loads(source.summary_path.read_text())["config"]
    if config["run_dir"] is None and config.get("name") == trained_config.get("name"):
        raise UsageError("eval needs a new --name (the setting's row in tables, e.g. "
                         "fedcoe-no_cold_start_prior) or --run_dir, so that it is not mistaken for the trained one")
    if run.path.resolve() == source.path.resolve():
        raise UsageError(f"eval would write into the trained run {trained}; give --name (e.g. the setting's "
                         f"ablation name) or --run_dir")
    as_trained = {**config, "name": trained_config.get("name"),
                  "method": {**config["method"], "init_args": {**config["method"].get("init_args", {}), **{
                      k: v for k, v in trained_config["method"].get("init_args", {}).items() if k in serving}}}}
    differ = [d.partition(":")[0] for d in config_diff(trained_config, as_trained, CHECKPOINT_NEUTRAL_KEYS)]
    if differ:
        allowed = ", ".join(f"method.init_args.{k}" for k in serving) or "none for this method"
        raise UsageError(f"eval may change only prediction-time settings ({allowed}) and name; this config also "
                         f"changes {', '.join(differ)}: train it with `fedbench fit` instead")
    state = RunDir(trained, as_trained).load_checkpoint()
    if state["round"] != config["loop"]["rounds"]:
        raise UsageError(f"{trained} was trained for {state['round']} rounds; eval serves that state, so drop "
                         f"--loop.rounds {config['loop']['rounds']}")
    return state


# ---------------------------------------------------------------------- fit: build, run, report
class Fit:
    """One ``fedbench fit`` (or, with ``trained``, one ``fedbench eval``) from its parsed config, in the
    order it happens: :meth:`build` the pieces, :meth:`run` the rounds, :meth:`report` the results."""

    def __init__(self, parser: ArgumentParser, cfg: Namespace, trained: str | None = None):
        self.parser, self.cfg, self.trained = parser, cfg, trained
        self.config = stored_config(parser, cfg)
        self.started = time.perf_counter()
        self.resume_state = None

    def build(self) -> None:
        """Method, data and loop from the config (bad values fail here, before any file is touched), the
        run directory, the checkpoint to resume (or the trained state to serve), and Fabric."""
        from lightning.fabric import Fabric

        cfg = self.cfg
        Fabric.seed_everything(cfg.seed, verbose=False)  # the method's initial weights follow the seed
        init = self.parser.instantiate(cfg)  # the method sized by the data source (see DATA_SHAPE)
        self.method, self.data, self.loop = init.method, init.data, init.loop
        if os.environ.get("CI") or not sys.stderr.isatty():  # a bar redrawn into a log file is noise
            self.loop.progress = False

        self.run_dir = RunDir(cfg.run_dir or default_run_dir(cfg), self.config)
        self.trained_state = None
        self.check_fabric()  # a device this machine lacks is refused before any file is touched
        if self.trained is not None:
            self.trained_state = load_trained(self.trained, self.config, type(self.method).serving, self.run_dir)
        created = self.run_dir.prepare(overwrite=cfg.overwrite)
        try:
            self.setup(Fabric)
        except UserError:  # refused after all: a directory made for nothing is not left behind
            if created:
                self.run_dir.discard()
            raise

    def setup(self, Fabric) -> None:
        """The checkpoint to resume, Fabric, the data and ``config.yaml``, in a prepared run directory."""
        cfg = self.cfg
        resume = cfg.resume and not cfg.overwrite and self.trained is None
        self.resume_state = self.run_dir.load_checkpoint() if resume else None
        if self.resume_state is not None:
            print(f"fedbench: {self.resumed()}", file=sys.stderr, flush=True)

        loggers = self.loggers()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is not supported on CPU.*")  # said by check_fabric
            self.fabric = Fabric(**cfg.fabric.as_dict(), loggers=loggers)
        self.fabric.launch()
        if self.fabric.device.type == "cpu" and self.fabric.world_size > 1:
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.fabric.world_size))
        self.fed = self.data.setup(cfg.seed, self.fabric.device)
        self.loop._check(self.fabric, self.fed)  # before config.yaml: a run refused here leaves nothing
        if self.fabric.is_global_zero:
            (self.run_dir.path / "config.yaml").write_text(self.parser.dump(cfg))

    def check_fabric(self) -> None:
        """Refuse in one line Fabric settings this machine cannot run; where Lightning falls back to another
        precision (16-mixed on CPU trains in bf16-mixed), record the one used and say so."""
        from lightning.fabric import Fabric
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        given = self.cfg.fabric.as_dict()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                used = Fabric(**given).strategy.precision.precision
        except (RuntimeError, ValueError, ImportError, MisconfigurationException) as err:
            settings = ", ".join(f"--fabric.{k} {given.get(k)}" for k in ("accelerator", "devices", "precision"))
            raise ConfigError(f"this machine cannot run {settings}: {' '.join(str(err).split())}; change them, "
                              f"e.g. --fabric.accelerator cpu") from None
        if str(given.get("precision")).split("-")[0] != str(used).split("-")[0]:
            print(f"fedbench: warning: --fabric.precision {given.get('precision')} is not available here; training "
                  f"in {used}, which config.yaml and summary.json record", file=sys.stderr)
            self.cfg.fabric.precision = self.config["fabric"]["precision"] = used

    def resumed(self) -> str:
        """What a resume continues: ``resuming DIR from round k of R`` and any change of ``loop.rounds``."""
        state, rounds = self.resume_state, self.loop.rounds
        line = f"resuming {self.run_dir.path} from round {state['round']} of {rounds}"
        if self.extended_from() is not None:
            line += f", extended from {self.extended_from()} to {rounds} rounds"
        return line

    def extended_from(self) -> int | None:
        """The rounds of the run a resume continues, where they differ from this config's, else None."""
        before = (self.resume_state or {}).get("rounds")
        return before if before is not None and before != self.loop.rounds else None

    def loggers(self) -> list:
        """``metrics.csv`` in the run directory, and W&B with ``--logger wandb``."""
        from lightning.fabric.loggers import CSVLogger

        # config.yaml and checkpoints share the folder; resumed rows are replayed into the CSV by the loop
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        # a row every round, so that a long run can be followed (appending a row costs microseconds)
        loggers = [CSVLogger(self.run_dir.path, name="", version="", flush_logs_every_n_steps=1)]
        if self.cfg.logger == "wandb":
            from fedcoe_bench.wandb_logging import wandb_logger

            loggers += wandb_logger(self.run_dir.path, self.cfg.wandb_project, self.config)
        return loggers

    def run(self):
        """Train (from the checkpoint, if any) and return the :class:`~fedcoe_bench.loop.FitResult`; with
        ``trained``, evaluate its state."""
        if self.trained is not None:
            return self.loop.evaluate(self.fabric, self.method, self.fed, self.trained_state, self.cfg.seed,
                                      RunDir(self.trained))
        self.run_dir.diverged_path.unlink(missing_ok=True)
        self.stop = stop = StopOnSignal(self)
        try:
            with stop:
                result = self.loop.fit(self.fabric, self.method, self.fed, self.cfg.seed, self.run_dir,
                                       self.resume_state, stop_requested=stop.requested)
        except TrainingDiverged as err:  # on disk, so that a table says why this run has no summary
            err = TrainingDiverged(f"{err} ({self.kept()})")
            if self.fabric.is_global_zero:
                self.run_dir.diverged_path.write_text(f"{err}\n")
            raise err from None
        except KeyboardInterrupt:  # a second signal: stopped in the middle of a round
            raise Interrupted(f"stopped in round {self.round_in_progress()} of {self.loop.rounds}; {self.kept()}; "
                              f"run the same command to resume", stop.code) from None
        if stop.signum is not None and len(result.history) < self.loop.rounds:
            raise Interrupted(f"interrupted after round {len(result.history)} of {self.loop.rounds}; saved to "
                              f"{self.run_dir.path}; run the same command to resume", stop.code)
        return result

    def round_in_progress(self) -> int:
        """The round being trained (counted from 1)."""
        start = self.resume_state["round"] if self.resume_state else 0
        return start + (self.stop.finished if getattr(self, "stop", None) else 0) + 1

    def kept(self) -> str:
        """Which checkpoint a run stopped now keeps."""
        saved = self.run_dir.saved_round or (self.resume_state or {}).get("round")
        return f"the last checkpoint, round {saved}, is kept" if saved else "no checkpoint yet"

    def report(self, result) -> dict:
        """Write the method's artefacts, ``clients.csv`` and ``summary.json`` (rank 0), close the loggers,
        and return the summary."""
        import torch

        from fedcoe_bench.results import METRICS

        fabric, cfg, metrics = self.fabric, self.cfg, result.metrics
        summary = {
            "status": "finished",
            "method": short_name(cfg.method.class_path),
            "global_model": type(self.method).global_model,
            "dataset": self.data.source.name,
            "scheme": self.data.scheme,
            "alpha": self.data.alpha,
            "seed": cfg.seed,
            "rounds": self.loop.rounds,
            **{k: metrics.get(k) for k in METRICS},
            "metrics": metrics,
            "wall_time_s": result.wall_time_s,
            "cost": result.cost,
            "resumed_from_round": self.resume_state["round"] if self.resume_state else None,
            "extended_from_rounds": self.extended_from(),
            "evaluated_from": str(self.trained) if self.trained else None,
            "run_dir": str(self.run_dir.path),
            "clients": {"training": len(self.fed.clients), "cold_start": len(self.fed.new_clients)},
            "config": self.config,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "lightning": importlib.import_module("lightning").__version__},
            "git_sha": _git_sha(),
            "device": str(fabric.device),
            "world_size": fabric.world_size,
        }
        if fabric.is_global_zero:
            from fedcoe_bench.evaluation import write_per_client

            self.method.save_artifacts(self.run_dir.path)
            if self.method.routing_profiles():
                from fedcoe_bench.routing import write_routing

                write_routing(self.method.routing_profiles(), self.fed, self.run_dir.path / "routing.csv")
            if result.per_client:  # the final evaluation, client by client
                write_per_client(result.per_client, self.run_dir.path / "clients.csv")
            for logger in fabric.loggers:
                if hasattr(logger, "log_summary"):  # W&B: the final numbers and the files above
                    logger.log_summary(summary, self.run_dir.path)
        for logger in fabric.loggers:
            logger.finalize("success")
        if fabric.is_global_zero:
            self.run_dir.write_summary(summary)
        return summary


def fit(parser: ArgumentParser, cfg: Namespace, trained: str | None = None) -> dict:
    """Train, evaluate and write the run directory; returns the summary. With ``trained`` (a finished
    run's directory) its final state is evaluated under this config instead of training."""
    job = Fit(parser, cfg, trained)
    job.build()
    summary = job.report(job.run())
    if job.fabric.is_global_zero:  # stdout, terminal or not: what ran, its numbers and where they are
        print(result_line(summary, time.perf_counter() - job.started), flush=True)
    return summary


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) during training: the first asks the loop to stop
    after the round in progress, checkpointed; a second stops at once (KeyboardInterrupt), keeping the
    last checkpoint. The handlers live only inside ``with`` and only in the main thread (where Python
    delivers signals)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, job: Fit):
        self.job, self.signum, self.previous = job, None, {}
        self.finished = 0  # rounds finished in this process: the loop asks after each

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"fedbench: stopping after round {self.job.round_in_progress()} (press Ctrl-C again to stop now; "
              f"{self.job.kept()})", file=sys.stderr, flush=True)

    def requested(self) -> bool:
        self.finished += 1
        return self.signum is not None

    @property
    def code(self) -> int:
        """The shell's exit code of a process killed by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + (self.signum or signal.SIGINT)


def partition(parser: ArgumentParser, cfg: Namespace) -> None:
    """Print how the partition of ``cfg`` deals classes to clients: one line per client."""
    data = parser.instantiate(cfg).data
    fed = data.setup(cfg.seed)
    hist = fed.label_histogram()
    everyone = fed.clients + fed.new_clients
    cold = {c.id for c in fed.new_clients}
    knob = {"dirichlet": f" (alpha {data.alpha})", "classes": f" ({data.classes_per_client} classes per client)",
            "shards": f" ({data.shards_per_client} shards per client)"}.get(data.scheme, "")
    skew = f", quantity skew {data.quantity_skew}" if data.quantity_skew else ""
    shifted = fed.num_clusters > 1
    held = f" (held out: {', '.join(map(str, data.held_out_clusters))})" if data.held_out_clusters else ""
    shift = f", shift {data.shift} over {fed.num_clusters} clusters{held}" if shifted else ""
    print(f"{data.source.name}: {len(fed.clients)} training + {len(fed.new_clients)} cold-start clients, "
          f"scheme {data.scheme}{knob}{skew}{shift}, seed {cfg.seed}, server validation {len(fed.val_y)} samples "
          f"(label counts of each client's train split, then its train / val / test sizes)")
    if shifted:
        print("cluster  clients  training  cold-start  samples")
        for k in range(fed.num_clusters):
            members = [c for c in everyone if c.cluster == k]
            new = sum(c.id in cold for c in members)
            samples = sum(c.bounds[3] - c.bounds[0] for c in members)
            print(f"{k:>7}{len(members):>9}{len(members) - new:>10}{new:>12}{samples:>9}"
                  + ("  held out" if k in fed.held_out_clusters else ""))
    width = max(4, len(str(int(hist.max()))) + 1)
    print("client  kind  " + ("cluster" if shifted else "") + "".join(f"{c:>{width}}" for c in range(hist.shape[1]))
          + "   train     val    test")
    rows = sorted(zip([c.id for c in everyone], hist.tolist(), everyone), key=lambda r: r[0])
    for cid, row, c in rows:
        kind = "new " if cid in cold else "train"
        sizes = "".join(f"{len(s):>8}" for s in (c.train, c.val, c.test))
        print(f"{cid:>6}  {kind:<5}" + (f"{c.cluster:>8}" if shifted else "") + "".join(f"{v:>{width}}" for v in row)
              + sizes)


# ---------------------------------------------------------------------- the subcommands
def _run_fit(parser: ArgumentParser, cfg: Namespace, argv: list[str]) -> None:
    fit(parser, cfg)


def _run_eval(parser: ArgumentParser, cfg: Namespace, argv: list[str]) -> None:
    trained = cfg.pop("trained")
    if not any(a == "--run_dir" or a.startswith("--run_dir=") for a in argv):
        cfg.run_dir = None  # not the trained run's, which its config.yaml names
    fit(fit_parser(), cfg, trained)  # the fit parser: the stored config.yaml has no `trained`


def _run_partition(parser: ArgumentParser, cfg: Namespace, argv: list[str]) -> None:
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
