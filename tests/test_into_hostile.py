"""Hostile bases for `output x into "BASE" -> "DIR"`: each is refused with a diagnostic (never an
internal error), nothing written, the base unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft_factory import ROBERTA_BASE, lora, save, save_base
from safetensors.torch import load_file, save_file

from pemlang.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import IA3Config

    root = tmp_path_factory.mktemp("hostile")
    save_base(root / "llama_sharded", max_shard_size="20KB")
    save_base(root / "roberta_lm", "roberta", task="lm")
    lora(root / "a", 1)
    # query and value are not feed-forward: PEFT's merge scales their biases with the weights
    save(IA3Config(target_modules=["query", "value"], feedforward_modules=[]), root / "roberta_ia3", 37,
         arch="roberta", name=ROBERTA_BASE)
    return root


def _run(tmp: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    program = tmp / "merge.pem"
    program.write_text(text, encoding="utf-8")
    status = main(["run", str(program), "--device", "cpu"])
    return status, capsys.readouterr().err


def _contents(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


QUERY_BIAS = "roberta.encoder.layer.0.attention.self.query.bias"


@pytest.mark.parametrize(("change", "code", "says"), [
    (lambda bias: bias.to(torch.int8), "E036", f"{QUERY_BIAS} is I8, not floating point"),
    (lambda bias: torch.zeros(7), "E009", f"{QUERY_BIAS} 16, the base's is 7"),
    (lambda bias: bias.reshape(1, -1).clone(), "E009", f"{QUERY_BIAS} 16, the base's is 1×16"),
])
def test_an_ia3_bias_the_merge_cannot_scale_is_refused(models: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str], change, code: str,
                                                       says: str) -> None:  # type: ignore[no-untyped-def]
    """(IA)3 on a non-feed-forward layer scales its bias too: a bias that is not floating point, or not
    one scale per output feature, is a misfit of the base (was: KeyError / reshape error inside the
    writer, an internal error)."""
    base = tmp_path / "base"
    shutil.copytree(models / "roberta_lm", base)
    tensors = load_file(base / "model.safetensors")
    tensors[QUERY_BIAS] = change(tensors[QUERY_BIAS])
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    before = _contents(base)
    status, err = _run(tmp_path, f'mode exact\ninput a = "{models / "roberta_ia3"}"\noutput a into "base" -> "m"\n',
                       capsys)
    assert status == 1 and f"error[{code}]" in err and says in err, err
    assert "internal error" not in err
    assert not (tmp_path / "m").exists()
    assert _contents(base) == before


@pytest.mark.parametrize("name", ["x" * 300, "a\0b"])
def test_an_index_naming_an_impossible_file_name_is_a_diagnostic(models: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str], name: str) -> None:
    """A shard name the file system cannot look up (too long: ENAMETOOLONG, which pathlib's is_file
    raises; a NUL) is a missing weight file (was: an internal error OSError)."""
    base = tmp_path / "base"
    shutil.copytree(models / "llama_sharded", base)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][sorted(index["weight_map"])[0]] = name
    index_path.write_text(json.dumps(index))
    before = _contents(base)
    status, err = _run(tmp_path, f'input a = "{models / "a"}"\noutput a into "base" -> "m"\n', capsys)
    assert status == 1 and "error[E035]" in err and "is missing" in err, err
    assert "internal error" not in err
    assert not (tmp_path / "m").exists()
    assert _contents(base) == before
