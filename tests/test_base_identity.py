"""Base identity: a base recorded as a path inside the Hugging Face cache is the repo it caches
(`…/models--org--name/snapshots/<sha>` is `org/name` at `<sha>`), so adapters trained on one model
combine however their configs spell it, and the output records the common base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import pemlang
from pemlang.types import BaseModelRef

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("recorded, revision, expected", [
    (f"/root/.cache/huggingface/hub/models--tiny-org--tiny-llama/snapshots/{SHA}", None, ("tiny-org/tiny-llama", SHA)),
    (f"C:\\hf\\hub\\models--gpt2\\snapshots\\{SHA}", None, ("gpt2", SHA)),
    (f"/hf/models--a--b/snapshots/{SHA}/sub/dir", None, ("a/b", SHA)),
    (f"/hf/models--a--b/snapshots/{SHA}", "v1.0", ("a/b", "v1.0")),  # a recorded revision wins
    ("tiny-org/tiny-llama", None, ("tiny-org/tiny-llama", None)),
    ("/hf/models--a--b/snapshots/not-a-sha", None, ("/hf/models--a--b/snapshots/not-a-sha", None)),
    ("/data/my-models--x/snapshots", None, ("/data/my-models--x/snapshots", None)),
    (None, None, (None, None)),
])
def test_cache_paths_are_repos(recorded: str | None, revision: str | None, expected: tuple[str | None, str | None]) -> None:
    base = BaseModelRef.from_config(recorded, revision)
    assert (base.name, base.revision) == expected


def _recorded_as(source: Path, target: Path, base: str) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (target / "adapter_config.json").write_text(json.dumps(config))
    return target


def test_a_cache_path_and_a_repo_id_combine(adapters: Path, tmp_path: Path) -> None:
    a = _recorded_as(adapters / "llama_r8", tmp_path / "a",
                     f"/home/me/.cache/huggingface/hub/models--tiny-org--tiny-llama/snapshots/{SHA}")
    b = adapters / "llama_r8_b"  # recorded as "tiny-org/tiny-llama"
    program = pemlang.compile("0.5*a + 0.5*b", inputs={"a": a, "b": b})
    [written] = program.save(tmp_path / "out")
    config = json.loads((written / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-org/tiny-llama" and config["revision"] == SHA


def test_different_repos_in_the_cache_still_differ(adapters: Path, tmp_path: Path) -> None:
    a = _recorded_as(adapters / "llama_r8", tmp_path / "a", f"/hf/models--someone--else/snapshots/{SHA}")
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("a + b", inputs={"a": a, "b": adapters / "llama_r8_b"})
    [error] = caught.value.diagnostics
    assert error.code == "E006" and '"someone/else" @ ' + SHA in error.notes[0]
