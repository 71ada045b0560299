"""Shared fixtures: real PEFT adapters built once per test session."""

from __future__ import annotations

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
