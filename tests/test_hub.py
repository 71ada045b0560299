"""Hub inputs (`hf://org/name[/sub][@rev]`) resolved offline from a Hugging Face cache laid out as
huggingface_hub lays it out (refs/, snapshots/<sha>/ links into blobs/), with HF_HUB_OFFLINE=1:
`check`, `run`, the API and provenance (the commit that was read), revisions, subfolders, and the
diagnostics for what cannot be resolved."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

import pemlang

REPO = Path(__file__).resolve().parent.parent
SHA_A = "a" * 40
SHA_B = "b" * 40


def cache_repo(cache: Path, repo: str, sha: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> None:
    """Put `files` (path in the repo → local file) into `cache` as commit `sha` of `repo`."""
    root = cache / f"models--{repo.replace('/', '--')}"
    for ref in refs:
        (root / "refs").mkdir(parents=True, exist_ok=True)
        (root / "refs" / ref).write_text(sha)
    for inside, source in files.items():
        data = source.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / sha / inside
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def adapter_files(directory: Path, prefix: str = "") -> dict[str, Path]:
    return {f"{prefix}{name}": directory / name for name in ("adapter_config.json", "adapter_model.safetensors")}


@pytest.fixture()
def cache(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache_repo(cache, "tiny-org/adapter-a", SHA_A, adapter_files(adapters / "llama_r8"), refs=("main", "v1"))
    cache_repo(cache, "tiny-org/adapter-b", SHA_B, adapter_files(adapters / "llama_r8_b"))
    cache_repo(cache, "tiny-org/several", SHA_B, {**adapter_files(adapters / "llama_r8", "first/"),
                                                  **adapter_files(adapters / "llama_r8_c", "second/")})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _inputs(path: Path) -> list[dict[str, str]]:
    with safe_open(path / "adapter_model.safetensors", "pt") as f:
        return json.loads(f.metadata()["pemlang.inputs"])


def test_run_merges_two_cached_hub_adapters(cache: Path, adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "hub.pem"
    program.write_text('input a = "hf://tiny-org/adapter-a"\ninput b = "hf://tiny-org/adapter-b@main"\n'
                       'output 0.5*a + 0.5*b -> "out/merged"\n')
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    checked = subprocess.run([sys.executable, "-m", "pemlang.cli", "check", str(program)], text=True,
                             capture_output=True, env=env)
    assert checked.returncode == 0, checked.stderr
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(program), "--device", "cpu"], text=True,
                          capture_output=True, env=env)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out" / "merged"
    recorded = {i["name"]: i for i in _inputs(out)}
    assert recorded["a"]["path"] == f"hf://tiny-org/adapter-a@{SHA_A}"
    assert recorded["b"]["path"] == f"hf://tiny-org/adapter-b@{SHA_B}"
    digest = hashlib.sha256((adapters / "llama_r8" / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert recorded["a"]["sha256"] == digest
    # the same merge from local directories gives the same tensors
    local = pemlang.compile("0.5*a + 0.5*b", inputs={"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"})
    from safetensors.torch import load_file

    expected = local.evaluate()["0.5*a + 0.5*b"]
    written = load_file(out / "adapter_model.safetensors")
    assert written.keys() == expected.keys() and all((written[k] == expected[k]).all() for k in written)
    card = (out / "README.md").read_text()
    assert f"hf://tiny-org/adapter-a@{SHA_A}" in card


@pytest.mark.parametrize("written, commit", [
    ("hf://tiny-org/adapter-a@v1", SHA_A),
    (f"hf://tiny-org/adapter-a@{SHA_A}", SHA_A),
    ("hf://tiny-org/several/second", SHA_B),
])
def test_revisions_and_subfolders(cache: Path, adapters: Path, written: str, commit: str) -> None:
    program = pemlang.compile("x", inputs={"x": written})
    inputs = program.plan().inputs
    assert inputs["x"].written.endswith(f"@{commit}") and inputs["x"].written.startswith(written.split("@")[0])
    expected = "llama_r8_c" if "second" in written else "llama_r8"
    assert (inputs["x"].path / "adapter_model.safetensors").read_bytes() == \
        (adapters / expected / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("written, message, hint", [
    ("hf://tiny-org/missing", "is not in the Hugging Face cache, and downloading is off (HF_HUB_OFFLINE)",
     "unset HF_HUB_OFFLINE"),
    ("hf://tiny-org/adapter-a@v9", "is not in the Hugging Face cache", "unset HF_HUB_OFFLINE"),
    ("hf://tiny-org/several", "is not in the Hugging Face cache", "unset HF_HUB_OFFLINE"),
    ("hf://", "is not a Hub id", "hf://ORG/NAME"),
    ("hf://a/b/../c", "'.' or '..'", ""),
])
def test_what_cannot_be_resolved(cache: Path, written: str, message: str, hint: str) -> None:
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("x", inputs={"x": written})
    [error] = caught.value.diagnostics
    assert error.code == "E012" and message in error.message, error.message
    assert hint in " ".join(error.hints)


def test_inspect_a_hub_adapter(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pemlang.cli import main

    assert main(["inspect", "hf://tiny-org/adapter-a@v1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"hf://tiny-org/adapter-a@{SHA_A}  (cached at ") and "tiny-org/tiny-llama" in out
    assert main(["inspect", "hf://tiny-org/nothing"]) == 1
    assert "error[E012]" in capsys.readouterr().err
