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


def test_a_program_states_the_base_of_an_input(adapters: Path, tmp_path: Path) -> None:
    """`input x = "dir" base "org/name"`: x is taken as trained on that base, visibly (W006); the
    output records it; without the statement the same program is E006."""
    other = adapters / "llama_other_base"  # records "someone-else/llama-7b"
    text = (f'input a = "{adapters / "llama_r8"}"\n'
            f'input b = "{other}" base "tiny-org/tiny-llama"\n'
            f'output 0.5*a + 0.5*b -> "{tmp_path / "out"}"\n')
    program = pemlang.compile(text=text)
    [warning] = program.warnings
    assert warning.code == "W006" and warning.message == 'input `b` is taken as trained on "tiny-org/tiny-llama"'
    assert warning.notes == ('its adapter_config.json records base "someone-else/llama-7b"',)
    [written] = program.save()
    assert json.loads((written / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-llama"
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile(text=text.replace(' base "tiny-org/tiny-llama"', ""))
    [error] = caught.value.diagnostics
    assert error.code == "E006" and 'input NAME = "DIR" base "tiny-org/tiny-llama"' in error.hints[0]


def test_no_base_statement_is_suggested_when_the_shapes_differ(adapters: Path, tmp_path: Path) -> None:
    """Stating a base would only lead to E009: when the layer shapes differ too, E006 says so and
    suggests nothing."""
    from peft_factory import lora

    # hidden 48, not 32: k_proj is (2 kv heads × 48/4) × 48 = 24×48 there, 16×32 here
    wide = lora(tmp_path / "wide", 50, hidden=48, name="someone-else/llama-7b")
    text = f'input a = "{adapters / "llama_r8"}"\ninput w = "{wide}"\noutput a + w -> "{tmp_path / "out"}"\n'
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile(text=text)
    [error] = caught.value.diagnostics
    assert error.code == "E006" and error.hints == ()
    assert error.notes[1] == ("the layer shapes differ too (model.layers.0.self_attn.k_proj: a 16×32, w 24×48): "
                              "these are different models, not one model recorded under two names")
    # Stated anyway, the base is noted and the shapes are the error.
    stated = text.replace(f'"{wide}"', f'"{wide}" base "tiny-org/tiny-llama"')
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile(text=stated)
    assert [d.code for d in caught.value.diagnostics] == ["E009"]


def test_a_stated_base_equal_to_the_recorded_one_is_quiet(adapters: Path) -> None:
    text = f'input a = "{adapters / "llama_r8"}" base "tiny-org/tiny-llama"\noutput a -> "o"\n'
    assert pemlang.compile(text=text).warnings == []
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile(text=text.replace('base "tiny-org/tiny-llama"', 'base "  "'))
    assert caught.value.diagnostics[0].code == "E024"


def test_the_base_clause_round_trips_and_base_stays_a_name() -> None:
    from pemlang import ast
    from pemlang.parser import parse_program
    from pemlang.source import Source

    program, errors = parse_program(Source('input base = "d" base "o/n"\ninput x = "e"\n', "t.pem"))
    assert not errors
    first, second = program.statements
    assert isinstance(first, ast.InputStmt) and first.name.id == "base" and first.base == "o/n"
    assert ast.format_statement(first) == 'input base = "d" base "o/n"'
    assert ast.format_statement(second) == 'input x = "e"'


@pytest.mark.parametrize("rename", ["default", "no_prefix"])
def test_key_variants_people_have(adapters: Path, tmp_path: Path, rename: str) -> None:
    """A state dict saved as is (`lora_A.default.weight`) or without PEFT's `base_model.model.`
    prefix reads as the adapter it is: the same result as the PEFT-saved original."""
    from safetensors.torch import load_file, save_file

    target = tmp_path / "variant"
    shutil.copytree(adapters / "llama_r8", target)
    tensors = load_file(adapters / "llama_r8" / "adapter_model.safetensors")
    if rename == "default":
        renamed = {k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight"): v
                   for k, v in tensors.items()}
    else:
        renamed = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    save_file(renamed, str(target / "adapter_model.safetensors"))
    got = pemlang.compile("0.5*a", inputs={"a": target}).evaluate()["0.5*a"]
    expected = pemlang.compile("0.5*a", inputs={"a": adapters / "llama_r8"}).evaluate()["0.5*a"]
    assert got.keys() == expected.keys() and all((got[k] == expected[k]).all() for k in got)


def test_several_adapters_in_one_file_are_refused_by_name(adapters: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    target = tmp_path / "two"
    shutil.copytree(adapters / "llama_r8", target)
    tensors = load_file(adapters / "llama_r8" / "adapter_model.safetensors")
    both = {**{k.replace(".weight", ".first.weight"): v for k, v in tensors.items()},
            **{k.replace(".weight", ".second.weight"): v.clone() for k, v in tensors.items()}}
    save_file(both, str(target / "adapter_model.safetensors"))
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("a", inputs={"a": target})
    assert caught.value.diagnostics[0].code == "E011" and "several adapters in one weights file" in str(caught.value)


def test_a_config_states_the_base_of_an_input(adapters: Path, tmp_path: Path) -> None:
    config = tmp_path / "merge.yaml"
    config.write_text(f"inputs:\n  a: {adapters / 'llama_r8'}\n  b: {adapters / 'llama_other_base'}\n"
                      f"bases:\n  b: tiny-org/tiny-llama\nexpression: 0.5*a + 0.5*b\noutput: {tmp_path / 'out'}\n")
    program = pemlang.load(config)
    [warning] = program.warnings
    assert warning.code == "W006" and warning.source is not None and warning.source.filename == str(config)
    [written] = program.save()
    assert json.loads((written / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny-org/tiny-llama"
    config.write_text(config.read_text().replace("  b: tiny-org/tiny-llama", "  c: tiny-org/tiny-llama"))
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.load(config)
    assert "`bases` names `c`, which is not an input" in str(caught.value)


def test_eval_states_the_base_of_an_input(adapters: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pemlang.cli import main

    args = ["eval", "--input", f"a={adapters / 'llama_r8'}", "--input", f"b={adapters / 'llama_other_base'}",
            "--out", str(tmp_path / "o"), "--device", "cpu", "0.5*a + 0.5*b"]
    assert main(args) == 1 and "error[E006]" in capsys.readouterr().err
    assert main([*args, "--input-base", "b=tiny-org/tiny-llama"]) == 0
    assert "warning[W006]" in capsys.readouterr().err
    assert main([*args, "--input-base", "c=tiny-org/tiny-llama"]) == 2


@pytest.mark.parametrize("recorded, code", [("org/\ud800x", "E013"), ("org/a\nb", "E013"), ("", "W001"), ("   ", "W001")])
def test_hostile_recorded_bases(adapters: Path, tmp_path: Path, recorded: str, code: str) -> None:
    a = _recorded_as(adapters / "llama_r8", tmp_path / "a", recorded)
    if code == "W001":  # an empty name records nothing: a warning, and it combines
        program = pemlang.compile("a + b", inputs={"a": a, "b": adapters / "llama_r8_b"})
        assert [w.code for w in program.warnings] == ["W001"]
        return
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("a", inputs={"a": a})
    assert caught.value.diagnostics[0].code == code


@pytest.mark.parametrize("stated", ["org/a\nb", "org/\ud800", "x\x00y"])
def test_hostile_stated_bases(adapters: Path, stated: str) -> None:
    from pemlang import ast

    text = f"input a = \"{adapters / 'llama_r8'}\" base {ast.format_string(stated)}\noutput a -> \"o\"\n"
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile(text=text)
    assert caught.value.diagnostics[0].code in ("E024", "E001")
