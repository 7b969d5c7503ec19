"""fedbench sweep: a W&B grid file expands to the right runs, --dry-run prints them, finished runs are skipped."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from fedcoe_bench import sweep, tuning
from fedcoe_bench.cli import main
from fedcoe_bench.results import METRICS
from fedcoe_bench.runs import config_diff

REPO = Path(__file__).parents[1]
METHODS = ["fedavg", "fedprox", "fedper", "fedmix", "pfedmoe", "local", "fedcoe"]


@pytest.fixture
def small_sweep(tmp_path) -> Path:
    """2 methods x 2 seeds x 2 alphas on tiny synthetic data, written as a W&B sweep file."""
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({
        "data": {"source": {"class_path": "fedcoe_bench.data.Synthetic", "init_args": {"samples": 400, "test_samples": 100}},
                 "num_clients": 10, "cache_dir": str(tmp_path / "partitions")},
        "loop": {"rounds": 5, "clients_per_round": 3, "progress": False},
        "fabric": {"accelerator": "cpu"},
    }))
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "program": "fedbench", "method": "grid",
        "command": ["fedbench", "fit", "--config", str(base), "--logger", "wandb", "${args}"],
        "parameters": {"method": {"values": ["fedavg", "fedper"]}, "seed": {"values": [0, 1]},
                       "data.alpha": {"values": [0.1, 0.5]}, "loop.rounds": {"value": 2}},
    }, sort_keys=False))
    return path


def test_grid_expands_to_every_combination_with_exact_args(small_sweep, tmp_path):
    runs = sweep.plan(small_sweep, tmp_path / "out")
    assert len(runs) == 8
    base = str(tmp_path / "base.yaml")
    first = runs[0]
    assert first.fit_args == ["--config", base, "--method=fedavg", "--seed=0", "--data.alpha=0.1", "--loop.rounds=2",
                              "--logger=csv", f"--run_dir={tmp_path / 'out' / 'synthetic' / 'dirichlet0.1' / 'fedavg' / 'seed0'}"]
    assert first.command == shlex.join(["fedbench", "fit", *first.fit_args])
    dirs = {str(r.run_dir.relative_to(tmp_path / "out")) for r in runs}
    assert dirs == {f"synthetic/dirichlet{a}/{m}/seed{s}" for m in ("fedavg", "fedper") for s in (0, 1) for a in (0.1, 0.5)}
    # the resolved config is what the run will store: the flags override the base config
    last = runs[-1]
    assert (last.params, last.config["seed"], last.config["data"]["alpha"], last.config["loop"]["rounds"]) == (
        {"method": "fedper", "seed": 1, "data.alpha": 0.5, "loop.rounds": 2}, 1, 0.5, 2)
    assert last.config["method"]["class_path"] == "fedcoe_bench.baselines.fedper.FedPer"


def test_dry_run_prints_the_commands_and_runs_nothing(small_sweep, tmp_path, run_cli):
    code, out, err = run_cli(["sweep", str(small_sweep), "--sweep_dir", str(tmp_path / "out"), "--dry-run"])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[:-1] == [r.command for r in sweep.plan(small_sweep, tmp_path / "out")]
    assert lines[-1] == "# 8 runs: 8 to run, 0 already finished, 0 diverged, 0 in conflict"
    assert not (tmp_path / "out").exists()


def test_finished_runs_are_skipped_and_conflicts_reported(small_sweep, tmp_path, capsys):
    runs = sweep.plan(small_sweep, tmp_path / "out")
    done, other = runs[0], runs[1]
    for r, rounds in ((done, 2), (other, 30)):  # `other` was finished with another config
        config = json.loads(json.dumps(r.config))
        config["loop"]["rounds"] = rounds
        config["run_dir"] = "somewhere/else"  # where it ran and how it logged do not matter
        config["logger"] = "wandb"
        r.run_dir.mkdir(parents=True)
        (r.run_dir / "summary.json").write_text(json.dumps({"status": "finished", "config": config}))
    runs = sweep.plan(small_sweep, tmp_path / "out")
    assert runs[0].state == "finished"
    assert runs[1].state.startswith("conflict") and "loop.rounds: 30 there, 2 here" in runs[1].state
    called = []
    code = sweep.run_sweep(runs, runner=lambda args: called.append(args) or 0)
    out, err = capsys.readouterr()
    assert called == [r.fit_args for r in runs[2:]]
    assert code == 1  # a conflict is not a success
    assert "sweep: 8 runs: 6 run now, 1 already finished, 0 run by another sweep process, 0 failed, 0 diverged (not rerun), 1 in conflict" in out
    assert f"skipping {runs[1].run_dir}" in err


def test_a_failed_run_does_not_stop_the_sweep(small_sweep, tmp_path, capsys):
    runs = sweep.plan(small_sweep, tmp_path / "out")
    codes = iter([0, 3] + [0] * 6)
    assert sweep.run_sweep(runs, runner=lambda args: next(codes)) == 1
    out, err = capsys.readouterr()
    assert "6 run now" not in out and "7 run now, 0 already finished, 0 run by another sweep process, 1 failed" in out
    assert f"failed (exit code 3): {runs[1].run_dir}" in err


def test_a_diverged_run_is_reported_not_resumed_into_the_same_nan(small_sweep, tmp_path, capsys):
    """A run stopped by a non-finite loss (diverged.txt, no summary) would resume from its last
    checkpoint and diverge again: the sweep skips it, says why and how to rerun it, and fails."""
    runs = sweep.plan(small_sweep, tmp_path / "out")
    runs[2].run_dir.mkdir(parents=True)
    (runs[2].run_dir / "diverged.txt").write_text("round 15, client 1: local loss is nan; lower method.init_args.lr\n")
    runs = sweep.plan(small_sweep, tmp_path / "out")
    assert runs[2].state == "diverged: round 15, client 1: local loss is nan; lower method.init_args.lr"
    assert [r.state for i, r in enumerate(runs) if i != 2] == ["todo"] * 7

    assert sweep.run_sweep(runs, dry_run=True) == 1
    out = capsys.readouterr().out
    assert f"# diverged: round 15, client 1: local loss is nan; lower method.init_args.lr: {runs[2].command}" in out
    assert "# 8 runs: 7 to run, 0 already finished, 1 diverged, 0 in conflict" in out

    called = []
    assert sweep.run_sweep(runs, runner=lambda args: called.append(args) or 0) == 1
    out, err = capsys.readouterr()
    assert called == [r.fit_args for i, r in enumerate(runs) if i != 2]
    assert "7 run now, 0 already finished, 0 run by another sweep process, 0 failed, 1 diverged (not rerun)" in out
    assert f"skipping {runs[2].run_dir}: it diverged: round 15" in err and "delete the directory" in err

    # another sweep process ran the second run, which diverged, while this one ran the first: not run again
    runs = sweep.plan(small_sweep, tmp_path / "again")

    def runner(args):
        if not called:
            runs[1].run_dir.mkdir(parents=True, exist_ok=True)
            (runs[1].run_dir / "diverged.txt").write_text("round 1, client 0: local loss is inf\n")
        called.append(args)
        return 0

    called = []
    assert sweep.run_sweep(runs, runner=runner) == 1
    assert runs[1].fit_args not in called and len(called) == 7
    assert "7 run now, 0 already finished, 0 run by another sweep process, 0 failed, 1 diverged (not rerun)" in \
        capsys.readouterr().out


def test_sweep_runs_fit_and_resumes(tmp_path, small_sweep, monkeypatch, run_cli):
    """End to end on one grid point: the run lands in the sweep layout; a second sweep skips it."""
    spec = yaml.safe_load(small_sweep.read_text())
    spec["parameters"] = {"method": {"value": "fedavg"}, "seed": {"value": 0}, "loop.rounds": {"value": 2}}
    small_sweep.write_text(yaml.safe_dump(spec))
    calls = []
    monkeypatch.setattr(sweep, "run_fit", lambda args: calls.append(args) or main(["fit", *args]))
    code, out, err = run_cli(["sweep", str(small_sweep), "--sweep_dir", str(tmp_path / "out")])
    assert code == 0, err
    run_dir = tmp_path / "out" / "synthetic" / "dirichlet0.3" / "fedavg" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["method"], summary["rounds"], summary["config"]["logger"]) == ("fedavg", 2, "csv")
    code, out, err = run_cli(["sweep", str(small_sweep), "--sweep_dir", str(tmp_path / "out")])
    assert code == 0 and len(calls) == 1 and "0 run now, 1 already finished" in out


def test_parallel_sweep_processes_share_the_grid_through_lock_files(small_sweep, tmp_path, capsys):
    """A run locked by a live process is left to it; a lock left by a dead process is taken over;
    locks are released when a run ends, even when it fails."""
    import os
    import socket
    import subprocess

    runs = sweep.plan(small_sweep, tmp_path / "out")
    host = socket.gethostname()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for r, pid in ((runs[0], os.getppid()), (runs[1], dead.pid)):  # our parent lives; `dead` has exited
        r.run_dir.mkdir(parents=True)
        (r.run_dir / sweep.LOCK).write_text(f"{host}:{pid}")
    called = []
    code = sweep.run_sweep(runs, runner=lambda args: called.append(args) or (3 if len(called) == 2 else 0))
    out, _ = capsys.readouterr()
    assert called == [r.fit_args for r in runs[1:]]
    assert code == 1 and "6 run now, 0 already finished, 1 run by another sweep process, 1 failed" in out
    assert (runs[0].run_dir / sweep.LOCK).exists()  # still the other process's
    assert not any((r.run_dir / sweep.LOCK).exists() for r in runs[1:])


def test_each_run_is_its_own_process_and_gets_each_signal_once(monkeypatch):
    """A run is its own process, in its own process group (a terminal's Ctrl-C reaches only the sweep),
    and each signal the sweep gets is passed on to it once; the sweep's handlers are restored after."""
    import os
    import signal

    seen, forwarded = [], []

    class FakeProcess:
        def __init__(self, argv, **kw):
            seen.append((argv, kw))

        def wait(self):
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's notice arrives while the run trains
            return 143

        def send_signal(self, signum):
            forwarded.append(signum)

    monkeypatch.setattr(sweep.subprocess, "Popen", FakeProcess)
    before = signal.getsignal(signal.SIGTERM)
    assert sweep.run_fit(["--seed=1"]) == 143
    assert seen == [([sys.executable, "-m", "fedcoe_bench.cli", "fit", "--seed=1"], {"process_group": 0})]
    assert forwarded == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) is before


def test_sweep_file_errors_are_one_line(tmp_path, small_sweep, run_cli):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: bayes\nparameters:\n  seed:\n    values: [0]\ncommand: [fedbench, fit, '${args}']\n")
    code, _, err = run_cli(["sweep", str(bad)])
    assert code == 1 and err.count("\n") == 1 and "grid sweeps only" in err
    spec = yaml.safe_load(small_sweep.read_text())
    spec["parameters"] = {"method.init_args.lr": {"values": [0.1, 0.01]}}  # same run directory twice, no name
    small_sweep.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli(["sweep", str(small_sweep), "--dry-run"])
    assert code == 1 and err.count("\n") == 1 and "both write" in err and "'name'" in err
    spec["parameters"] = {"method": {"values": ["fedavgg"]}}
    small_sweep.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli(["sweep", str(small_sweep), "--dry-run"])
    assert code == 1 and err.count("\n") == 1 and "grid point 1 (method=fedavgg): unknown method 'fedavgg'" in err


# ---------------------------------------------------------------------- the shipped sweep files
@pytest.mark.parametrize("name", ["main_table", "mnist10k", "mnist10k_control", "ablation", "tune_mnist10k", "tune_fedcoe"])
def test_shipped_sweeps_are_wandb_grid_definitions(name):
    spec = sweep.load_sweep(REPO / "benchmarks" / "sweeps" / f"{name}.yaml")
    assert spec["method"] == "grid" and spec["program"] == "fedbench"
    cmd = spec["command"]
    assert cmd[:3] == ["fedbench", "fit", "--config"] and (REPO / cmd[3]).exists()
    assert cmd[-1] == "${args}" and "--logger" in cmd and cmd[cmd.index("--logger") + 1] == "wandb"


def test_main_table_grid():
    spec = sweep.load_sweep(REPO / "benchmarks" / "sweeps" / "main_table.yaml")
    points = sweep.grid(spec)
    assert len(points) == 2 * 3 * 7 * 3
    assert {p["method"] for p in points} == set(METHODS) and {p["data.source"] for p in points} == {"cifar10", "cifar100"}
    assert sweep.command_args(spec, points[0]) == ["--config", "benchmarks/cifar10_dir0.1.yaml", "--data.source=cifar10",
                                                   "--data.alpha=0.1", "--method=fedavg", "--seed=0"]


def test_mnist10k_sweep(monkeypatch):
    """The main table: every method at each alpha at the setting the tuning sweep exported (its file
    pins the method's arguments, its name and the alpha), seeds 0 2 3, 100 rounds."""
    monkeypatch.chdir(REPO)
    runs = sweep.plan("benchmarks/sweeps/mnist10k.yaml", "runs")
    assert len(runs) == 7 * 2 * 3
    keys = {(r.config["method"]["class_path"].rsplit(".", 1)[-1].lower(), r.config["data"]["alpha"], r.config["seed"])
            for r in runs}
    assert keys == {(m, a, s) for m in METHODS for a in (0.1, 0.3) for s in (0, 2, 3)}
    assert {r.config["loop"]["rounds"] for r in runs} == {100}
    assert {r.config["data"]["source"] for r in runs} == {"mnist10k"}
    for r in runs:
        chosen = yaml.safe_load(Path(r.params["config"]).read_text())
        assert chosen["data"]["alpha"] == r.config["data"]["alpha"] and chosen["name"] == r.config["name"]
        assert chosen["method"] == r.config["method"]  # every argument as the tuning run had it
        assert str(r.run_dir) == f"runs/mnist10k/dirichlet{chosen['data']['alpha']}/{chosen['name']}/seed{r.config['seed']}"


def test_mnist10k_control_runs_the_main_tables_methods_at_the_old_lr_in_directories_of_their_own(monkeypatch):
    """The before/after control: FedAvg and FedPer as the main table runs them but at lr 0.01, in run
    directories no main-table run writes (else a sweep would count one for the other)."""
    monkeypatch.chdir(REPO)
    control = sweep.plan("benchmarks/sweeps/mnist10k_control.yaml", "runs")
    main = {str(r.run_dir): r for r in sweep.plan("benchmarks/sweeps/mnist10k.yaml", "runs")}
    assert len(control) == 2 * 2 * 3
    for r in control:
        method = r.config["method"]["class_path"].rsplit(".", 1)[-1].lower()
        assert method in {"fedavg", "fedper"} and r.config["method"]["init_args"]["lr"] == 0.01
        assert str(r.run_dir) not in main
        twin = main[str(r.run_dir).replace(f"{method}-lr0.01", f"{method}-lr0.03")]
        assert {k: v for k, v in twin.config.items() if k not in ("method", "name", "run_dir")} == \
            {k: v for k, v in r.config.items() if k not in ("method", "name", "run_dir")}


def test_mnist10k_shift_sweep_lands_apart_from_the_unshifted_runs(monkeypatch):
    monkeypatch.chdir(REPO)
    runs = sweep.plan("benchmarks/sweeps/mnist10k_shift.yaml", "runs")
    keys = {(r.config["method"]["class_path"].rsplit(".", 1)[-1].lower(), r.config["seed"]) for r in runs}
    assert len(runs) == 9 * 3 and keys == {(m, s) for m in (*METHODS, "ifca", "fedem") for s in (0, 2, 3)}
    data = {json.dumps(r.config["data"], sort_keys=True) for r in runs}
    assert len(data) == 1 and {r.config["loop"]["rounds"] for r in runs} == {100}
    data = json.loads(data.pop())
    assert (data["shift"], data["clusters"], data["held_out_clusters"], data["alpha"]) == ("rotate", 4, [3], 0.3)
    assert str(runs[0].run_dir) == "runs/mnist10k/dirichlet0.3-rotate4-held3/fedavg/seed0"
    unshifted = {r.run_dir for r in sweep.plan("benchmarks/sweeps/mnist10k.yaml", "runs")}
    assert not unshifted & {r.run_dir for r in runs}


def test_ablation_is_one_run_per_variant_and_seed(monkeypatch):
    monkeypatch.chdir(REPO)
    runs = sweep.plan("benchmarks/sweeps/ablation.yaml", "runs")
    assert len(runs) == 9 * 2 * 3
    by_name = {}
    for r in runs:
        method = r.config["method"]
        assert method["class_path"] == "fedcoe_bench.fedcoe.FedCoE"
        assert method["init_args"]["backbone"] == "cnn" and r.config["loop"]["rounds"] == 100
        by_name.setdefault(r.config["name"], []).append(r)
    reference = by_name["fedcoe-lr0.03-k4"]
    default = reference[0].config["method"]["init_args"]
    assert all(r.config["method"]["init_args"]["lr"] == 0.03 for r in runs)  # the main table's lr, every variant
    changed = {name: {k for k, v in rs[0].config["method"]["init_args"].items() if v != default[k]}
               for name, rs in by_name.items()}
    assert changed == {
        "fedcoe-lr0.03-k4": set(), "fedcoe-no_coordination": {"coordinated"}, "fedcoe-no_shared_gate": {"shared_gate"},
        "fedcoe-no_local_level": {"local_level"}, "fedcoe-no_cold_start_prior": {"cold_start_prior"},
        "fedcoe-no_expert_loss": {"lambda_expert"}, "fedcoe-no_local_prior": {"local_prior"},
        "fedcoe-beta_adaptive": {"beta"}, "fedcoe-spec": {"lambda_expert", "local_prior", "beta"},
    }
    assert all({(r.config["seed"], r.config["data"]["alpha"]) for r in rs} == {(s, a) for s in (0, 2, 3) for a in (0.1, 0.3)}
               for rs in by_name.values())
    assert [r.config["seed"] for r in runs[:18]] == [0] * 18  # whole seeds first
    # the reference runs are the main table's FedCoE runs: same directories, same config
    main = {r.run_dir: r for r in sweep.plan("benchmarks/sweeps/mnist10k.yaml", "runs")}
    assert len(reference) == 6
    for r in reference:
        assert not config_diff(main[r.run_dir].config, r.config), r.run_dir


def test_a_lock_released_while_being_read_is_claimed(small_sweep, tmp_path, monkeypatch):
    """The holder may delete its lock between our failed create and our read of it."""
    from pathlib import Path as P

    run = sweep.plan(small_sweep, tmp_path / "out")[0]
    run.run_dir.mkdir(parents=True)
    lock = run.run_dir / sweep.LOCK
    lock.write_text("elsewhere:1")
    real_read = P.read_text

    def released_meanwhile(self, *args, **kwargs):
        if self == lock and lock.read_bytes() == b"elsewhere:1":
            lock.unlink()
            raise FileNotFoundError(lock)
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(P, "read_text", released_meanwhile)
    assert sweep.claim(run) and lock.read_bytes().endswith(f":{__import__('os').getpid()}".encode())


# ---------------------------------------------------------------------- choosing on validation
# val_personal_acc and personal_acc per (setting, alpha, seed). On validation lr0.1 wins for fedavg at
# alpha 0.1 by its mean over seeds (seed 0 alone would pick lr0.01) and lr0.01 everywhere else;
# on test the other setting would win every time, so a selection that read a test metric chooses differently.
VAL = {("fedavg-lr0.01", 0.1): (0.80, 0.60), ("fedavg-lr0.1", 0.1): (0.70, 0.75),
       ("fedavg-lr0.01", 0.5): (0.90, 0.90), ("fedavg-lr0.1", 0.5): (0.50, 0.50),
       ("fedper-lr0.01", 0.1): (0.95, 0.95), ("fedper-lr0.1", 0.1): (0.10, 0.10),
       ("fedper-lr0.01", 0.5): (0.85, 0.85), ("fedper-lr0.1", 0.5): (0.20, 0.20)}
CHOSEN = {("fedavg", 0.1): "fedavg-lr0.1", ("fedavg", 0.5): "fedavg-lr0.01",
          ("fedper", 0.1): "fedper-lr0.01", ("fedper", 0.5): "fedper-lr0.01"}


def held_out_accuracy(name: str, alpha: float, seed: int) -> float:
    """Test numbers that favour the setting validation rejects; distinct per run, so each is traceable."""
    method, alpha_key = name.split("-")[0], (name.split("-")[0], alpha)
    return (0.40 if CHOSEN[alpha_key] == name else 0.99) - 0.01 * seed - (0.1 * alpha if method == "fedper" else 0)


@pytest.fixture
def tuning_sweep(small_sweep, tmp_path) -> Path:
    """2 methods x 2 learning rates (one config file per setting) x 2 alphas x 2 seeds, selected on val_personal_acc."""
    spec = yaml.safe_load(small_sweep.read_text())
    files = []
    for method in ("fedavg", "fedper"):
        for lr in ("0.01", "0.1"):
            f = tmp_path / f"{method}-lr{lr}.yaml"
            f.write_text(yaml.safe_dump({"name": f"{method}-lr{lr}", "method": {
                "class_path": f"baselines.{method}.{'FedAvg' if method == 'fedavg' else 'FedPer'}", "init_args": {"lr": float(lr)}}}))
            files.append(str(f))
    spec["metric"] = {"name": "val_personal_acc", "goal": "maximize"}
    spec["parameters"] = {"seed": {"values": [0, 1]}, "data.alpha": {"values": [0.1, 0.5]}, "config": {"values": files},
                          "loop.rounds": {"value": 2}}
    small_sweep.write_text(yaml.safe_dump(spec, sort_keys=False))
    return small_sweep


def finish(runs, test_value=held_out_accuracy, drop: str | None = None) -> None:
    """Write each run's summary.json as `fedbench fit` would, with the accuracies above."""
    for r in runs:
        name, alpha, seed = r.config["name"], r.config["data"]["alpha"], r.config["seed"]
        val = VAL[(name, alpha)][seed]
        test = test_value(name, alpha, seed)
        metrics = {k: test for k in METRICS}
        metrics.update({"val_global_acc": 0.5, "val_personal_acc": val, "val_cold_start_acc": 0.5})
        metrics.pop(drop, None)
        r.run_dir.mkdir(parents=True, exist_ok=True)
        summary = {"status": "finished", "method": r.config["method"]["class_path"].rsplit(".", 1)[-1].lower(),
                   "dataset": "synthetic", "scheme": "dirichlet", "alpha": alpha, "seed": seed, "rounds": 2,
                   **{k: v for k, v in metrics.items() if not k.startswith("val_")}, "metrics": metrics,
                   "global_model": "convention" if name.startswith("fedper") else "trained", "config": r.config}
        (r.run_dir / "summary.json").write_text(json.dumps(summary))


def chosen(selections) -> dict:
    return {(s.group[-1], s.group[2]): s.runs[0].config["name"] for s in selections}


def test_selection_picks_the_best_mean_validation_score_per_group(tuning_sweep, tmp_path):
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    assert len(runs) == 16 and tuning.selection_metric(sweep.load_sweep(tuning_sweep)) == ("val_personal_acc", "maximize")
    finish(runs)
    selections = tuning.select(runs, "val_personal_acc")
    assert chosen(selections) == CHOSEN
    fedavg = next(s for s in selections if s.group[-1] == "fedavg" and s.group[2] == 0.1)
    assert fedavg.score == pytest.approx((0.70 + 0.75) / 2) and fedavg.settings == 2
    assert fedavg.setting == {"config": str(tmp_path / "fedavg-lr0.1.yaml")} and len(fedavg.runs) == 2
    # minimize flips every choice
    assert set(chosen(tuning.select(runs, "val_personal_acc", "minimize")).items()).isdisjoint(CHOSEN.items())


def test_selection_never_reads_a_test_metric(tuning_sweep, tmp_path):
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs)
    before = chosen(tuning.select(runs, "val_personal_acc"))
    finish(runs, test_value=lambda *_: float("nan"))  # every test metric NaN, validation unchanged
    assert chosen(tuning.select(runs, "val_personal_acc")) == before == CHOSEN


def test_sweep_prints_the_chosen_settings_test_numbers_only(tuning_sweep, tmp_path, run_cli):
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs)
    code, out, err = run_cli(["sweep", str(tuning_sweep), "--sweep_dir", str(tmp_path / "out"), "--dry-run"])
    assert code == 0, err
    assert "# 16 runs: 0 to run, 16 already finished, 0 diverged, 0 in conflict" in out
    rows = [line for line in out.splitlines() if line.startswith("| synthetic")]
    assert len(rows) == 4
    for (method, alpha), name in CHOSEN.items():
        row = next(r.split(" | ") for r in rows if f"alpha={alpha}," in r and f"| {method} |" in r)
        edge = "highest" if name.endswith("lr0.1") else "lowest"  # two rates: every choice is at an end
        assert row[2] == f"config={tmp_path / name}.yaml (of 2; lr the {edge} tried: widen the grid)"
        assert row[3] == f"{100 * sum(VAL[(name, alpha)]) / 2:.2f}"
        mean, std = mean_std_pct([held_out_accuracy(name, alpha, s) for s in (0, 1)])
        personal = f"{mean:.1f} ± {std:.1f}"
        assert row[5] == personal and row[9] == "0 1 |"
        assert row[4] == (personal + "†" if method == "fedper" else personal)  # FedPer's global is a convention
    assert [line for line in out.splitlines() if line.startswith("† ")] == [
        "† fedper: the method defines no server model; these columns serve the benchmark's convention (see the method's docstring)"]
    # test numbers of settings validation rejected appear nowhere
    rejected = {f"{100 * (0.99 - 0.005 - (0.1 * a if n.startswith('fedper') else 0)):.1f}" for (n, a) in VAL
                if CHOSEN[(n.split("-")[0], a)] != n}
    assert not any(f" {v} ±" in out for v in rejected)


def mean_std_pct(values):
    from fedcoe_bench.tables import mean_std

    return mean_std([100 * v for v in values])


def test_selection_on_real_runs_summaries(small_sweep, tmp_path, monkeypatch, run_cli):
    """End to end: a tuning sweep of two learning rates runs `fedbench fit` twice, and the selection
    reads the val_personal_acc those runs wrote and prints the chosen run's test numbers."""
    files = []
    for lr in (0.001, 0.05):  # lr 0 is refused (it trains nothing)
        files.append(tmp_path / f"fedavg-lr{lr}.yaml")
        files[-1].write_text(yaml.safe_dump({"name": f"fedavg-lr{lr}", "method": {
            "class_path": "fedcoe_bench.baselines.fedavg.FedAvg", "init_args": {"lr": lr}}}))
    spec = yaml.safe_load(small_sweep.read_text())
    spec["metric"] = {"name": "val_personal_acc", "goal": "maximize"}
    spec["parameters"] = {"config": {"values": [str(f) for f in files]}, "seed": {"value": 0},
                          "loop.rounds": {"value": 2}}
    small_sweep.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(sweep, "run_fit", lambda args: main(["fit", *args]))
    code, out, err = run_cli(["sweep", str(small_sweep), "--sweep_dir", str(tmp_path / "out")])
    assert code == 0, err
    runs = sweep.plan(small_sweep, tmp_path / "out")
    summaries = [json.loads((r.run_dir / "summary.json").read_text()) for r in runs]
    val = [s["metrics"]["val_personal_acc"] for s in summaries]
    best = max(range(2), key=lambda i: (val[i], -i))  # ties go to the first in grid order
    [selection] = tuning.select(runs, "val_personal_acc")
    assert selection.runs == [runs[best]] and selection.score == pytest.approx(val[best])
    row = next(line for line in out.splitlines() if line.startswith("| synthetic")).split(" | ")
    assert row[2] == f"config={files[best]} (of 2; lr the {('lowest', 'highest')[best]} tried: widen the grid)"
    assert row[5] == f"{100 * summaries[best]['personal_acc']:.1f}"


def test_a_missing_validation_metric_is_a_one_line_error_naming_it(tuning_sweep, tmp_path, run_cli):
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs, drop="val_personal_acc")
    code, _, err = run_cli(["sweep", str(tuning_sweep), "--sweep_dir", str(tmp_path / "out"), "--dry-run"])
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("fedbench: error: ") and "no validation metric 'val_personal_acc'" in err


def test_an_unfinished_group_chooses_nothing(tuning_sweep, tmp_path, capsys):
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs[1:])  # the first run (fedavg, alpha 0.1, seed 0) never finished
    selections = tuning.select(runs, "val_personal_acc")
    open_groups = [s for s in selections if s.score is None]
    assert [(s.group[-1], s.group[2], s.unfinished) for s in open_groups] == [("fedavg", 0.1, 1)]
    assert len(selections) == 4
    out = tuning.render_selection(selections, "val_personal_acc", "maximize")
    assert "not chosen: 1 of its runs unfinished" in out


def test_a_setting_with_a_diverged_run_is_out_of_the_running(tuning_sweep, tmp_path):
    """A diverged run (diverged.txt, no summary) fails its setting: the group chooses among the others
    rather than waiting for a run that a resume would diverge again; all settings diverged: nothing."""
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs)
    best = next(r for r in runs if r.config["name"] == "fedavg-lr0.1" and r.config["data"]["alpha"] == 0.1)
    (best.run_dir / "summary.json").unlink()
    (best.run_dir / "diverged.txt").write_text("round 3, client 1: local loss is nan\n")
    selections = tuning.select(runs, "val_personal_acc")
    fedavg = next(s for s in selections if s.group[-1] == "fedavg" and s.group[2] == 0.1)
    assert fedavg.runs[0].config["name"] == "fedavg-lr0.01" and fedavg.diverged == 1
    assert {k: v for k, v in chosen(selections).items() if k != ("fedavg", 0.1)} == \
        {k: v for k, v in CHOSEN.items() if k != ("fedavg", 0.1)}
    assert "fedavg-lr0.01.yaml (of 2, 1 diverged; lr the lowest tried: widen the grid) |" in tuning.render_selection(selections, "val_personal_acc", "maximize")
    other = next(r for r in runs if r.config["name"] == "fedavg-lr0.01" and r.config["data"]["alpha"] == 0.1)
    (other.run_dir / "summary.json").unlink()
    (other.run_dir / "diverged.txt").write_text("round 2, client 0: local loss is inf\n")
    fedavg = next(s for s in tuning.select(runs, "val_personal_acc") if s.group[-1] == "fedavg" and s.group[2] == 0.1)
    assert fedavg.score is None and fedavg.unfinished == 0 and fedavg.diverged == 2


def test_a_learning_rate_chosen_at_an_end_of_the_grid_is_flagged_for_widening(tuning_sweep, tmp_path):
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs)
    selections = tuning.select(runs, "val_personal_acc")
    edges = {(s.group[-1], s.group[2]): s.lr_edge for s in selections}
    assert edges == {("fedavg", 0.1): "highest", ("fedavg", 0.5): "lowest", ("fedper", 0.1): "lowest",
                     ("fedper", 0.5): "lowest"}
    assert "lr the highest tried: widen the grid" in tuning.render_selection(selections, "val_personal_acc", "maximize")


@pytest.mark.parametrize("stem", ["tune_v2", "tune_cifar10"])
def test_the_core_tuning_grid_runs_a_subset_of_tune_v2_into_the_same_directories(monkeypatch, stem):
    """tune_v2_core.yaml is tune_v2.yaml's inner learning rates, reordered: every run it makes is one
    tune_v2 makes, in the same directory, so the full grid later adds only the outer rates."""
    monkeypatch.chdir(REPO)
    full = {r.run_dir: r.config for r in sweep.plan(f"benchmarks/sweeps/{stem}.yaml", "runs/tune")}
    core = sweep.plan(f"benchmarks/sweeps/{stem}_core.yaml", "runs/tune")
    assert all(full[r.run_dir] == r.config for r in core)
    assert {r.run_dir for r in core} == {d for d, c in full.items() if c["method"]["init_args"]["lr"] in (0.01, 0.03, 0.1)}
    methods = [r.config["method"]["class_path"] for r in core]
    changes = sum(a != b for a, b in zip(methods, methods[1:]))
    assert changes == len(set(methods)) - 1  # one method's runs together
    assert len(core) == 4 * len({r.config["name"] for r in core})  # 2 alphas x 2 seeds each


def test_a_sweep_on_a_test_metric_selects_nothing(small_sweep):
    assert tuning.selection_metric(sweep.load_sweep(small_sweep)) is None
    assert tuning.selection_metric(sweep.load_sweep(REPO / "benchmarks" / "sweeps" / "mnist10k.yaml")) is None


def test_tune_mnist10k_gives_every_method_its_knobs_on_validation(monkeypatch):
    monkeypatch.chdir(REPO)
    spec = sweep.load_sweep("benchmarks/sweeps/tune_mnist10k.yaml")
    assert tuning.selection_metric(spec) == ("val_personal_acc", "maximize")
    runs = sweep.plan("benchmarks/sweeps/tune_mnist10k.yaml", "runs/tune")
    assert len(runs) == 33 * 2
    assert {r.config["seed"] for r in runs} == {1} and {r.config["loop"]["rounds"] for r in runs} == {50}
    assert {r.config["data"]["source"] for r in runs} == {"mnist10k"}
    lrs, knobs = {0.005, 0.01, 0.03}, {"fedprox": ("mu", {0.001, 0.01, 0.1}), "fedmix": ("num_experts", {2, 4}),
                                       "fedcoe": ("num_experts", {2, 4})}
    want = set()
    for m in METHODS:
        key, values = knobs.get(m, (None, {None}))
        want |= {(m, a, lr, key, v) for a in (0.1, 0.3) for lr in lrs for v in values}
    got = set()
    for r in runs:
        m, init = r.config["method"]["class_path"].rsplit(".", 1)[-1].lower(), r.config["method"]["init_args"]
        key = knobs.get(m, (None,))[0]
        got.add((m, r.config["data"]["alpha"], init["lr"], key, init.get(key)))
        assert init["backbone"] == "cnn" and init["momentum"] == 0.9  # the rest of the base config stays
    assert got == want
    assert len({r.config["name"] for r in runs}) == 33  # each setting its own row and run directory


def test_export_writes_each_chosen_setting_as_a_config_that_pins_its_row(tuning_sweep, tmp_path, run_cli):
    """--export writes one config per (group, method), holding the chosen setting (its config file's
    method and name) and the group's alpha; the base config plus that file resolves to the chosen run's
    config, up to seed, rounds and run directory."""
    from fedcoe_bench import cli

    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs)
    code, out, err = run_cli(["sweep", str(tuning_sweep), "--sweep_dir", str(tmp_path / "out"), "--dry-run",
                              "--export", str(tmp_path / "chosen")])
    assert code == 0, err
    files = sorted((tmp_path / "chosen").glob("*.yaml"))
    assert [f.name for f in files] == ["synthetic-dirichlet0.1-fedavg.yaml", "synthetic-dirichlet0.1-fedper.yaml",
                                       "synthetic-dirichlet0.5-fedavg.yaml", "synthetic-dirichlet0.5-fedper.yaml"]
    assert all(f"wrote {f}" in out for f in files)
    base = str(tmp_path / "base.yaml")
    for f in files:
        alpha, method = float(f.stem.split("-")[1][len("dirichlet"):]), f.stem.split("-")[2]
        assert f.read_text().startswith("# chosen by `fedbench sweep ") and "val_personal_acc" in f.read_text()
        cfg = cli.fit_parser().parse_args(["--config", base, "--config", str(f), "--seed", "7"])
        assert cfg.name == CHOSEN[(method, alpha)] and cfg.data.alpha == alpha
        chosen_run = next(r for r in runs if r.config["name"] == cfg.name and r.config["data"]["alpha"] == alpha)
        assert cfg.method.init_args.lr == chosen_run.config["method"]["init_args"]["lr"]
    # an unfinished group writes nothing; a sweep on a test metric cannot export
    (runs[0].run_dir / "summary.json").unlink()
    run_cli(["sweep", str(tuning_sweep), "--sweep_dir", str(tmp_path / "out"), "--dry-run", "--export", str(tmp_path / "again")])
    assert len(list((tmp_path / "again").glob("*.yaml"))) == 3
    spec = yaml.safe_load(tuning_sweep.read_text())
    spec["metric"] = {"name": "personal_acc"}
    tuning_sweep.write_text(yaml.safe_dump(spec))
    code, _, err = run_cli(["sweep", str(tuning_sweep), "--sweep_dir", str(tmp_path / "out"), "--dry-run", "--export", str(tmp_path / "x")])
    assert code != 0 and "--export needs a tuning sweep" in err and len(err.strip().splitlines()) == 1


def test_a_sweep_reports_each_run_and_stops_with_an_interrupted_run(small_sweep, tmp_path, capsys):
    """Each finished run: its result, its time and the runs left; a run stopped by a signal (exit 130 or
    143, having said what it kept) ends the sweep in one line with the same code, the rest not started."""
    runs = sweep.plan(small_sweep, tmp_path / "out")
    called = []

    def runner(args):
        called.append(args)
        if len(called) == 3:
            return 130
        run_dir = Path(next(a for a in args if a.startswith("--run_dir=")).split("=", 1)[1])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps({
            "method": "fedavg", "global_model": "trained", "rounds": 2, "global_acc": 0.5, "personal_acc": 0.25,
            "cold_start_acc": 0.125, "wall_time_s": 1.0, "run_dir": str(run_dir), "config": {}}))
        return 0

    assert sweep.run_sweep(runs, runner=runner) == 130
    out, err = capsys.readouterr()
    done = [line for line in out.splitlines() if "global 50.00%" in line]
    assert len(done) == 2 and len(called) == 3
    assert str(runs[0].run_dir) in done[0] and "personal 25.00%" in done[0] and "cold-start 12.50%" in done[0]
    assert "so far" in done[0] and "7 of its runs not started" in done[0] and "6 of its runs not started" in done[1]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted in run 3 of 8" in lines[0] and "resume" in lines[0], err
    assert not any((r.run_dir / sweep.LOCK).exists() for r in runs)


@pytest.mark.parametrize(("stem", "source", "alphas"), [("tune_v2", "mnist10k", (0.1, 0.3)), ("tune_cifar10", "cifar10", (0.1, 0.5))])
def test_tune_v2_gives_every_method_the_same_lr_grid_and_at_most_one_knob_of_three(monkeypatch, stem, source, alphas):
    """Issue #29's budget: lr in {0.003, 0.01, 0.03, 0.1} and beyond for all 13 methods, one knob <= 3 values, seeds 1
    and 4, both alphas, validation only; CIFAR-10 tuned with the very same setting files on its own data."""
    monkeypatch.chdir(REPO)
    make_tuning = load_make_tuning()
    runs = sweep.plan(f"benchmarks/sweeps/{stem}.yaml", "runs/tune")
    assert tuning.selection_metric(sweep.load_sweep(f"benchmarks/sweeps/{stem}.yaml"))[0].startswith("val_")
    assert {str(r.run_dir).split("/")[2] for r in runs} == {source}
    assert {r.params["config"] for r in runs} == {r.params["config"] for r in sweep.plan("benchmarks/sweeps/tune_v2.yaml", "runs/tune")}
    by_method: dict = {}
    for r in runs:
        by_method.setdefault(r.config["method"]["class_path"].rsplit(".", 1)[-1].lower(), []).append(r)
    assert len(by_method) == 13
    for method, rs in by_method.items():
        assert {r.config["method"]["init_args"]["lr"] for r in rs} == set(make_tuning.LRS) >= {0.003, 0.01, 0.03, 0.1}, method
        assert {(r.config["seed"], r.config["data"]["alpha"]) for r in rs} == {(s, a) for s in (1, 4) for a in alphas}
        files = {r.params["config"] for r in rs}
        knobs = {k for f in files for k in yaml.safe_load(Path(f).read_text())["method"]["init_args"] if k != "lr"}
        assert len(knobs) <= 1 and len(files) <= len(make_tuning.LRS) * 3, method


def test_the_fit_a_sweep_starts_holds_the_runs_lock_so_a_sweep_killed_hard_leaves_no_run_to_start_twice(tmp_path):
    """The sweep's claim passes to its child; while the child lives no other process can claim the run,
    even once the sweep that started it is gone; a process that is not the holder's child cannot take it."""
    import os
    import socket
    import subprocess

    from fedcoe_bench.runs import take_lock

    lock = tmp_path / "run" / sweep.LOCK
    lock.parent.mkdir()
    assert take_lock(lock) is None  # this process, as a sweep, claims the run
    child = subprocess.Popen([sys.executable, "-c", "import os, sys, time; from pathlib import Path; "
                              "from fedcoe_bench.runs import take_lock; "
                              "print(take_lock(Path(sys.argv[1]), heir_of=os.getppid()), flush=True); time.sleep(60)",
                              str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "None"  # the fit took the claim over
        assert lock.read_text() == f"{socket.gethostname()}:{child.pid}"
        assert take_lock(lock) == f"{socket.gethostname()}:{child.pid}"  # another sweep: held
        assert take_lock(lock, heir_of=os.getpid()) == f"{socket.gethostname()}:{child.pid}"  # not its heir
    finally:
        child.kill()
        child.wait()
    assert take_lock(lock) is None  # its holder died: taken over


def load_make_tuning():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tuning", REPO / "benchmarks" / "sweeps" / "make_tuning.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_widening_adds_the_next_rate_past_each_edge_choice_with_every_knob_value():
    make_tuning = load_make_tuning()

    def chosen(method, alpha, lr, edge):
        run = sweep.SweepRun(0, {}, [], Path(), {"method": {"init_args": {"lr": lr}}})
        return tuning.Selection(("mnist10k", "dirichlet", alpha, 50, method), {}, 90.0, [run], 9, lr_edge=edge)

    widen, beyond = make_tuning.widening([chosen("fedprox", 0.3, 0.1, "highest"), chosen("ditto", 0.1, 0.01, "lowest"),
                                          chosen("fedavg", 0.1, 0.03, ""), chosen("local", 0.3, make_tuning.LRS[-1], "highest")])
    files = "benchmarks/sweeps/tune_v2/{}.yaml".format
    assert widen == {0.3: [files(f"fedprox-lr0.3-mu{mu}") for mu in (0.001, 0.01, 0.1)],
                     0.1: [files(f"ditto-lr0.003-lam{lam}") for lam in (0.1, 0.5, 1.0)]}
    assert beyond == [f"local at alpha 0.3: lr {make_tuning.LRS[-1]}, the highest of LRS"]


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "sweeps").glob("*_widen_dir*.yaml")), ids=lambda p: p.name)
def test_a_widening_sweep_runs_outer_rates_of_its_grid_into_the_same_directories(monkeypatch, path):
    monkeypatch.chdir(REPO)
    stem = path.name.split("_widen_dir")[0]
    full = {r.run_dir: r.config for r in sweep.plan(f"benchmarks/sweeps/{stem}.yaml", "runs/tune")}
    widen = sweep.plan(path, "runs/tune")
    assert widen and all(full[r.run_dir] == r.config for r in widen)
    make_tuning = load_make_tuning()
    assert {r.config["method"]["init_args"]["lr"] for r in widen} <= set(make_tuning.LRS) - set(make_tuning.CORE_LRS)
    assert {r.config["data"]["alpha"] for r in widen} == {float(path.stem.split("_widen_dir")[1])}


def test_several_sweep_files_plan_as_one_and_a_directory_planned_twice_runs_once(tuning_sweep, tmp_path):
    spec = yaml.safe_load(tuning_sweep.read_text())
    files = spec["parameters"]["config"]["values"]
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    for path, values in ((first, files[:3]), (second, files[2:])):  # files[2] in both
        path.write_text(yaml.safe_dump({**spec, "parameters": {**spec["parameters"], "config": {"values": values}}}))
    runs = sweep.plan_all([first, second], tmp_path / "out")
    whole = sweep.plan(tuning_sweep, tmp_path / "out")
    assert len(runs) == len(whole) and {r.run_dir for r in runs} == {r.run_dir for r in whole}
    assert [r.index for r in runs] == list(range(1, len(runs) + 1))
    other = yaml.safe_load(Path(files[2]).read_text())
    other["method"]["init_args"]["lr"] = 0.5  # same name, so the same directories, another config
    clash = tmp_path / "clash.yaml"
    clash.write_text(yaml.safe_dump(other))
    second.write_text(yaml.safe_dump({**spec, "parameters": {**spec["parameters"], "config": {"values": [str(clash)]}}}))
    with pytest.raises(sweep.SweepError, match=f"{second} and {first} plan .* with different configs"):
        sweep.plan_all([first, second], tmp_path / "out")


def test_several_tuning_files_choose_as_one_by_the_metric_they_share(tuning_sweep, tmp_path, capsys):
    spec = yaml.safe_load(tuning_sweep.read_text())
    files = spec["parameters"]["config"]["values"]
    low, high = tmp_path / "low.yaml", tmp_path / "high.yaml"
    for path, values in ((low, [f for f in files if "lr0.01" in f]), (high, [f for f in files if "lr0.1" in f])):
        path.write_text(yaml.safe_dump({**spec, "parameters": {**spec["parameters"], "config": {"values": values}}}))
    finish(sweep.plan_all([low, high], tmp_path / "out"))
    assert main(["sweep", str(low), str(high), "--sweep_dir", str(tmp_path / "out"), "--dry-run"]) == 0
    whole = sweep.plan(tuning_sweep, tmp_path / "out")
    assert capsys.readouterr().out.split(" in conflict\n", 1)[1] == tuning.render_selection(
        tuning.select(whole, "val_personal_acc"), "val_personal_acc", "maximize")
    high.write_text(yaml.safe_dump({**yaml.safe_load(high.read_text()), "metric": {"name": "personal_acc"}}))
    with pytest.raises(sweep.SweepError, match=f"choose by different metrics .*{high}: no val_. metric"):
        tuning.sweeps_metric([low, high])
    (tmp_path / "out").rename(tmp_path / "kept")  # a sweep that cannot choose must stop before it runs anything
    assert main(["sweep", str(low), str(high), "--sweep_dir", str(tmp_path / "out")]) != 0
    assert not (tmp_path / "out").exists()


def test_once_every_group_has_chosen_the_table_sweeps_run_the_chosen_settings_at_the_test_seeds(
        tuning_sweep, tmp_path, monkeypatch):
    make_tuning = load_make_tuning()
    monkeypatch.chdir(tmp_path)
    shift = tmp_path / "shift.yaml"
    shift.write_text(yaml.safe_dump({**yaml.safe_load((tmp_path / "base.yaml").read_text()), "data": {
        **yaml.safe_load((tmp_path / "base.yaml").read_text())["data"], "alpha": 0.5}}))
    monkeypatch.setitem(make_tuning.TABLES, "t", ("tables", str(tmp_path / "base.yaml"), 7, str(shift)))
    runs = sweep.plan(tuning_sweep, tmp_path / "out")
    finish(runs[:-1])
    assert make_tuning.write_tables("t", tuning.select(runs, "val_personal_acc"), "val_personal_acc", tmp_path) == []
    finish(runs)
    selections = tuning.select(runs, "val_personal_acc")
    assert {s.lr_edge for s in selections} == {"highest", "lowest"}  # every choice at an end: nothing is final
    assert make_tuning.write_tables("t", selections, "val_personal_acc", tmp_path) == []
    for s in selections:
        s.lr_edge = ""  # as if widened past each
    make_tuning.write_tables("t", selections, "val_personal_acc", tmp_path)
    main_runs = sweep.plan(tmp_path / "tables.yaml", tmp_path / "main")
    got = {(r.config["method"]["class_path"].rsplit(".", 1)[-1].lower(), r.config["data"]["alpha"]): r.config["name"]
           for r in main_runs}
    assert got == chosen(selections) == CHOSEN
    assert {r.config["seed"] for r in main_runs} == {0, 2, 3} and len(main_runs) == 3 * len(selections)
    assert {r.config["loop"]["rounds"] for r in main_runs} == {7}
    assert all(r.config["loop"]["cold_start_lr"] == make_tuning.FT_LRS for r in main_runs)
    shifted = sweep.plan(tmp_path / "tables_shift.yaml", tmp_path / "shift")
    assert {r.config["name"] for r in shifted} == {name for (m, a), name in chosen(selections).items() if a == 0.5}
    assert {r.config["data"]["alpha"] for r in shifted} == {0.5}
    assert not (tmp_path / "tables_ablation.yaml").exists()  # no FedCoE tuned: no FedCoE ablation


def test_the_ablation_sweep_retrains_the_main_tables_fedcoe_with_only_its_label_prior_off(monkeypatch):
    monkeypatch.chdir(REPO)
    sweeps = REPO / "benchmarks" / "sweeps"
    main = {(r.config["data"]["alpha"], r.config["seed"]): r.config
            for r in sweep.plan(sweeps / "mnist10k_v2.yaml", "runs/x") if r.config["name"].startswith("fedcoe")}
    ablated = {(r.config["data"]["alpha"], r.config["seed"]): r.config
               for r in sweep.plan(sweeps / "mnist10k_v2_ablation.yaml", "runs/x")}
    assert ablated.keys() == main.keys() and len(main) == 6
    for key, config in ablated.items():
        assert config["method"]["init_args"]["local_prior"] is False and main[key]["method"]["init_args"]["local_prior"] is True
        assert config["name"] == "fedcoe-no_local_prior"
        assert {d.split(":")[0] for d in config_diff(main[key], config)} == {"name", "method.init_args.local_prior"}


def test_the_switch_ablations_retrain_the_main_tables_fedcoe_with_one_switch_off_each(monkeypatch):
    """mnist10k_v2_switches.yaml: each of FedCoE's switches alone, at the setting the tuning chose at each
    alpha, the test seeds; a run differs from the main table's FedCoE run of its alpha and seed in its name
    and in that switch's arguments only (as fedcoe_variants/<switch>.yaml sets them)."""
    make_tuning = load_make_tuning()
    monkeypatch.chdir(REPO)
    sweeps = REPO / "benchmarks" / "sweeps"
    main = {(r.config["data"]["alpha"], r.config["seed"]): r.config
            for r in sweep.plan(sweeps / "mnist10k_v2.yaml", "runs/x") if r.config["name"].startswith("fedcoe")}
    runs = sweep.plan(sweeps / "mnist10k_v2_switches.yaml", "runs/x")
    assert len(runs) == len(make_tuning.SWITCHES) * len(main) and [r.config["seed"] for r in runs[:14]] == [0] * 14
    for switch in make_tuning.SWITCHES:
        variant = yaml.safe_load((sweeps / "fedcoe_variants" / f"{switch}.yaml").read_text())
        mine = [r.config for r in runs if r.config["name"] == variant["name"]]
        assert {(c["data"]["alpha"], c["seed"]) for c in mine} == main.keys()
        for c in mine:
            diff = {d.split(":")[0] for d in config_diff(main[(c["data"]["alpha"], c["seed"])], c)}
            changed = {f"method.init_args.{k}" for k, v in variant["method"]["init_args"].items()
                       if main[(c["data"]["alpha"], c["seed"])]["method"]["init_args"][k] != v}
            assert changed and diff == {"name"} | changed, (switch, diff)


def test_the_committed_widening_is_what_the_committed_records_call_for(monkeypatch):
    """tune_v2_widen_dir*.yaml are make_tuning.py's output from benchmarks/results/runs/tune_v2: after new
    records, rerun it (python benchmarks/sweeps/make_tuning.py)."""
    monkeypatch.chdir(REPO)
    make_tuning = load_make_tuning()
    widen, _, _ = make_tuning.widened("tune_v2", make_tuning.RECORDS / "tune_v2")
    committed = {float(p.stem.split("_widen_dir")[1]): sweep.load_sweep(p)["parameters"]["config"]["values"]
                 for p in (REPO / "benchmarks" / "sweeps").glob("tune_v2_widen_dir*.yaml")}
    assert committed == widen


@pytest.mark.parametrize("path", sorted((REPO / "benchmarks" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_the_command_a_sweep_file_gives_in_its_header_names_a_sweep_file_that_exists(path):
    """The headers make_tuning.py writes are how a reader starts a sweep: each file they name must exist."""
    import re

    named = re.findall(r"fedbench sweep ((?:benchmarks/sweeps/\S+\.yaml ?)+)", path.read_text())
    for pattern in (p for line in named for p in line.split()):
        assert list(REPO.glob(pattern)), f"{path.name}'s header runs {pattern}, which does not exist"
