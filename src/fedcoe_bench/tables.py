"""``fedbench table``: methods as rows, the accuracies as columns, mean ± std over seeds.

One table per (dataset, scheme, alpha, rounds). Numbers are percentages with one decimal; std is
the sample standard deviation (n - 1) over seeds; ``n`` is the number of seeds. The best mean of
each column (compared at the printed precision, so ties are all bold) is bold. Runs that could not
be counted are listed under their table as ``missing: PATH (why)``; a diverged run is also a failure
in its row, ``n`` reading ``2 + 1 diverged`` (a setting whose every run diverged is a row of dashes),
the same rule for every method; a method with fewer seeds than the others in its table gets a
``note:`` line naming the seeds it lacks that no failure accounts for.

The global and cold-start columns measure a server-side model, which the run's method declares
(``global_model`` in summary.json, from the method class): where it has none (Local) the cells
read ``n/a`` and are never bold; where the benchmark serves one by a convention the method's paper
does not define (FedPer's and pFedMoE's averaged heads) the cells carry a dagger and a footnote.
The fine-tuned cold-start column (``cold-start + ft``) is a model the new client trains itself, so
it is a number for every method (Local's too); runs from before it existed show a dash there.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field

from fedcoe_bench.results import EXTRA_METRICS, METRICS, SCORES, SERVER_METRICS, Run, group_title, method_sort_key

HEADERS = {"global_acc": "global", "personal_acc": "personal", "cold_start_acc": "cold-start",
           "cold_start_ft_acc": "cold-start + ft", "cold_start_lp_acc": "cold-start + prior", "personal_lp_acc": "personal + prior",
           "cold_start_acc_new_domain": "cold-start new domain", "expert_cluster_nmi": "expert-cluster NMI",
           "expert_cluster_purity": "expert-cluster purity", "cold_start_gate_assignment_agreement": "new-client gate agreement"}
HEADERS.update({f"val_{m}": f"val {h}" for m, h in HEADERS.items() if m not in SCORES})
SPLITS = ("test", "val")
FORMATS = ("md", "csv", "latex")
NA = "n/a"
# the most cautious first: a row whose runs disagree (e.g. summaries written before the field) takes it
GLOBAL_MODELS = ("none", "convention", "trained")
CONVENTION_NOTE = ("{dagger} {labels}: the method defines no server model; these columns serve the benchmark's "
                   "convention (see the method's docstring)")


@dataclass
class Cell:
    mean: float | None  # in %
    std: float | None  # in %; None with fewer than two values
    n: int
    model: str = "trained"  # what the cell measures: trained | convention | none (see GLOBAL_MODELS)
    digits: int = 1

    def text(self, pm: str = " ± ") -> str:
        if self.model == "none":
            return NA
        if self.mean is None:
            return "–"
        return f"{self.mean:.{self.digits}f}" + (f"{pm}{self.std:.{self.digits}f}" if self.std is not None else "")

    def styled(self, bold: bool, bold_fmt: str, dagger: str, pm: str = " ± ") -> str:
        """The text, bold where asked, with ``dagger`` after a convention-based number."""
        text = bold_fmt.format(self.text(pm)) if bold else self.text(pm)
        return text + dagger if self.model == "convention" and self.mean is not None else text


@dataclass
class Row:
    label: str
    seeds: list
    paths: list[str]
    cells: dict[str, Cell]
    bold: set = field(default_factory=set)
    cost: dict = field(default_factory=dict)  # cost_of(): what the method costs, next to what it scores
    method: str = ""  # the runs' method (short name), whatever the row's label
    diverged: list = field(default_factory=list)  # the seeds of its runs that diverged (failures, not dropped)

    @property
    def n(self) -> str:
        return f"{len(self.seeds)}" + (f" + {len(self.diverged)} diverged" if self.diverged else "")


@dataclass
class Table:
    group: tuple
    rows: list[Row]
    missing: list[Run]
    notes: list[str]
    columns: tuple = METRICS  # METRICS, then the EXTRA_METRICS some run of the table has (on_split's keys)
    split: str = "test"

    @property
    def title(self) -> str:
        return group_title(self.group)


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value).

    >>> [round(v, 4) for v in mean_std([0.5, 0.7])]
    [0.6, 0.1414]
    """
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _group_order(group: tuple) -> tuple:
    return tuple((x is None, (0, x, "") if isinstance(x, (int, float)) else (1, 0, str(x))) for x in group)


def on_split(metric: str, split: str) -> str:
    """The key of ``metric`` on ``split`` (``val``: ``val_`` + the accuracy; scores have no twin).

    >>> on_split("global_acc", "val"), on_split("expert_cluster_nmi", "val"), on_split("global_acc", "test")
    ('val_global_acc', 'expert_cluster_nmi', 'global_acc')
    """
    return f"val_{metric}" if split == "val" and metric not in SCORES else metric


def build_tables(runs: list[Run], split: str = "test") -> list[Table]:
    """One table per group; ``split``: the test accuracies or, ``val``, the validation ones (tuning's)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    tables = []
    for key in sorted(groups, key=_group_order):
        members = groups[key]
        missing = [r for r in members if not r.finished]
        notes: list[str] = []
        by_label: dict[str, dict] = {}
        diverged: dict[str, list[Run]] = {}
        for r in missing:
            if r.status.startswith("diverged"):
                diverged.setdefault(r.label, []).append(r)
                by_label.setdefault(r.label, {})
        for r in sorted((r for r in members if r.finished), key=lambda r: r.path):
            seeds = by_label.setdefault(r.label, {})
            if r.seed in seeds:
                notes.append(f"duplicate: {r.label} seed {r.seed} in {seeds[r.seed].path} and {r.path}; "
                             f"counting the first only")
                continue
            seeds[r.seed] = r
        columns = tuple(on_split(m, split) for m in METRICS) + tuple(
            on_split(m, split) for m in EXTRA_METRICS
            if any(r.metrics.get(on_split(m, split)) is not None for s in by_label.values() for r in s.values()))
        rows = []
        for label in sorted(by_label, key=method_sort_key):
            seed_runs = by_label[label]
            failed = diverged.get(label, [])
            model = min((r.global_model for r in [*seed_runs.values(), *failed]), key=_caution)
            cells = {}
            for m in columns:
                scale, digits = (1.0, 2) if m in SCORES else (100.0, 1)
                values = [scale * r.metrics[m] for r in seed_runs.values() if r.metrics.get(m) is not None]
                mean, std = mean_std(values)
                cells[m] = Cell(mean, std, len(values), model if m.removeprefix("val_") in SERVER_METRICS else "trained", digits)
            rows.append(Row(label, sorted(seed_runs, key=str), [r.path for r in seed_runs.values()], cells,
                            cost=cost_of(list(seed_runs.values())), method=[*seed_runs.values(), *failed][0].method,
                            diverged=sorted((r.seed for r in failed), key=str)))
        relative_time(rows)
        for m in columns:
            ranked = [r for r in rows if r.cells[m].mean is not None and r.cells[m].model != "none"]
            shown = [round(r.cells[m].mean, r.cells[m].digits) for r in ranked]
            for r in ranked:
                if round(r.cells[m].mean, r.cells[m].digits) == max(shown):
                    r.bold.add(m)
        all_seeds = sorted({s for r in rows for s in r.seeds}, key=str)
        for r in rows:
            lacking = [s for s in all_seeds if s not in r.seeds and s not in r.diverged]
            if lacking:
                has = f" ({', '.join(map(str, r.seeds))})" if r.seeds else ""
                notes.append(f"note: {r.label} has {len(r.seeds)} seed{'s' * (len(r.seeds) != 1)}{has}, "
                             f"the others up to {len(all_seeds)}: "
                             f"missing seed{'s' * (len(lacking) != 1)} {', '.join(map(str, lacking))}")
        tables.append(Table(key, rows, missing, notes, columns, split))
    return tables


COSTS = {"server_params": ("server params (M)", 1e-6, 2), "client_params": ("params / client (M)", 1e-6, 2),
         "bytes_sent": ("MB sent / round", 1e-6, 1), "bytes_received": ("MB received / round", 1e-6, 1),
         "round_time_x": ("round time × FedAvg", 1.0, 2), "prediction_flops": ("MFLOP / prediction", 1e-6, 1)}


def cost_of(runs: list[Run]) -> dict:
    """A row's cost from its runs' summaries (the same for every seed, but the round time, averaged)."""
    costs = [r.cost for r in runs if r.cost]
    if not costs:
        return {}
    c = costs[0]
    # finite only: a run evaluated from a trained one before eval wrote the trained run's cost says NaN
    times = [x["round_time_s"] for x in costs if isinstance(x.get("round_time_s"), (int, float)) and math.isfinite(x["round_time_s"])]
    return {**{k: c.get(k) for k in ("server_params", "client_params", "bytes_sent", "bytes_received")},
            "prediction_flops": c.get("personal_prediction_flops"),
            "round_time_s": statistics.fmean(times) if times else None}


def relative_time(rows: list[Row]) -> None:
    """Each row's round time over FedAvg's in the same table: the mean of its FedAvg rows, whatever
    they are named (``fedavg-lr0.1``), as a FedAvg round costs the same at any setting; none without one."""
    times = [r.cost["round_time_s"] for r in rows if r.method == "fedavg" and r.cost.get("round_time_s")]
    base = statistics.fmean(times) if times else None
    for r in rows:
        if r.cost:
            r.cost["round_time_x"] = r.cost["round_time_s"] / base if base and r.cost.get("round_time_s") else None


def render_cost_md(t: Table) -> list[str]:
    """The cost table under a group's accuracies (rows whose runs recorded a cost)."""
    rows = [r for r in t.rows if r.cost]
    if not rows:
        return []
    out = ["| method | " + " | ".join(h for h, _, _ in COSTS.values()) + " |", "|---|" + "---:|" * len(COSTS)]
    for r in rows:
        cells = ["–" if r.cost.get(k) is None else f"{scale * r.cost[k]:.{digits}f}" for k, (_, scale, digits) in COSTS.items()]
        out.append(f"| {r.label} | " + " | ".join(cells) + " |")
    return out + [""]


def _caution(model: str) -> int:
    return GLOBAL_MODELS.index(model) if model in GLOBAL_MODELS else len(GLOBAL_MODELS)


def _convention_labels(table: Table) -> list[str]:
    return [r.label for r in table.rows if any(c.model == "convention" for c in r.cells.values())]


def _missing_lines(table: Table) -> list[str]:
    return [f"missing: {r.path} ({r.label} seed {r.seed}; {r.status})" for r in table.missing]


def render_md(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out.append(f"## {t.title}\n")
        if t.rows:
            out.append("| method | " + " | ".join(HEADERS[m] for m in t.columns) + " | n |")
            out.append("|---|" + "---:|" * len(t.columns) + "---:|")
            for r in t.rows:
                cells = [r.cells[m].styled(m in r.bold, "**{}**", "†") for m in t.columns]
                out.append(f"| {r.label} | " + " | ".join(cells) + f" | {r.n} |")
            out.append("")
            if _convention_labels(t):
                out += [CONVENTION_NOTE.format(dagger="†", labels=", ".join(_convention_labels(t))), ""]
            out += render_cost_md(t)
        else:
            out.append("(no finished runs)\n")
        extra = t.notes + _missing_lines(t)
        if extra:
            out += extra + [""]
    shown = {m for t in tables for m in t.columns}
    scores = ["expert-cluster NMI and purity: 0 to 1, the last round's routing"] if "expert_cluster_nmi" in shown else []
    if "cold_start_gate_assignment_agreement" in shown:
        scores.append("new-client gate agreement: the share of new clients whose gate, from their inputs, picks the "
                      "expert their labels would")
    split = " on the validation splits" if any(t.split == "val" for t in tables) else ""
    out.append(f"Accuracy{split} in %" + (f" ({'; '.join(scores)})" if scores else "")
               + ", mean ± sample std over n seeds; best mean per column in bold.")
    return "\n".join(out) + "\n"


def _tex(s: str) -> str:
    s = s.replace("\\", "\x00")
    for ch in "_%&#${}":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\x00", r"\textbackslash{}")


def render_latex(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out.append(f"% {t.title}: accuracy (%), mean $\\pm$ sample std over n seeds; best mean in bold")
        out.append("\\begin{tabular}{l" + "r" * len(t.columns) + "r}")
        out.append("\\toprule")
        out.append("Method & " + " & ".join(HEADERS[m].capitalize() for m in t.columns) + " & $n$ \\\\")
        out.append("\\midrule")
        for r in t.rows:
            cells = [r.cells[m].styled(m in r.bold, "\\textbf{{{}}}", "$^\\dagger$", " $\\pm$ ") for m in t.columns]
            out.append(f"{_tex(r.label)} & " + " & ".join(cells) + f" & {r.n} \\\\")
        out.append("\\bottomrule")
        if _convention_labels(t):
            note = CONVENTION_NOTE.format(dagger="$^\\dagger$", labels=", ".join(map(_tex, _convention_labels(t))))
            out.append(f"\\multicolumn{{{len(t.columns) + 2}}}{{l}}{{\\footnotesize {note}}} \\\\")
        out.append("\\end{tabular}")
        out += [f"% {line}" for line in t.notes + _missing_lines(t)]
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[Table]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "scheme", "alpha", "rounds", "method", "n", "seeds"]
               + [f"{m}_{s}" for m in METRICS + EXTRA_METRICS for s in ("mean", "std")] + ["global_model"] + list(COSTS) + ["diverged_seeds"])
    for t in tables:
        dataset, scheme, alpha, rounds = t.group
        for r in t.rows:
            stats = []
            for m in METRICS + EXTRA_METRICS:
                c = r.cells.get(on_split(m, t.split), Cell(None, None, 0))
                if c.model == "none":
                    stats += [NA, NA]  # pandas reads n/a as missing
                else:
                    stats += ["" if c.mean is None else f"{c.mean:.4f}", "" if c.std is None else f"{c.std:.4f}"]
            model = min((c.model for c in r.cells.values()), key=_caution)
            costs = ["" if r.cost.get(k) is None else f"{r.cost[k]:.6g}" for k in COSTS]  # raw units: params, bytes, x, FLOPs
            w.writerow([dataset, scheme, "" if alpha is None else alpha, "" if rounds is None else rounds,
                        r.label, len(r.seeds), " ".join(map(str, r.seeds))] + stats + [model] + costs + [" ".join(map(str, r.diverged))])
    return buf.getvalue()


def render(tables: list[Table], fmt: str = "md") -> tuple[str, list[str]]:
    """(the table text, lines for stderr). CSV keeps stdout machine-readable: its notes go to stderr."""
    if fmt == "md":
        return render_md(tables), []
    if fmt == "latex":
        return render_latex(tables), []
    if fmt == "csv":
        return render_csv(tables), [line for t in tables for line in t.notes + _missing_lines(t)]
    raise ValueError(f"unknown table format {fmt!r}; choose one of {', '.join(FORMATS)}")


def command(cfg) -> int:
    """``fedbench table [DIR] [--format md|csv|latex] [--split test|val] [--wandb ENTITY/PROJECT]``."""
    import sys

    from fedcoe_bench.results import ResultsError, load_runs, load_wandb_runs

    if (cfg.dir is None) == (cfg.wandb is None):
        raise ResultsError("fedbench table reads a runs directory or --wandb ENTITY/PROJECT: give exactly one")
    runs = load_wandb_runs(cfg.wandb) if cfg.wandb else load_runs(cfg.dir)
    text, notes = render(build_tables(runs, cfg.split), cfg.format)
    print(text, end="")
    for line in notes:
        print(f"fedbench table: {line}", file=sys.stderr)
    return 0
