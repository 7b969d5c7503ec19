"""The README's examples run exactly as written, from a user's own directory, through the CLI."""

import json
import re
from pathlib import Path

import pytest
from helpers import README, python_block

from fedcoe_bench.cli import main


def test_setup_commands_come_first():
    first_block = re.search(r"```bash\n(.*?)```", README, re.DOTALL).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "fedbench fit --config benchmarks/mnist10k_dir0.3.yaml" in first_block[0]
    assert "pytest" in first_block[1]
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert first_block[1] in ci


def bash_command(program: str) -> list[str]:
    """The arguments after ``fedbench fit`` of the README's bash line that uses ``program``."""
    match = re.search(rf"^fedbench fit (.*{re.escape(program)}.*)$", README, re.MULTILINE)
    assert match, f"README has no `fedbench fit` line using {program}"
    return match.group(1).split()


@pytest.mark.parametrize("filename,args,used", [
    ("my_method.py", [*bash_command("my_method.FedDyn"), "--data.source", "synthetic"], "method.class_path"),
    ("my_source.py", bash_command("my_source.MySource"), "data.source.class_path"),
    ("my_backbone.py", [*bash_command("my_backbone.SmallBN"), "--data.source", "synthetic"], "method.init_args.backbone"),
])
def test_readme_example_runs_through_the_cli(filename, args, used, tmp_path, monkeypatch):
    (tmp_path / filename).write_text(python_block(filename))
    monkeypatch.syspath_prepend(str(tmp_path))
    repo = Path(__file__).parents[1]
    args = [str(repo / a) if a.endswith(".yaml") else a for a in args]
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    code = main(["fit", *args, "--loop.rounds", "2", "--loop.eval_every", "2", "--loop.progress", "false",
                 "--run_dir", str(run_dir), "--data.cache_dir", str(tmp_path / "cache")])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("global_acc", "personal_acc", "cold_start_acc"):
        assert 0.0 <= summary[key] <= 1.0
    value = summary["config"]
    for key in used.split("."):
        value = value[key]
    assert value.startswith(filename[:-3] + ".")  # the user's class was used
