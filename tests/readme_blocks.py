"""The README's program blocks, run as printed: what the tests of each section share."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from pemlang.cli import main

REPO = Path(__file__).resolve().parent.parent


def program_block(heading: str) -> str:
    """The first indented `mode exact` block after `heading` in the README, as printed (indented)."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index(heading):]
    block = section[section.index("    mode exact"):]
    return block[: block.index("\n\n")]


def run_block(block: str, root: Path, name: str) -> None:
    """`pemlang run` of a README block saved at the repository root `root`, from there (so its paths
    are read as a user who pasted it would have them read); it must succeed."""
    program = root / name
    program.write_text("\n".join(line[4:] for line in block.splitlines()) + "\n", encoding="utf-8")
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(["run", str(program), "--device", "cpu", "--force"])
    finally:
        os.chdir(cwd)
    assert status == 0, err.getvalue()


def destinations(text: str, relative_to: str = "") -> set[str]:
    """The output directories a program writes (`-> "DIR"`), normalised, each under `relative_to`."""
    return {os.path.normpath(os.path.join(relative_to, d)) for d in re.findall(r'-> "([^"]+)"', text)}
