"""Programs embedded in configs (SPEC §7): the published schema, `pemlang run CONFIG`, the API on a
block nested in a larger config, and diagnostics that point at the config file's lines."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import pemlang
from pemlang.cli import main
from pemlang.config import SCHEMA_PATH, PemConfig, schema_text


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def lora(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}


def assert_mix(out_dir: Path, adapters: Path, lam: float) -> None:
    """Paper mode, equal ranks and scalings: lam*a + (1-lam)*b mixes A and B alike."""
    got, a, b = lora(out_dir), lora(adapters / "llama_r8"), lora(adapters / "llama_r8_b")
    assert set(got) == set(a)
    for key in a:
        assert torch.allclose(got[key], lam * a[key] + (1 - lam) * b[key], atol=1e-6), key


TRAINING_YAML = """\
# a training config that carries a pemlang block
model: tiny-llama
optimizer: {{lr: 3.0e-4, epochs: 3}}
merge:
  inputs:
    a: {adapters}/llama_r8
    b: {adapters}/llama_r8_b
  params: {{lam: 0.5}}
  expression: lam*a + (1 - lam)*b
  output: out/mix
"""


def test_schema_is_published_and_current() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == schema_text(), (
        "pemlang/config.schema.json is stale: regenerate it with\n"
        "  python -c \"from pemlang.config import schema_text; open('pemlang/config.schema.json','w').write(schema_text())\"")
    schema = json.loads(schema_text())
    assert set(schema["properties"]) == set(PemConfig.model_fields)
    assert schema["additionalProperties"] is False


def test_run_a_block_nested_in_a_training_yaml(adapters: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML.format(adapters=adapters), encoding="utf-8")
    status, out, err = cli("run", str(config), "--key", "merge", "--set", "lam=0.25", "--device", "cpu")
    assert status == 0, err
    assert "wrote" in out
    assert_mix(tmp_path / "out" / "mix", adapters, 0.25)  # relative to the config file
    status, _, err = cli("check", str(config))  # without --key: pemlang says where the block is
    assert status == 1 and "pass --key merge" in err and f"{config.name}:4:1" in err


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_run_toml_and_json(adapters: Path, tmp_path: Path, suffix: str) -> None:
    block = {"inputs": {"a": str(adapters / "llama_r8"), "b": str(adapters / "llama_r8_b")},
             "params": {"lam": 0.75}, "expression": "lam*a + (1 - lam)*b", "output": "out/mix"}
    config = tmp_path / f"config{suffix}"
    if suffix == ".json":
        config.write_text(json.dumps({"tool": {"pemlang": block}}, indent=2), encoding="utf-8")
    else:
        config.write_text(f"""[tool.pemlang]
expression = "lam*a + (1 - lam)*b"
output = "out/mix"
params = {{ lam = 0.75 }}

[tool.pemlang.inputs]
a = "{adapters / 'llama_r8'}"
b = "{adapters / 'llama_r8_b'}"
""", encoding="utf-8")
    status, _, err = cli("run", str(config), "--key", "tool.pemlang", "--device", "cpu")
    assert status == 0, err
    assert_mix(tmp_path / "out" / "mix", adapters, 0.75)


def test_run_sweep_on_a_config(adapters: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML.format(adapters=adapters), encoding="utf-8")
    status, _, err = cli("run", str(config), "--key", "merge", "--sweep", "lam=0,0.5", "--device", "cpu")
    assert status == 0, err
    for lam in (0, 0.5):
        assert_mix(tmp_path / "out" / f"mix.lam={lam:.1f}", adapters, lam)


def test_api_from_a_file_key_and_from_a_mapping(adapters: Path, tmp_path: Path) -> None:
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML.format(adapters=adapters), encoding="utf-8")
    a, b = lora(adapters / "llama_r8"), lora(adapters / "llama_r8_b")
    from_file = pemlang.load(config, key="merge", device="cpu")
    block = yaml.safe_load(config.read_text(encoding="utf-8"))["merge"]  # the user's own loader
    from_mapping = pemlang.from_config(block, base_dir=tmp_path, device="cpu")
    for program in (from_file, from_mapping):
        [(name, got)] = program.evaluate(lam=0.4).items()
        for key in a:
            assert torch.allclose(got[key].float(), 0.4 * a[key] + 0.6 * b[key], atol=1e-6), (name, key)
    [written] = from_mapping.save(lam=1.0)
    assert written == tmp_path / "out" / "mix"
    assert_mix(written, adapters, 1.0)


def test_api_errors_name_the_field(adapters: Path, tmp_path: Path) -> None:
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.from_config({"inputs": {"a": str(adapters / "llama_r8")}, "expresion": "2*a"})
    text = str(caught.value)
    assert "unknown field `expresion`" in text and "did you mean `expression`?" in text
    config = tmp_path / "train.yaml"
    config.write_text(TRAINING_YAML.format(adapters=adapters).replace("(1 - lam)*b", "(1 - lam)*bb"), encoding="utf-8")
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.load(config, key="merge")
    assert "train.yaml:9:33" in str(caught.value) and "unknown name `bb`" in str(caught.value)


@pytest.mark.parametrize("style", ["plain", "single", "double", "literal", "flow"])
def test_expression_diagnostics_land_on_the_typo_in_the_file(adapters: Path, tmp_path: Path, style: str) -> None:
    """Whichever way YAML quotes the expression, the carets sit under the misspelt name."""
    expression = "0.5*a + 0.5*bee"
    written = {"plain": expression, "single": f"'{expression}'", "double": f'"{expression}"',
               "literal": f"|\n    {expression}"}.get(style)
    if style == "flow":
        text = f'{{inputs: {{a: {adapters}/llama_r8}}, expression: "{expression}", output: out/x}}\n'
    else:
        text = f"inputs:\n  a: {adapters}/llama_r8\noutput: out/x\nexpression: {written}\n"
    config = tmp_path / "c.yaml"
    config.write_text(text, encoding="utf-8")
    status, _, err = cli("check", str(config))
    assert status == 1
    lines = err.splitlines()
    head = next(i for i, line in enumerate(lines) if "E002" in line)
    source_line, carets = lines[head + 3], lines[head + 4]
    code = source_line.split(" | ", 1)[1]
    start = carets.index("^") - (len(carets.split(" | ", 1)[0]) + 3)
    assert code[start:start + carets.count("^")] == "bee", err


def test_key_is_only_for_configs(adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "p.pem"
    program.write_text(f'input a = "{adapters}/llama_r8"\noutput 2*a -> "out"\n', encoding="utf-8")
    status, _, err = cli("check", str(program), "--key", "merge")
    assert status == 2 and "--key" in err
    status, _, err = cli("check", str(tmp_path / "missing.yaml"))
    assert status == 2 and "no such file" in err


def test_readme_config_runs_and_points_at_the_typo(example_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    monkeypatch.chdir(example_root)
    Path("train.yaml").write_text(block, encoding="utf-8")
    status, out, err = cli("run", "train.yaml", "--key", "merge", "--set", "λ=0.3", "--device", "cpu", "--force")
    assert status == 0, err
    assert (example_root / "examples" / "out" / "yelp_cls_from_config" / "adapter_config.json").exists()
    Path("train.yaml").write_text(block.replace("- amazon_lm)", "- amazon_lmm)"), encoding="utf-8")
    status, _, err = cli("check", "train.yaml", "--key", "merge", "--force")
    shown = re.search(r"    error\[E002\].*?did you mean `amazon_lm`\?\n", readme, flags=re.S)
    assert status == 1 and shown is not None
    assert "\n".join(line[4:] for line in shown.group().splitlines()) in err  # the README shows real output


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_config_device_is_checked_at_the_field(adapters: Path, tmp_path: Path, device: str) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"inputs:\n  a: {adapters}/llama_r8\nexpression: 2*a\noutput: out/x\ndevice: {device}\n",
                      encoding="utf-8")
    status, _, err = cli("run", str(config))
    assert status == 1, err
    assert "error[E025]" in err and f"{config.name}:5:9" in err and "auto, cpu, cuda, cuda:N" in err
    assert "internal error" not in err and not (tmp_path / "out").exists()


def _config(tmp_path: Path, suffix: str, text: str) -> Path:
    path = tmp_path / f"c{suffix}"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_yaml_alias_bomb_is_refused_before_expansion(adapters: Path, tmp_path: Path) -> None:
    import time

    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 10)]
    text = "\n".join(lines) + f"\nmerge:\n  inputs: {{a: {adapters}/llama_r8}}\n  expression: 2*a\n  output: out/x\n"
    config = _config(tmp_path, ".yaml", text)
    start = time.perf_counter()
    status, _, err = cli("check", str(config), "--key", "merge")
    assert time.perf_counter() - start < 10
    assert status == 1 and "error[E025]" in err and "alias" in err, err
    line = int(err.split(f"{config.name}:")[1].split(":")[0])
    assert "*l" in text.splitlines()[line - 1]  # at an alias
    assert "internal error" not in err


def test_a_few_aliases_in_a_training_config_are_fine(adapters: Path, tmp_path: Path) -> None:
    text = (f"paths: &paths {{a: {adapters}/llama_r8, b: {adapters}/llama_r8_b}}\n"
            "merge:\n  inputs: *paths\n  params: {lam: 0.5}\n  expression: lam*a + (1 - lam)*b\n  output: out/x\n")
    status, out, err = cli("check", str(_config(tmp_path, ".yaml", text)), "--key", "merge")
    assert status == 0, err
    assert "2 inputs" in out


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "merge: " + "[" * 100_000), (".yaml", "merge:\n" + "- " * 50_000 + "x\n"),
    (".yaml", "merge: " + "{a: " * 100_000), (".json", '{"merge": ' + "[" * 100_000),
    (".json", '{"merge": ' + '{"a": ' * 100_000), (".toml", "merge = " + "[" * 100_000),
    (".toml", "merge = " + "{a = " * 100_000)], ids=lambda x: x if x.startswith(".") else x[:12])
def test_deep_nesting_is_a_diagnostic(tmp_path: Path, suffix: str, text: str) -> None:
    status, _, err = cli("check", str(_config(tmp_path, suffix, text)), "--key", "merge")
    assert status == 1, err
    assert "error[E025]" in err and "nested deeper than" in err and "internal error" not in err


EVIL = 'l = 1\noutput a -> "out/evil"\nparam m'


@pytest.mark.parametrize("with_program", [False, True])
def test_param_names_are_names(adapters: Path, tmp_path: Path, with_program: bool) -> None:
    body = ('program: |\n  param l = 1\n  output l*a -> "out/x"\n' if with_program
            else "expression: 2*a\noutput: out/x\n")
    text = f"inputs:\n  a: {adapters}/llama_r8\nparams:\n  {json.dumps(EVIL)}: 1\n" + body
    status, _, err = cli("run", str(_config(tmp_path, ".yaml", text)), "--device", "cpu")
    assert status == 1, err
    assert "error[E025]" in err and "cannot be a param name" in err and "c.yaml:4:3" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix,value,line", [
    (".yaml", "1e400", 3), (".yaml", ".nan", 3), (".yaml", ".inf", 3), (".yaml", "-.inf", 3),
    (".json", "NaN", 3), (".json", "Infinity", 3), (".json", "1e400", 3),
    (".toml", "nan", 4), (".toml", "inf", 4), (".toml", "1e400", 4)])
def test_non_finite_params_are_refused_at_the_field(adapters: Path, tmp_path: Path, suffix: str, value: str,
                                                    line: int) -> None:
    if suffix == ".yaml":
        text = f"inputs: {{a: {adapters}/llama_r8}}\nparams:\n  l: {value}\nexpression: l*a\noutput: out/x\n"
    elif suffix == ".json":
        text = (f'{{"inputs": {{"a": "{adapters}/llama_r8"}},\n"params":\n  {{"l": {value}}},\n'
                '"expression": "l*a", "output": "out/x"}\n')
    else:
        text = f'expression = "l*a"\noutput = "out/x"\n[params]\nl = {value}\n[inputs]\na = "{adapters}/llama_r8"\n'
    status, _, err = cli("run", str(_config(tmp_path, suffix, text)), "--device", "cpu")
    assert status == 1, err
    assert "error[E025]" in err and "must be a finite number" in err and f"c{suffix}:{line}:" in err, err
    assert "E002" not in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix,value,line", [
    (".yaml", "yes", 3), (".yaml", "off", 3), (".yaml", "true", 3), (".yaml", "False", 3), (".yaml", "on", 3),
    (".json", "true", 3), (".json", "false", 3), (".toml", "true", 4), (".toml", "false", 4)])
@pytest.mark.parametrize("with_program", [False, True])
def test_boolean_params_are_refused_at_the_field(adapters: Path, tmp_path: Path, suffix: str, value: str,
                                                 line: int, with_program: bool) -> None:
    body = {"expression": "l*a", "output": "out/x"}
    if with_program:
        body = {"program": 'param l = 0.5\noutput l*a -> "out/x"\n'}
    if suffix == ".yaml":
        text = (f"inputs: {{a: {adapters}/llama_r8}}\nparams:\n  l: {value}\n"
                + "".join(f"{k}: {json.dumps(v)}\n" for k, v in body.items()))
    elif suffix == ".json":
        text = (f'{{"inputs": {{"a": "{adapters}/llama_r8"}},\n"params":\n  {{"l": {value}}},\n'
                + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in body.items()) + "}\n")
    else:
        text = ("".join(f"{k} = {json.dumps(v)}\n" for k, v in body.items())
                + f'[params]\nl = {value}\n[inputs]\na = "{adapters}/llama_r8"\n')
        line += len(body) - 2
    status, _, err = cli("run", str(_config(tmp_path, suffix, text)), "--device", "cpu")
    assert status == 1, err
    assert "error[E025]" in err and "expected a number, got a boolean" in err and f"c{suffix}:{line}:" in err, err
    assert "internal error" not in err and not (tmp_path / "out").exists()


def test_boolean_params_are_refused_in_a_mapping_too(adapters: Path, tmp_path: Path) -> None:
    block = {"inputs": {"a": str(adapters / "llama_r8")}, "params": {"l": True}, "expression": "l*a"}
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.from_config(block, base_dir=tmp_path)
    (diag,) = caught.value.diagnostics
    assert diag.code == "E025" and "`params.l`: expected a number, got a boolean" in diag.message
    block["params"] = {"l": 1}  # an integer is a number
    assert pemlang.from_config(block, base_dir=tmp_path).plan()


@pytest.mark.parametrize("suffix,text,line,col,key", [
    (".yaml", "inputs: {{a: {a}}}\ninputs: {{a: {b}}}\nexpression: a\noutput: out/x\n", 2, 1, "inputs"),
    (".yaml", "inputs: {{a: {a}}}\nparams: {{l: 1, l: 2}}\nexpression: l*a\noutput: out/x\n", 2, 16, "l"),
    (".yaml", "inputs:\n  a: {a}\n  a: {b}\nexpression: a\noutput: out/x\n", 3, 3, "a"),
    (".yaml", "inputs: {{a: {a}}}\nparams:\n  l: 1\n  'l': 2\nexpression: l*a\noutput: out/x\n", 4, 3, "l"),
    (".yaml", "inputs: {{a: {a}}}\nparams: {{1: 1, 01: 2}}\nexpression: a\noutput: out/x\n", 2, 16, "1"),
    (".json", '{{"inputs": {{"a": "{a}"}},\n"inputs": {{"a": "{b}"}}, "expression": "a", "output": "out/x"}}\n',
     2, 1, "inputs"),
    (".json", '{{"inputs": {{"a": "{a}"}}, "params": {{"l": 1,\n "\\u006c": 2}}, "expression": "l*a", '
     '"output": "out/x"}}\n', 2, 2, "l"),
    (".toml", 'expression = "a"\noutput = "out/x"\n[inputs]\na = "{a}"\na = "{b}"\n', 5, None, None),
    (".toml", 'expression = "a"\nexpression = "2*a"\noutput = "out/x"\n[inputs]\na = "{a}"\n', 2, None, None),
], ids=["yaml_top", "yaml_flow", "yaml_block", "yaml_quoted", "yaml_int", "json_top", "json_escaped", "toml_table",
        "toml_top"])
def test_duplicate_keys_are_refused_at_the_second(adapters: Path, tmp_path: Path, suffix: str, text: str,
                                                  line: int, col: int | None, key: str | None) -> None:
    config = _config(tmp_path, suffix, text.format(a=adapters / "llama_r8", b=adapters / "llama_r8_b"))
    status, _, err = cli("run", str(config), "--device", "cpu")
    assert status == 1, err
    assert "error[E025]" in err and "internal error" not in err and not (tmp_path / "out").exists()
    assert f"c{suffix}:{line}:{col if col is not None else ''}" in err, err
    if key is not None:  # TOML's own parser refuses duplicates, in its words
        assert f"the key `{key}` is given twice" in err or f"the key {key} is given twice" in err, err


def test_yaml_merge_keys_may_be_overridden(adapters: Path, tmp_path: Path) -> None:
    text = (f"paths: &paths {{a: {adapters}/nowhere, b: {adapters}/llama_r8_b}}\n"
            f"merge:\n  inputs: {{<<: *paths, a: {adapters}/llama_r8}}\n  expression: a + b\n  output: out/x\n")
    status, out, err = cli("check", str(_config(tmp_path, ".yaml", text)), "--key", "merge")
    assert status == 0, err
    assert "2 inputs" in out


def test_an_adapters_own_config_is_named_as_such(adapters: Path) -> None:
    """From a new-user trial: `pemlang check DIR/adapter_config.json` printed 41 `unknown field` errors."""
    status, _, err = cli("check", str(adapters / "llama_r8" / "adapter_config.json"))
    assert status == 1
    assert err.count("error[") == 1 and "this is a PEFT adapter's config, not a pemlang config" in err, err
    assert f"pemlang inspect {adapters / 'llama_r8'}" in err and "unknown field" not in err
