"""Shared fixtures: real PEFT adapters built once per test session."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from peft_factory import build_all  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--regen-golden", action="store_true",
                     help="rewrite tests/golden/*.err from the current output instead of comparing")


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of fixture adapters (see peft_factory.build_all)."""
    return build_all(tmp_path_factory.mktemp("fixtures") / "adapters")


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="session")
def example_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the repository's examples/ with its adapters made by examples/make_adapters.py:
    `ROOT/examples/*.pem`, `ROOT/examples/adapters/...` (so README paths work with cwd = ROOT)."""
    root = tmp_path_factory.mktemp("example_root")
    examples = root / "examples"
    examples.mkdir()
    spec = importlib.util.spec_from_file_location("make_adapters", EXAMPLES / "make_adapters.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with contextlib.redirect_stdout(io.StringIO()):
        module.main(["--out", str(examples / "adapters")])
    for program in [*EXAMPLES.glob("*.pem"), *EXAMPLES.glob("*.jsonl")]:
        shutil.copy(program, examples / program.name)
    return root
