"""``fedbench sweep FILE [FILE ...]``: run W&B grid-sweep definitions locally, without W&B.

The file is an ordinary ``wandb sweep`` definition (``method: grid``, ``parameters`` with
``values`` or ``value``, a ``command`` running ``fedbench fit ... ${args}``). Each grid point
becomes the command ``wandb agent`` would run (``${args}`` expands to ``--key=value`` flags, in
the order of ``parameters``), with ``--logger=csv`` and ``--run_dir`` set to
``SWEEP_DIR/<dataset>/<scheme><alpha>/<name or method>/seed<seed>``: the layout of
``fedbench fit``'s default run directory with ``runs`` replaced by ``SWEEP_DIR``. Runs go one
after another, each in its own process; a run whose directory already holds a finished run of
the same config is skipped, so an interrupted sweep resumes where it stopped (an unfinished run
continues from its checkpoint; one stopped by a non-finite loss is reported, not run again: resumed,
it would diverge again). Several ``fedbench sweep`` processes on the same file share the
grid: each run is claimed with a lock file in its directory, so on N cores run N of them (with
``OMP_NUM_THREADS`` set so that they do not oversubscribe the cores). Several files run one after
another as one sweep (:func:`plan_all`).

A tuning sweep is one whose W&B ``metric`` names a validation metric (``val_*``, e.g.
``val_personal_acc``): after its runs (or with ``--dry-run``, instead of them) ``fedbench sweep``
prints, for each (method, dataset, scheme/alpha, rounds), the setting with the best validation
score, averaged over seeds, and the test accuracies of that setting only (:func:`select`). W&B's
own key says which metric to optimise, so the file stays a clean W&B sweep (a key of our own
would be a schema violation there), and choosing can never read a test metric.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedcoe_bench.errors import UsageError, UserError
from fedcoe_bench.results import result_line
from fedcoe_bench.runs import LOCK, RunDir, config_diff, release_lock, shown, take_lock


class SweepError(UserError):
    """A sweep file that cannot be run locally; the message names the key."""


@dataclass
class SweepRun:
    index: int
    params: dict
    fit_args: list[str]  # everything after `fedbench fit`, --run_dir and --logger included
    run_dir: Path
    config: dict = field(default_factory=dict)  # the resolved config, as summary.json stores it
    state: str = "todo"  # todo | finished | diverged: ... | conflict: ... (set by check_finished)

    @property
    def command(self) -> str:
        return shlex.join(["fedbench", "fit", *self.fit_args])


def load_sweep(path: str | os.PathLike) -> dict:
    try:
        config = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise SweepError(f"cannot read sweep file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise SweepError(f"sweep file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(config, dict):
        raise SweepError(f"sweep file {path} must be a mapping with 'method', 'parameters' and 'command'")
    if config.get("method") != "grid":
        raise SweepError(f"{path}: method is {config.get('method')!r}; fedbench sweep runs grid sweeps only "
                         f"(use wandb sweep + wandb agent for random or bayes search)")
    params = config.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: 'parameters' must map each flag to its values")
    for key, spec in params.items():
        if not isinstance(spec, dict) or not (("values" in spec and isinstance(spec["values"], list) and spec["values"])
                                              or "value" in spec):
            raise SweepError(f"{path}: parameters.{key} needs a non-empty 'values' list or a single 'value' "
                             f"(distributions are not a grid)")
    if not isinstance(config.get("command"), list):
        raise SweepError(f"{path}: 'command' must be a list such as [fedbench, fit, --config, FILE, '${{args}}']")
    return config


def grid(config: dict) -> list[dict]:
    """Every combination of the parameters' values; the last parameter varies fastest."""
    keys = list(config["parameters"])
    values = [spec["values"] if "values" in spec else [spec["value"]] for spec in config["parameters"].values()]
    return [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def command_args(config: dict, params: dict) -> list[str]:
    """The arguments of ``fedbench fit`` for one grid point, as ``wandb agent`` would form them."""
    flags = [f"--{k}={v}" for k, v in params.items()]  # wandb's own formatting: str() of the value
    tokens: list[str] = []
    for tok in map(str, config["command"]):
        if tok == "${args}":
            tokens += flags
        elif tok == "${args_no_equals}":
            tokens += [t for k, v in params.items() for t in (f"--{k}", str(v))]
        elif tok in ("${env}", "${interpreter}"):
            continue
        elif tok == "${program}":
            tokens.append(str(config.get("program", "fedbench")))
        elif tok.startswith("${envvar:") and tok.endswith("}"):
            tokens.append(os.environ.get(tok[9:-1], tok[9:-1]))
        elif tok.startswith("${"):
            raise SweepError(f"command macro {tok} is not supported by fedbench sweep; use ${{args}}")
        else:
            tokens.append(tok)
    if "fit" not in tokens:
        raise SweepError(f"the sweep's command must run `fedbench fit` (got: {shlex.join(tokens)})")
    return drop_flag(tokens[tokens.index("fit") + 1 :], "--logger")  # the local sweep logs to CSV only


def drop_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value (``flag VALUE`` or ``flag=VALUE``).

    >>> drop_flag(["--a", "1", "--logger", "wandb", "--logger=csv", "--b"], "--logger")
    ['--a', '1', '--b']
    """
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def plan(path: str | os.PathLike, sweep_dir: str | os.PathLike = "runs", logger: str = "csv") -> list[SweepRun]:
    """The runs of a sweep file, resolved (configs parsed, run directories chosen), nothing run."""
    from jsonargparse import ArgumentError

    from fedcoe_bench import config as run_config
    from fedcoe_bench import experiment

    config = load_sweep(path)
    fit_parser = run_config.fit_parser()
    runs, seen = [], {}
    for i, params in enumerate(grid(config), 1):
        args = command_args(config, params)
        try:
            cfg = fit_parser.parse_args(run_config.expand_short_names(args))
        except (ArgumentError, UsageError) as err:
            point = ", ".join(f"{k}={v}" for k, v in params.items())
            raise SweepError(f"grid point {i} ({point}): {run_config.one_line(err)}") from None
        default = Path(experiment.default_run_dir(cfg))
        run_dir = Path(sweep_dir) / default.relative_to(default.parts[0])
        if run_dir in seen:
            raise SweepError(f"grid points {seen[run_dir]} and {i} both write {run_dir}; give each variant its own "
                             f"'name' (see benchmarks/sweeps/ablation.yaml)")
        seen[run_dir] = i
        cfg.run_dir = str(run_dir)
        runs.append(SweepRun(i, params, [*args, f"--logger={logger}", f"--run_dir={run_dir}"], run_dir,
                             experiment.stored_config(fit_parser, cfg)))
    for r in runs:
        check_finished(r)
    return runs


def plan_all(paths: list[str | os.PathLike], sweep_dir: str | os.PathLike = "runs", logger: str = "csv") -> list[SweepRun]:
    """The runs of several sweep files in order, as one sweep (a tuning grown in steps: a core grid, then
    the rates that widen it); a run directory two files plan alike is run once, planned with two
    configs it is an error."""
    runs: dict[Path, tuple[SweepRun, str | os.PathLike]] = {}
    for path in paths:
        for r in plan(path, sweep_dir, logger):
            first, where = runs.setdefault(r.run_dir, (r, path))
            diff = config_diff(first.config, r.config) if first is not r else None
            if diff:
                raise SweepError(f"{path} and {where} plan {r.run_dir} with different configs "
                                 f"({shown(diff)}); give one of the settings another 'name'")
    for i, (r, _) in enumerate(runs.values(), 1):
        r.index = i
    return [r for r, _ in runs.values()]


def check_finished(run: SweepRun) -> str:
    """``finished`` when the run directory holds a finished run of this config, ``conflict: ...`` when it
    holds a finished run of another config, ``diverged: <its error>`` when it holds a run stopped by a
    non-finite loss, else ``todo``."""
    summary_path = run.run_dir / "summary.json"
    if not summary_path.exists():
        error = RunDir(run.run_dir).divergence()
        run.state = f"diverged: {error}" if error else "todo"
        return run.state
    try:
        done = json.loads(summary_path.read_text()).get("config") or {}
    except (OSError, ValueError, AttributeError):
        run.state = "conflict: its summary.json is unreadable"
        return run.state
    diff = config_diff(done, run.config)  # a finished run serves a config that differs in neutral keys only
    run.state = f"conflict: holds a finished run of another config ({shown(diff)})" if diff else "finished"
    return run.state


def claim(run: SweepRun) -> bool:
    """Take ``run``'s lock (:func:`~fedcoe_bench.runs.take_lock`; the fit started then holds it); False if
    another live process holds it, a sweep's or a fit's."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    return take_lock(run.run_dir / LOCK) is None


INTERRUPTED = (128 + signal.SIGINT, 128 + signal.SIGTERM)  # the exit codes of a fit stopped by a signal


def run_fit(args: list[str]) -> int:
    """One ``fedbench fit`` in its own process (same interpreter); its output goes to the terminal. It runs
    in a process group of its own and each SIGINT or SIGTERM the sweep gets is passed on to it once, so
    that it stops as a fit does: after the round in progress, checkpointed, or at once on a second signal
    (Ctrl-C in a terminal would otherwise reach it twice, directly and passed on)."""
    proc = subprocess.Popen([sys.executable, "-m", "fedcoe_bench.cli", "fit", *args], process_group=0)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda signum, frame: proc.send_signal(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_sweep(runs: list[SweepRun], dry_run: bool = False, runner=None) -> int:
    """Run (or with ``dry_run`` print) the planned runs in order. Returns the exit code: 1 if a run
    failed, diverged (now or before) or a run directory holds another config's finished run, else 0."""
    runner = runner or run_fit
    n = len(runs)
    todo = [r for r in runs if r.state == "todo"]
    finished = [r for r in runs if r.state == "finished"]
    conflicts = [r for r in runs if r.state.startswith("conflict")]
    diverged = [r for r in runs if r.state.startswith("diverged")]
    if dry_run:
        for r in runs:
            prefix = "" if r.state == "todo" else f"# {r.state}: "
            print(prefix + r.command)
        print(f"# {n} runs: {len(todo)} to run, {len(finished)} already finished, {len(diverged)} diverged, "
              f"{len(conflicts)} in conflict")
        return 1 if conflicts or diverged else 0
    for r in conflicts:
        print(f"fedbench sweep: skipping {r.run_dir}: it {r.state[len('conflict: '):]}; move it away or choose "
              f"another --sweep_dir", file=sys.stderr)
    for r in diverged:
        _skip_diverged(r)
    failed, ran, elsewhere = [], 0, []
    started = time.perf_counter()
    for position, r in enumerate(todo, 1):
        if not claim(r):
            elsewhere.append(r)
            continue
        try:
            state = check_finished(r)
            if state != "todo":  # another process finished it meanwhile, or saw it diverge
                (diverged if state.startswith("diverged") else finished).append(r)
                continue
            print(f"[{r.index}/{n}] {r.command}", flush=True)
            t0 = time.perf_counter()
            code = runner(r.fit_args)
        finally:
            release_lock(r.run_dir / LOCK)  # ours unless the fit took it over (then it released it, or died)
        if code in INTERRUPTED:  # the run said what it kept; the sweep stops with it
            print(f"fedbench sweep: interrupted in run {r.index} of {n} ({r.run_dir}); run the same command to "
                  f"resume the sweep", file=sys.stderr, flush=True)
            return code
        if code != 0:
            failed.append(r)
            print(f"[{r.index}/{n}] failed (exit code {code}): {r.run_dir}", file=sys.stderr, flush=True)
        else:
            ran += 1
            # No time-left estimate: runs differ several-fold by method, resumed ones take seconds, and
            # other sweep processes take some of those left; an estimate from the pace so far was off 10x.
            left = len(todo) - position
            print(f"[{r.index}/{n}] {_result(r)}; took {_duration(time.perf_counter() - t0)}, sweep "
                  f"{_duration(time.perf_counter() - started)} so far, {left} of its runs not started", flush=True)
    print(f"sweep: {n} runs: {ran} run now, {len(finished)} already finished, {len(elsewhere)} run by another "
          f"sweep process, {len(failed)} failed, {len(diverged)} diverged (not rerun), {len(conflicts)} in conflict",
          flush=True)
    for r in failed:
        print(f"failed: {r.run_dir} ({r.command})", file=sys.stderr)
    return 1 if failed or conflicts or diverged else 0


def _result(run: SweepRun) -> str:
    """The finished run's result line (as its ``fit`` printed it), or its directory if it has no summary."""
    try:
        return result_line(json.loads((run.run_dir / "summary.json").read_text())).removeprefix("fedbench: ")
    except (OSError, ValueError):
        return f"finished: {run.run_dir}"


def _duration(seconds: float) -> str:
    """``42 s``, ``3 min 5 s``, ``2 h 10 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    return f"{s // 60} min {s % 60} s" if s < 3600 else f"{s // 3600} h {s % 3600 // 60} min"


def _skip_diverged(run: SweepRun) -> None:
    print(f"fedbench sweep: skipping {run.run_dir}: it {run.state}; resumed, it would diverge again; change its "
          f"settings (e.g. a lower lr, under another name) or delete the directory to run it anew", file=sys.stderr)
