"""Golden diagnostics: each tests/golden/<case>.pem (or a config <case>.yaml, .toml, .json) next to
<case>.err, the exact output of `pemlang check` (stderr, then the exit status).

A first line `# args: ...` gives extra command-line arguments; `# command: run` (first or second
line) runs `pemlang run --device cpu` instead, for diagnostics that need tensor data, and
`# command: tune` runs `pemlang tune` (its options in `# args:`). The .pem files name fixture
adapters as "adapters/<name>" (see peft_factory.build_all); `model/` holds a config.json, what `tune --base`
checks before anything loads.

Regenerate after an intended change of wording:   python -m pytest tests/test_golden.py --regen-golden
"""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import shutil
from pathlib import Path

import pytest

from pemlang.cli import main

GOLDEN = Path(__file__).parent / "golden"
SUFFIXES = (".pem", ".yaml", ".toml", ".json")  # programs, and programs embedded in configs
CASES = sorted(p.name for p in GOLDEN.iterdir() if p.suffix in SUFFIXES)


def run_check(pem: Path, workdir: Path, adapters: Path) -> str:
    """Run `pemlang check` on a copy of `pem` inside `workdir`, where adapters/ are the fixtures."""
    text = pem.read_text(encoding="utf-8")
    head = text.splitlines()[:2]
    extra = next((shlex.split(line.removeprefix("# args:")) for line in head if line.startswith("# args:")), [])
    command = (["run", "--device", "cpu"] if "# command: run" in head else ["tune"] if "# command: tune" in head
               else ["check"])
    link = workdir / "adapters"
    if not link.exists():
        link.symlink_to(adapters, target_is_directory=True)
    shutil.copy(pem, workdir / pem.name)
    (workdir / "out" / "existing").mkdir(parents=True, exist_ok=True)
    (workdir / "model").mkdir(exist_ok=True)  # what a base model directory looks like before it is loaded
    (workdir / "model" / "config.json").write_text('{"model_type": "llama"}\n', encoding="utf-8")
    stderr, stdout = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
            status = main([command[0], pem.name, *command[1:], *extra])
    finally:
        os.chdir(cwd)
    return f"{stderr.getvalue()}exit status: {status}\n"


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str, adapters: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    actual = run_check(GOLDEN / case, tmp_path, adapters)
    expected_file = (GOLDEN / case).with_suffix(".err")
    if request.config.getoption("--regen-golden"):
        expected_file.write_text(actual, encoding="utf-8")
        return
    assert expected_file.exists(), f"no {expected_file.name}: run with --regen-golden and review it"
    assert actual == expected_file.read_text(encoding="utf-8")


def test_every_code_has_a_golden_case() -> None:
    """Every diagnostic code a check can produce is shown in at least one golden file."""
    from pemlang.diagnostics import CODES

    shown = "".join(p.read_text(encoding="utf-8") for p in GOLDEN.glob("*.err"))
    missing = [code for code in CODES if f"[{code}]" not in shown]
    assert not missing


def test_the_readme_lists_every_code() -> None:
    """The README's table of codes is what users have: every code appears there, and no other."""
    import re

    from pemlang.diagnostics import CODES

    readme = (GOLDEN.parent.parent / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"\| ([EW]\d{3}) \|", readme))
    assert listed == set(CODES)
