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

REPO = Path(__file__).parents[1]
RECORDS = "benchmarks/results/runs"
PAGES = [REPO / "README.md", *sorted((REPO / "benchmarks" / "results").glob("*.md"))]


def table_commands(text: str) -> list[str]:
    """The ``fedbench table`` commands over the committed records that ``text`` names: lines of its
    fenced code blocks (a trailing ``# comment`` dropped) and inline code spans."""
    candidates = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, re.DOTALL | re.MULTILINE):
        candidates += [line.split(" #")[0].strip() for line in block.splitlines()]
    candidates += re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)
    commands = []
    for command in candidates:
        if not command.startswith(("fedbench table ", "fedbench sweep ")):
            continue
        argv = shlex.split(command)
        if not any(a.startswith(RECORDS) for a in argv[2:]):
            continue
        if argv[1] == "sweep" and "--dry-run" not in argv:  # a sweep that would run: not a page's rebuild
            continue
        if any(a.endswith("/...") for a in argv):  # README's placeholder for "a directory of records"
            continue
        if command not in commands:
            commands.append(command)
    return commands


CASES = [(page, command) for page in PAGES for command in table_commands(page.read_text())]


def test_the_pages_name_table_commands():
    assert len(CASES) >= 4, CASES  # the collection itself works (at least the pages known to name one)


def ignored_files(directory: str) -> list[str]:
    """Files under ``directory`` that git ignores, i.e. records that can never be committed."""
    out = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--", directory],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    return out.splitlines()


@pytest.mark.parametrize("page,command", CASES,
                         ids=[f"{page.name}:{command.split()[1]}:{command.split()[-1]}" for page, command in CASES])
def test_page_prints_what_its_table_command_rebuilds(page, command, run_cli, monkeypatch):
    argv = shlex.split(command)[1:]
    directory = next(a for a in argv[2:] if a.startswith(RECORDS))
    # the records must be in the repository: a missing directory fails, never skips
    assert (REPO / directory).is_dir(), f"{page.name} names {directory}, which is not in the repository"
    assert any((REPO / directory).rglob("summary.json")), f"{directory} holds no run record"
    if (REPO / ".git").exists() and shutil.which("git"):
        assert not ignored_files(directory), f"git ignores records under {directory}: they cannot be committed"

    monkeypatch.chdir(REPO)  # the page's relative paths; main() puts the cwd on sys.path: restore it after
    monkeypatch.setattr(sys, "path", list(sys.path))
    rc, out, err = run_cli(argv)
    assert rc == 0, err

    rows = [line for line in out.splitlines() if line.startswith("|") and not re.fullmatch(r"\|(-*:?\|)+", line)]
    assert rows, f"`{command}` printed no table"
    lines = {line.rstrip() for line in page.read_text().splitlines()}
    missing = [row for row in rows if row not in lines]
    assert not missing, (f"{page.relative_to(REPO)} does not print these rows of `{command}`:\n"
                         + "\n".join(missing))
