"""``fedbench``: the command line.

    fedbench fit --config benchmarks/mnist10k_dir0.3.yaml --method fedper --seed 1
    fedbench eval RUN_DIR --name fedcoe-no_cold_start_prior --method.init_args.cold_start_prior false
    fedbench partition --config benchmarks/mnist10k_dir0.3.yaml
    fedbench sweep benchmarks/sweeps/mnist10k.yaml [--sweep_dir runs] [--dry-run]
    fedbench table runs [--format md|csv|latex] [--wandb ENTITY/PROJECT]
    fedbench plot runs [--out runs/plots]
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
import platform
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from fedcoe_bench.data import DataSource, FederatedData
from fedcoe_bench.errors import UserError
from fedcoe_bench.evaluation import write_per_client
from fedcoe_bench.loop import FederatedLoop
from fedcoe_bench.method import FederatedMethod
from fedcoe_bench.runs import RunDir, flatten, is_volatile


class UsageError(UserError):
    """A command-line or config mistake."""


def _known(base: type) -> dict[str, type]:
    """Short names (lower-cased class names) of the imported subclasses of ``base``."""
    importlib.import_module("baselines")
    importlib.import_module("fedcoe_bench.fedcoe")
    out, todo = {}, list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        out.setdefault(cls.__name__.lower(), cls)
        todo += cls.__subclasses__()
    return out


def _expand_short_names(argv: list[str]) -> list[str]:
    """``--method fedavg`` -> ``--method baselines.fedavg.FedAvg`` (likewise ``--data.source``)."""
    targets = {"--method": FederatedMethod, "--data.source": DataSource}
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        if key in targets and (eq or i + 1 < len(argv)):
            if not eq:
                i += 1
                value = argv[i]
            known = _known(targets[key])
            cls = known.get(value.lower())
            if cls is None and "." not in value and not value.startswith("{"):
                raise UsageError(f"unknown {key[2:]} '{value}'; choose one of {', '.join(sorted(known))} "
                                 f"or give a class path (module.Class)")
            out.append(f"{key}={cls.__module__}.{cls.__qualname__}" if cls else f"{key}={value}")
        else:
            out.append(arg)
        i += 1
    return out


def _fit_parser() -> ArgumentParser:
    p = ArgumentParser(description="Train one federated method on one setting.", exit_on_error=False, allow_abbrev=False)
    p.add_argument("--config", action=ActionConfigFile, help="YAML config file (later flags override it)")
    p.add_argument("--seed", type=int, default=0, help="seeds the partition, the client sampling and every client")
    p.add_argument("--run_dir", type=str | None, default=None,
                   help="output directory (default runs/<dataset>/<scheme><alpha>/<name or method>/seed<seed>)")
    p.add_argument("--name", type=str | None, default=None,
                   help="label of this setting (e.g. an ablation) in run directories, tables and W&B (default: the method)")
    p.add_subclass_arguments(FederatedMethod, "method", skip={"num_classes", "in_channels", "image_size"},
                             default={"class_path": "baselines.fedavg.FedAvg"}, required=False)
    p.add_class_arguments(FederatedData, "data")
    p.add_class_arguments(FederatedLoop, "loop")
    p.add_argument("--fabric.accelerator", type=str, default="auto")
    p.add_argument("--fabric.devices", type=int | str, default=1)
    p.add_argument("--fabric.strategy", type=str, default="auto")
    p.add_argument("--fabric.num_nodes", type=int, default=1)
    p.add_argument("--fabric.precision", type=str, default="32-true")
    p.add_argument("--logger", type=str, default="csv", choices=["csv", "wandb"],
                   help="csv: metrics.csv only; wandb: also Weights & Biases (WANDB_MODE=offline works without account)")
    p.add_argument("--wandb_project", type=str, default="fedcoe-bench")
    p.add_argument("--resume", type=bool, default=True, help="continue an unfinished run found in run_dir")
    p.add_argument("--overwrite", type=bool, default=False, help="replace a finished run in run_dir")
    p.add_argument("--debug", type=bool, default=False, help="show tracebacks")
    return p


def _eval_parser() -> ArgumentParser:
    p = _fit_parser()
    p.description = ("Evaluate a finished run's final state, without training, under other prediction-time "
                     "settings (the method's ``serving`` init args, e.g. FedCoE's cold_start_prior and beta); "
                     "the trained run's config.yaml is the base config. Writes a new run directory.")
    p.add_argument("trained", type=str, help="directory of a finished `fedbench fit` run")
    return p


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="fedbench", description="Federated-learning benchmark: global, personalized "
                            "and cold-start accuracy.", exit_on_error=False, allow_abbrev=False)
    sub = parser.add_subcommands()
    sub.add_subcommand("fit", _fit_parser(), help="train one method on one setting")
    sub.add_subcommand("eval", _eval_parser(), help="evaluate a finished run under other prediction-time settings")
    # partition takes the fit config as it is (only its seed and data keys matter)
    sub.add_subcommand("partition", _fit_parser(), help="show how a partition deals classes to clients")
    sub.add_subcommand("sweep", _sweep_parser(), help="run a W&B grid-sweep file locally, one run after another")
    sub.add_subcommand("table", _table_parser(), help="results table: methods x accuracies, mean ± std over seeds")
    sub.add_subcommand("plot", _plot_parser(), help="figures: accuracy curves, per-client spread, partitions")
    return parser


# subcommands whose module has ``command(cfg) -> exit code``
RESULTS_COMMANDS = {"sweep": "fedcoe_bench.sweep", "table": "fedcoe_bench.tables", "plot": "fedcoe_bench.plots"}


def _sweep_parser() -> ArgumentParser:
    p = ArgumentParser(description="Run a W&B grid-sweep definition locally, without W&B: one `fedbench fit` per "
                       "grid point, each in SWEEP_DIR/<dataset>/<scheme><alpha>/<name or method>/seed<seed>; "
                       "finished runs are skipped.", exit_on_error=False, allow_abbrev=False)
    p.add_argument("file", type=str, help="sweep YAML, e.g. benchmarks/sweeps/mnist10k.yaml")
    p.add_argument("--sweep_dir", type=str, default="runs", help="where the run directories go")
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print the commands only")
    p.add_argument("--logger", default="csv", choices=["csv", "wandb"], help="logger of every run")
    p.add_argument("--debug", type=bool, default=False)
    return p


def _table_parser() -> ArgumentParser:
    p = ArgumentParser(description="Methods as rows, global / personalized / cold-start accuracy as columns, "
                       "mean ± std over seeds, one table per dataset and alpha.", exit_on_error=False, allow_abbrev=False)
    p.add_argument("dir", nargs="?", default=None, help="runs directory: every summary.json below it")
    p.add_argument("--format", default="md", choices=["md", "csv", "latex"], help="markdown, CSV or LaTeX (booktabs)")
    p.add_argument("--wandb", type=str | None, default=None, metavar="ENTITY/PROJECT",
                   help="read the runs of this W&B project instead of a directory")
    p.add_argument("--debug", type=bool, default=False)
    return p


def _plot_parser() -> ArgumentParser:
    p = ArgumentParser(description="PNG figures of the finished runs below a directory.", exit_on_error=False,
                       allow_abbrev=False)
    p.add_argument("dir", type=str, help="runs directory")
    p.add_argument("--out", type=str | None, default=None, help="output folder (default DIR/plots)")
    p.add_argument("--debug", type=bool, default=False)
    return p


def short_name(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1].lower()


def default_run_dir(cfg: Namespace) -> str:
    src = cfg.data.source
    dataset = short_name(src.class_path) if isinstance(src, Namespace) else str(src)
    scheme = cfg.data.scheme + (str(cfg.data.alpha) if cfg.data.scheme == "dirichlet" else "")
    name = cfg.get("name") or short_name(cfg.method.class_path)
    return os.path.join("runs", dataset, scheme, name, f"seed{cfg.seed}")


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def method_class(cfg: Namespace) -> type[FederatedMethod]:
    module, _, name = cfg.method.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def build_method(cfg: Namespace, source: DataSource) -> FederatedMethod:
    init = dict(cfg.method.get("init_args") or {})
    return method_class(cfg)(**init, num_classes=source.num_classes, in_channels=source.in_channels, image_size=source.image_size)


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
    a, b = flatten(as_trained), flatten(trained_config)
    differ = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and not is_volatile(k))
    if differ:
        allowed = ", ".join(f"method.init_args.{k}" for k in serving) or "none for this method"
        raise UsageError(f"eval may change only prediction-time settings ({allowed}) and name; this config also "
                         f"changes {', '.join(differ)}: train it with `fedbench fit` instead")
    state = RunDir(trained, as_trained).load_checkpoint()
    if state["round"] != config["loop"]["rounds"]:
        raise UsageError(f"{trained} was trained for {state['round']} rounds; eval serves that state, so drop "
                         f"--loop.rounds {config['loop']['rounds']}")
    return state


def fit(parser: ArgumentParser, cfg: Namespace, trained: str | None = None) -> dict:
    """Train, evaluate and write the run directory; returns the summary. With ``trained`` (a finished
    run's directory) its final state is evaluated under this config instead of training."""
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    init = parser.instantiate(cfg)
    data: FederatedData = init.data
    loop: FederatedLoop = init.loop
    if os.environ.get("CI"):
        loop.progress = False
    config = cfg.as_dict()
    config.pop("config", None)
    run = RunDir(cfg.run_dir or default_run_dir(cfg), config)
    if trained is not None:
        trained_state = load_trained(trained, config, method_class(cfg).serving, run)
    run.prepare(overwrite=cfg.overwrite)
    resume_state = run.load_checkpoint() if cfg.resume and not cfg.overwrite and trained is None else None

    # config.yaml and checkpoints share the folder; resumed rows are replayed into the CSV by the loop
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    loggers = [CSVLogger(run.path, name="", version="", flush_logs_every_n_steps=10)]
    if cfg.logger == "wandb":
        from fedcoe_bench.wandb_logging import wandb_logger

        loggers += wandb_logger(run.path, cfg.wandb_project, config)
    f = cfg.fabric
    fabric = Fabric(accelerator=f.accelerator, devices=f.devices, strategy=f.strategy, num_nodes=f.num_nodes,
                    precision=f.precision, loggers=loggers)
    fabric.launch()
    if fabric.device.type == "cpu" and fabric.world_size > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // fabric.world_size))
    if fabric.is_global_zero:
        (run.path / "config.yaml").write_text(parser.dump(cfg))

    fed = data.setup(cfg.seed, fabric.device)
    fabric.seed_everything(cfg.seed, verbose=False)
    method = build_method(cfg, data.source)
    if trained is None:
        metrics = loop.fit(fabric, method, fed, cfg.seed, run, resume_state)
    else:
        metrics = loop.evaluate(fabric, method, fed, trained_state, cfg.seed)

    summary = {
        "status": "finished",
        "method": short_name(cfg.method.class_path),
        "dataset": data.source.name,
        "scheme": data.scheme,
        "alpha": data.alpha,
        "seed": cfg.seed,
        "rounds": loop.rounds,
        **{k: metrics.get(k) for k in ("global_acc", "personal_acc", "cold_start_acc", "cold_start_lp_acc")},
        "metrics": metrics,
        "wall_time_s": loop.wall_time_s,
        "resumed_from_round": resume_state["round"] if resume_state else None,
        "evaluated_from": str(trained) if trained else None,
        "clients": {"training": len(fed.clients), "cold_start": len(fed.new_clients)},
        "config": config,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "lightning": importlib.import_module("lightning").__version__},
        "git_sha": _git_sha(),
        "device": str(fabric.device),
        "world_size": fabric.world_size,
    }
    if fabric.is_global_zero:
        method.save_artifacts(run.path)
        if loop.evaluator.per_client:  # the final evaluation, client by client
            write_per_client(loop.evaluator.per_client, run.path / "clients.csv")
        for logger in fabric.loggers:
            if hasattr(logger, "log_summary"):  # W&B: the final numbers and the files above
                logger.log_summary(summary, run.path)
    for logger in fabric.loggers:
        logger.finalize("success")
    if fabric.is_global_zero:
        run.write_summary(summary)
    return summary


def partition(parser: ArgumentParser, cfg: Namespace) -> None:
    data: FederatedData = parser.instantiate(cfg).data
    fed = data.setup(cfg.seed)
    hist = fed.label_histogram()
    ids = [c.id for c in fed.clients] + [c.id for c in fed.new_clients]
    cold = {c.id for c in fed.new_clients}
    print(f"{data.source.name}: {len(fed.clients)} training + {len(fed.new_clients)} cold-start clients, "
          f"scheme {data.scheme}, alpha {data.alpha}, seed {cfg.seed} (train-split label counts)")
    width = max(4, len(str(int(hist.max()))) + 1)
    print("client  kind  " + "".join(f"{c:>{width}}" for c in range(hist.shape[1])) + "   total")
    for cid, row in sorted(zip(ids, hist.tolist())):
        kind = "new " if cid in cold else "train"
        print(f"{cid:>6}  {kind:<5}" + "".join(f"{v:>{width}}" for v in row) + f"{sum(row):>8}")


def _one_line(err: BaseException, parser: ArgumentParser | None = None) -> str:
    msg = " ".join(str(err).split())
    if "does not correspond to a subclass of" in msg:
        path = msg.split("Import path ")[-1].split(" does not")[0]
        return f"{path} is not a subclass of {msg.split('subclass of ')[-1]}; give a class that subclasses it"
    if "unrecognized arguments:" in msg.lower() and parser is not None:
        keys = _all_keys(parser)
        bad = [a.split("=")[0] for a in msg.lower().split("unrecognized arguments:")[-1].split() if a.startswith("--")]
        hints = [f"{b} (did you mean {m[0]}?)" for b in bad if (m := difflib.get_close_matches(b, keys, 1))]
        if hints:
            msg += "; " + ", ".join(hints)
    return msg


def _all_keys(parser: ArgumentParser) -> list[str]:
    sub = parser._subcommands_action._name_parser_map.get("fit") if parser._subcommands_action else None
    p = sub or parser
    return [opt for a in p._actions for opt in a.option_strings if opt.startswith("--")]


def _eval_base_config(argv: list[str]) -> list[str]:
    """``eval RUN ...`` -> ``eval RUN --config RUN/config.yaml ...``: the trained run's config comes first."""
    if len(argv) < 2 or argv[0] != "eval" or argv[1].startswith("-"):
        return argv
    config = Path(argv[1]) / "config.yaml"
    if not config.exists():
        raise UsageError(f"{argv[1]} has no config.yaml; give the directory of a finished `fedbench fit` run")
    return [*argv[:2], "--config", str(config), *argv[2:]]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.getcwd() not in sys.path:  # user methods and sources next to the config, as with `python -m`
        sys.path.insert(0, os.getcwd())
    debug = "--debug" in argv or "--debug=true" in argv
    parser = build_parser()
    try:
        argv = _expand_short_names(_eval_base_config(argv))
        cfg = parser.parse_args(argv)
        if cfg.subcommand == "fit":
            fit(parser._subcommands_action._name_parser_map["fit"], cfg.fit)
        elif cfg.subcommand == "eval":
            trained = cfg.eval.pop("trained")
            if not any(a == "--run_dir" or a.startswith("--run_dir=") for a in argv):
                cfg.eval.run_dir = None  # not the trained run's, which its config.yaml names
            fit(parser._subcommands_action._name_parser_map["fit"], cfg.eval, trained)
        elif cfg.subcommand == "partition":
            partition(parser._subcommands_action._name_parser_map["partition"], cfg.partition)
        elif cfg.subcommand in RESULTS_COMMANDS:
            return importlib.import_module(RESULTS_COMMANDS[cfg.subcommand]).command(cfg[cfg.subcommand])
    except UserError as err:
        if debug:
            raise
        print(f"fedbench: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        from jsonargparse import ArgumentError

        if isinstance(err, ArgumentError) and not debug:
            print(f"fedbench: error: {_one_line(err, parser)}", file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
