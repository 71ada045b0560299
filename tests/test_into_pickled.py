"""A pickled base model (`pytorch_model.bin`, or shards named by `pytorch_model.bin.index.json`) for
`output … into` (SPEC §5.2): refused (E023) unless --allow-pickle; with it, read by torch's
weights-only unpickler (memory-mapped where the file's format allows) and written as safetensors.

The oracle is the one of test_into_base.py: PEFT's `merge_and_unload()` on the base (transformers
loads the .bin files) in fp32, then cast to the base's dtype; and the logits of the written model,
loaded by transformers, against `PeftModel(base, adapter)`."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft_factory import lora, save_base
from safetensors import safe_open
from test_into_base import _load, assert_matches, peft_merged, state

from pemlang.cli import main

PICKLE_INDEX = "pytorch_model.bin.index.json"


def pickled_copy(source: Path, out: Path, *, shards: int = 1, legacy: bool = False) -> Path:
    """`source` (a safetensors base) with its weights as transformers' pickled format: one
    pytorch_model.bin, or `shards` files pytorch_model-0000i-of-0000n.bin and their index;
    `legacy`: torch's pre-1.6 format, which cannot be memory-mapped."""
    out.mkdir()
    for entry in source.iterdir():
        if not entry.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(entry, out / entry.name)
    tensors = state(source)
    keys = list(tensors)
    groups = [keys[i::shards] for i in range(shards)]  # interleaved: a layer's tensors in several files
    weight_map = {}
    for number, group in enumerate(groups, 1):
        name = "pytorch_model.bin" if shards == 1 else f"pytorch_model-{number:05d}-of-{shards:05d}.bin"
        torch.save({k: tensors[k] for k in group}, out / name, _use_new_zipfile_serialization=not legacy)
        weight_map.update({k: name for k in group})
    if shards > 1:
        (out / PICKLE_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}), encoding="utf-8")
    return out


def pickled_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a pickled base."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.bin")):
        tensors.update(torch.load(file, weights_only=True))
    return tensors


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pickled")
    save_base(root / "llama")
    save_base(root / "llama_bf16", dtype="bfloat16")
    pickled_copy(root / "llama", root / "bin")
    pickled_copy(root / "llama_bf16", root / "bin_sharded", shards=3)
    pickled_copy(root / "llama", root / "bin_legacy", legacy=True)
    lora(root / "a", 1)
    lora(root / "mlp", 3, targets=("gate_proj", "down_proj"))
    return root


def eval_into(base: Path, adapter: Path, out: Path, *extra: str) -> int:
    return main(["eval", "--input", f"x={adapter}", "--out", str(out), "--into", str(base), *extra, "--", "x"])


def peft_merged_pickled(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge in fp32 of the pickled base (transformers reads the .bin files), cast to its dtypes."""
    from peft import PeftModel

    stored = pickled_state(base)
    model = _load(base, "llama", "lm", dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.to(stored[k].dtype) for k, v in merged.state_dict().items() if k in stored}


def test_without_allow_pickle_a_pickled_base_is_refused(models: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_into(models / "bin", models / "a", tmp_path / "m") == 1
    err = capsys.readouterr().err
    assert "error[E023]" in err and "weights are pickled (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("base", ["bin", "bin_legacy"])
def test_a_pickled_base_is_merged_as_peft_does_and_written_as_safetensors(models: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         base: str) -> None:
    """The memory-mapped zip format, and the legacy one (read whole): the same merge."""
    calls: list[dict] = []
    load = torch.load

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(kwargs)
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert eval_into(models / base, models / "a", tmp_path / "m", "--allow-pickle") == 0
    assert calls and all(c["weights_only"] is True and c["mmap"] is (base == "bin") for c in calls)
    monkeypatch.undo()
    written = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert written == ["README.md", "config.json", "generation_config.json", "model.safetensors"]
    ours = state(tmp_path / "m")
    assert_matches(ours, peft_merged_pickled(models / base, models / "a"), pickled_state(models / base))
    # and what the safetensors base merges into, byte for byte
    assert_matches(ours, peft_merged(models / "llama", models / "a"), state(models / "llama"))
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as opened:
        meta = opened.metadata()
    assert meta["format"] == "pt" and json.loads(meta["pemlang.inputs"])[0]["name"] == "x"
    for name in ("config.json", "generation_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (models / base / name).read_bytes()


def test_a_sharded_pickled_base_becomes_safetensors_shards_with_their_index(models: Path, tmp_path: Path) -> None:
    base = models / "bin_sharded"
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    assert eval_into(base, models / "mlp", tmp_path / "m", "--allow-pickle") == 0
    out = tmp_path / "m"
    shards = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "config.json", "generation_config.json", "model.safetensors.index.json", *shards])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    pickled_index = json.loads((base / PICKLE_INDEX).read_text())["weight_map"]
    renamed = {f"pytorch_model-0000{i}-of-00003.bin": shards[i - 1] for i in (1, 2, 3)}
    assert index["weight_map"] == {k: renamed[v] for k, v in pickled_index.items()}  # each tensor in its file's shard
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in pickled_state(base).values())
    ours = state(out)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    assert_matches(ours, peft_merged_pickled(base, models / "mlp"), pickled_state(base))
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before  # the base is never written


def test_transformers_loads_it_and_its_logits_equal_peftmodels(models: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    assert eval_into(models / "bin", models / "a", tmp_path / "m", "--allow-pickle") == 0
    merged = _load(tmp_path / "m", "llama", "lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(_load(models / "bin", "llama", "lm"), str(models / "a")).eval()
    tokens = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        assert torch.allclose(merged(tokens).logits, reference(tokens).logits, atol=1e-5, rtol=1e-5)


def test_resharding_a_pickled_base(models: Path, tmp_path: Path) -> None:
    assert eval_into(models / "bin", models / "a", tmp_path / "m", "--allow-pickle", "--max-shard-size", "20KB") == 0
    out = tmp_path / "m"
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not list(out.glob("*.bin*"))
    assert_matches(state(out), peft_merged_pickled(models / "bin", models / "a"), pickled_state(models / "bin"))


def test_plan_says_the_weights_are_written_as_safetensors(models: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    program = tmp_path / "m.pem"
    program.write_text(f'input a = "{models / "a"}"\noutput a into "{models / "bin_sharded"}" -> "m"\n',
                       encoding="utf-8")
    assert main(["plan", str(program), "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    assert "writes 3 weight files (as the base is; safetensors, from the base's pickled weights)" in out
    assert "model-00001-of-00003.safetensors:" in out
    assert not (tmp_path / "m").exists()


# -- hostile pickles ---------------------------------------------------------------------------------


class _Touch:
    """Unpickling it would create `marker` (were the unpickler not weights-only)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


@pytest.mark.parametrize("content", ["code", "not_tensors", "garbage"])
def test_a_hostile_or_damaged_pickle_is_an_error_and_runs_nothing(models: Path, tmp_path: Path, content: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    shutil.copytree(models / "bin", base)
    marker = tmp_path / "ran"
    weights = base / "pytorch_model.bin"
    if content == "code":
        torch.save({"model.norm.weight": _Touch(marker)}, weights)
    elif content == "not_tensors":
        torch.save({"model.norm.weight": [1.0, 2.0]}, weights)
    else:
        weights.write_bytes(b"\x00garbage" * 10)
    assert eval_into(base, models / "a", tmp_path / "m", "--allow-pickle") == 1
    err = capsys.readouterr().err
    assert "error[E035]" in err and "pytorch_model.bin" in err and "Traceback" not in err
    assert ("unpickler refused it: Trying to load unsupported GLOBAL posix.mkdir" in err) is (content == "code")
    assert not marker.exists() and not (tmp_path / "m").exists()


def test_a_shard_missing_from_a_pickled_index(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    shutil.copytree(models / "bin_sharded", base)
    (base / "pytorch_model-00002-of-00003.bin").unlink()
    assert eval_into(base, models / "a", tmp_path / "m", "--allow-pickle") == 1
    err = capsys.readouterr().err
    assert "error[E035]" in err and "weight file pytorch_model-00002-of-00003.bin is missing" in err
    assert PICKLE_INDEX in err and not (tmp_path / "m").exists()


def test_inspect_a_pickled_model(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(models / "bin_sharded")]) == 1
    assert "error[E023]" in capsys.readouterr().err
    assert main(["inspect", str(models / "bin_sharded"), "--allow-pickle"]) == 0
    out = capsys.readouterr().out
    assert "config.json and pickled weights" in out and f"3 files ({PICKLE_INDEX})" in out


def test_api_save_into_a_pickled_base(models: Path, tmp_path: Path) -> None:
    import pemlang
    from pemlang.diagnostics import CompileError

    with pytest.raises(CompileError, match="E023"):
        pemlang.compile("a", inputs={"a": models / "a"}, device="cpu").save(tmp_path / "m", into=models / "bin")
    program = pemlang.compile("a", inputs={"a": models / "a"}, device="cpu", allow_pickle=True)
    program.save(tmp_path / "m", into=models / "bin")
    assert_matches(state(tmp_path / "m"), peft_merged_pickled(models / "bin", models / "a"),
                   pickled_state(models / "bin"))
