"""The grammar loads from an editable install and from a wheel installed elsewhere."""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_editable_install_reads_the_repository_grammar() -> None:
    from pemlang.parser import grammar_text

    assert grammar_text() == (REPO / "grammar" / "pem.lark").read_text(encoding="utf-8")


@pytest.mark.skipif(os.environ.get("PEMLANG_SKIP_WHEEL") == "1", reason="PEMLANG_SKIP_WHEEL=1")
def test_wheel_carries_the_grammar(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(dist), str(REPO)], check=True, capture_output=True)
    (wheel,) = dist.glob("pemlang-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
                    str(wheel)], check=True, capture_output=True)
    (own_site,) = (Path(d) for d in _site_packages(python) if (Path(d) / "pemlang" / "parser.py").is_file())
    # lark & co. come from the running interpreter's site-packages (a venv's or the system's, whichever
    # runs the tests), appended after the fresh venv's own: its `.pth` files (an editable pemlang among
    # them) are not processed, so the wheel is the only pemlang there is.
    running = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
    (own_site / "running-interpreter.pth").write_text("\n".join(running) + "\n")
    program = tmp_path / "elsewhere" / "p.pem"
    program.parent.mkdir()
    program.write_text("param lam = 0.5\nx = lam * 2\n")
    code = ("import pemlang, pathlib, sys; from pemlang.parser import grammar_text; "
            "assert pemlang.__file__.startswith(sys.argv[2]), pemlang.__file__; "
            "assert 'pemlang/grammar/pem.lark' in str(__import__('importlib.resources').resources.files('pemlang')"
            ".joinpath('grammar/pem.lark')); "
            "from pemlang.cli import main; sys.exit(main(['check', sys.argv[1]]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(python), "-I", "-c", code, str(program), str(own_site)], capture_output=True, text=True,
                            cwd=program.parent, env=env)
    assert result.returncode == 0, result.stderr
    assert "ok:" in result.stdout
    assert (REPO / "grammar" / "pem.lark").read_text() in _wheel_grammar(wheel)


def _site_packages(python: Path) -> list[str]:
    """The site-packages directories of another interpreter."""
    code = "import json, site; print(json.dumps(site.getsitepackages()))"
    found = subprocess.run([str(python), "-I", "-c", code], check=True, capture_output=True, text=True).stdout
    return [d for d in json.loads(found) if Path(d).is_dir()]


def _wheel_grammar(wheel: Path) -> str:
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        return archive.read("pemlang/grammar/pem.lark").decode("utf-8")
