"""W&B logging: offline runs leave their files and the same summary.json as CSV-only runs; a failing W&B
never costs a run and is reported in one line."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fedcoe_bench.wandb_logging import SafeLogger, run_name, wandb_config

wandb = pytest.importorskip("wandb")

ACCURACIES = ("global_acc", "personal_acc", "cold_start_acc", "cold_start_lp_acc")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No account, no network: W&B offline, all of its files in tmp_path."""
    for key in ("WANDB_PROJECT", "WANDB_ENTITY", "WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    for key in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    (tmp_path / "wandb_dir").mkdir()
    yield tmp_path / "wandb_dir"
    if wandb.run is not None:
        wandb.run.finish()


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log: 7-byte file header, 32 KiB blocks,
    each chunk with a 7-byte header: crc32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        if kind == 0:
            break
        buf += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def logged_summary(run_file: Path) -> dict:
    summary = {}
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = item.key or ".".join(item.nested_key)
                summary[key] = json.loads(item.value_json)
    return summary


def test_offline_wandb_run_matches_csv_only_run(fit_argv, run_cli, tmp_path, offline):
    code, _, err = run_cli(fit_argv("csv_only", "--loop.eval_every", "1"))
    assert code == 0, err
    code, _, err = run_cli(fit_argv("with_wandb", "--loop.eval_every", "1", "--logger", "wandb"))
    assert code == 0, err
    assert "fedbench:" not in err
    csv_only = json.loads((tmp_path / "csv_only" / "summary.json").read_text())
    with_wandb = json.loads((tmp_path / "with_wandb" / "summary.json").read_text())
    assert with_wandb["status"] == "finished"
    assert {k: with_wandb[k] for k in ACCURACIES} == {k: csv_only[k] for k in ACCURACIES}
    assert with_wandb["metrics"] == csv_only["metrics"]
    for name in ("metrics.csv", "config.yaml", "clients.csv"):
        assert (tmp_path / "with_wandb" / name).stat().st_size > 0
    # W&B's offline run: in WANDB_DIR, holding the final numbers we logged
    run_files = list(offline.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(run_files) == 1 and run_files[0].stat().st_size > 0
    try:
        logged = logged_summary(run_files[0])
    except Exception as err:  # the file format is W&B's own business; ours is what goes in
        pytest.skip(f"cannot read this W&B version's run file ({err})")
    for key in ACCURACIES:
        assert logged[key] == pytest.approx(csv_only[key])
    assert (logged["method"], logged["dataset"], logged["status"]) == ("fedavg", "synthetic", "finished")
    assert logged["trainer/global_step"] == 2
    assert wandb.run is None  # the W&B run was finished, not left open


def test_wandb_init_failure_keeps_the_run_and_says_so_once(fit_argv, run_cli, tmp_path, offline, monkeypatch):
    calls = []

    def broken_init(*args, **kwargs):
        calls.append(kwargs)
        raise wandb.errors.CommError("Network error (ConnectionError), entering retry loop")

    monkeypatch.setattr(wandb, "init", broken_init)
    code, _, err = run_cli(fit_argv("run", "--logger", "wandb", "--wandb_project", "my-project"))
    assert code == 0
    assert len(calls) == 1 and calls[0]["project"] == "my-project" and calls[0]["config"]["method"] == "fedavg"
    lines = [line for line in err.splitlines() if "fedbench" in line or "W&B" in line]
    assert len(lines) == 1
    assert lines[0].startswith("fedbench: warning: W&B logging failed") and "CommError" in lines[0]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "finished" and all(0.0 <= summary[k] <= 1.0 for k in ACCURACIES)
    rows = (tmp_path / "run" / "metrics.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header + 2 rounds


class Flaky:
    """A logger whose every call fails."""

    name, version = "flaky", "0"

    def __init__(self):
        self.calls = 0

    def log_metrics(self, metrics, step=None):
        self.calls += 1
        raise RuntimeError("service died\nwith a two-line message")

    def finalize(self, status):
        self.calls += 1
        raise RuntimeError("still dead")


def test_safe_logger_reports_the_first_failure_once_then_ignores_wandb(capsys):
    inner = Flaky()
    logger = SafeLogger(lambda: inner)
    logger.log_metrics({"a": 1.0}, step=1)
    logger.log_metrics({"a": 2.0}, step=2)
    logger.log_summary({"global_acc": 0.5}, ".")
    logger.finalize("success")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "while logging metrics (RuntimeError: service died with a two-line message)" in err
    assert inner.calls == 1


def test_missing_wandb_package_is_one_line_too(capsys):
    def make():
        raise ModuleNotFoundError("No module named 'wandb'")

    logger = SafeLogger(make)
    logger.log_metrics({"a": 1.0}, step=1)
    logger.finalize("success")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "while setting up (ModuleNotFoundError" in err


def test_wandb_sees_the_sweep_keys():
    config = {"seed": 1, "name": None, "method": {"class_path": "fedcoe_bench.baselines.fedper.FedPer", "init_args": {"lr": 0.01}},
              "data": {"source": "mnist10k", "scheme": "dirichlet", "alpha": 0.1}, "loop": {"rounds": 100}}
    flat = wandb_config(config)
    # the keys a sweep file sets (method, seed, data.alpha, loop.rounds) hold the same values here
    assert (flat["method"], flat["seed"], flat["data.alpha"], flat["loop.rounds"]) == ("fedper", 1, 0.1, 100)
    assert flat["method.init_args.lr"] == 0.01
    assert run_name(config) == ("fedper/mnist10k/dirichlet0.1/seed1", "fedper/mnist10k/dirichlet0.1")
    assert run_name({**config, "name": "fedper-x"})[0] == "fedper-x/mnist10k/dirichlet0.1/seed1"


def logged_steps(run_file: Path) -> list[int]:
    """The rounds (``trainer/global_step``) of the history rows in a ``.wandb`` file, in order."""
    steps = []
    for record in read_wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or ".".join(item.nested_key): item.value_json for item in record.history.item}
            if "trainer/global_step" in items and "train_loss" in items:
                steps.append(int(json.loads(items["trainer/global_step"])))
    return steps


def test_a_resumed_run_continues_its_wandb_run_and_overwrite_starts_a_new_one(fit_argv, run_cli, tmp_path, offline,
                                                                                monkeypatch):
    from fedcoe_bench.runs import RunDir

    args = ("--logger", "wandb", "--loop.rounds", "4", "--loop.checkpoint_every", "1", "--loop.eval_every", "2")
    save = RunDir.save_checkpoint

    def killed_before_round_3_is_saved(self, fabric, state):
        if state["round"] == 3:  # W&B has received round 3, the checkpoint holds round 2
            raise RuntimeError("killed")
        save(self, fabric, state)

    monkeypatch.setattr(RunDir, "save_checkpoint", killed_before_round_3_is_saved)
    with pytest.raises(RuntimeError, match="killed"):
        run_cli(fit_argv("run", *args))
    wandb.finish(exit_code=1)  # what W&B makes of a dead process
    monkeypatch.setattr(RunDir, "save_checkpoint", save)
    stored = json.loads((tmp_path / "run" / "wandb_run.json").read_text())
    assert stored["step"] == 3

    code, _, err = run_cli(fit_argv("run", *args))
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["resumed_from_round"] == 2
    first, resumed = sorted(offline.glob("wandb/offline-run-*/run-*.wandb"))
    assert first.stem == resumed.stem == f"run-{stored['id']}", "the resumed run logs into the same W&B run"
    try:
        steps = logged_steps(first) + logged_steps(resumed)
    except Exception as err:  # the file format is W&B's own business
        pytest.skip(f"cannot read this W&B version's run file ({err})")
    assert steps == [1, 2, 3, 4], "each round reaches W&B once: replayed and retrained rounds are not sent again"

    code, _, err = run_cli(fit_argv("run", *args, "--overwrite", "true"))
    assert code == 0, err
    new_id = json.loads((tmp_path / "run" / "wandb_run.json").read_text())["id"]
    assert new_id != stored["id"] and len(list(offline.glob(f"wandb/offline-run-*/run-{new_id}.wandb"))) == 1
