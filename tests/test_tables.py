"""fedbench table: means, sample stds, bold cells and missing runs, from hand-written summaries and from W&B."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import pytest

from fedcoe_bench.results import METRICS, load_runs, load_wandb_runs
from fedcoe_bench.tables import build_tables, mean_std, render

# accuracies (global, personal, cold-start, cold-start + ft, cold-start + prior: METRICS) per seed
FEDAVG = {0: (0.80, 0.70, 0.50, 0.60, 0.55), 1: (0.82, 0.74, 0.52, 0.62, 0.56), 2: (0.84, 0.72, 0.54, 0.64, 0.57)}
FEDPER = {0: (0.78, 0.90, 0.40, 0.70, 0.60), 1: (0.80, 0.92, 0.42, 0.72, 0.62), 2: (0.76, 0.91, 0.44, 0.74, 0.64)}
FEDCOE = {0: (0.85, 0.88, 0.60, 0.66, 0.58), 1: (0.87, 0.89, 0.64, 0.68, 0.60)}  # seed 2 unfinished


def write_summary(root: Path, method: str, seed: int, accs, alpha: float = 0.3, rounds: int = 100,
                  name: str | None = None, init_args: dict | None = None, dataset: str = "mnist10k",
                  global_model: str | None = None) -> Path:
    run = root / dataset / f"dirichlet{alpha}" / (name or method) / f"seed{seed}"
    run.mkdir(parents=True)
    keys = METRICS
    config = {"seed": seed, "name": name,
              "method": {"class_path": f"baselines.{method}.{method.capitalize()}", "init_args": init_args or {}},
              "data": {"source": {"class_path": f"fedcoe_bench.data.sources.{dataset}"}, "scheme": "dirichlet",
                       "alpha": alpha}, "loop": {"rounds": rounds}}
    summary = {"status": "finished", "method": method, "dataset": dataset, "scheme": "dirichlet", "alpha": alpha,
               "seed": seed, "rounds": rounds, **dict(zip(keys, accs)), "metrics": dict(zip(keys, accs)),
               "config": config, **({"global_model": global_model} if global_model else {})}
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    return run


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    root = tmp_path / "runs"
    for method, table in (("fedavg", FEDAVG), ("fedper", FEDPER), ("fedcoe", FEDCOE)):
        for seed, accs in table.items():
            write_summary(root, method, seed, accs)
    # fedcoe seed 2: started, never finished (config.yaml only)
    unfinished = root / "mnist10k" / "dirichlet0.3" / "fedcoe" / "seed2"
    unfinished.mkdir(parents=True)
    (unfinished / "config.yaml").write_text(
        "seed: 2\nmethod:\n  class_path: fedcoe_bench.fedcoe.FedCoE\ndata:\n  source: mnist10k\n  scheme: dirichlet\n"
        "  alpha: 0.3\nloop:\n  rounds: 100\n")
    # a broken summary: half-written JSON (e.g. copied while being written by hand)
    broken = write_summary(root, "fedprox", 0, (0.5,) * 5)
    (broken / "summary.json").write_text('{"status": "finished", "global_acc": 0.')
    # a second group: alpha 0.1, one method
    write_summary(root, "fedavg", 0, (0.60, 0.65, 0.30, 0.40, 0.35), alpha=0.1)
    # W&B's own files inside a run directory are not runs
    wandb_files = root / "mnist10k" / "dirichlet0.1" / "fedavg" / "seed0" / "wandb" / "offline-run-x" / "files"
    wandb_files.mkdir(parents=True)
    (wandb_files / "config.yaml").write_text("wandb_version: 1\n")
    return root


def pct(values, i):
    return mean_std([100 * v[i] for v in values])


def cell(values, i):
    m, s = pct(values, i)
    return f"{m:.1f} ± {s:.1f}"


def md_row(text: str, label: str) -> list[str]:
    line = next(line for line in text.splitlines() if line.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_mean_std_is_the_sample_std():
    m, s = mean_std([80.0, 82.0, 84.0])
    assert m == pytest.approx(82.0) and s == pytest.approx(2.0)  # sqrt(((-2)^2 + 0 + 2^2) / (3 - 1))
    assert mean_std([50.0]) == (50.0, None) and mean_std([]) == (None, None)


def test_markdown_means_stds_bold_and_missing(runs_dir):
    text, stderr_lines = render(build_tables(load_runs(runs_dir)), "md")
    assert stderr_lines == []
    # one table per (dataset, alpha): alpha 0.1 first
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert titles == ["## mnist10k, dirichlet alpha=0.1, 100 rounds", "## mnist10k, dirichlet alpha=0.3, 100 rounds"]
    group = text.split("## mnist10k, dirichlet alpha=0.3")[1]
    assert md_row(group, "fedavg") == ["fedavg", "82.0 ± 2.0", "72.0 ± 2.0", "52.0 ± 2.0", "62.0 ± 2.0", "56.0 ± 1.0", "3"]
    # fedper has the best personalized, cold-start + ft and cold-start + prior means; fedcoe the best global and cold-start
    assert md_row(group, "fedper") == ["fedper", "78.0 ± 2.0", "**91.0 ± 1.0**", "42.0 ± 2.0", "**72.0 ± 2.0**",
                                       "**62.0 ± 2.0**", "3"]
    assert md_row(group, "fedcoe") == ["fedcoe", f"**{cell(FEDCOE.values(), 0)}**", cell(FEDCOE.values(), 1),
                                       f"**{cell(FEDCOE.values(), 2)}**", cell(FEDCOE.values(), 3),
                                       cell(FEDCOE.values(), 4), "2"]
    assert md_row(group, "fedcoe")[1] == "**86.0 ± 1.4**"
    # rows in the paper's order
    labels = [line.split("|")[1].strip() for line in group.splitlines() if line.startswith("| ") and "---" not in line]
    assert labels == ["method", "fedavg", "fedper", "fedcoe"]
    # nothing is silently dropped: the unfinished and the broken run are listed, the seed gap is named
    missing = [line for line in group.splitlines() if line.startswith("missing:")]
    assert len(missing) == 2
    assert any("fedcoe/seed2" in m and "unfinished" in m for m in missing)
    assert any("fedprox/seed0" in m and "unreadable summary.json" in m for m in missing)
    assert any(line.startswith("note: fedcoe has 2 seeds (0, 1)") and "missing seed 2" in line
               for line in group.splitlines())
    assert "wandb" not in text  # W&B's config.yaml is not a run


def test_latex_bold_and_escaping(runs_dir):
    write_summary(runs_dir, "fedcoe", 0, (0.99, 0.10, 0.10, 0.10, 0.10), name="fedcoe-no_coordination",
                  init_args={"coordinated": False})
    text, _ = render(build_tables(load_runs(runs_dir)), "latex")
    group = text.split("alpha=0.3")[1]
    rows = {line.split(" & ")[0]: line for line in group.splitlines() if line.endswith("\\\\")}
    assert rows["fedavg"] == ("fedavg & 82.0 $\\pm$ 2.0 & 72.0 $\\pm$ 2.0 & 52.0 $\\pm$ 2.0 & 62.0 $\\pm$ 2.0 & "
                              "56.0 $\\pm$ 1.0 & 3 \\\\")
    assert rows["fedper"].split(" & ")[2] == "\\textbf{91.0 $\\pm$ 1.0}"
    # a single seed has no std; the ablation's name is its row, underscores escaped; it has the best global mean
    assert rows["fedcoe-no\\_coordination"].split(" & ")[1] == "\\textbf{99.0}"
    assert "\\textbf" not in rows["fedcoe"].split(" & ")[1]
    assert "\\begin{tabular}{lrrrrrr}" in text and "\\toprule" in text
    assert any(line.startswith("% missing:") and "fedcoe/seed2" in line for line in group.splitlines())


def test_csv_is_machine_readable_and_notes_go_to_stderr(runs_dir):
    text, stderr_lines = render(build_tables(load_runs(runs_dir)), "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    fedavg = next(r for r in rows if r["method"] == "fedavg" and r["alpha"] == "0.3")
    assert (fedavg["n"], fedavg["seeds"], fedavg["global_acc_mean"], fedavg["global_acc_std"]) == ("3", "0 1 2", "82.0000", "2.0000")
    assert len(rows) == 4
    assert sum(line.startswith("missing:") for line in stderr_lines) == 2


def test_differing_settings_without_a_name_get_their_own_rows(tmp_path):
    for seed in (0, 1):
        write_summary(tmp_path / "a", "fedcoe", seed, (0.8,) * 5, init_args={"coordinated": True, "lr": 0.01})
        write_summary(tmp_path / "b", "fedcoe", seed, (0.6,) * 5, init_args={"coordinated": False, "lr": 0.01})
    text, _ = render(build_tables(load_runs(tmp_path)), "md")
    assert md_row(text, "fedcoe (coordinated=True)")[1:] == ["**80.0 ± 0.0**"] * 5 + ["2"]
    assert md_row(text, "fedcoe (coordinated=False)")[1:] == ["60.0 ± 0.0"] * 5 + ["2"]


def test_cli_table_and_its_errors(runs_dir, run_cli, tmp_path):
    code, out, err = run_cli(["table", str(runs_dir), "--format", "md"])
    assert code == 0 and "| fedavg | 82.0 ± 2.0 |" in out and err == ""
    code, out, err = run_cli(["table", str(tmp_path / "nowhere")])
    assert code == 1 and err.count("\n") == 1 and err.startswith("fedbench: error: no such directory")
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(["table", str(tmp_path / "empty")])
    assert code == 1 and err.count("\n") == 1 and "no runs under" in err
    code, out, err = run_cli(["table"])
    assert code == 1 and err.count("\n") == 1 and "--wandb" in err


# ---------------------------------------------------------------------- W&B
class FakeSummary:
    """Like wandb's HTTPSummary: dict-like (keys/items/get/[]), not a dict."""

    def __init__(self, d):
        self._d = d

    def keys(self):
        return self._d.keys()

    def items(self):
        return self._d.items()

    def get(self, k, default=None):
        return self._d.get(k, default)

    def __getitem__(self, k):
        return self._d[k]


class FakeRun:
    def __init__(self, name, state, summary, config):
        self.name, self.state, self.summary, self.config = name, state, FakeSummary(summary), config
        self.path = ["team", "fedcoe-bench", name]


def recorded_run(name, method, seed, accs, state="finished", alpha=0.3):
    """What fedbench's W&B logger leaves in a run: the flattened config and the final summary."""
    keys = METRICS
    config = {"method": method, "method.class_path": f"baselines.{method}.X", "method.init_args.lr": 0.01,
              "seed": seed, "data.alpha": alpha, "data.scheme": "dirichlet",
              "data.source.class_path": "fedcoe_bench.data.sources.MNIST10k", "loop.rounds": 100, "name": None,
              "_wandb": {"value": {"cli_version": "0.31.0"}}}
    summary = {"_step": 100, "trainer/global_step": 100, "train_loss": 0.3}
    if state == "finished":
        summary.update({"status": "finished", "method": method, "dataset": "mnist10k", "scheme": "dirichlet",
                        "alpha": alpha, "seed": seed, "rounds": 100, **dict(zip(keys, accs)), "wall_time_s": 60.0})
    return FakeRun(name, state, summary, config)


class FakeApi:
    def __init__(self, runs):
        self._runs, self.asked = runs, []

    def runs(self, path):
        self.asked.append(path)
        return self._runs


def test_table_from_wandb_runs(monkeypatch, run_cli):
    import wandb

    recorded = [recorded_run(f"fedavg-{s}", "fedavg", s, a) for s, a in FEDAVG.items()]
    recorded += [recorded_run(f"fedcoe-{s}", "fedcoe", s, a) for s, a in FEDCOE.items()]
    recorded.append(recorded_run("fedcoe-2", "fedcoe", 2, None, state="crashed"))
    api = FakeApi(recorded)
    monkeypatch.setattr(wandb, "Api", lambda *a, **k: api)
    code, out, err = run_cli(["table", "--wandb", "team/fedcoe-bench"])
    assert code == 0, err
    assert api.asked == ["team/fedcoe-bench"]
    assert md_row(out, "fedavg") == ["fedavg", "82.0 ± 2.0", "72.0 ± 2.0", "52.0 ± 2.0", "62.0 ± 2.0", "56.0 ± 1.0", "3"]
    assert md_row(out, "fedcoe")[1] == "**86.0 ± 1.4**"
    assert md_row(out, "fedavg")[2] == "72.0 ± 2.0" and md_row(out, "fedcoe")[2] == "**88.5 ± 0.7**"
    assert "missing: wandb:team/fedcoe-bench/fedcoe-2 (fedcoe seed 2; W&B state 'crashed')" in out


def test_wandb_errors_are_one_line(monkeypatch, run_cli):
    import wandb

    def no_api(*a, **k):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "Api", no_api)
    code, _, err = run_cli(["table", "--wandb", "team/fedcoe-bench"])
    assert code == 1 and err.count("\n") == 1 and "cannot read W&B runs of team/fedcoe-bench" in err
    code, _, err = run_cli(["table", "--wandb", "just-a-project"])
    assert code == 1 and "ENTITY/PROJECT" in err
    assert load_wandb_runs("a/b", api=FakeApi([recorded_run("r", "fedavg", 0, FEDAVG[0])]))[0].metrics["global_acc"] == 0.80
    assert math.isclose(load_wandb_runs("a/b", api=FakeApi([recorded_run("r", "fedavg", 0, FEDAVG[0])]))[0].alpha, 0.3)


# ---------------------------------------------------------------------- n/a and convention cells
SERVER_COLUMNS = (1, 3, 5)  # global, cold-start, cold-start + prior (column 0 is the label)
OWN_COLUMNS = (2, 4)  # personal and cold-start + ft: models the clients train themselves


@pytest.fixture
def models_dir(tmp_path) -> Path:
    """One run per kind of server model; Local's untrained numbers are the highest, so bold must skip them."""
    root = tmp_path / "runs"
    write_summary(root, "fedavg", 0, (0.80, 0.70, 0.50, 0.60, 0.55), global_model="trained")
    write_summary(root, "fedmix", 0, (0.81, 0.71, 0.51, 0.61, 0.56))  # written before the field existed: trained
    write_summary(root, "local", 0, (0.99, 0.90, 0.99, 0.30, 0.99), global_model="none")
    write_summary(root, "fedper", 0, (0.60, 0.95, 0.40, 0.62, 0.45), global_model="convention")
    write_summary(root, "pfedmoe", 0, (0.61, 0.80, 0.41, 0.63, 0.46), global_model="convention")
    return root


def test_na_exactly_where_a_method_has_no_server_model(models_dir):
    tables = build_tables(load_runs(models_dir))
    md, _ = render(tables, "md")
    assert md.count("n/a") == len(SERVER_COLUMNS)
    local = md_row(md, "local")
    assert [local[i] for i in SERVER_COLUMNS] == ["n/a"] * 3
    assert [local[i] for i in OWN_COLUMNS] == ["90.0", "30.0"]  # personal and fine-tuned cold start are real
    # Local's 99.0 is not a global model's number: the best global is FedMix's
    assert md_row(md, "fedmix")[1] == "**81.0**" and md_row(md, "fedmix")[3] == "**51.0**"
    latex, _ = render(tables, "latex")
    assert latex.count("n/a") == len(SERVER_COLUMNS)
    rows = list(csv.DictReader(io.StringIO(render(tables, "csv")[0])))
    na = {(r["method"], k) for r in rows for k, v in r.items() if v == "n/a"}
    assert na == {("local", f"{m}_{s}") for m in ("global_acc", "cold_start_acc", "cold_start_lp_acc")
                  for s in ("mean", "std")}
    assert {r["method"]: r["global_model"] for r in rows} == {"fedavg": "trained", "fedmix": "trained", "local": "none",
                                                            "fedper": "convention", "pfedmoe": "convention"}


def test_convention_cells_carry_a_dagger_and_a_footnote(models_dir):
    md, _ = render(build_tables(load_runs(models_dir)), "md")
    for label in ("fedper", "pfedmoe"):
        row = md_row(md, label)
        assert [i for i, c in enumerate(row) if c.endswith("†")] == list(SERVER_COLUMNS)
    assert md_row(md, "fedper")[2] == "**95.0**"  # personal accuracy is no convention
    assert md_row(md, "pfedmoe")[4] == "**63.0**"  # nor is a client's own fine-tuning
    assert sum(c.endswith("†") for label in ("fedavg", "fedmix", "local") for c in md_row(md, label)) == 0
    notes = [line for line in md.splitlines() if line.startswith("† ")]
    assert len(notes) == 1 and notes[0].startswith("† fedper, pfedmoe: the method defines no server model")
    latex, _ = render(build_tables(load_runs(models_dir)), "latex")
    rows = {line.split(" & ")[0]: line.split(" & ") for line in latex.splitlines() if " & " in line}
    assert [i for i, c in enumerate(rows["pfedmoe"]) if c.endswith("$^\\dagger$")] == list(SERVER_COLUMNS)
    assert "\\footnotesize $^\\dagger$ fedper, pfedmoe:" in latex


def test_fit_records_the_methods_global_model_and_the_table_reads_it(tmp_path, fit_argv, run_cli):
    for method in ("local", "fedper"):
        code, _, err = run_cli(fit_argv(f"runs/synthetic/{method}", "--method", method, "--loop.rounds", "1"))
        assert code == 0, err
    assert json.loads((tmp_path / "runs/synthetic/local/summary.json").read_text())["global_model"] == "none"
    code, out, err = run_cli(["table", str(tmp_path / "runs")])
    assert code == 0, err
    assert [md_row(out, "local")[i] for i in SERVER_COLUMNS] == ["n/a"] * 3 and out.count("n/a") == 3
    assert float(md_row(out, "local")[4].strip("*")) >= 0  # a fit writes the fine-tuned cold start, a number for Local too
    assert all(md_row(out, "fedper")[i].endswith("†") for i in SERVER_COLUMNS)


def test_wandb_runs_carry_the_global_model_too():
    local = recorded_run("local-0", "local", 0, (0.1, 0.9, 0.1, 0.1, 0.1))
    local.summary._d["global_model"] = "none"
    runs = load_wandb_runs("a/b", api=FakeApi([local, recorded_run("fedavg-0", "fedavg", 0, FEDAVG[0])]))
    assert {r.method: r.global_model for r in runs} == {"local": "none", "fedavg": "trained"}
    text, _ = render(build_tables(runs), "md")
    assert [md_row(text, "local")[i] for i in SERVER_COLUMNS] == ["n/a"] * 3 and text.count("n/a") == 3


def test_shift_columns_appear_only_where_runs_have_them(tmp_path):
    """A feature-shift table gains the new-domain cold start (from summary.json) and the expert-cluster
    agreement (from the last round of metrics.csv that logged it); a table without them does not."""
    root = tmp_path / "runs"
    accs = (0.8, 0.9, 0.5, 0.6, 0.55)
    for seed, (new_domain, nmi) in enumerate(((0.30, 0.40), (0.20, 0.60))):
        run = write_summary(root, "fedcoe", seed, accs, dataset="shifted")
        summary = json.loads((run / "summary.json").read_text())
        summary["metrics"]["cold_start_acc_new_domain"] = new_domain
        (run / "summary.json").write_text(json.dumps(summary))
        (run / "metrics.csv").write_text(  # the agreement of the last round that logged it counts, not the max
            f"round,expert_cluster_nmi,expert_cluster_purity\n1,0.99,0.99\n2,{nmi},0.5\n3,,\n")
    write_summary(root, "fedavg", 0, accs, dataset="shifted")  # no experts: empty agreement cells
    write_summary(root, "fedavg", 0, accs)  # another table, without shift: no extra columns
    text, _ = render(build_tables(load_runs(root)), "md")
    sections = {part.split(",")[0]: part for part in text.split("## ")[1:]}
    shifted, plain = sections["shifted"], sections["mnist10k"]
    header = next(line for line in shifted.splitlines() if line.startswith("| method"))
    assert header.endswith("| cold-start new domain | expert-cluster NMI | expert-cluster purity | n |")
    fedcoe = md_row(shifted, "fedcoe")
    assert fedcoe[6] == f"**{100 * 0.25:.1f} ± {100 * mean_std([0.3, 0.2])[1]:.1f}**"  # the only one
    assert fedcoe[7] == f"**0.50 ± {mean_std([0.4, 0.6])[1]:.2f}**" and fedcoe[8] == "**0.50 ± 0.00**"
    assert md_row(shifted, "fedavg")[7:9] == ["–", "–"]
    assert "new domain" not in plain and "NMI" not in plain
    rows = list(csv.DictReader(io.StringIO(render(build_tables(load_runs(root)), "csv")[0])))
    assert [r["expert_cluster_nmi_mean"] for r in rows if r["dataset"] == "shifted"] == ["", "0.5000"]


def test_records_copy_finished_runs_small_files_only_and_tables_rebuild_from_them(tmp_path, fit_argv, run_cli):
    assert run_cli(fit_argv("runs/a"))[0] == 0
    (tmp_path / "runs" / "b").mkdir(parents=True)
    (tmp_path / "runs" / "b" / "config.yaml").write_text("seed: 0\n")  # unfinished: not a record
    code, out, err = run_cli(["records", str(tmp_path / "runs"), str(tmp_path / "records")])
    assert code == 0 and "records of 1 runs (finished or diverged)" in out, err
    copied = {p.name for p in (tmp_path / "records" / "a").iterdir()}
    assert {"config.yaml", "summary.json", "metrics.csv"} <= copied and "checkpoint.pt" not in copied
    assert not (tmp_path / "records" / "b").exists()
    runs, records = (run_cli(["table", str(tmp_path / d)])[1] for d in ("runs", "records"))
    assert "| fedavg |" in records and runs.endswith(records)  # the same table, less the unfinished run's group


def test_the_val_split_tables_the_validation_accuracies_and_keeps_the_scores(tmp_path, capsys):
    """``--split val`` reads each accuracy's ``val_`` twin (what tuning chose by), never the test one;
    scores without a twin (NMI) stay; a method without validation numbers shows empty cells."""
    from fedcoe_bench.cli import main

    root = tmp_path / "runs"
    for seed, (test, val) in enumerate(((0.9, 0.5), (0.8, 0.7))):
        run = write_summary(root, "fedcoe", seed, (test,) * 5)
        summary = json.loads((run / "summary.json").read_text())
        summary["metrics"].update({f"val_{m}": val for m in METRICS}, expert_cluster_nmi=0.25 * (seed + 1))
        (run / "summary.json").write_text(json.dumps(summary))
    [val] = build_tables(load_runs(root), "val")
    [test] = build_tables(load_runs(root))
    assert val.columns[:5] == tuple(f"val_{m}" for m in METRICS) and "expert_cluster_nmi" in val.columns
    assert val.rows[0].cells["val_global_acc"].mean == pytest.approx(60.0)
    assert test.rows[0].cells["global_acc"].mean == pytest.approx(85.0)
    assert val.rows[0].cells["expert_cluster_nmi"].mean == pytest.approx(0.375)
    assert main(["table", str(root), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert "| method | val global | val personal |" in out and "60.0 ± 14.1" in out and "85.0" not in out
    assert "Accuracy on the validation splits in %" in out


def test_records_keep_finished_and_diverged_runs_so_a_table_from_them_lists_the_failure(tmp_path, capsys):
    """``fedbench records``: finished runs' records and diverged runs' (a failure stays in the table, one
    rule for every method), never an unfinished run, a checkpoint or a client state."""
    from fedcoe_bench.cli import main

    runs, dest = tmp_path / "runs", tmp_path / "records"
    write_summary(runs, "fedavg", 0, (0.8,) * 5)
    diverged = runs / "mnist10k" / "dirichlet0.3" / "fedcoe" / "seed0"
    unfinished = runs / "mnist10k" / "dirichlet0.3" / "fedcoe" / "seed2"
    for run in (diverged, unfinished):
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(
            "seed: 0\nmethod:\n  class_path: fedcoe_bench.fedcoe.FedCoE\ndata:\n  source: mnist10k\n  scheme: dirichlet\n"
            "  alpha: 0.3\nloop:\n  rounds: 100\n")
        (run / "checkpoint.pt").write_bytes(b"weights")
    (diverged / "diverged.txt").write_text("round 15, client 3: local loss is nan")
    (runs / "mnist10k" / "dirichlet0.3" / "fedavg" / "seed0" / "checkpoint.pt").write_bytes(b"weights")

    assert main(["records", str(runs), str(dest)]) == 0
    copied = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert copied == ["mnist10k/dirichlet0.3/fedavg/seed0/config.yaml", "mnist10k/dirichlet0.3/fedavg/seed0/summary.json",
                      "mnist10k/dirichlet0.3/fedcoe/seed0/config.yaml", "mnist10k/dirichlet0.3/fedcoe/seed0/diverged.txt"]
    capsys.readouterr()
    assert main(["table", str(dest)]) == 0
    out = capsys.readouterr().out
    assert "fedcoe/seed0 (fedcoe seed 0; diverged: round 15, client 3: local loss is nan)" in out


def test_a_diverged_run_is_a_failure_in_its_row_for_every_method(tmp_path):
    """Issue #29: a diverged run is not dropped into a footnote: its row says ``2 + 1 diverged`` (a mean
    over the survivors alone would read as a method that never fails), a setting whose every run
    diverged is a row of dashes, and no note calls the diverged seed lacking."""
    root = tmp_path / "runs"
    for seed, accs in FEDAVG.items():
        write_summary(root, "fedavg", seed, accs)
    for seed in (0, 1):
        write_summary(root, "fedper", seed, FEDPER[seed])
    for method, seed in (("fedper", 2), ("fedcoe", 0)):
        run = root / "mnist10k" / "dirichlet0.3" / method / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(json.dumps({"seed": seed, "method": {"class_path": f"baselines.{method}.{method.capitalize()}"},
                                                     "data": {"source": "mnist10k", "scheme": "dirichlet", "alpha": 0.3},
                                                     "loop": {"rounds": 100}}))
        (run / "diverged.txt").write_text("round 7, client 1: local loss is nan")
    text, _ = render(build_tables(load_runs(root)))
    assert md_row(text, "fedper")[-1] == "2 + 1 diverged" and md_row(text, "fedper")[1] == cell([FEDPER[0], FEDPER[1]], 0)
    assert md_row(text, "fedcoe")[1:-1] == ["–"] * 5 and md_row(text, "fedcoe")[-1] == "0 + 1 diverged"
    assert md_row(text, "fedavg")[-1] == "3"
    notes = [line for line in text.splitlines() if line.startswith("note:")]  # fedcoe: seeds 1 and 2 never ran
    assert len(notes) == 1 and notes[0].startswith("note: fedcoe has 0 seeds") and notes[0].endswith("missing seeds 1, 2")
    assert sum(line.startswith("missing:") and "diverged" in line for line in text.splitlines()) == 2
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO(render(build_tables(load_runs(root)), "csv")[0]))}
    assert rows["fedper"]["n"] == "2" and rows["fedper"]["diverged_seeds"] == "2" and rows["fedavg"]["diverged_seeds"] == ""
