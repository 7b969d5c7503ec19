"""Run directories: a finished run is never overwritten by accident, an interrupted one resumes to the
same numbers, a damaged checkpoint is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
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

    rc, _, err = run_cli(fit_argv("run", "--seed", "1", "--overwrite", "true"))
    assert rc == 0, err
    assert read_summary(run)["seed"] == 1


def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path, fit_argv, run_cli, monkeypatch):
    args = ("--loop.rounds", "3", "--loop.checkpoint_every", "1", "--loop.eval_every", "1")
    assert run_cli(fit_argv("whole", *args))[0] == 0

    original = FederatedLoop._train_client

    def crash_in_round_3(self, fabric, method, optimizer, fed, client, seed, rnd, server):
        if rnd == 2:
            raise RuntimeError("simulated crash")
        return original(self, fabric, method, optimizer, fed, client, seed, rnd, server)

    monkeypatch.setattr(FederatedLoop, "_train_client", crash_in_round_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_cli(fit_argv("parts", *args))
    assert not (tmp_path / "parts" / "summary.json").exists()
    assert (tmp_path / "parts" / "checkpoint.pt").exists()
    monkeypatch.undo()

    assert run_cli(fit_argv("parts", *args))[0] == 0
    whole, parts = read_summary(tmp_path / "whole"), read_summary(tmp_path / "parts")
    assert parts["resumed_from_round"] == 2
    for key in METRICS:
        assert parts[key] == whole[key], key
    rows = (tmp_path / "parts" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3, "the resumed run's metrics.csv must hold one row per round, no duplicates"


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
