"""Killed runs resume to the uninterrupted result; half-written checkpoints are never read; NaN stops a run;
2 CPU processes (gloo) give the numbers of 1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedcoe_bench.cli import main

METRICS = ("global_acc", "personal_acc", "cold_start_acc", "cold_start_lp_acc")


def argv(tmp_path: Path, run: str, method: str, *extra: str) -> list[str]:
    return ["fit", "--method", method, "--data.source", "synthetic", "--data.source.samples", "400",
            "--data.source.test_samples", "100", "--data.num_clients", "10", "--loop.clients_per_round", "4",
            "--loop.rounds", "4", "--loop.checkpoint_every", "1", "--loop.eval_every", "2", "--loop.progress", "false",
            "--fabric.accelerator", "cpu", "--data.cache_dir", str(tmp_path / "cache"),
            "--run_dir", str(tmp_path / run), *extra]


def fedbench(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedcoe_bench.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def checkpoint_round(run: Path) -> int:
    try:
        return torch.load(run / "checkpoint.pt", weights_only=True)["round"]
    except (FileNotFoundError, RuntimeError, EOFError, KeyError):
        return 0


def same(a, b) -> bool:
    """Equal nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def finished(run: Path) -> tuple[dict, dict]:
    """The summary and the final checkpoint: the server state and the method's (server-only state included)."""
    return json.loads((run / "summary.json").read_text()), torch.load(run / "checkpoint.pt", weights_only=True)


@pytest.mark.parametrize("method", ["fedavg", "fedper", "fedcoe", "scaffold", "ditto", "fedrep", "ensemble", "ifca",
                                    "fedem"])
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, method):
    assert main(argv(tmp_path, "whole", method)) == 0
    proc = fedbench(argv(tmp_path, "killed", method, "--loop.rounds", "40"))  # same config hash: rounds may differ
    deadline = time.time() + 240
    while checkpoint_round(tmp_path / "killed") < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint_round(tmp_path / "killed")
    assert 2 <= killed_at < 40, proc.stderr.read()
    assert not (tmp_path / "killed" / "summary.json").exists()
    if killed_at >= 4:
        pytest.skip("the run got past round 4 before the kill (machine too fast to interrupt)")

    assert main(argv(tmp_path, "killed", method)) == 0  # resumes by default
    (whole, a), (resumed, b) = finished(tmp_path / "whole"), finished(tmp_path / "killed")
    assert resumed["resumed_from_round"] == killed_at
    for key in METRICS:
        assert resumed[key] == whole[key], key
    assert torch.equal(a["server"], b["server"])
    assert same(a["method"], b["method"])  # e.g. FedEM's server-only pi sums, the routing tables


def test_a_checkpoint_cut_short_mid_write_is_never_loaded(tmp_path):
    assert main(argv(tmp_path, "whole", "fedavg")) == 0
    assert main(argv(tmp_path, "cut", "fedavg", "--loop.rounds", "2")) == 0  # checkpoint at round 2
    run = tmp_path / "cut"
    (run / "summary.json").unlink()  # as if killed while writing the round-3 checkpoint:
    good = (run / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt.tmp").write_bytes(good[: len(good) // 3])  # the half-written temp file
    assert main(argv(tmp_path, "cut", "fedavg")) == 0
    resumed, whole = json.loads((run / "summary.json").read_text()), json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert resumed["resumed_from_round"] == 2
    for key in METRICS:
        assert resumed[key] == whole[key], key


class NaNAtRound2:
    """Source of a method whose loss turns NaN in round 2 (written to a module so the CLI can import it)."""

    code = '''
import torch
from fedcoe_bench.baselines import FedAvg

class NaNFedAvg(FedAvg):
    calls = 0
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        NaNFedAvg.calls += 1
        return loss * float("nan") if NaNFedAvg.calls > 12 else loss
'''


@pytest.mark.parametrize("every", ["1", "10"])
def test_nan_loss_stops_the_run_naming_round_and_client(tmp_path, monkeypatch, capsys, every):
    (tmp_path / "nan_method.py").write_text(NaNAtRound2.code)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "nan_method", raising=False)  # NaNFedAvg.calls starts at 0
    code = main(argv(tmp_path, "nan", "nan_method.NaNFedAvg", "--loop.checkpoint_every", every))
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "Traceback" not in err[0]
    assert "round" in err[0] and "client" in err[0] and "nan" in err[0] and "round 0" not in err[0]
    run = tmp_path / "nan"
    assert not (run / "summary.json").exists()
    if every == "1":  # rounds count from 1: the round after the last checkpoint's is the one that failed
        saved = checkpoint_round(run)
        assert saved >= 1 and f"round {saved + 1}, client" in err[0]
        assert f"the last checkpoint, round {saved}, is kept" in err[0]
    else:
        assert checkpoint_round(run) == 0 and "no checkpoint yet" in err[0] and "kept" not in err[0]
    # and a table says why it has no numbers (not "unfinished", which a resume would mend)
    from fedcoe_bench.results import load_run

    assert load_run(run).status == f"diverged: {err[0].removeprefix('fedbench: error: ')}"


@pytest.mark.parametrize("method", ["fedavg", "fedper", "fedcoe"])
def test_two_gloo_processes_match_one(tmp_path, method):
    store = ("--loop.client_store", "disk")  # processes share the clients' states through the run directory
    single = fedbench(argv(tmp_path, "one", method, "--loop.rounds", "3", *store))
    assert single.wait(timeout=300) == 0, single.stderr.read()
    double = fedbench(argv(tmp_path, "two", method, "--loop.rounds", "3", "--fabric.strategy", "ddp",
                           "--fabric.devices", "2", *store))
    assert double.wait(timeout=300) == 0, double.stderr.read()
    (one, a), (two, b) = finished(tmp_path / "one"), finished(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    # FedCoE: its cold-start diagnostics too, which the evaluator averages over new clients on both ranks
    diagnostic = "cold_start_gate_assignment_agreement"
    assert (diagnostic in one["metrics"]) == (method == "fedcoe")
    for key in METRICS:
        assert two[key] == pytest.approx(one[key], abs=1e-5), key
    assert two["metrics"].get(diagnostic) == pytest.approx(one["metrics"].get(diagnostic), abs=1e-9)
    torch.testing.assert_close(b["server"], a["server"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_after_round_2_keeps_it_and_the_same_command_resumes(tmp_path, signum):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM after round 2 of 4, with no checkpoint due before round 10:
    one line, exit 128 + signal, round 2 saved; the same command finishes with an uninterrupted run's
    numbers. metrics.csv gets a row every round: the test waits for its second row."""
    args = ("--loop.rounds", "4", "--loop.checkpoint_every", "10", "--loop.local_epochs", "3")
    assert main(argv(tmp_path, "whole", "fedper", *args)) == 0
    run = tmp_path / "stopped"
    proc = fedbench(argv(tmp_path, "stopped", "fedper", *args))
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        rows = (run / "metrics.csv").read_text().splitlines() if (run / "metrics.csv").exists() else []
        if len(rows) >= 1 + 2:
            break
        time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=240)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal (machine too fast to interrupt)")
    lines = err.strip().splitlines()
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err and len(lines) == 2, err
    assert lines[0].startswith("fedbench: stopping after round ") and "no checkpoint yet" in lines[0]
    stopped_at = checkpoint_round(run)
    assert 2 <= stopped_at < 4, err
    assert lines[1] == (f"fedbench: interrupted after round {stopped_at} of 4; saved to {run}; run the same "
                        f"command to resume")
    assert not (run / "summary.json").exists()

    assert main(argv(tmp_path, "stopped", "fedper", *args)) == 0
    (whole, a), (resumed, b) = finished(tmp_path / "whole"), finished(run)
    assert resumed["resumed_from_round"] == stopped_at
    for key in METRICS:
        assert resumed[key] == whole[key], key
    assert torch.equal(a["server"], b["server"])
