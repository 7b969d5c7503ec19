"""``fedbench plot RUNS_DIR``: PNG figures of finished runs, one set per (dataset, scheme, alpha, rounds).

- ``*_curves.png``: global / personalized / cold-start accuracy (%) against the round, one line
  per method (mean over seeds, band: ± one sample std), from each run's ``metrics.csv``;
- ``*_cost.png``: each method's accuracy (mean ± std over seeds, the table's numbers) against what it
  costs: parameters per client and training time per round relative to FedAvg (the cost table's);
- ``*_clients.png``: the spread of per-client accuracy (%) per method, all seeds pooled, from each
  run's ``clients.csv`` (written by ``fedbench fit`` at the final evaluation);
- ``*_partition.png``: how the partition deals classes to clients (the run config's
  ``FederatedData.setup(seed).label_histogram()``, lowest seed of the group), with one pool image
  of each class under its colour (up to 20 classes);
- with feature-shift clusters, ``*_clusters.png``: a few of the clients' (transformed) images per
  cluster, and ``*_routing.png``: each client's routing profile (``routing.csv``), clients grouped
  by cluster, one panel per method with experts (lowest seed).
"""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

from fedcoe_bench.results import (SERVER_METRICS, Run, finite_float, fmt_alpha, group_title, load_runs, method_sort_key,
                                  read_history)
from fedcoe_bench.tables import COSTS, build_tables, mean_std

CURVE_METRICS = (("global_acc", "global (server model, global test set)"),
                 ("personal_acc", "personalized (own model, own test split)"),
                 ("cold_start_acc", "cold-start (new clients, no training)"))


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # a bare Figure renders with Agg and touches no global backend

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _colors(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def legend_entries(axes) -> tuple[list, list[str]]:
    """Every panel's legend entries once each, in the order the panels first show them: one figure
    legend for panels that each draw some of the methods."""
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    return handles, names


def read_curve(run_dir: str | Path) -> dict[str, dict[int, float]]:
    """metric -> {round: accuracy} from ``metrics.csv`` (rounds without an evaluation are left out)."""
    return read_history(run_dir, [m for m, _ in CURVE_METRICS])


def read_clients(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "clients.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [{"kind": r["kind"], "acc": finite_float(r["acc"])} for r in csv.DictReader(f) if finite_float(r.get("acc")) is not None]


def _slug(group: tuple) -> str:
    dataset, scheme, alpha, rounds = group
    text = f"{dataset}_{scheme}{'' if alpha is None else fmt_alpha(alpha)}" + ("" if rounds is None else f"_{rounds}r")
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text)


def curve_series(runs: list[Run]) -> dict[str, dict[str, list[dict[int, float]]]]:
    """``{metric: {label: [one {round: value} per seed]}}`` of the curves a figure draws: a server
    metric (global, cold-start) only for runs whose method has a server model, as the tables print
    ``n/a`` for the others (Local's untrained model is no curve)."""
    curves = {r.path: read_curve(r.path) for r in runs}
    series: dict[str, dict[str, list[dict[int, float]]]] = {}
    for metric, _ in CURVE_METRICS:
        for r in runs:
            if curves[r.path][metric] and not (metric in SERVER_METRICS and r.global_model == "none"):
                series.setdefault(metric, {}).setdefault(r.label, []).append(curves[r.path][metric])
    return series


def plot_curves(runs: list[Run], title: str, out: Path) -> bool:
    labels = sorted({r.label for r in runs}, key=method_sort_key)
    colors = _colors(labels)
    series = curve_series(runs)
    if not series:
        return False
    from matplotlib.ticker import MaxNLocator

    fig = _figure(5.0 * len(CURVE_METRICS), 4.2)
    axes = fig.subplots(1, len(CURVE_METRICS))
    for ax, (metric, name) in zip(axes, CURVE_METRICS):
        for i, label in enumerate(labels):
            per_seed = series.get(metric, {}).get(label)
            if not per_seed:
                continue
            rounds = sorted({t for c in per_seed for t in c})
            stats = [mean_std([100 * c[t] for c in per_seed if t in c]) for t in rounds]
            mean = [m for m, _ in stats]
            std = [s or 0.0 for _, s in stats]
            # every other method dashed: a method that tracks another (FedProx, FedAvg) stays visible
            ax.plot(rounds, mean, marker="o" if len(rounds) <= 12 else None, markersize=3.5, color=colors[label],
                    linestyle="--" if i % 2 else "-", label=f"{label} (n={len(per_seed)})")
            if len(per_seed) > 1:
                ax.fill_between(rounds, [max(0.0, m - s) for m, s in zip(mean, std)],
                                [min(100.0, m + s) for m, s in zip(mean, std)], color=colors[label], alpha=0.18,
                                linewidth=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("communication round")
        ax.set_ylabel("accuracy (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_xlim(left=0)  # the first point is round eval_every, not the start of training
        ax.grid(alpha=0.3)
        lo, hi = ax.get_ylim()
        ax.set_ylim(max(0.0, lo), min(100.0, hi))
    handles, names = legend_entries(axes)
    fig.legend(handles, names, loc="outside right upper", title="method (seeds)", fontsize=9)
    fig.suptitle(f"{title}: accuracy vs round (mean over seeds, band ± 1 std)")
    fig.savefig(out)
    return True


COST_AXES = ("client_params", "round_time_x")  # keys of tables.COSTS: the figure's x axes


def cost_points(runs: list[Run], shown: set[str] | None = None) -> dict[str, dict[str, tuple[dict, float, float | None]]]:
    """``{metric: {label: (cost, mean, std)}}``: the rows (``shown`` labels only, default all) of the
    table of ``runs``, one group, that recorded a cost, their accuracy in % as the table prints it (a
    server metric left out where the table says n/a). The round time is relative to the group's FedAvg
    row, as in the table, whether or not FedAvg is shown."""
    tables = build_tables(runs)
    if len(tables) != 1:
        raise ValueError(f"cost_points takes the runs of one group (got {len(tables)})")
    points: dict[str, dict[str, tuple[dict, float, float | None]]] = {}
    for metric, _ in CURVE_METRICS:
        for row in tables[0].rows:
            cell = row.cells[metric]
            if row.cost and cell.mean is not None and cell.model != "none" and (shown is None or row.label in shown):
                points.setdefault(metric, {})[row.label] = (row.cost, cell.mean, cell.std)
    return points


def plot_cost(runs: list[Run], title: str, out: Path, group_runs: list[Run] | None = None) -> bool:
    """``runs``' points; their costs read from the table of ``group_runs`` (default ``runs``), the
    whole group, so that the time axis has the group's FedAvg as its unit."""
    points = cost_points(group_runs or runs, {r.label for r in runs})
    if not points:
        return False
    from matplotlib.ticker import LogFormatter

    labels = sorted({r.label for r in runs}, key=method_sort_key)
    colors = _colors(labels)  # the curves figure's colours
    fig = _figure(5.0 * len(CURVE_METRICS), 3.8 * len(COST_AXES))
    axes = fig.subplots(len(COST_AXES), len(CURVE_METRICS), squeeze=False)
    for row_axes, key in zip(axes, COST_AXES):
        name, scale, _ = COSTS[key]
        for ax, (metric, metric_name) in zip(row_axes, CURVE_METRICS):
            drawn = 0
            for label, (cost, mean, std) in points.get(metric, {}).items():
                if cost.get(key) is None or cost[key] <= 0:  # no FedAvg row: no relative time
                    continue
                ax.errorbar(scale * cost[key], mean, yerr=std or 0.0, fmt="o", color=colors[label], capsize=3,
                            label=label)
                drawn += 1
            ax.set_title(metric_name, fontsize=10)
            ax.set_xlabel(name)
            ax.set_ylabel("accuracy (%)")
            if not drawn:
                ax.text(0.5, 0.5, "no cost recorded" if key != "round_time_x" else "no FedAvg row: no relative time",
                        ha="center", va="center", transform=ax.transAxes)
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.set_xscale("log")
            # plain numbers (2, 3, 10, not 2 x 10^0), minor ones only where the axis spans few decades
            for set_formatter in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                set_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))
            ax.grid(alpha=0.3, which="both")
    handles, names = legend_entries(axes)
    order = sorted(range(len(names)), key=lambda i: method_sort_key(names[i]))
    fig.legend([handles[i] for i in order], [names[i] for i in order], loc="outside right upper", title="method",
               fontsize=9)
    fig.suptitle(f"{title}: accuracy against cost (mean ± 1 std over seeds)")
    fig.savefig(out)
    return True


def plot_clients(runs: list[Run], title: str, out: Path) -> bool:
    labels = sorted({r.label for r in runs}, key=method_sort_key)
    colors = _colors(labels)
    kinds = (("train", "personalized accuracy of each training client"),
             ("cold_start", "cold-start accuracy of each new client"))
    data = {k: {label: [] for label in labels} for k, _ in kinds}
    for r in runs:
        for row in read_clients(r.path):
            if row["kind"] in data:
                data[row["kind"]][r.label].append(100 * row["acc"])
    kinds = tuple((k, name) for k, name in kinds if any(data[k].values()))
    if not kinds:
        return False
    fig = _figure(max(6.0, 1.0 + 0.9 * len(labels)) * len(kinds), 4.6)
    axes = fig.subplots(1, len(kinds), sharey=True, squeeze=False)[0]
    for ax, (kind, name) in zip(axes, kinds):
        shown = [label for label in labels if data[kind][label]]
        values = [data[kind][label] for label in shown]
        box = ax.boxplot(values, patch_artist=True, widths=0.6, showfliers=False,
                         medianprops={"color": "black"})
        ax.set_xticks(range(1, len(shown) + 1), shown, rotation=30, ha="right")
        for patch, label in zip(box["boxes"], shown):
            patch.set_facecolor((*colors[label][:3], 0.35))
            patch.set_edgecolor(colors[label])
        for i, (label, vals) in enumerate(zip(shown, values), 1):  # every client as a dot
            jitter = [((j * 0.618) % 1 - 0.5) * 0.35 for j in range(len(vals))]
            ax.scatter([i + d for d in jitter], vals, s=9, color=colors[label], alpha=0.7, linewidths=0, zorder=3)
        counts = {len(v) for v in values}
        ax.set_title(f"{name}\n(one dot per client and seed; n = {', '.join(map(str, sorted(counts)))} per method)",
                     fontsize=10)
        ax.set_ylim(-2, 102)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    fig.suptitle(f"{title}: per-client accuracy at the end of training")
    fig.savefig(out)
    return True


def federation_of(config: dict):
    """(the federation, its seed) of a run's config, built on the CPU."""
    from fedcoe_bench.config import fit_parser

    parser = fit_parser()
    config = {k: v for k, v in config.items() if k != "config"}
    cfg = parser.parse_object(config)
    data = parser.instantiate(cfg).data
    return data.setup(cfg.seed), cfg.seed


def plot_partition(fed, seed: int, title: str, out: Path) -> bool:
    ids = [c.id for c in fed.clients] + [c.id for c in fed.new_clients]
    cold = {c.id for c in fed.new_clients}
    hist = fed.label_histogram().numpy()
    n_clients, n_classes = hist.shape
    width = min(16.0, max(7.0, 0.22 * n_clients + 2.5))
    fig = _figure(width, 4.8 + (1.1 if n_classes <= 20 else 0))
    if n_classes <= 20:  # a strip of one image per class, so that a colour reads as what it shows
        top, strip = fig.subfigures(2, 1, height_ratios=[4.8, 1.1])
        _class_samples(fed, strip)
    else:
        top = fig
    ax = top.subplots()
    x = list(range(n_clients))
    if n_classes <= 20:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if n_classes <= 10 else "tab20"]
        bottom = [0] * n_clients
        for c in range(n_classes):
            ax.bar(x, hist[:, c], bottom=bottom, color=cmap(c), width=0.85, label=str(c))
            bottom = [b + v for b, v in zip(bottom, hist[:, c])]
        ax.set_ylabel("training samples (local train split)")
        top.legend(title="class", loc="outside right upper", fontsize=8, ncols=1 if n_classes <= 10 else 2)
    else:
        image = ax.imshow(hist.T, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_ylabel("class")
        top.colorbar(image, ax=ax, label="training samples")
    n_train = n_clients - len(cold)
    if cold:
        ax.axvspan(n_train - 0.5, n_clients - 0.5, color="0.88", zorder=0)
    ax.set_xlim(-0.5, n_clients - 0.5)
    step = max(1, math.ceil(n_clients / 60))
    ax.set_xticks(x[::step], [str(i) for i in ids][::step], fontsize=7 if n_clients > 30 else 8,
                  rotation=90 if n_clients > 30 else 0)
    ax.set_xlabel("client id: training clients, then cold-start clients (grey band: never trained on)"
                  if cold else "client id")
    ax.set_title(f"{title}\nclasses per client (partition of seed {seed})", fontsize=11)
    fig.savefig(out)
    return True


def _class_samples(fed, fig) -> None:
    """The first pool image of each class, framed in the class's colour of the partition figure."""
    from matplotlib import colormaps

    n = fed.num_classes
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    axes = fig.subplots(1, n, squeeze=False)[0]
    for c, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_color(cmap(c))
            side.set_linewidth(3)
        ax.set_xlabel(str(c), fontsize=8, labelpad=2)
        where = (fed.pool_y == c).nonzero()
        if len(where):
            image = fed.pool_x[int(where[0, 0])].permute(1, 2, 0).cpu().numpy()
            gray = image.shape[2] == 1
            ax.imshow(image[:, :, 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=255)


def plot_cluster_samples(fed, seed: int, title: str, out: Path, per_cluster: int = 8) -> bool:
    """A row of images per cluster: the first local train samples of its clients, as the clients
    hold them (transformed)."""
    if fed.num_clusters < 2:
        return False
    everyone = sorted(fed.clients + fed.new_clients, key=lambda c: c.id)
    fig = _figure(1.0 * per_cluster + 1.8, 1.05 * fed.num_clusters + 0.7)
    axes = fig.subplots(fed.num_clusters, per_cluster, squeeze=False)
    for k, row in enumerate(axes):
        members = [c for c in everyone if c.cluster == k]
        picked = [int(i) for c in members for i in c.train[:2]][:per_cluster]
        for j, ax in enumerate(row):
            ax.set_axis_off()
            if j < len(picked):
                image = fed.pool_x[picked[j]].permute(1, 2, 0).cpu().numpy()
                gray = image.shape[2] == 1
                ax.imshow(image[:, :, 0] if gray else image, cmap="gray" if gray else None, vmin=0, vmax=255)
        held = ", held out" if k in fed.held_out_clusters else ""
        row[0].text(-0.15, 0.5, f"cluster {k}\n({len(members)} clients{held})", transform=row[0].transAxes,
                    ha="right", va="center", fontsize=8)
    fig.suptitle(f"{title}\nlocal train images per cluster (partition of seed {seed})", fontsize=10)
    fig.savefig(out)
    return True


def read_routing(run_dir: str | Path) -> tuple[list[int], list[list[float]]] | None:
    """(cluster of each client, routing profiles) from a run's ``routing.csv``; None without one or
    without a cluster column."""
    path = Path(run_dir) / "routing.csv"
    if not path.exists():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "cluster" not in rows[0]:
        return None
    experts = [k for k in rows[0] if k.startswith("expert_")]
    return [int(r["cluster"]) for r in rows], [[float(r[k]) for k in experts] for r in rows]


def plot_routing(runs: list[Run], title: str, out: Path) -> bool:
    """Each client's routing profile as a row of a heat map, clients grouped by cluster, one panel
    per method with a ``routing.csv`` (its lowest seed), NMI and purity of top expert vs cluster."""
    import torch

    from fedcoe_bench.routing import expert_cluster_agreement

    panels = []
    for label in sorted({r.label for r in runs}, key=method_sort_key):
        seeded = sorted((r for r in runs if r.label == label), key=lambda r: (r.seed is None, r.seed or 0, r.path))
        found = next(((r, got) for r in seeded if (got := read_routing(r.path)) and len(set(got[0])) > 1), None)
        if found:
            panels.append((label, *found))
    if not panels:
        return False
    fig = _figure(max(5.5, 2.2 + 2.6 * len(panels)), 5.0)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (label, run, (clusters, profiles)) in zip(axes, panels):
        top = [max(range(len(p)), key=p.__getitem__) for p in profiles]
        order = sorted(range(len(clusters)), key=lambda i: (clusters[i], top[i]))
        image = ax.imshow([profiles[i] for i in order], aspect="auto", cmap="viridis", vmin=0, vmax=1,
                          interpolation="nearest")
        bounds = [i for i in range(1, len(order)) if clusters[order[i]] != clusters[order[i - 1]]]
        for b in bounds:
            ax.axhline(b - 0.5, color="white", linewidth=1.5)
        starts, ends = [0, *bounds], [*bounds, len(order)]
        ax.set_yticks([(s + e - 1) / 2 for s, e in zip(starts, ends)],
                      [f"cluster {clusters[order[s]]}" for s in starts], fontsize=8)
        ax.set_xticks(range(len(profiles[0])), [str(k) for k in range(len(profiles[0]))])
        ax.set_xlabel("expert")
        agree = expert_cluster_agreement(torch.tensor(top), torch.tensor(clusters))
        ax.set_title(f"{label} (seed {run.seed})\nNMI {agree['expert_cluster_nmi']:.2f}, "
                     f"purity {agree['expert_cluster_purity']:.2f}", fontsize=9)
    fig.colorbar(image, ax=axes.tolist(), label="mean gate weight")
    fig.suptitle(f"{title}:\nrouting profile of each trained client, grouped by cluster", fontsize=10)
    fig.savefig(out)
    return True


def figure_sets(slug: str, runs: list[Run]) -> list[tuple[str, list[Run]]]:
    """The methods in one set of figures; named settings (ablations, ``--name``) in a second,
    ``SLUG_variants``, next to the default runs of their methods, so neither figure is crowded."""
    plain = [r for r in runs if r.label == r.method]
    variants = [r for r in runs if r.label != r.method]
    if not plain or not variants:
        return [(slug, runs)]
    ablated = {r.method for r in variants}
    return [(slug, plain), (f"{slug}_variants", [r for r in plain if r.method in ablated] + variants)]


def make_plots(runs_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write the figures of every group of finished runs under ``runs_dir``; returns the files written."""
    runs = load_runs(runs_dir)
    out = Path(out_dir) if out_dir is not None else Path(runs_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        print(f"plot: leaving out {len(unfinished)} run(s) that are not finished "
              f"(see fedbench table): {', '.join(r.path for r in unfinished[:3])}{' ...' * (len(unfinished) > 3)}",
              file=sys.stderr)
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.finished:
            groups.setdefault(r.group, []).append(r)
    written = []
    for group, members in sorted(groups.items(), key=lambda kv: _slug(kv[0])):
        title, slug = group_title(group), _slug(group)
        for name, shown in figure_sets(slug, members):
            if plot_curves(shown, title, out / f"{name}_curves.png"):
                written.append(out / f"{name}_curves.png")
            if plot_cost(shown, title, out / f"{name}_cost.png", group_runs=members):
                written.append(out / f"{name}_cost.png")
            if plot_clients(shown, title, out / f"{name}_clients.png"):
                written.append(out / f"{name}_clients.png")
            else:
                print(f"plot: {title}: no clients.csv in its runs, so no per-client figure", file=sys.stderr)
            if plot_routing(shown, title, out / f"{name}_routing.png"):
                written.append(out / f"{name}_routing.png")
        first = min(members, key=lambda r: (r.seed is None, r.seed or 0, r.path))
        try:
            config = _run_config(first)
            fed, seed = federation_of(config) if config else (None, None)
            for kind, draw in (("partition", plot_partition), ("clusters", plot_cluster_samples)):
                if fed is not None and draw(fed, seed, title, out / f"{slug}_{kind}.png"):
                    written.append(out / f"{slug}_{kind}.png")
        except Exception as err:  # noqa: BLE001 - e.g. the data set is not on this machine
            print(f"plot: {title}: no partition figure ({type(err).__name__}: {' '.join(str(err).split())[:200]})",
                  file=sys.stderr)
    return written


def _run_config(run: Run) -> dict | None:
    import json

    path = Path(run.path) / "summary.json"
    if path.exists():
        return json.loads(path.read_text()).get("config")
    return None


def command(cfg) -> int:
    """``fedbench plot DIR [--out DIR]``: prints the files written."""
    from fedcoe_bench.results import ResultsError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ResultsError("fedbench plot needs matplotlib: pip install 'fedcoe-bench[plots]'") from None
    written = make_plots(cfg.dir, cfg.out)
    if not written:
        raise ResultsError(f"no figures written: no finished run under {cfg.dir} has metrics.csv")
    print("\n".join(map(str, written)))
    return 0
