"""Refresh the generated blocks of the results pages from the committed records.

A page marks a block it does not write by hand with the command that prints it:

    <!-- fedbench sweep benchmarks/sweeps/tune_v2_core.yaml --sweep_dir benchmarks/results/runs/tune_v2 --dry-run -->
    ...
    <!-- end -->

and this script replaces what stands between the two markers with the command's status line (a
sweep's ``# N runs: ...``) and its table lines, run from the repository root. Run it after
committing new records (``fedbench records``); tests/test_results_pages.py checks that every
table line those commands print stands in the page.

    python benchmarks/results/refresh.py [PAGE ...]     # default: every page in benchmarks/results
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"(<!-- (fedbench [^\n]*?) -->\n)(.*?)(<!-- end -->)", re.DOTALL)


def output_of(command: str) -> str:
    """What ``command`` prints (``fedbench`` run as this Python's module), less a sweep's list of runs:
    its status line (``# N runs: ...``), tables and notes (one list item each), a heading as a bold line."""
    argv = [sys.executable, "-m", "fedcoe_bench.cli", *shlex.split(command)[1:]]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
    lines = []
    for line in done.stdout.splitlines():
        if line.startswith("# ") and " runs: " in line:
            lines.append(line[2:])
        elif line.startswith("## "):
            lines.append(f"**{line[3:]}**")
        elif line.startswith(("missing: ", "note: ", "duplicate: ")):
            lines.append(f"- {line}")  # one list item each, not one paragraph
        elif not line.startswith(("fedbench fit ", "# ")):
            lines.append(line)
    if not any(line.startswith("|") for line in lines):
        raise SystemExit(f"refresh: `{command}` printed no table (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    return "\n".join(lines).strip("\n") + "\n"


def refresh(page: Path) -> bool:
    """Rewrite ``page``'s generated blocks; True if anything changed."""
    text = page.read_text()
    new = BLOCK.sub(lambda m: m.group(1) + output_of(m.group(2)) + m.group(4), text)
    if new != text:
        page.write_text(new)
    return new != text


def main(paths: list[str]) -> None:
    pages = [Path(p) for p in paths] or sorted((REPO / "benchmarks" / "results").glob("*.md"))
    for page in pages:
        if refresh(page):
            print(f"refreshed {page}")


if __name__ == "__main__":
    main(sys.argv[1:])
