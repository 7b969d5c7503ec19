"""Finished and unfinished runs, read from run directories or from W&B, as one kind of record.

A run directory is any folder holding ``summary.json`` (finished) or ``config.yaml`` without a
summary (started, not finished); folders named ``wandb`` (W&B's own files) are not searched.
A run that cannot be used (unfinished, unreadable summary, another status) is kept as a record
with ``status`` saying why, so that tables list it as missing instead of dropping it.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fedcoe_bench.errors import UserError
from fedcoe_bench.registry import family_order, short_name
from fedcoe_bench.runs import NO_DEFAULT, RunDir, argument_default

# The table columns; the fine-tuned cold start sits next to the zero-shot one.
METRICS = ("global_acc", "personal_acc", "cold_start_acc", "cold_start_ft_acc", "cold_start_lp_acc")
# The columns that measure the server-side model, which a method may lack or serve by a convention
# (its ``global_model``: trained | convention | none, recorded in summary.json).
SERVER_METRICS = ("global_acc", "cold_start_acc", "cold_start_lp_acc", "cold_start_acc_new_domain")
# Columns a table shows only where a run has them: personal accuracy after the label-prior adapter
# (runs from before it existed lack it), cold start on held-out clusters (feature shift) and the
# expert-cluster agreement of the routing (methods with experts, on federations with clusters).
EXTRA_METRICS = ("personal_lp_acc", "cold_start_acc_new_domain", "expert_cluster_nmi", "expert_cluster_purity",
                 "cold_start_gate_assignment_agreement")
# Diagnostics rather than accuracies: they have no validation twin.
SCORES = ("expert_cluster_nmi", "expert_cluster_purity", "cold_start_gate_assignment_agreement")
# The same accuracies on the validation splits (``fedbench table --split val``, what tuning reads).
VAL_METRICS = tuple(f"val_{m}" for m in METRICS + EXTRA_METRICS if m not in SCORES)


class ResultsError(UserError):
    """Nothing usable where results were asked for; the message says where we looked."""


@dataclass
class Run:
    """One run. ``status`` is ``finished`` or why the run cannot be counted."""

    path: str
    method: str
    dataset: str | None = None
    scheme: str | None = None
    alpha: float | None = None
    rounds: int | None = None
    seed: int | None = None
    name: str | None = None  # the config's ``name`` (a label chosen by the user), if any
    shift: str | None = None  # the feature shift, e.g. rotate4-held3 (shift_label); None without
    metrics: dict[str, float | None] = field(default_factory=dict)
    init_args: dict = field(default_factory=dict)
    class_path: str | None = None  # the method's class, where the config names it
    global_model: str = "trained"  # the method's ``global_model``; summaries written before it existed: trained
    cost: dict = field(default_factory=dict)  # summary.json's cost (fedcoe_bench.cost), empty before it existed
    status: str = "finished"
    label: str = ""  # the table row; set by :func:`assign_labels`

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def group(self) -> tuple:
        """Runs are compared only within (dataset, scheme, alpha, rounds), the dataset named with its
        feature shift (e.g. ``mnist10k rotate4-held3``)."""
        alpha = self.alpha if self.scheme in (None, "dirichlet") else None
        dataset = self.dataset or "?"
        return (f"{dataset} {self.shift}" if self.shift else dataset, self.scheme or "?", alpha, self.rounds)


def _source_name(source) -> str | None:
    if isinstance(source, dict):
        return short_name(source.get("class_path", "?"))
    return None if source is None else short_name(source)


def run_from_config(config: dict, path: str, status: str) -> Run:
    """A record from a run's (nested) config: what the run was meant to be."""
    method = config.get("method") or {}
    method = method if isinstance(method, dict) else {"class_path": method}
    data = config.get("data") or {}
    return Run(path=path, method=short_name(method.get("class_path", "fedavg")),
               dataset=_source_name(data.get("source")), scheme=data.get("scheme"), alpha=data.get("alpha"),
               rounds=(config.get("loop") or {}).get("rounds"), seed=config.get("seed"), name=config.get("name"),
               shift=shift_label(data.get("shift"), data.get("clusters"), data.get("held_out_clusters")),
               init_args=dict(method.get("init_args") or {}), class_path=method.get("class_path"), status=status)


def run_from_summary(summary: dict, path: str) -> Run:
    """A record from ``summary.json``."""
    run = run_from_config(summary.get("config") or {}, path, "finished")
    for key in ("method", "dataset", "scheme", "alpha", "rounds", "seed", "global_model"):
        if summary.get(key) is not None:
            setattr(run, key, summary[key])
    run.metrics = {k: summary.get(k, (summary.get("metrics") or {}).get(k)) for k in METRICS + EXTRA_METRICS + VAL_METRICS}
    run.cost = summary.get("cost") or {}
    if summary.get("status", "finished") != "finished":
        run.status = f"status {summary.get('status')!r}"
    elif all(v is None for v in run.metrics.values()):
        run.status = "summary.json has no accuracies"
    return run


def find_run_dirs(root: str | os.PathLike) -> list[Path]:
    """Folders under ``root`` (itself included) that hold ``summary.json`` or ``config.yaml``."""
    root = Path(root)
    if not root.is_dir():
        raise ResultsError(f"no such directory: {root}")
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "wandb" and not d.startswith("."))
        if "summary.json" in files or "config.yaml" in files:
            found.append(Path(here))
    return found


def load_run(path: Path) -> Run:
    """The record of one run directory; never raises for a damaged run (its ``status`` says why)."""
    summary_path, config_path = path / "summary.json", path / "config.yaml"
    if summary_path.exists():
        try:
            summary = json.loads(summary_path.read_text())
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
            run = run_from_summary(summary, str(path))
            missing = [k for k in EXTRA_METRICS if run.metrics.get(k) is None]
            run.metrics.update(last_logged(path, missing) if missing else {})
            return run
        except (OSError, ValueError) as err:
            why = f"unreadable summary.json: {type(err).__name__}"
    else:
        error = RunDir(path).divergence()
        why = f"diverged: {error}" if error else "unfinished: no summary.json"
    try:
        config = yaml.safe_load(config_path.read_text()) if config_path.exists() else {}
        config = config if isinstance(config, dict) else {}
    except (OSError, yaml.YAMLError):
        config = {}
    return run_from_config(config, str(path), why)


def finite_float(v) -> float | None:
    """``v`` as a finite float, or None (empty CSV cells, ``nan``, text)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def read_history(run_dir: str | os.PathLike, keys) -> dict[str, dict[int, float]]:
    """key -> {round: value} from a run's ``metrics.csv``, finite values only (a metric is logged in
    the rounds that measure it)."""
    path = Path(run_dir) / "metrics.csv"
    out: dict[str, dict[int, float]] = {k: {} for k in keys}
    if not path.exists():
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rnd = finite_float(row.get("round") or row.get("step"))
            if rnd is None:
                continue
            for k, series in out.items():
                v = finite_float(row.get(k))
                if v is not None:
                    series[int(rnd)] = v
    return out


def last_logged(run_dir: str | os.PathLike, keys) -> dict[str, float]:
    """The value of each of ``keys`` in the last round of ``metrics.csv`` that logged it (per-round
    diagnostics, such as the expert-cluster agreement, are logged there rather than in the final
    metrics); absent keys are left out."""
    return {k: series[max(series)] for k, series in read_history(run_dir, keys).items() if series}


def load_runs(root: str | os.PathLike) -> list[Run]:
    runs = [load_run(p) for p in find_run_dirs(root)]
    if not runs:
        raise ResultsError(f"no runs under {root} (looked for folders with summary.json or config.yaml)")
    return assign_labels(runs)


# ---------------------------------------------------------------------- W&B
def _plain(mapping) -> dict:
    """A W&B summary or config (dict-like; config values may be wrapped as {'value': v}) as a dict."""
    items = mapping.items() if hasattr(mapping, "items") else []
    out = {}
    for k, v in items:
        if isinstance(v, dict) and set(v) <= {"value", "desc"} and "value" in v:
            v = v["value"]
        out[k] = v
    return out


def run_from_wandb(wb_run) -> Run:
    """A record from a W&B run (the public API's ``Run``: ``.summary``, ``.config``, ``.state``, ``.name``).

    fedbench's W&B logger writes the run's flattened config (``method`` short name, ``data.alpha``,
    ``seed``, ``method.init_args.*``...) and the final numbers into the run summary.
    """
    summary, config = _plain(wb_run.summary), _plain(wb_run.config)
    path = "/".join(getattr(wb_run, "path", None) or []) or str(getattr(wb_run, "name", "?"))
    pick = lambda *keys: next((src[k] for k in keys for src in (summary, config) if src.get(k) is not None), None)
    method = pick("method")
    run = Run(path=f"wandb:{path}", method=short_name(method) if method else "?",
              dataset=pick("dataset") or _source_name(pick("data.source.class_path", "data.source")),
              scheme=pick("scheme", "data.scheme"), alpha=pick("alpha", "data.alpha"),
              rounds=pick("rounds", "loop.rounds"), seed=pick("seed"), name=pick("name"),
              shift=shift_label(pick("data.shift"), pick("data.clusters"), pick("data.held_out_clusters")),
              init_args={k[len("method.init_args."):]: v for k, v in config.items() if k.startswith("method.init_args.")},
              global_model=pick("global_model") or "trained")
    run.metrics = {k: summary.get(k) for k in METRICS + EXTRA_METRICS + VAL_METRICS}  # W&B's summary: each key's last value
    state = getattr(wb_run, "state", "finished")
    if method is None:
        run.status = "not a fedbench run (no 'method' in its config)"
    elif state != "finished":
        run.status = f"W&B state {state!r}"
    elif summary.get("status") not in (None, "finished") or all(v is None for v in run.metrics.values()):
        run.status = "no final accuracies in its W&B summary"
    return run


def load_wandb_runs(path: str, api=None) -> list[Run]:
    """Runs of the W&B project ``ENTITY/PROJECT`` (read through ``wandb.Api().runs``)."""
    if path.count("/") != 1 or not all(path.split("/")):
        raise ResultsError(f"--wandb expects ENTITY/PROJECT (got {path!r})")
    try:
        if api is None:
            import wandb

            api = wandb.Api()
        runs = [run_from_wandb(r) for r in api.runs(path)]
    except ResultsError:
        raise
    except Exception as err:  # wandb raises its own CommError/UsageError, or ValueError for a bad path
        raise ResultsError(f"cannot read W&B runs of {path}: {' '.join(str(err).split()) or type(err).__name__}") from None
    if not runs:
        raise ResultsError(f"W&B project {path} has no runs")
    return assign_labels(runs)


# ---------------------------------------------------------------------- labels
def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v, sort_keys=True, default=str) if isinstance(v, list) else v
    return out


def assign_labels(runs: list[Run]) -> list[Run]:
    """Row labels: the config's ``name`` or the method's short name; where runs of one label in one
    group differ in method settings (an ablation run without ``--name``), each run whose setting is
    not the most common one gets it appended, e.g. ``fedcoe (coordinated=False)``."""
    by_key: dict[tuple, list[Run]] = {}
    for r in runs:
        r.label = r.name or r.method
        by_key.setdefault((r.group, r.label), []).append(r)
    for same in by_key.values():
        flats = [_flat(r.init_args) for r in same]
        keys = sorted({k for f in flats for k in f})
        for r, f in zip(same, flats):  # a run from before an argument existed ran at its default
            for k in keys:
                if k not in f and r.class_path and (default := argument_default(r.class_path, k)) is not NO_DEFAULT:
                    f[k] = default
        varying = [k for k in keys if len({repr(f.get(k)) for f in flats}) > 1]
        for r, f in zip(same, flats):
            extra = []
            for k in varying:
                counts = Counter(repr(g.get(k)) for g in flats).most_common()
                unique_mode = len(counts) == 1 or counts[0][1] > counts[1][1]
                if not unique_mode or repr(f.get(k)) != counts[0][0]:
                    extra.append(f"{k}={f.get(k)}")
            if extra:
                r.label = f"{r.label} ({', '.join(extra)})"
    return runs


def method_sort_key(label: str) -> tuple:
    """Rows by family, then registry order (:mod:`fedcoe_bench.registry`), then label."""
    return (*family_order(label.split(" ")[0].split("-")[0]), label)


def fmt_alpha(alpha) -> str:
    try:
        return f"{float(alpha):g}"
    except (TypeError, ValueError):
        return str(alpha)


def group_title(group: tuple) -> str:
    dataset, scheme, alpha, rounds = group
    title = f"{dataset}, {scheme}" + (f" alpha={fmt_alpha(alpha)}" if alpha is not None and scheme == "dirichlet" else "")
    return title + (f", {rounds} rounds" if rounds is not None else "")


def shift_label(shift: str, clusters: int, held_out_clusters) -> str | None:
    """A short name of a shift setting for run directories and table titles; None without shift.

    Example:
        >>> shift_label("rotate", 4, [3]), shift_label("my_mod.Blur", 2, []), shift_label("none", 4, [])
        ('rotate4-held3', 'blur2', None)
    """
    if shift in (None, "none"):
        return None
    held = "_".join(str(k) for k in sorted(held_out_clusters or ()))
    held = f"-held{held}" if held else ""
    return f"{str(shift).rpartition('.')[2].lower()}{clusters}{held}"


def copy_records(source: str | os.PathLike, dest: str | os.PathLike) -> list[Path]:
    """Copy the small records (:data:`~fedcoe_bench.runs.RECORDS`) of every finished or diverged run below
    ``source`` to the same relative place below ``dest``, so that ``fedbench table DEST`` rebuilds the tables
    (a diverged run listed under its table as a failure) and a sweep started elsewhere counts them as done
    (a diverged one as diverged, not rerun); checkpoints and client states are never copied. Returns the
    run directories written."""
    import shutil

    from fedcoe_bench.runs import RECORDS

    source, dest = Path(source), Path(dest)
    written = []
    for run in find_run_dirs(source):
        if not (RunDir(run).is_finished() or RunDir(run).divergence()):
            continue
        target = dest / run.relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for name in RECORDS:
            if (run / name).exists():
                shutil.copy2(run / name, target / name)
        written.append(target)
    return written


def records_command(cfg) -> int:
    """``fedbench records RUNS_DIR DEST``."""
    written = copy_records(cfg.dir, cfg.dest)
    if not written:
        raise ResultsError(f"no finished or diverged run (a directory with summary.json or diverged.txt) below {cfg.dir}")
    print(f"copied the records of {len(written)} runs (finished or diverged) to {cfg.dest} (no checkpoints, no client states)")
    return 0


def result_line(summary: dict, seconds: float | None = None) -> str:
    """What a finished ``fit`` or ``eval`` did, in one line: the method, the three accuracies in % (n/a where
    the method has no such model), the time (``seconds``, else the summary's training time), whether it
    resumed or extended a run, and the run directory."""
    def pct(key: str) -> str:
        value = summary.get(key)
        none = value is None or (key in SERVER_METRICS and summary.get("global_model") == "none")
        return "n/a" if none else f"{100 * value:.2f}%"

    config = summary.get("config") or {}
    name = config.get("name") or summary.get("method")
    seconds = summary.get("wall_time_s") if seconds is None else seconds
    if summary.get("evaluated_from"):
        what = f"evaluated {summary['evaluated_from']} as {name}"
    else:
        what = f"{name} trained {summary.get('rounds')} rounds"
        if summary.get("resumed_from_round") is not None:
            what += f" (resumed from round {summary['resumed_from_round']}"
            extended = summary.get("extended_from_rounds")
            what += f", extended from {extended} to {summary.get('rounds')} rounds)" if extended else ")"
    return (f"fedbench: {what}: global {pct('global_acc')}, personal {pct('personal_acc')}, cold-start "
            f"{pct('cold_start_acc')} in {seconds or 0:.1f} s; run directory {summary.get('run_dir') or config.get('run_dir')}")
