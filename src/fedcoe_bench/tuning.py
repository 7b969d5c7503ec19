"""Tuning: choose each method's setting from a sweep's runs on validation metrics only.

A tuning sweep is a sweep (:mod:`fedcoe_bench.sweep`) whose W&B ``metric`` is a validation metric
(``val_*``): per group (dataset, scheme, alpha, rounds, method) the setting with the best mean over
its seeds is chosen, a setting with a diverged run is out, and only the chosen setting's test
numbers are printed; ``--export`` writes each choice as a config the main table runs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from fedcoe_bench.sweep import SweepError, SweepRun, check_finished, load_sweep


VALIDATION_PREFIX = "val_"
# Grid parameters that say which group a run belongs to, or which repetition it is, not which setting.
NOT_A_SETTING = ("seed", "method", "data.source", "data.scheme", "data.alpha", "loop.rounds", "data.shift",
                 "data.clusters", "data.held_out_clusters")


@dataclass
class Selection:
    """The chosen setting of one (dataset, scheme, alpha, rounds, method) group."""

    group: tuple  # results.Run.group + (method,)
    setting: dict  # the grid parameters that make the setting (seed and group keys left out)
    score: float | None  # mean validation metric over its seeds; None when the group is incomplete
    runs: list[SweepRun]  # the chosen setting's runs
    settings: int  # how many settings competed
    unfinished: int = 0  # runs of the group without a finished summary: nothing is chosen then
    diverged: int = 0  # settings out of the running because one of their runs diverged
    lr_edge: str = ""  # "lowest" / "highest" when the chosen lr is an end of the lrs the group tried
    knob_edges: tuple[str, ...] = ()  # e.g. "lam the highest": another argument chosen at an end of its range


def method_args(run: SweepRun) -> dict:
    """The method's arguments in the run's resolved config."""
    return (run.config.get("method") or {}).get("init_args") or {}


def learning_rate(run: SweepRun) -> float | None:
    """The method's learning rate in the run's resolved config (None when it has none)."""
    lr = method_args(run).get("lr")
    return float(lr) if isinstance(lr, (int, float)) else None


def lr_edge(chosen: SweepRun, tried: list[SweepRun]) -> str:
    """Whether the chosen learning rate is the lowest or highest of two or more tried (every setting
    counts, diverged ones too: a grid whose top diverged has found its edge). An edge choice says
    the optimum may lie outside the grid, which is widened on that side until the choice is inside.

    >>> low, mid, top = [SweepRun(i, {}, [], Path(), {"method": {"init_args": {"lr": lr}}})
    ...                  for i, lr in enumerate((0.01, 0.03, 0.1))]
    >>> lr_edge(top, [low, top]), lr_edge(low, [low, top]), lr_edge(low, [low])
    ('highest', 'lowest', '')
    >>> lr_edge(mid, [low, mid, top])  # also when the top one diverged: it was tried
    ''
    """
    lrs = {x for x in map(learning_rate, tried) if x is not None}
    lr = learning_rate(chosen)
    if lr is None or len(lrs) < 2:
        return ""
    return "highest" if lr == max(lrs) else "lowest" if lr == min(lrs) else ""


def knob_edges(chosen: SweepRun, tried: list[SweepRun]) -> tuple[str, ...]:
    """The method's numeric arguments other than lr that the group tried at three or more values and
    chose at an end of them (with two values every choice is an end, which says nothing). The
    budget caps a knob at three values, so such an edge is reported, not widened.

    >>> runs = [SweepRun(i, {}, [], Path(), {"method": {"init_args": {"lr": 0.1, "lam": lam, "k": k}}})
    ...         for i, (lam, k) in enumerate(((0.1, 2), (0.5, 4), (1.0, 2)))]
    >>> knob_edges(runs[2], runs), knob_edges(runs[1], runs)
    (('lam the highest',), ())
    """
    edges = []
    for name, value in method_args(chosen).items():
        values = {a.get(name) for a in map(method_args, tried)}
        if name == "lr" or isinstance(value, bool) or not isinstance(value, (int, float)) or len(values) < 3 \
                or not all(isinstance(v, (int, float)) for v in values):
            continue
        if value in (min(values), max(values)):
            edges.append(f"{name} the {'highest' if value == max(values) else 'lowest'}")
    return tuple(edges)


def selection_metric(config: dict) -> tuple[str, str] | None:
    """(name, goal) of the sweep's W&B ``metric`` when it is a validation metric, else None.

    >>> selection_metric({"metric": {"name": "val_personal_acc"}}), selection_metric({"metric": {"name": "personal_acc"}})
    (('val_personal_acc', 'maximize'), None)
    """
    metric = config.get("metric") or {}
    name, goal = metric.get("name"), metric.get("goal", "maximize")
    if not (isinstance(name, str) and name.startswith(VALIDATION_PREFIX)):
        return None
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"metric.goal is {goal!r}; use maximize or minimize")
    return name, goal


def validation_score(run: SweepRun, metric: str) -> float:
    """``metric`` from the run's summary.json ``metrics``; the only number :func:`select` reads to choose."""
    metrics = json.loads((run.run_dir / "summary.json").read_text()).get("metrics") or {}
    value = metrics.get(metric)
    if value is None:
        raise SweepError(f"{run.run_dir / 'summary.json'} has no validation metric '{metric}' (the sweep's "
                         f"metric.name); rerun it with validation splits or name a val_* metric it logged")
    return float(value)


def select(runs: list[SweepRun], metric: str, goal: str = "maximize") -> list[Selection]:
    """Per group (method, dataset, scheme, alpha, rounds; read from each run's resolved config), the
    setting whose mean ``metric`` over its seeds is best; ties go to the first in grid order, NaN ranks
    last. A setting with a diverged run (``diverged.txt``, no summary) is a failed setting, out of the
    running; a group with another unfinished run chooses nothing (its ``unfinished`` says how many)."""
    from fedcoe_bench.results import run_from_config

    groups: dict[tuple, dict[tuple, list[SweepRun]]] = {}
    for r in runs:
        record = run_from_config(r.config, str(r.run_dir), "planned")
        setting = tuple((k, str(v)) for k, v in r.params.items() if k not in NOT_A_SETTING)
        groups.setdefault((*record.group, record.method), {}).setdefault(setting, []).append(r)
    out = []
    for group, settings in groups.items():
        for r in (r for same in settings.values() for r in same):
            check_finished(r)  # one read of each run directory: finished, diverged or neither
        failed = {k for k, same in settings.items() if any(r.state.startswith("diverged") for r in same)}
        unfinished = sum(r.state != "finished" for k, same in settings.items() if k not in failed for r in same)
        if unfinished or len(failed) == len(settings):
            out.append(Selection(group, {}, None, [], len(settings), unfinished=unfinished, diverged=len(failed)))
            continue
        sign = 1.0 if goal == "maximize" else -1.0
        best, best_key = None, None
        for same in (same for k, same in settings.items() if k not in failed):
            score = sum(validation_score(r, metric) for r in same) / len(same)
            key = -math.inf if math.isnan(score) else sign * score
            if best_key is None or key > best_key:
                best, best_key = (same, score), key
        chosen, score = best
        setting = {k: v for k, v in chosen[0].params.items() if k not in NOT_A_SETTING}
        tried = [r for same in settings.values() for r in same]
        out.append(Selection(group, setting, score, chosen, len(settings), unfinished=0, diverged=len(failed),
                             lr_edge=lr_edge(chosen[0], tried), knob_edges=knob_edges(chosen[0], tried)))
    return out


def render_selection(selections: list[Selection], metric: str, goal: str) -> str:
    """A markdown table: per group the chosen setting, its validation score and its test accuracies
    (mean ± std over its seeds, as ``fedbench table`` prints them), read from the chosen runs only."""
    from fedcoe_bench.results import METRICS, SERVER_METRICS, group_title, load_run, method_sort_key
    from fedcoe_bench.tables import CONVENTION_NOTE, HEADERS, Cell, mean_std

    lines = [f"## selection by {metric} ({goal}, mean over seeds); test accuracy (%) of the chosen setting only", "",
             f"| data | method | chosen | {metric} | " + " | ".join(HEADERS[m] for m in METRICS) + " | seeds |",
             "|---|---|---|---:|" + "---:|" * len(METRICS) + "---|"]
    conventions: list[str] = []
    for sel in sorted(selections, key=lambda s: (str(s.group[:-1]), method_sort_key(s.group[-1]))):
        title, method = group_title(sel.group[:-1]), sel.group[-1]
        if sel.score is None:
            why = f"{sel.unfinished} of its runs unfinished" if sel.unfinished else "every setting diverged"
            row = [f"not chosen: {why}", "", *[""] * len(METRICS), ""]
        else:
            tested = [load_run(r.run_dir) for r in sel.runs]
            cells = []
            for m in METRICS:
                values = [100.0 * t.metrics[m] for t in tested if t.metrics.get(m) is not None]
                cells.append(Cell(*mean_std(values), len(values), tested[0].global_model if m in SERVER_METRICS
                                  else "trained").styled(False, "{}", "†"))
            conventions += [method] * (tested[0].global_model == "convention")
            chosen = ", ".join(f"{k}={v}" for k, v in sel.setting.items()) or "(the only one)"
            diverged = f", {sel.diverged} diverged" if sel.diverged else ""
            edge = f"; lr the {sel.lr_edge} tried: widen the grid" if sel.lr_edge else ""
            edge += "".join(f"; {knob} of its values" for knob in sel.knob_edges)
            row = [f"{chosen} (of {sel.settings}{diverged}{edge})", f"{100.0 * sel.score:.2f}", *cells,
                   " ".join(str(r.config.get("seed")) for r in sel.runs)]
        lines.append("| " + " | ".join([title, method, *row]) + " |")
    if conventions:
        lines += ["", CONVENTION_NOTE.format(dagger="†", labels=", ".join(dict.fromkeys(conventions)))]
    return "\n".join(lines) + "\n"


def _nest(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def export_selection(selections: list[Selection], directory: str | os.PathLike, metric: str, source: str) -> list[Path]:
    """Write each chosen setting as a config file ``DIRECTORY/<dataset>-<scheme><alpha>-<method>.yaml``,
    to be given after the sweep's base config: the setting's own config files and grid values, the
    chosen runs' resolved ``method`` (class and every argument) and ``name``, and the group's data
    keys (source, scheme, alpha, shift), so that one file pins one table row. Groups that chose
    nothing (unfinished runs) write no file. Returns the paths written."""
    from fedcoe_bench.results import fmt_alpha, run_from_config

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for sel in selections:
        if sel.score is None:
            continue
        config = sel.runs[0].config
        out: dict = {}
        for key, value in sel.setting.items():
            if key == "config":
                out = _merge(out, yaml.safe_load(Path(value).read_text()) or {})
            else:
                out = _merge(out, _nest({key: value}))
        data = {k: config["data"][k] for k in ("source", "scheme", "alpha", "shift", "clusters", "held_out_clusters")
                if k in config.get("data", {})}
        out = _merge(out, {"name": config.get("name"), "method": config["method"], "data": data})
        record = run_from_config(config, "", "chosen")
        alpha = fmt_alpha(record.alpha) if record.scheme == "dirichlet" else ""
        stem = "-".join(filter(None, (record.dataset, record.shift, f"{record.scheme}{alpha}", record.method)))
        path = directory / f"{stem}.yaml"
        seeds = " ".join(str(r.config.get("seed")) for r in sel.runs)
        header = (f"# chosen by `fedbench sweep {source}`: {metric} {sel.score:.4f} (mean over seeds {seeds}), "
                  f"the best of {sel.settings} settings\n")
        path.write_text(header + yaml.safe_dump({k: v for k, v in out.items() if v is not None}, sort_keys=False))
        written.append(path)
    return written


def sweeps_metric(paths: list[str | os.PathLike]) -> tuple[str, str] | None:
    """The validation metric the sweep files choose by (:func:`selection_metric`), None for files
    that choose nothing; files that differ cannot run as one sweep."""
    metrics = {str(path): selection_metric(load_sweep(path)) for path in paths}
    if len(set(metrics.values())) > 1:
        named = ", ".join(f"{p}: {m[0] if m else 'no val_* metric'}" for p, m in metrics.items())
        raise SweepError(f"the sweep files choose by different metrics ({named}); give them one metric, or run them apart")
    return next(iter(metrics.values()))


def report_selection(source: str, chosen_by: tuple[str, str], runs: list[SweepRun], export: str | None = None) -> None:
    """Print the selection of a tuning sweep's runs by ``chosen_by`` (:func:`sweeps_metric`), and with
    ``export`` write it as config files (:func:`export_selection`; ``source`` names the sweep there)."""
    selections = select(runs, *chosen_by)
    print(render_selection(selections, *chosen_by), end="", flush=True)
    if export is not None:
        for written in export_selection(selections, export, chosen_by[0], source):
            print(f"wrote {written}", flush=True)
