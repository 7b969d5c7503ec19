"""``fedbench fit`` end to end on tiny synthetic data: outputs, determinism, user data sources, bad input."""

from __future__ import annotations

import csv
import math
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import read_summary

METRICS = ("global_acc", "personal_acc", "cold_start_acc")


def test_fit_writes_metrics_csv_and_summary(tmp_path, fit_argv, run_cli):
    rc, _, err = run_cli(fit_argv("run", "--loop.rounds", "3", "--loop.eval_every", "2", "--seed", "3"))
    assert rc == 0, err

    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2, 3], "one row per round"
    assert all(math.isfinite(float(r["train_loss"])) for r in rows)
    # evaluated every 2 rounds and after the last one
    assert [bool(r["global_acc"]) for r in rows] == [False, True, True]

    summary = read_summary(tmp_path / "run")
    expected = {"method", "dataset", "alpha", "seed", "rounds", *METRICS, "wall_time_s"}
    assert expected <= summary.keys()
    assert summary["method"] == "fedavg" and summary["dataset"] == "synthetic"
    assert summary["alpha"] == 0.3 and summary["seed"] == 3 and summary["rounds"] == 3
    for key in METRICS:
        assert isinstance(summary[key], float) and 0.0 <= summary[key] <= 1.0, key
    assert summary["global_acc"] == pytest.approx(float(rows[-1]["global_acc"]))
    assert isinstance(summary["wall_time_s"], float) and summary["wall_time_s"] >= 0
    assert summary["clients"] == {"training": 8, "cold_start": 2}
    assert (tmp_path / "run" / "config.yaml").exists()


def test_same_seed_gives_the_same_summary(tmp_path, fit_argv, run_cli):
    # the first run computes the partition, the second reads it from the cache: both paths must agree
    assert run_cli(fit_argv("a", "--seed", "7"))[0] == 0
    assert run_cli(fit_argv("b", "--seed", "7"))[0] == 0
    a, b = read_summary(tmp_path / "a"), read_summary(tmp_path / "b")
    for key in METRICS:
        assert a[key] == b[key], key
    assert a["metrics"] == b["metrics"]


def test_another_seed_gives_another_partition(tmp_path, run_cli):
    def histogram(seed: str) -> list[str]:
        rc, out, err = run_cli(["partition", "--data.source", "synthetic", "--data.source.samples", "400",
                                "--data.num_clients", "10", "--data.cache_dir", str(tmp_path), "--seed", seed])
        assert rc == 0, err
        lines = out.strip().splitlines()
        assert len(lines) == 2 + 10, "a header, a column line and one line per client"
        return lines[2:]

    assert histogram("0") == histogram("0")
    assert histogram("0") != histogram("1")


@pytest.mark.parametrize("scheme", [["--data.scheme", "classes", "--data.classes_per_client", "3"],
                                    ["--data.scheme", "iid", "--data.quantity_skew", "1.0"]])
def test_partition_shows_each_clients_train_val_test_sizes(tmp_path, run_cli, scheme):
    rc, out, err = run_cli(["partition", "--data.source", "synthetic", "--data.source.samples", "400",
                            "--data.num_clients", "10", "--data.cache_dir", str(tmp_path), *scheme])
    assert rc == 0, err
    header, columns, *lines = out.strip().splitlines()
    assert "server validation 40 samples" in header and columns.split()[-3:] == ["train", "val", "test"]
    rows = [[int(v) for v in line.split()[2:]] for line in lines]
    assert len(rows) == 10 and sum(sum(r[-3:]) for r in rows) == 360, "clients hold the pool less the server's val"
    for r in rows:
        hist, (train, val, test) = r[:-3], r[-3:]
        assert sum(hist) == train and train >= 1 and test >= 1 and val == int(0.1 * (train + val + test) + 0.5)
        if "classes" in scheme:
            assert sum(v > 0 for v in hist) <= 3  # of its 3 classes, a train split may miss one
    if "iid" in scheme:
        assert max(sum(r[-3:]) for r in rows) > 2 * min(sum(r[-3:]) for r in rows), "quantity skew not shown"


# The README's example of a user data source (keep it short: it is copied there verbatim).
MY_SOURCE = '''
import torch
from fedcoe_bench.data import DataSource, Images


class MySource(DataSource):
    """Three classes of 8x8 grey images: class c is noise around brightness 100 * c."""

    num_classes, in_channels, image_size = 3, 1, 8

    def load(self) -> Images:
        g = torch.Generator().manual_seed(0)
        y = torch.arange(600) % 3  # int64 labels
        x = (100 * y.view(-1, 1, 1, 1) + torch.randint(0, 50, (600, 1, 8, 8), generator=g)).to(torch.uint8)
        return Images(x[:500], y[:500], x[500:], y[500:])  # train pool, global test split
'''


def test_a_user_data_source_plugs_in_by_class_path(tmp_path, monkeypatch, fit_argv, run_cli):
    (tmp_path / "my_source.py").write_text(textwrap.dedent(MY_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_source", raising=False)

    rc, _, err = run_cli(fit_argv("run", source=("--data.source", "my_source.MySource")))
    assert rc == 0, err
    summary = read_summary(tmp_path / "run")
    assert summary["dataset"] == "mysource"
    for key in METRICS:
        assert 0.0 <= summary[key] <= 1.0, key
    monkeypatch.delitem(sys.modules, "my_source", raising=False)


@pytest.mark.parametrize("extra, names", [
    (["--method", "nosuchmethod"], ["nosuchmethod"]),
    (["--data.source", "nosuchdata"], ["data.source", "nosuchdata"]),
    (["--data.alpha", "0"], ["data.alpha"]),
    (["--data.alpha", "-0.5"], ["data.alpha", "-0.5"]),
    (["--data.num_clients", "500"], ["data.num_clients", "400 samples"]),
    (["--loop.clients_per_round", "9"], ["loop.clients_per_round", "9"]),
    (["--loop.round", "3"], ["--loop.round"]),
    (["--config", "MISSING"], ["missing.yaml"]),
    (["--config", "NOT_YAML"], ["config"]),
    (["--method.init_args.backbone", "vgg"], ["backbone", "vgg"]),
    (["--data.num_clients", "0"], ["data.num_clients"]),
    (["--data.cold_start_fraction", "1.0"], ["data.cold_start_fraction"]),
    (["--data.min_size", "60", "--data.alpha", "0.05"], ["data.min_size"]),
    (["--data.source", "cifar10", "--data.source.root", "NO_DATA", "--data.source.download", "false"],
     ["cifar-10-batches-py", "download=True"]),
    (["--run_dir", "UNWRITABLE"], ["not writable"]),
    (["--method", "collections.OrderedDict"], ["collections.OrderedDict", "FederatedMethod"]),
    (["--fabric.accelerator", "gpu"], ["--fabric.accelerator gpu", "--fabric.accelerator cpu"]),
    (["--fabric.accelerator", "cuda"], ["--fabric.accelerator cuda", "--fabric.accelerator cpu"]),
    (["--method.init_args.lr", "-0.1"], ["method.init_args.lr", "-0.1"]),
    (["--method.init_args.lr", "0"], ["method.init_args.lr", "> 0"]),
    (["--method", "fedcoe", "--method.init_args.num_experts", "0"], ["method.init_args.num_experts", ">= 1"]),
    (["--run_dir", "USER_DIR"], ["USER_DIR", "not a fedbench run directory", "--run_dir"]),
    (["--run_dir", "USER_DIR", "--overwrite"], ["USER_DIR", "not a fedbench run directory", "--run_dir"]),
    (["--overwrite", "maybe"], ["overwrite"]),
    (["--config", "OLD_PATH"], ["baselines.fedper.FedPer", "fedcoe_bench.baselines.fedper.FedPer", "fedper"]),
    (["--method.class_path", "fedcoe_bench.baselines.nosuch.NoSuch"], ["fedcoe_bench.baselines.nosuch.NoSuch"]),
], ids=["unknown-method", "unknown-dataset", "alpha-zero", "alpha-negative", "clients-gt-samples",
        "clients-per-round-gt-clients", "misspelled-key", "missing-config", "config-not-yaml", "unknown-model",
        "no-clients", "cold-start-fraction-1", "min-size-unmeetable", "dataset-offline", "unwritable-run-dir",
        "not-a-method", "no-gpu", "no-cuda", "lr-negative", "lr-zero", "no-experts", "not-a-run-dir",
        "overwrite-not-a-run-dir", "overwrite-not-a-bool", "old-class-path", "class-path-not-importable"])
def test_bad_input_ends_in_one_readable_line(tmp_path, fit_argv, run_cli, extra, names, monkeypatch):
    import torch

    # a user's directory, where the repository's baselines/ is no top-level module (`python -m pytest` from
    # the repository root puts it on sys.path)
    monkeypatch.chdir(tmp_path)
    repo = str(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", repo)])
    for name in [m for m in sys.modules if m == "baselines" or m.startswith("baselines.")]:  # an earlier test's
        monkeypatch.delitem(sys.modules, name)
    if "--fabric.accelerator" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    (tmp_path / "bad.yaml").write_text("loop: [rounds: 3\n")
    (tmp_path / "old.yaml").write_text("method:\n  class_path: baselines.fedper.FedPer\n")  # before the move
    (tmp_path / "file").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.yaml").write_text("my: own\n")
    subst = {"MISSING": str(tmp_path / "missing.yaml"), "NOT_YAML": str(tmp_path / "bad.yaml"),
             "NO_DATA": str(tmp_path / "nodata"), "UNWRITABLE": str(tmp_path / "file" / "run"),
             "USER_DIR": str(tmp_path / "mine"), "OLD_PATH": str(tmp_path / "old.yaml")}
    extra = [subst.get(a, a) for a in extra]
    rc, _, err = run_cli(fit_argv("run", *extra))
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedbench: error:")
    for name in names:
        name = subst.get(name, name)
        assert name in lines[0], f"{name!r} not named in: {lines[0]}"
    assert not (tmp_path / "run").exists(), "a run refused by validation must leave nothing behind"
    assert (tmp_path / "mine" / "config.yaml").read_text() == "my: own\n" and len(list((tmp_path / "mine").iterdir())) == 1


def test_an_unimportable_user_source_says_the_import_failed(fit_argv, run_cli):
    rc, _, err = run_cli(fit_argv("run", source=("--data.source", "nosuchmod.MySource")))
    assert rc != 0 and len(err.strip().splitlines()) == 1
    assert "nosuchmod" in err and ("import" in err.lower() or "no module" in err.lower()), err


# ---------------------------------------------------------------------- configs/method, --help, start-up
METHOD_FILES = sorted((Path(__file__).parents[1] / "configs" / "method").glob("*.yaml"))


@pytest.mark.parametrize("path", METHOD_FILES, ids=[p.stem for p in METHOD_FILES])
def test_each_method_file_lists_every_setting_at_its_default_and_trains(path, tmp_path, fit_argv, run_cli):
    import yaml

    from fedcoe_bench.cli import DATA_SHAPE, fit_parser

    spec = yaml.safe_load(path.read_text())
    defaults = fit_parser().parse_args(["--method", spec["class_path"]]).method.init_args.as_dict()
    assert spec["init_args"] == {k: v for k, v in defaults.items() if k not in DATA_SHAPE}, \
        "the file must list every setting of its method at the method's default"
    rc, _, err = run_cli(fit_argv("run", "--method", str(path), "--data.source.image_size", "12",
                                  "--loop.rounds", "1", "--loop.clients_per_round", "2"))
    assert rc == 0, err
    method = read_summary(tmp_path / "run")["config"]["method"]
    assert method["class_path"] == spec["class_path"] and method["init_args"] == spec["init_args"]


def test_every_help_is_readable(capsys):
    from fedcoe_bench.cli import COMMANDS, main

    for command in [[], *([c] for c in COMMANDS)]:
        with pytest.raises(SystemExit) as done:
            main([*command, "--help"])
        out = capsys.readouterr().out
        assert done.value.code == 0 and out.startswith("usage: fedbench")
        for unreadable in (" at 0x", "<function", "<lambda>", "<locals>", "attrgetter", "accelerates your PyTorch",
                           "how the:"):
            assert unreadable not in out, f"fedbench {' '.join(command)} --help shows {unreadable!r}"
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in ("accelerator", "devices", "strategy", "num_nodes", "precision"):
        assert f"--fabric.{flag}" in out
    assert "bf16-mixed" in out and "Literal['csv', 'wandb']" in out  # typed from Fabric's signature, and ours
    assert "fedcoe_bench.fedcoe.FedCoE" in " ".join(out.split()), "FedCoE is not among the known methods"
    assert "fedbench fit --method.help fedcoe" in " ".join(out.split()), "no line on how to list a method's settings"


@pytest.mark.parametrize("name", ["fedcoe", "fedcoe_bench.fedcoe.FedCoE", "fedprox"])
def test_method_help_lists_the_settings_as_the_readme_spells_them(name, capsys):
    from fedcoe_bench.cli import main

    assert main(["fit", "--method.help", name]) == 0
    out = capsys.readouterr().out
    own = "--method.init_args.num_experts" if "fedcoe" in name.lower() else "--method.init_args.mu"
    assert own in out and "--method.init_args.lr" in out
    assert "--method.num_experts" not in out and "--method.lr " not in out
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert "--method.init_args." in readme


def test_version(capsys):
    from importlib.metadata import version

    from fedcoe_bench.cli import main

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fedbench {version('fedcoe-bench')}"


@pytest.mark.parametrize("method", ["fedavg", "local"])
def test_fit_says_what_it_did_on_stdout_when_not_a_terminal(tmp_path, fit_argv, run_cli, method):
    """With stdout redirected (capsys is no terminal) fit still names the run directory and the three
    accuracies, n/a where the method has no such model."""
    rc, out, err = run_cli(fit_argv("run", "--method", method))
    assert rc == 0, err
    summary = read_summary(tmp_path / "run")
    lines = out.strip().splitlines()
    assert len(lines) == 1 and str(tmp_path / "run") in lines[0], out
    for label, key in (("global", "global_acc"), ("personal", "personal_acc"), ("cold-start", "cold_start_acc")):
        shown = "n/a" if method == "local" and key != "personal_acc" else f"{100 * summary[key]:.2f}%"
        assert f"{label} {shown}" in lines[0], lines[0]


def test_precision_records_what_ran(tmp_path, fit_argv, run_cli):
    """16-mixed on CPU trains in bf16-mixed (Lightning's fallback): the records say bf16-mixed."""
    import torch
    import yaml

    if torch.cuda.is_available():
        pytest.skip("16-mixed runs as asked on a GPU")
    rc, _, err = run_cli(fit_argv("run", "--fabric.precision", "16-mixed"))
    assert rc == 0, err
    assert "warning" in err and "bf16-mixed" in err
    assert read_summary(tmp_path / "run")["config"]["fabric"]["precision"] == "bf16-mixed"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["fabric"]["precision"] == "bf16-mixed"


@pytest.mark.parametrize("argv", [["--help"], ["table", "--help"], ["table", "NO_RUNS"]], ids=["help", "table-help", "table"])
def test_commands_that_do_not_train_do_not_import_torch(argv, tmp_path):
    import subprocess

    argv = [str(tmp_path) if a == "NO_RUNS" else a for a in argv]
    code = ("import sys; from fedcoe_bench.cli import main\n"
            "try: main(sys.argv[1:])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'lightning', 'wandb', 'matplotlib', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_no_progress_bar_when_stderr_is_not_a_terminal(fit_argv, run_cli, monkeypatch):
    """A sweep's or nohup's log file gets no redrawn progress bar, even outside CI and with progress on."""
    monkeypatch.delenv("CI", raising=False)
    code, _, err = run_cli(fit_argv("run", "--loop.progress", "true"))
    assert code == 0, err
    assert "it/s" not in err and "s/it" not in err and "2/2" not in err
