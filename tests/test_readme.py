"""The README's examples run exactly as written, from a user's own directory, through the CLI."""

import json
import re
from pathlib import Path

import pytest

from fedcoe_bench.cli import main

README = (Path(__file__).parents[1] / "README.md").read_text()


def python_block(filename: str) -> str:
    match = re.search(rf"```python\n# {re.escape(filename)}\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no python block starting with '# {filename}'"
    return match.group(1)


def test_setup_commands_come_first():
    first_block = re.search(r"```bash\n(.*?)```", README, re.DOTALL).group(1).strip().splitlines()
    assert len(first_block) == 2
    assert "fedbench fit --config benchmarks/mnist10k_dir0.3.yaml" in first_block[0]
    assert "pytest" in first_block[1]
    ci = (Path(__file__).parents[1] / ".ci" / "run").read_text()
    assert first_block[1] in ci


@pytest.mark.parametrize("filename,args", [
    ("my_method.py", ["--config", "benchmarks/mnist10k_dir0.3.yaml", "--method.class_path", "my_method.FedAvgM",
                      "--method.init_args.server_momentum", "0.5", "--data.source", "synthetic"]),
    ("my_source.py", ["--data.source", "my_source.MySource", "--data.num_clients", "10", "--loop.clients_per_round", "4"]),
])
def test_readme_example_runs_through_the_cli(filename, args, tmp_path, monkeypatch):
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
    assert summary["config"]["method"]["class_path"].startswith(filename[:-3]) or filename == "my_source.py"
