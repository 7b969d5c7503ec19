"""One experiment, from a parsed ``fedbench fit`` config: build the pieces, run the rounds (or serve a
trained run's state, for ``fedbench eval``), report the results; what ``fit``, ``eval`` and
``partition`` do once the command line has been parsed (:mod:`fedcoe_bench.cli`)."""

from __future__ import annotations

import importlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from fedcoe_bench.errors import ConfigError, Interrupted, TrainingDiverged, UsageError, UserError
from fedcoe_bench.registry import short_name
from fedcoe_bench.results import result_line
from fedcoe_bench.runs import CHECKPOINT_NEUTRAL_KEYS, EVALUATION_KEYS, RunDir, config_diff


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
    evaluation = [k.partition(".")[2] for k in EVALUATION_KEYS]  # loop.* keys
    as_trained = {**config, "name": trained_config.get("name"),
                  "method": {**config["method"], "init_args": {**config["method"].get("init_args", {}), **{
                      k: v for k, v in trained_config["method"].get("init_args", {}).items() if k in serving}}},
                  "loop": {**{k: v for k, v in config["loop"].items() if k not in evaluation},
                           **{k: v for k, v in trained_config["loop"].items() if k in evaluation}}}
    differ = [d.partition(":")[0] for d in config_diff(trained_config, as_trained, CHECKPOINT_NEUTRAL_KEYS)]
    if differ:
        allowed = ", ".join([*(f"method.init_args.{k}" for k in serving), *EVALUATION_KEYS])
        raise UsageError(f"eval may change only prediction-time settings ({allowed}) and name; this config also "
                         f"changes {', '.join(differ)}: train it with `fedbench fit` instead")
    state = RunDir(trained, as_trained).load_checkpoint()
    if state["round"] != config["loop"]["rounds"]:
        raise UsageError(f"{trained} was trained for {state['round']} rounds; eval serves that state, so drop "
                         f"--loop.rounds {config['loop']['rounds']}")
    return state


# ---------------------------------------------------------------------- fit: build, run, report
class Experiment:
    """One ``fedbench fit`` (or, with ``trained_run``, one ``fedbench eval``) from its parsed config, in the
    order it happens: :meth:`build` the pieces, :meth:`run` the rounds, :meth:`report` the results."""

    def __init__(self, parser: ArgumentParser, cfg: Namespace, trained_run: str | None = None):
        self.parser, self.cfg, self.trained_run = parser, cfg, trained_run
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
        if self.trained_run is not None:
            self.trained_state = load_trained(self.trained_run, self.config, type(self.method).serving, self.run_dir)
        created = self.run_dir.prepare(overwrite=cfg.overwrite)
        try:
            self.setup(Fabric)
        except BaseException as err:
            self.run_dir.release()
            if created and isinstance(err, UserError):  # refused after all: a directory made for nothing goes
                self.run_dir.discard()
            raise

    def setup(self, Fabric) -> None:
        """The checkpoint to resume, Fabric, the data and ``config.yaml``, in a prepared run directory."""
        cfg = self.cfg
        resume = cfg.resume and not cfg.overwrite and self.trained_run is None
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
        ``trained_run``, evaluate its state."""
        if self.trained_run is not None:
            return self.loop.evaluate(self.fabric, self.method, self.fed, self.trained_state, self.cfg.seed,
                                      RunDir(self.trained_run))
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
        cost = {**result.cost, "round_time_s": statistics.median(
            [r["round_time"] for r in result.history if "round_time" in r] or [float("nan")])}
        if self.trained_run is not None:  # nothing trained here: the state's cost is its training run's
            cost.update(json.loads(RunDir(self.trained_run).summary_path.read_text()).get("cost", {}))
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
            "cost": cost,
            "resumed_from_round": self.resume_state["round"] if self.resume_state else None,
            "extended_from_rounds": self.extended_from(),
            "evaluated_from": str(self.trained_run) if self.trained_run else None,
            "run_dir": str(self.run_dir.path),
            "clients": {"training": len(self.fed.clients), "cold_start": len(self.fed.new_clients)},
            "config": self.config,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "lightning": importlib.import_module("lightning").__version__},
            "git_sha": _git_sha(),
            "device": str(fabric.device),
            # a run's numbers repeat bitwise only on CPUs of the same kernel family with as many threads
            # (one FedAvg run on two of the project's machines parted at the 8th digit of round 1's loss)
            "cpu": {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()},
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


def run_experiment(parser: ArgumentParser, cfg: Namespace, trained_run: str | None = None) -> dict:
    """Train, evaluate and write the run directory; returns the summary. With ``trained_run`` (a finished
    run's directory) its final state is evaluated under this config instead of training."""
    job = Experiment(parser, cfg, trained_run)
    job.build()
    try:
        summary = job.report(job.run())
    finally:
        job.run_dir.release()
    if job.fabric.is_global_zero:  # stdout, terminal or not: what ran, its numbers and where they are
        print(result_line(summary, time.perf_counter() - job.started), flush=True)
    return summary


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM (a scheduler's notice) during training: the first asks the loop to stop
    after the round in progress, checkpointed; a second stops at once (KeyboardInterrupt), keeping the
    last checkpoint. The handlers live only inside ``with`` and only in the main thread (where Python
    delivers signals)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, job: Experiment):
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
