"""`fedbench eval`: a finished run served under other prediction-time settings, without training."""

from __future__ import annotations

import json

import pytest
from helpers import read_summary

from fedcoe_bench.runs import comparable

FEDCOE = ("--method", "fedcoe", "--method.init_args.num_experts", "2", "--method.init_args.lr", "0.05",
          "--loop.local_epochs", "3", "--loop.rounds", "3")
ACCURACIES = ("global_acc", "personal_acc", "cold_start_acc", "cold_start_lp_acc")


@pytest.fixture
def trained(tmp_path, fit_argv, run_cli):
    code, _, err = run_cli(fit_argv("trained", *FEDCOE))
    assert code == 0, err
    return tmp_path / "trained"


@pytest.mark.parametrize("setting", [("cold_start_prior", "false"), ("beta", "adaptive"), ("beta", "0.5")])
def test_eval_equals_training_with_the_setting(tmp_path, trained, fit_argv, run_cli, setting):
    key, value = setting
    change = (f"--method.init_args.{key}", value, "--name", "variant")
    code, _, err = run_cli(fit_argv("retrained", *FEDCOE, *change))
    assert code == 0, err
    summary = read_summary(trained)  # eval must measure, not copy: hide the trained run's numbers
    (trained / "summary.json").write_text(json.dumps({**summary, **dict.fromkeys(ACCURACIES, -1.0), "metrics": {}}))
    code, _, err = run_cli(["eval", str(trained), *change, "--run_dir", str(tmp_path / "evaluated")])
    assert code == 0, err
    again, evaluated = read_summary(tmp_path / "retrained"), read_summary(tmp_path / "evaluated")
    assert {k: evaluated[k] for k in ACCURACIES} == {k: again[k] for k in ACCURACIES}
    assert evaluated["evaluated_from"] == str(trained) and evaluated["config"]["method"]["init_args"][key] != "calibrated"
    # a sweep counts the evaluated run as the run it stands for
    assert comparable(evaluated["config"]) == comparable(again["config"])


def test_an_evaluated_run_costs_what_its_trained_run_cost(tmp_path, trained, run_cli):
    """No round runs in an evaluation, so its own measure would have no round time and no client report:
    the cost columns of a table read the trained run's (issue #29: cost in every summary)."""
    code, _, err = run_cli(["eval", str(trained), "--method.init_args.beta", "adaptive", "--name", "v",
                            "--run_dir", str(tmp_path / "evaluated")])
    assert code == 0, err
    cost, evaluated = read_summary(trained)["cost"], read_summary(tmp_path / "evaluated")["cost"]
    assert cost["round_time_s"] > 0 and cost["bytes_sent"] > cost["bytes_received"]  # FedCoE reports its routing
    assert evaluated == cost


def test_eval_writes_the_default_run_directory_of_its_name(tmp_path, trained, run_cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    variant = tmp_path / "variant.yaml"  # as in benchmarks/sweeps/fedcoe_variants/
    variant.write_text("name: fedcoe-no_cold_start_prior\nmethod:\n  class_path: fedcoe_bench.fedcoe.FedCoE\n"
                       "  init_args:\n    cold_start_prior: false\n")
    code, _, err = run_cli(["eval", str(trained), "--config", str(variant)])
    assert code == 0, err
    out = tmp_path / "runs" / "synthetic" / "dirichlet0.3" / "fedcoe-no_cold_start_prior" / "seed0"
    assert read_summary(out)["evaluated_from"] == str(trained)
    assert (out / "config.yaml").exists() and (out / "metrics.csv").exists() and (out / "calibration.csv").exists()


@pytest.mark.parametrize("extra, names", [
    (("--method.init_args.local_level", "false", "--name", "x"), ["local_level", "fedbench fit"]),
    (("--data.alpha", "0.1", "--name", "x"), ["data.alpha"]),
    (("--loop.rounds", "5", "--name", "x"), ["trained for 3 rounds", "--loop.rounds 5"]),
    (("--method.init_args.cold_start_prior", "false"), ["--name", "trained one"]),
    (("--method.init_args.cold_start_prior", "false", "--run_dir", "trained"), ["--name", "trained run"]),
])
def test_eval_refuses_what_training_read(tmp_path, trained, run_cli, extra, names, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()}
    code, _, err = run_cli(["eval", str(trained), *extra])
    assert code == 1 and err.count("\n") == 1 and all(n in err for n in names), err
    assert {p.name: p.read_bytes() for p in trained.iterdir() if p.is_file()} == before


def test_eval_of_a_directory_without_a_run_is_one_line(tmp_path, run_cli):
    code, _, err = run_cli(["eval", str(tmp_path), "--name", "x"])
    assert code == 1 and err.count("\n") == 1 and "config.yaml" in err
    (tmp_path / "config.yaml").write_text(json.dumps({"seed": 0}))
    code, _, err = run_cli(["eval", str(tmp_path), "--name", "x"])
    assert code == 1 and err.count("\n") == 1 and "no finished run" in err


def test_the_fine_tuning_step_size_is_a_setting_eval_can_serve_and_it_moves_the_ft_column(tmp_path, trained,
                                                                                          fit_argv, run_cli):
    """loop.cold_start_lr (issue #29: + ft was fine-tuned at the training lr): training never reads it, so
    eval of the trained run equals training with it; a different step size gives a different column."""
    change = ("--loop.cold_start_lr", "0.5", "--name", "ft-lr")
    assert run_cli(fit_argv("retrained", *FEDCOE, *change))[0] == 0
    code, _, err = run_cli(["eval", str(trained), *change, "--run_dir", str(tmp_path / "evaluated")])
    assert code == 0, err
    again, evaluated, base = (read_summary(tmp_path / d) for d in ("retrained", "evaluated", "trained"))
    for key in ("cold_start_ft_acc", "global_acc", "personal_acc"):
        assert evaluated["metrics"][key] == again["metrics"][key], key
    assert evaluated["metrics"]["global_acc"] == base["metrics"]["global_acc"]  # training did not move
    assert evaluated["metrics"]["val_cold_start_ft_acc"] != base["metrics"]["val_cold_start_ft_acc"] or \
        evaluated["metrics"]["cold_start_ft_acc"] != base["metrics"]["cold_start_ft_acc"]


def test_several_fine_tuning_step_sizes_serve_the_one_of_best_validation_accuracy(tmp_path, trained, run_cli):
    """loop.cold_start_lr as a list (issue #29: the + ft step size tuned on validation, one rule for every
    method): the column is the single-lr evaluation of best val_cold_start_ft_acc, whatever its test score."""
    lrs = ("0.0001", "3.0")  # 3.0 wrecks the fine-tuned level: the two differ on validation
    single = {}
    for lr in lrs:
        code, _, err = run_cli(["eval", str(trained), "--loop.cold_start_lr", lr, "--name", f"ft{lr}",
                                "--run_dir", str(tmp_path / f"ft{lr}")])
        assert code == 0, err
        single[float(lr)] = read_summary(tmp_path / f"ft{lr}")["metrics"]
    a, b = (single[float(lr)]["val_cold_start_ft_acc"] for lr in lrs)
    assert a != b  # else the choice is not observable here
    code, _, err = run_cli(["eval", str(trained), "--loop.cold_start_lr", f"[{', '.join(lrs)}]", "--name", "ft-grid",
                            "--run_dir", str(tmp_path / "grid")])
    assert code == 0, err
    grid = read_summary(tmp_path / "grid")["metrics"]
    chosen = max(single, key=lambda lr: single[lr]["val_cold_start_ft_acc"])
    assert grid["cold_start_ft_lr"] == chosen
    for key in ("cold_start_ft_acc", "val_cold_start_ft_acc", "global_acc", "cold_start_acc"):
        assert grid[key] == single[chosen][key], key


@pytest.mark.parametrize("value", ["[]", "[0.1, -1]", "0"])
def test_a_bad_fine_tuning_step_size_is_one_line(trained, run_cli, value):
    code, _, err = run_cli(["eval", str(trained), "--loop.cold_start_lr", value, "--name", "bad"])
    assert code == 1 and err.count("\n") == 1 and "loop.cold_start_lr" in err, err


def test_choosing_the_fine_tuning_step_size_needs_validation(trained, run_cli):
    code, _, err = run_cli(["eval", str(trained), "--loop.cold_start_lr", "[0.1, 0.01]", "--data.val_fraction", "0",
                            "--name", "noval"])
    assert code == 1 and err.count("\n") == 1 and "val_fraction" in err, err
