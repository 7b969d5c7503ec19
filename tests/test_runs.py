"""Run directories: a finished run is never overwritten by accident, an interrupted one resumes to the
same numbers, a damaged checkpoint is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import read_summary

from fedcoe_bench.loop import FederatedLoop

METRICS = ("global_acc", "personal_acc", "cold_start_acc")
REPO = Path(__file__).resolve().parents[1]


def test_a_finished_run_is_not_overwritten_unless_asked(tmp_path, fit_argv, run_cli):
    run = tmp_path / "run"
    assert run_cli(fit_argv("run"))[0] == 0
    first = (run / "summary.json").read_text()

    for again in (fit_argv("run"), fit_argv("run", "--seed", "1")):  # same config, and another one
        rc, _, err = run_cli(again)
        assert rc != 0
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedbench: error:") and "Traceback" not in err
        assert str(run) in lines[0] and "finished run" in lines[0] and "--overwrite" in lines[0]
        assert (run / "summary.json").read_text() == first, "the finished run was touched"

    rc, _, err = run_cli(fit_argv("run", "--seed", "1", "--overwrite"))  # as the error says: a bare flag
    assert rc == 0, err
    assert read_summary(run)["seed"] == 1


def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, fit_argv, run_cli, monkeypatch):
    args = ("--loop.rounds", "3", "--loop.checkpoint_every", "1", "--loop.eval_every", "1")
    assert run_cli(fit_argv("whole", *args))[0] == 0

    original = FederatedLoop._train_client

    def crash_in_round_3(self, fabric, run, optimizer, client, round_ctx):
        if round_ctx.round == 3:  # rounds count from 1
            raise RuntimeError("simulated crash")
        return original(self, fabric, run, optimizer, client, round_ctx)

    monkeypatch.setattr(FederatedLoop, "_train_client", crash_in_round_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(fit_argv("parts", *args))
    assert not (tmp_path / "parts" / "summary.json").exists()
    assert (tmp_path / "parts" / "checkpoint.pt").exists()
    monkeypatch.undo()

    assert run_cli(fit_argv("parts", *args))[0] == 0
    whole, parts = read_summary(tmp_path / "whole"), read_summary(tmp_path / "parts")
    assert parts["resumed_from_round"] == 2
    # what bitwise equality depends on, besides the code: the CPU's kernel family and the thread count
    assert parts["cpu"] == {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
    for key in METRICS:
        assert parts[key] == whole[key], key
    rows = (tmp_path / "parts" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3, "the resumed run's metrics.csv must hold one row per round, no duplicates"


@pytest.mark.parametrize("closing_error", [False, True])
def test_a_full_disk_is_one_line_keeps_the_last_checkpoint_and_leaves_no_partial_file(tmp_path, fit_argv, run_cli,
                                                                                     monkeypatch, closing_error):
    """The disk fills while round 2's checkpoint is written: one line naming the file and what to do,
    round 1's checkpoint kept whole, no half-written temporary file taking space; run again, the run
    resumes to the numbers of an uninterrupted one. ``closing_error``: as torch's zip writer does, a
    RuntimeError raised while closing the file, over the OSError (a sweep printed its traceback)."""
    import errno

    args = ("--loop.rounds", "3", "--loop.checkpoint_every", "1", "--loop.eval_every", "1")
    assert run_cli(fit_argv("whole", *args))[0] == 0
    real_save, saves = torch.save, []

    def disk_fills_on_the_second(obj, f, *a, **kw):
        saves.append(1)
        if len(saves) == 2:
            f.write(b"partial")
            try:
                raise OSError(errno.ENOSPC, "No space left on device")  # what torch's zip writer raises: no file name
            finally:
                if closing_error:
                    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 113119296 vs 113119224")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", disk_fills_on_the_second)
    rc, _, err = run_cli(fit_argv("parts", *args))
    monkeypatch.undo()
    run = tmp_path / "parts"
    assert rc == 1 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedbench: error: No space left on device writing ")
    assert str(run / "checkpoint.pt") in lines[0] and "resume" in lines[0]
    assert not list(run.glob("*.tmp"))
    assert torch.load(run / "checkpoint.pt", weights_only=False)["round"] == 1

    assert run_cli(fit_argv("parts", *args))[0] == 0
    whole, parts = read_summary(tmp_path / "whole"), read_summary(run)
    assert parts["resumed_from_round"] == 1
    for key in METRICS:
        assert parts[key] == whole[key], key


def test_a_run_that_died_after_its_last_checkpoint_keeps_its_numbers(tmp_path, fit_argv, run_cli):
    assert run_cli(fit_argv("run"))[0] == 0
    before = read_summary(tmp_path / "run")
    (tmp_path / "run" / "summary.json").unlink()  # as if the process died right after the final checkpoint
    assert run_cli(fit_argv("run"))[0] == 0
    after = read_summary(tmp_path / "run")
    for key in METRICS:
        assert after[key] == before[key], key


def test_a_corrupt_checkpoint_is_refused_in_one_line(tmp_path, fit_argv, run_cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    rc, _, err = run_cli(fit_argv("run"))
    assert rc != 0 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedbench: error:")
    assert "checkpoint.pt" in lines[0] and "corrupt" in lines[0]
    assert (run / "checkpoint.pt").read_bytes() == b"not a checkpoint", "the damaged file must be left for the user"


def test_partition_accepts_a_benchmark_config(tmp_path, run_cli):
    rc, out, err = run_cli(["partition", "--config", str(REPO / "benchmarks" / "mnist10k_dir0.3.yaml"),
                            "--data.cache_dir", str(tmp_path)])
    assert rc == 0, err
    assert len(out.strip().splitlines()) == 2 + 50


def test_overwrite_removes_what_fedbench_wrote_and_refuses_a_directory_that_is_no_run(tmp_path, fit_argv, run_cli):
    run = tmp_path / "run"
    assert run_cli(fit_argv("run", "--method", "fedcoe", "--method.init_args.num_experts", "2"))[0] == 0
    assert (run / "routing.csv").exists()
    rc, _, err = run_cli(fit_argv("run", "--method", "fedavg", "--overwrite", "true"))
    assert rc == 0, err
    assert read_summary(run)["method"] == "fedavg"
    assert not (run / "routing.csv").exists(), "another method's artefact survived --overwrite"

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("months of work")
    rc, _, err = run_cli(fit_argv("notes", "--overwrite", "true"))
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err
    assert str(notes) in lines[0] and "not a fedbench run directory" in lines[0] and "--run_dir" in lines[0]
    assert [p.name for p in notes.iterdir()] == ["thesis.tex"] and (notes / "thesis.tex").read_text() == "months of work"


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, list[str]]:
    """A finished 2-round FedAvg run (checkpoint at the end) and its argv."""
    from fedcoe_bench.cli import main

    tmp = tmp_path_factory.mktemp("neutral")
    argv = ["fit", "--data.source", "synthetic", "--data.source.samples", "400", "--data.source.test_samples", "100",
            "--data.num_clients", "10", "--loop.rounds", "2", "--loop.clients_per_round", "3", "--loop.progress",
            "false", "--fabric.accelerator", "cpu", "--data.cache_dir", str(tmp / "partitions")]
    assert main([*argv, "--run_dir", str(tmp / "trained")]) == 0
    return tmp / "trained", argv


@pytest.mark.parametrize("change, neutral", [
    (("--wandb_project", "elsewhere"), True),  # where it is logged: was refused by resume
    (("--loop.eval_batch_size", "7"), True),  # how evaluation is batched: was refused by resume
    (("--fabric.precision", "bf16-true"), False),  # changes the numbers: was accepted by resume and eval
], ids=["wandb_project", "eval_batch_size", "precision"])
def test_resume_sweep_and_eval_agree_on_which_keys_are_neutral(trained, tmp_path, run_cli, change, neutral):
    import shutil

    from fedcoe_bench import cli, experiment, sweep

    run, argv = trained
    key = change[0][2:]
    # resume: an unfinished copy of the run, resumed with the change
    shutil.copytree(run, tmp_path / "unfinished")
    (tmp_path / "unfinished" / "summary.json").unlink()
    rc, _, resume_err = run_cli([*argv, *change, "--run_dir", str(tmp_path / "unfinished")])
    # sweep: does the finished run count as done for a grid point with the change?
    cfg = cli.fit_parser().parse_args(cli.expand_short_names([*argv[1:], *change, "--run_dir", str(run)]))
    state = sweep.check_finished(sweep.SweepRun(1, {}, [], run, experiment.stored_config(cli.fit_parser(), cfg)))
    # eval: does it serve the trained state under the change?
    eval_rc, _, eval_err = run_cli(["eval", str(run), "--name", "x", *change, "--run_dir", str(tmp_path / "evaluated")])
    if neutral:
        assert rc == 0 and read_summary(tmp_path / "unfinished")["resumed_from_round"] == 2, resume_err
        assert state == "finished"
        assert eval_rc == 0, eval_err
    else:
        assert rc == 1 and resume_err.count("\n") == 1 and f"{key}: " in resume_err, resume_err
        assert state.startswith("conflict") and f"{key}: " in state
        assert eval_rc == 1 and eval_err.count("\n") == 1 and key in eval_err, eval_err


def test_a_method_argument_a_config_predates_counts_at_its_default():
    """A run finished before FedCoE had balance_rate ran the code of its time, which is balance_rate 0
    (off): it is the same config as one stating the default, not as one turning the switch on."""
    from fedcoe_bench.runs import config_diff

    old = {"seed": 0, "method": {"class_path": "fedcoe_bench.fedcoe.FedCoE", "init_args": {"lr": 0.01}}}
    new = {"seed": 0, "method": {"class_path": "fedcoe_bench.fedcoe.FedCoE", "init_args": {"lr": 0.01, "balance_rate": 0.0}}}
    assert config_diff(old, new) == [] and config_diff(new, old) == []
    on = {"seed": 0, "method": {"class_path": "fedcoe_bench.fedcoe.FedCoE", "init_args": {"lr": 0.01, "balance_rate": 0.1}}}
    assert config_diff(old, on) == ["method.init_args.balance_rate: None there, 0.1 here"]
    other = {"seed": 0, "method": {"class_path": "fedcoe_bench.baselines.fedavg.FedAvg", "init_args": {"lr": 0.01, "balance_rate": 0.0}}}
    assert config_diff(old, other)  # another class: nothing is filled in


def test_a_table_row_keeps_runs_that_predate_an_argument_at_its_default(tmp_path):
    from fedcoe_bench.results import load_runs
    from fedcoe_bench.tables import build_tables

    def write(seed, init_args, name=None):
        run = tmp_path / f"seed{seed}"
        run.mkdir()
        config = {"seed": seed, "name": name, "method": {"class_path": "fedcoe_bench.fedcoe.FedCoE", "init_args": init_args},
                  "data": {"source": "mnist10k", "scheme": "dirichlet", "alpha": 0.3}, "loop": {"rounds": 100}}
        (run / "summary.json").write_text(json.dumps({"status": "finished", "global_acc": 0.5, "personal_acc": 0.5,
                                                      "cold_start_acc": 0.5, "config": config}))

    write(0, {"lr": 0.01})
    write(1, {"lr": 0.01, "balance_rate": 0.0})
    write(2, {"lr": 0.01, "balance_rate": 0.1})  # the switch on, without a name of its own: a row of its own
    labels = {r.label: r.seeds for r in build_tables(load_runs(tmp_path))[0].rows}
    assert labels == {"fedcoe": [0, 1], "fedcoe (balance_rate=0.1)": [2]}


# ---------------------------------------------------------------------- what is a run directory
def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (hidden ones too) with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_error_line(result: tuple[int, str, str]) -> str:
    rc, _, err = result
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fedbench: error:")
    return lines[0]


@pytest.mark.parametrize("overwrite", [(), ("--overwrite", "true"), ("--overwrite",)],
                         ids=["fit", "overwrite-true", "bare-overwrite"])
def test_a_directory_without_the_marker_keeps_every_file(tmp_path, fit_argv, run_cli, overwrite):
    """A folder holding the user's files under fedbench's names (the issue's ``--run_dir . --overwrite true``
    emptied one, .git and all; a plain fit overwrote its config.yaml): refused, every file as it was."""
    folder = tmp_path / "folder"
    (folder / "src").mkdir(parents=True)
    (folder / "config.yaml").write_text("my: own config\n")
    (folder / "summary.json").write_text("{}")
    (folder / "checkpoint.pt").write_bytes(b"mine")
    (folder / "src" / "model.py").write_text("print('hi')\n")
    before = tree(folder)
    line = one_error_line(run_cli(fit_argv("folder", *overwrite)))
    assert str(folder) in line and "not a fedbench run directory" in line and "--run_dir" in line
    assert tree(folder) == before


def test_overwrite_keeps_a_user_file_inside_a_run_directory(tmp_path, fit_argv, run_cli):
    from fedcoe_bench.runs import MARKER

    run = tmp_path / "run"
    assert run_cli(fit_argv("run", "--loop.client_store", "disk"))[0] == 0
    first_id = json.loads((run / MARKER).read_text())["run_id"]
    (run / "notes.txt").write_text("what I saw")
    (run / "clients" / "README").write_text("mine too")
    rc, _, err = run_cli(fit_argv("run", "--seed", "1", "--overwrite"))
    assert rc == 0, err
    assert (run / "notes.txt").read_text() == "what I saw" and (run / "clients" / "README").read_text() == "mine too"
    assert read_summary(run)["seed"] == 1 and not list((run / "clients").glob("*.*")), "the old store survived"
    assert json.loads((run / MARKER).read_text())["run_id"] != first_id, "a new run gets a new id"


@pytest.mark.parametrize("where", ["cwd", "home", "git", "project"])
def test_what_is_never_a_run_directory_is_refused_untouched(tmp_path, fit_argv, run_cli, monkeypatch, where):
    folder = tmp_path / "folder"
    folder.mkdir()
    monkeypatch.chdir(tmp_path)
    if where == "cwd":
        monkeypatch.chdir(folder)
    elif where == "home":
        monkeypatch.setenv("HOME", str(folder))
    elif where == "git":
        (folder / ".git").mkdir()
        (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    else:
        (folder / "pyproject.toml").write_text("[project]\n")
    before = tree(folder)
    for run_dir in (str(folder), "." if where == "cwd" else str(folder)):
        for overwrite in ((), ("--overwrite",)):
            line = one_error_line(run_cli([*fit_argv("x"), "--run_dir", run_dir, *overwrite]))
            assert "never a run directory" in line and "--run_dir" in line
    assert tree(folder) == before and not (folder / "config.yaml").exists()


def test_a_run_from_before_the_marker_resumes_but_is_not_emptied(tmp_path, fit_argv, run_cli):
    from fedcoe_bench.runs import MARKER

    run = tmp_path / "run"
    args = ("--loop.rounds", "3", "--loop.checkpoint_every", "1")
    assert run_cli(fit_argv("run", *args, "--loop.rounds", "2"))[0] == 0
    (run / MARKER).unlink()  # as an older fedbench left it
    before = tree(run)
    line = one_error_line(run_cli(fit_argv("run", *args, "--overwrite")))
    assert "older fedbench" in line and "by hand" in line and str(run) in line
    assert tree(run) == before

    (run / "summary.json").unlink()  # unfinished: resuming it is allowed, and marks it
    rc, _, err = run_cli(fit_argv("run", *args))
    assert rc == 0, err
    assert read_summary(run)["resumed_from_round"] == 2 and (run / MARKER).exists()
    assert "resuming" in err and "from round 2 of 3" in err and "extended from 2 to 3 rounds" in err


def test_a_run_directory_being_written_by_a_live_process_is_refused_and_left_alone(tmp_path, fit_argv, run_cli):
    """Two fits into one directory would interleave their checkpoints: while the lock's holder lives, a
    second fit (even with --overwrite) is refused in one line and touches nothing; a lock whose holder
    died is taken over, and a finished fit leaves no lock behind."""
    import socket
    import subprocess
    import sys

    from fedcoe_bench.runs import LOCK

    run = tmp_path / "run"
    assert run_cli(fit_argv("run"))[0] == 0
    assert not (run / LOCK).exists()
    before = {p.name: p.stat().st_mtime_ns for p in run.iterdir()}
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK).write_text(f"{socket.gethostname()}:{writer.pid}")
        rc, _, err = run_cli(fit_argv("run", "--method", "fedprox", "--overwrite", "true"))
    finally:
        writer.kill()
        writer.wait()
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and "being written by another fedbench process" in lines[0], err
    assert str(writer.pid) in lines[0] and "--run_dir" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in run.iterdir() if p.name != LOCK} == before
    assert (run / LOCK).read_text() == f"{socket.gethostname()}:{writer.pid}"  # the holder's, not taken
    rc, _, err = run_cli(fit_argv("run", "--method", "fedprox", "--overwrite", "true"))  # its holder died
    assert rc == 0, err
    assert read_summary(run)["method"] == "fedprox" and not (run / LOCK).exists()
