"""fedbench plot: the figures of a group of runs are non-empty PNGs that draw what the tables print; clients.csv
holds per-client accuracies."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

pytest.importorskip("matplotlib")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def runs(tmp_path, fit_argv, run_cli):
    """Two seeds of FedAvg and one of FedPer (3 rounds, evaluated every round), plus an unfinished run."""
    root = tmp_path / "runs"
    for method, seed in (("fedavg", 0), ("fedavg", 1), ("fedper", 0)):
        code, _, err = run_cli(fit_argv(f"runs/{method}/seed{seed}", "--method", method, "--seed", str(seed),
                                        "--loop.rounds", "3", "--loop.eval_every", "1"))
        assert code == 0, err
    shutil.copytree(root / "fedper" / "seed0", root / "fedper" / "seed1")
    (root / "fedper" / "seed1" / "summary.json").unlink()
    return root


def test_clients_csv_has_every_scored_client_once(runs):
    summary = json.loads((runs / "fedavg" / "seed0" / "summary.json").read_text())
    with open(runs / "fedavg" / "seed0" / "clients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    kinds, m = [r["kind"] for r in rows], summary["metrics"]
    assert len({r["client"] for r in rows}) == len(rows)
    # every client evaluated (no eval_clients sample): the trained training clients and every new one
    assert m["clients_evaluated"] == summary["clients"]["training"] == m["clients_trained"] + m["clients_never_trained"]
    assert kinds.count("train") == m["clients_trained"] and kinds.count("cold_start") == summary["clients"]["cold_start"]
    train = [float(r["acc"]) for r in rows if r["kind"] == "train"]
    cold = [float(r["acc"]) for r in rows if r["kind"] == "cold_start"]
    cold_lp = [float(r["lp_acc"]) for r in rows if r["kind"] == "cold_start"]
    # the summary's means are the means of these per-client accuracies
    assert sum(train) / len(train) == pytest.approx(summary["personal_acc"], abs=1e-5)
    assert sum(cold) / len(cold) == pytest.approx(summary["cold_start_acc"], abs=1e-5)
    assert sum(cold_lp) / len(cold_lp) == pytest.approx(summary["cold_start_lp_acc"], abs=1e-5)


def test_plot_writes_nonempty_pngs(runs, tmp_path, run_cli):
    out = tmp_path / "figures"
    code, stdout, err = run_cli(["plot", str(runs), "--out", str(out)])
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["synthetic_dirichlet0.3_3r_clients.png", "synthetic_dirichlet0.3_3r_cost.png",
                     "synthetic_dirichlet0.3_3r_curves.png", "synthetic_dirichlet0.3_3r_partition.png"]
    assert stdout.split() == [str(out / n) for n in ("synthetic_dirichlet0.3_3r_curves.png",
                                                     "synthetic_dirichlet0.3_3r_cost.png",
                                                     "synthetic_dirichlet0.3_3r_clients.png",
                                                     "synthetic_dirichlet0.3_3r_partition.png")]
    for name in names:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 20_000  # a drawn figure, not an empty canvas
    assert "leaving out 1 run(s) that are not finished" in err


def test_curves_average_over_seeds(runs):
    from fedcoe_bench.plots import read_curve
    from fedcoe_bench.results import load_runs

    curve = read_curve(runs / "fedavg" / "seed0")
    assert sorted(curve["global_acc"]) == [1, 2, 3]
    summary = json.loads((runs / "fedavg" / "seed0" / "summary.json").read_text())
    assert curve["global_acc"][3] == pytest.approx(summary["global_acc"])
    labels = sorted({r.label for r in load_runs(runs) if r.finished})
    assert labels == ["fedavg", "fedper"]


def test_a_method_without_a_server_model_draws_no_server_curve(runs, fit_argv, run_cli):
    """As the tables print n/a for Local's global and cold-start cells, its curves leave those out
    (they would be its untrained model) and keep its personalized one."""
    from fedcoe_bench.plots import curve_series
    from fedcoe_bench.results import load_runs

    code, _, err = run_cli(fit_argv(str(runs / "local" / "seed0"), "--method", "local", "--loop.rounds", "2",
                                    "--loop.eval_every", "1"))
    assert code == 0, err
    series = curve_series([r for r in load_runs(runs) if r.finished])
    assert "local" in series["personal_acc"] and "fedavg" in series["global_acc"]
    assert "local" not in series["global_acc"] and "local" not in series["cold_start_acc"]
    assert len(series["global_acc"]["fedavg"]) == 2  # one curve per seed


def test_the_cost_figure_plots_the_tables_accuracy_against_the_summaries_cost(runs, fit_argv, run_cli, tmp_path,
                                                                              monkeypatch):
    """Each point is a table row: x the cost its runs recorded (time over the group's FedAvg, even where
    FedAvg is not drawn), y its mean over seeds; Local has no server point, as its table cell is n/a."""
    from matplotlib.axes import Axes

    from fedcoe_bench.plots import cost_points, plot_cost
    from fedcoe_bench.results import load_runs

    code, _, err = run_cli(fit_argv(str(runs / "local" / "seed0"), "--method", "local", "--loop.rounds", "3"))
    assert code == 0, err
    finished = [r for r in load_runs(runs) if r.finished]
    points = cost_points(finished)
    summary = {(m, s): json.loads((runs / m / f"seed{s}" / "summary.json").read_text())
               for m, s in (("fedavg", 0), ("fedavg", 1), ("fedper", 0))}
    cost, mean, std = points["global_acc"]["fedavg"]
    assert cost["client_params"] == summary["fedavg", 0]["cost"]["client_params"]
    assert mean == pytest.approx(50.0 * (summary["fedavg", 0]["global_acc"] + summary["fedavg", 1]["global_acc"]))
    fedavg_time = (summary["fedavg", 0]["cost"]["round_time_s"] + summary["fedavg", 1]["cost"]["round_time_s"]) / 2
    fedper = points["personal_acc"]["fedper"][0]
    assert fedper["round_time_x"] == pytest.approx(summary["fedper", 0]["cost"]["round_time_s"] / fedavg_time)
    assert std is not None and "local" in points["personal_acc"]
    assert "local" not in points["global_acc"] and "local" not in points["cold_start_acc"]
    # FedAvg not drawn: FedPer's time is still relative to it; without FedAvg's runs there is no unit
    only_fedper = cost_points(finished, {"fedper"})
    assert set(only_fedper["global_acc"]) == {"fedper"}
    assert only_fedper["global_acc"]["fedper"][0]["round_time_x"] == pytest.approx(fedper["round_time_x"])
    assert cost_points([r for r in finished if r.label == "fedper"])["global_acc"]["fedper"][0]["round_time_x"] is None

    drawn = []
    monkeypatch.setattr(Axes, "errorbar", lambda self, x, y, **kw: drawn.append((kw["label"], x, y)))
    shown = [r for r in finished if r.label == "fedper"]
    assert plot_cost(shown, "t", tmp_path / "cost.png", group_runs=finished)
    # 3 accuracies x 2 cost axes, each FedPer's point at the table's numbers
    assert sorted(drawn) == sorted(
        [("fedper", 1e-6 * fedper["client_params"], points[m]["fedper"][1]) for m in points]
        + [("fedper", fedper["round_time_x"], points[m]["fedper"][1]) for m in points])


def test_plot_of_nothing_is_one_line(tmp_path, run_cli):
    code, _, err = run_cli(["plot", str(tmp_path / "missing")])
    assert code == 1 and err.count("\n") == 1 and err.startswith("fedbench: error: no such directory")


def test_named_settings_get_their_own_figures(runs, tmp_path, fit_argv, run_cli):
    code, _, err = run_cli(fit_argv("runs/fedavg-lr0.1/seed0", "--method", "fedavg", "--name", "fedavg-lr0.1",
                                    "--method.init_args.lr", "0.1", "--loop.rounds", "3", "--loop.eval_every", "1"))
    assert code == 0, err
    from fedcoe_bench.plots import figure_sets
    from fedcoe_bench.results import load_runs

    sets = dict(figure_sets("g", [r for r in load_runs(runs) if r.finished]))
    assert sorted({r.label for r in sets["g"]}) == ["fedavg", "fedper"]
    assert sorted({r.label for r in sets["g_variants"]}) == ["fedavg", "fedavg-lr0.1"]  # next to its method
    out = tmp_path / "figures"
    code, _, err = run_cli(["plot", str(runs), "--out", str(out)])
    assert code == 0, err
    assert {"synthetic_dirichlet0.3_3r_variants_curves.png", "synthetic_dirichlet0.3_3r_variants_clients.png",
            "synthetic_dirichlet0.3_3r_curves.png"} <= {p.name for p in out.iterdir()}
    assert [p.name for p in out.glob("*partition*")] == ["synthetic_dirichlet0.3_3r_partition.png"]
