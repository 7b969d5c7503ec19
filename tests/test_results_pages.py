"""Every published table is rebuilt from the repository by the command its page names, equal to what
the page prints: each ``fedbench table benchmarks/results/runs/...`` command of README.md and
benchmarks/results/*.md, and each tuning selection (``fedbench sweep FILE --sweep_dir
benchmarks/results/runs/... --dry-run``), runs on the committed records, and every table line it
prints is in the page."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedcoe_bench.sweep import drop_flag

REPO = Path(__file__).parents[1]
RECORDS = "benchmarks/results/runs"
PAGES = [REPO / "README.md", *sorted((REPO / "benchmarks" / "results").glob("*.md"))]


def records_dir(argv: list[str]) -> str | None:
    """The records directory a rebuild command reads (``argv`` from ``table`` or ``sweep`` on): the
    table's first positional argument, the sweep's ``--sweep_dir``; None outside the records."""
    if argv[0] == "table":
        directory = next((a for a in argv[1:] if not a.startswith("-")), None)
    else:
        flags = dict(a.split("=", 1) for a in argv if a.startswith("--sweep_dir="))
        after = [b for a, b in zip(argv, argv[1:]) if a == "--sweep_dir"]
        directory = flags.get("--sweep_dir") or (after[0] if after else None)
    return directory if directory and (directory + "/").startswith(RECORDS + "/") else None


def rebuild_commands(text: str) -> list[str]:
    """The commands that rebuild a table from the committed records that ``text`` names: ``fedbench
    table DIR`` and the tuning selection ``fedbench sweep FILE --sweep_dir DIR --dry-run``; lines of
    its fenced code blocks (a trailing ``# comment`` dropped) and inline code spans."""
    candidates = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        candidates += [line.split(" #")[0].strip() for line in block.splitlines()]
    candidates += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)
    commands = []
    for command in candidates:
        if not command.startswith(("fedbench table ", "fedbench sweep ")):
            continue
        argv = shlex.split(command)[1:]
        if records_dir(argv) is None:
            continue
        if argv[0] == "sweep" and not {"--dry-run", "--dry_run"} & set(argv):  # it would run the sweep
            continue
        if any(a.endswith("/...") for a in argv):  # README's placeholder for "a directory of records"
            continue
        if command not in commands:
            commands.append(command)
    return commands


CASES = [(page, command) for page in PAGES for command in rebuild_commands(page.read_text())]


def test_the_pages_name_rebuild_commands():
    # the collection itself works (at least the pages known to name one of each kind)
    assert len(CASES) >= 4 and any(c.startswith("fedbench sweep ") for _, c in CASES), CASES


def ignored_files(directory: str) -> list[str]:
    """Files under ``directory`` that git ignores, i.e. records that can never be committed."""
    out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", directory],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("page,command", CASES, ids=[
    f"{page.name}:{command.split()[1]}:{records_dir(shlex.split(command)[1:])}" for page, command in CASES])
def test_page_prints_what_its_command_rebuilds(page, command, run_cli, monkeypatch):
    argv = drop_flag(shlex.split(command)[1:], "--export")  # a page's selection may write configs; the test none
    directory = records_dir(argv)
    # the records must be in the repository: a missing directory fails, never skips
    assert (REPO / directory).is_dir(), f"{page.name} names {directory}, which is not in the repository"
    assert any((REPO / directory).rglob("summary.json")), f"{directory} holds no run record"
    if (REPO / ".git").exists() and shutil.which("git"):
        assert not ignored_files(directory), f"git ignores records under {directory}: they cannot be committed"

    monkeypatch.chdir(REPO)  # the page's relative paths; main() puts the cwd on sys.path: restore it after
    monkeypatch.setattr(sys, "path", list(sys.path))
    rc, out, err = run_cli(argv)
    # a sweep's dry run exits 1 when a run diverged (a failed setting the selection shows), 0 otherwise
    assert rc == 0 or (argv[0] == "sweep" and rc == 1 and " 0 in conflict" in out), err

    rows = [line for line in out.splitlines() if line.startswith("|") and not re.fullmatch(r"\|(-*:?\|)+", line)]
    assert rows, f"`{command}` printed no table"
    lines = {line.rstrip() for line in page.read_text().splitlines()}
    missing = [row for row in rows if row not in lines]
    assert not missing, (f"{page.relative_to(REPO)} does not print these rows of `{command}`:\n"
                         + "\n".join(missing))


def test_refresh_rewrites_only_a_marked_block_with_what_its_command_prints(tmp_path, run_cli, monkeypatch):
    """benchmarks/results/refresh.py replaces a stale block between a command's marker and ``<!-- end -->``
    with that command's table lines, and leaves the page's own text alone."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("refresh", REPO / "benchmarks" / "results" / "refresh.py")
    refresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    command = f"fedbench table {RECORDS}/cifar10-jpeg"
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\nwritten by hand\n\n<!-- {command} -->\n| stale | row |\n<!-- end -->\n\nafter\n")
    assert refresh.refresh(page)
    text = page.read_text()
    assert text.startswith("# Title\n\nwritten by hand\n\n") and text.endswith("<!-- end -->\n\nafter\n")
    assert "| stale | row |" not in text
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _, out, _ = run_cli(shlex.split(command)[1:])
    rows = [line for line in out.splitlines() if line.startswith("|")]
    assert rows and all(row in text.splitlines() for row in rows)
    assert not refresh.refresh(page)  # nothing new: the page is left as it is
