"""``fedbench table``: methods as rows, the accuracies as columns, mean ± std over seeds.

One table per (dataset, scheme, alpha, rounds). Numbers are percentages with one decimal; std is
the sample standard deviation (n - 1) over seeds; ``n`` is the number of seeds. The best mean of
each column (compared at the printed precision, so ties are all bold) is bold. Runs that could not
be counted are listed under their table as ``missing: PATH (why)``; a method with fewer seeds
than the others in its table gets a ``note:`` line naming the seeds it lacks.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass, field

from fedcoe_bench.results import METRICS, Run, group_title, method_sort_key

HEADERS = {"global_acc": "global", "personal_acc": "personal", "cold_start_acc": "cold-start",
           "cold_start_lp_acc": "cold-start + prior"}
FORMATS = ("md", "csv", "latex")


@dataclass
class Cell:
    mean: float | None  # in %
    std: float | None  # in %; None with fewer than two values
    n: int

    def text(self, pm: str = " ± ") -> str:
        if self.mean is None:
            return "–"
        return f"{self.mean:.1f}" + (f"{pm}{self.std:.1f}" if self.std is not None else "")


@dataclass
class Row:
    label: str
    seeds: list
    paths: list[str]
    cells: dict[str, Cell]
    bold: set = field(default_factory=set)


@dataclass
class Table:
    group: tuple
    rows: list[Row]
    missing: list[Run]
    notes: list[str]

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


def build_tables(runs: list[Run]) -> list[Table]:
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    tables = []
    for key in sorted(groups, key=_group_order):
        members = groups[key]
        missing = [r for r in members if not r.finished]
        notes: list[str] = []
        by_label: dict[str, dict] = {}
        for r in sorted((r for r in members if r.finished), key=lambda r: r.path):
            seeds = by_label.setdefault(r.label, {})
            if r.seed in seeds:
                notes.append(f"duplicate: {r.label} seed {r.seed} in {seeds[r.seed].path} and {r.path}; "
                             f"counting the first only")
                continue
            seeds[r.seed] = r
        rows = []
        for label in sorted(by_label, key=method_sort_key):
            seed_runs = by_label[label]
            cells = {}
            for m in METRICS:
                values = [100.0 * r.metrics[m] for r in seed_runs.values() if r.metrics.get(m) is not None]
                mean, std = mean_std(values)
                cells[m] = Cell(mean, std, len(values))
            rows.append(Row(label, sorted(seed_runs, key=str), [r.path for r in seed_runs.values()], cells))
        for m in METRICS:
            shown = [round(r.cells[m].mean, 1) for r in rows if r.cells[m].mean is not None]
            for r in rows:
                if shown and r.cells[m].mean is not None and round(r.cells[m].mean, 1) == max(shown):
                    r.bold.add(m)
        all_seeds = sorted({s for r in rows for s in r.seeds}, key=str)
        for r in rows:
            lacking = [s for s in all_seeds if s not in r.seeds]
            if lacking:
                notes.append(f"note: {r.label} has {len(r.seeds)} seed{'s' * (len(r.seeds) != 1)} "
                             f"({', '.join(map(str, r.seeds))}), the others up to {len(all_seeds)}: "
                             f"missing seed{'s' * (len(lacking) != 1)} {', '.join(map(str, lacking))}")
        tables.append(Table(key, rows, missing, notes))
    return tables


def _missing_lines(table: Table) -> list[str]:
    return [f"missing: {r.path} ({r.label} seed {r.seed}; {r.status})" for r in table.missing]


def render_md(tables: list[Table]) -> str:
    out = []
    for t in tables:
        out.append(f"## {t.title}\n")
        if t.rows:
            out.append("| method | " + " | ".join(HEADERS[m] for m in METRICS) + " | n |")
            out.append("|---|" + "---:|" * len(METRICS) + "---:|")
            for r in t.rows:
                cells = [f"**{r.cells[m].text()}**" if m in r.bold else r.cells[m].text() for m in METRICS]
                out.append(f"| {r.label} | " + " | ".join(cells) + f" | {len(r.seeds)} |")
            out.append("")
        else:
            out.append("(no finished runs)\n")
        extra = t.notes + _missing_lines(t)
        if extra:
            out += extra + [""]
    out.append("Accuracy in %, mean ± sample std over n seeds; best mean per column in bold.")
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
        out.append("\\begin{tabular}{l" + "r" * len(METRICS) + "r}")
        out.append("\\toprule")
        out.append("Method & " + " & ".join(HEADERS[m].capitalize() for m in METRICS) + " & $n$ \\\\")
        out.append("\\midrule")
        for r in t.rows:
            cells = [r.cells[m].text(" $\\pm$ ") for m in METRICS]
            cells = [f"\\textbf{{{c}}}" if m in r.bold else c for m, c in zip(METRICS, cells)]
            out.append(f"{_tex(r.label)} & " + " & ".join(cells) + f" & {len(r.seeds)} \\\\")
        out.append("\\bottomrule")
        out.append("\\end{tabular}")
        out += [f"% {line}" for line in t.notes + _missing_lines(t)]
        out.append("")
    return "\n".join(out)


def render_csv(tables: list[Table]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["dataset", "scheme", "alpha", "rounds", "method", "n", "seeds"]
               + [f"{m}_{s}" for m in METRICS for s in ("mean", "std")])
    for t in tables:
        dataset, scheme, alpha, rounds = t.group
        for r in t.rows:
            stats = []
            for m in METRICS:
                c = r.cells[m]
                stats += ["" if c.mean is None else f"{c.mean:.4f}", "" if c.std is None else f"{c.std:.4f}"]
            w.writerow([dataset, scheme, "" if alpha is None else alpha, "" if rounds is None else rounds,
                        r.label, len(r.seeds), " ".join(map(str, r.seeds))] + stats)
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
    """``fedbench table [DIR] [--format md|csv|latex] [--wandb ENTITY/PROJECT]``."""
    import sys

    from fedcoe_bench.results import ResultsError, load_runs, load_wandb_runs

    if (cfg.dir is None) == (cfg.wandb is None):
        raise ResultsError("fedbench table reads a runs directory or --wandb ENTITY/PROJECT: give exactly one")
    runs = load_wandb_runs(cfg.wandb) if cfg.wandb else load_runs(cfg.dir)
    text, notes = render(build_tables(runs), cfg.format)
    print(text, end="")
    for line in notes:
        print(f"fedbench table: {line}", file=sys.stderr)
    return 0
