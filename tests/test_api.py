"""The Python API and λ sweeps (SPEC §7), against the paper's formulas written out here, PEFT's own
loader, and the README's snippet executed as written."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest
import torch
from peft_factory import base_model
from safetensors.torch import load_file

import pemlang
from pemlang.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"


def lora(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(adapter_dir / "adapter_model.safetensors"))


def detox_formula(instruct: dict[str, torch.Tensor], toxic: dict[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """(1+λ)·instruct ⊖ λ·toxic in paper mode (equal scalings): A adds, B subtracts."""
    out = {}
    for key in instruct:
        sign = -1.0 if key.endswith("lora_B.weight") else 1.0
        out[key] = (1 + lam) * instruct[key] + sign * lam * toxic[key]
    return out


@pytest.fixture
def detox(example_root: Path) -> pemlang.Program:
    return pemlang.load(example_root / "examples" / "detoxify.pem", device="cpu")


def test_evaluate_gives_peft_keys_and_the_formula(detox: pemlang.Program, example_root: Path) -> None:
    adapters = example_root / "examples" / "adapters"
    instruct, toxic = lora(adapters / "instruct"), lora(adapters / "toxic")
    assert detox.params == {"λ": 0.4} and detox.outputs == ["detoxified"]
    for lam in (0.4, 0.0, 0.9):  # the same program object, several parameter values
        got = detox.evaluate(λ=lam)["detoxified"]
        expected = detox_formula(instruct, toxic, lam)
        assert set(got) == set(expected)
        for key in expected:
            assert torch.allclose(got[key], expected[key], atol=1e-6), (lam, key)


def test_save_and_load_into_match_peft_loading_from_disk(detox: pemlang.Program, example_root: Path,
                                                         tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = example_root / "examples" / "adapters" / "base"
    [written] = detox.save(tmp_path / "detox", λ=0.25)
    assert written == tmp_path / "detox"
    with warnings.catch_warnings():  # loading without warnings is test_evaluate's concern
        warnings.simplefilter("ignore")
        from_disk = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), written)
        in_memory = detox.load_into(AutoModelForCausalLM.from_pretrained(base_dir), λ=0.25)
    ids = torch.arange(1, 17).reshape(2, 8)
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base_dir)(input_ids=ids).logits
        expected = from_disk(input_ids=ids).logits
        got = in_memory(input_ids=ids).logits
    assert not torch.allclose(plain, expected, atol=1e-4)  # the adapter does change the model
    assert torch.allclose(got, expected, atol=1e-6)


def test_load_into_an_existing_peft_model_adds_and_activates(adapters: Path) -> None:
    from peft import PeftModel

    program = pemlang.compile("2*a", inputs={"a": adapters / "llama_r8"}, mode="exact", device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(base_model(), adapters / "llama_r8", adapter_name="a")
    model = program.load_into(model, adapter_name="twice")
    assert model.active_adapter == "twice"
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert torch.allclose(layer.get_delta_weight("twice"), 2 * layer.get_delta_weight("a"), atol=1e-6)


def test_compile_errors_carry_rendered_diagnostics(adapters: Path) -> None:
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("a + llama_r8b", inputs={"a": adapters / "llama_r8", "llama_r8_b": adapters / "llama_r8_b"})
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.code == "E002"
    assert "<expression>:1:5" in str(caught.value) and "llama_r8_b" in str(caught.value)
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile(text="input a = \"nowhere\"\noutput a -> \"out\"\n")
    assert [d.code for d in caught.value.diagnostics] == ["E012"]


def test_sweep_streams_each_point_to_the_callback_and_saves(detox: pemlang.Program, example_root: Path,
                                                            tmp_path: Path) -> None:
    program = pemlang.compile(text=(example_root / "examples" / "detoxify.pem").read_text()
                              .replace('"adapters/', f'"{example_root}/examples/adapters/')
                              .replace('"out/detoxified"', f'"{tmp_path}/detox"'), device="cpu")
    seen: list[dict[str, float]] = []
    evaluations = list(program.sweep(λ=[0.0, 0.02, 0.04], save=True, callback=lambda ev: seen.append(ev.params)))
    assert seen == [{"λ": 0.0}, {"λ": 0.02}, {"λ": 0.04}]
    for ev in evaluations:
        lam = ev.params["λ"]
        on_disk = lora(tmp_path / f"detox.λ={lam:.2f}")
        alone = detox.evaluate(λ=lam)["detoxified"]
        for key, value in ev.tensors["detoxified"].items():
            assert torch.equal(value, alone[key]) and torch.equal(on_disk[key], value.to(on_disk[key].dtype))


def test_sweep_checks_every_point_before_computing_any(adapters: Path, tmp_path: Path) -> None:
    program = pemlang.compile(text=f'input a = "{adapters}/llama_r8"\nparam k = 1\noutput a / (k - 0.5) -> "{tmp_path}/o"\n')
    with pytest.raises(pemlang.CompileError) as caught:
        list(program.sweep(k=[0.0, 0.5, 1.0], save=True))
    [diagnostic] = caught.value.diagnostics
    assert diagnostic.code == "E015" and "at k=0.5" in str(caught.value)
    assert not list(tmp_path.iterdir())  # nothing was written
    with pytest.raises(pemlang.CompileError, match="E017|not a param"):
        list(program.sweep(j=[1.0]))


# -- the command line --------------------------------------------------------------------------------


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def sweep_program(adapters: Path, tmp_path: Path) -> Path:
    path = tmp_path / "mix.pem"
    path.write_text(f'input a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\n'
                    'param lam = 0.5\noutput lam*a + (1 - lam)*b -> "out/mix"\n', encoding="utf-8")
    return path


def test_run_sweep_writes_one_adapter_per_value(sweep_program: Path, adapters: Path) -> None:
    status, out, err = cli("run", str(sweep_program), "--sweep", "lam=0:1:0.25", "--device", "cpu")
    assert status == 0, err
    assert "wrote 5 adapters" in out
    directories = sorted(p.name for p in (sweep_program.parent / "out").iterdir())
    assert directories == [f"mix.lam={v:.2f}" for v in (0, 0.25, 0.5, 0.75, 1)]
    a, b = lora(adapters / "llama_r8"), lora(adapters / "llama_r8_b")
    for lam in (0, 0.25, 1):  # paper mode, equal ranks and scalings: both factors mix linearly
        got = lora(sweep_program.parent / "out" / f"mix.lam={lam:.2f}")
        for key in a:
            assert torch.allclose(got[key].float(), lam * a[key].float() + (1 - lam) * b[key].float(), atol=1e-6)
    # Existing directories are refused, all of them named before any work; --force replaces them.
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0,0.25", "--device", "cpu")
    assert status == 1 and "error[E018]: 2 output directories already exist" in err
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0,0.25", "--device", "cpu", "--force")
    assert status == 0, err


def test_run_sweep_diagnostics(sweep_program: Path) -> None:
    status, _, err = cli("run", str(sweep_program), "--sweep", "lma=0:1:0.5")
    assert status == 1
    assert "error[E017]: --sweep names `lma`" in err and "--> --sweep:1:1" in err and "lam" in err
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=1:0:0.5")
    assert status == 1 and "error[E029]: lam: the range 1:0 is empty (LO must be below HI)" in err, err
    assert not (sweep_program.parent / "out").exists()


# -- the README ------------------------------------------------------------------------------------


def test_readme_api_snippet_runs(example_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    snippets = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
    assert len(snippets) == 2  # tuning's, then the API section's
    monkeypatch.chdir(example_root)
    namespace: dict[str, object] = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        for snippet in snippets:
            exec(compile(snippet, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["result"].best_params.keys() == {"λ"}  # type: ignore[attr-defined]
    assert "{'λ': 0.4} ['detoxified']" in out.getvalue()
    assert (example_root / "examples" / "out" / "detoxified" / "adapter_config.json").exists()
    assert (example_root / "examples" / "out" / "mix" / "adapter_model.safetensors").exists()
    assert sorted(namespace["results"]) == [0.0, 0.02, 0.04]  # type: ignore[call-overload]


def test_run_sweep_keeps_the_set_values(adapters: Path, tmp_path: Path) -> None:
    """--set fixes a param for every point of the sweep (it was once dropped)."""
    path = tmp_path / "scaled.pem"
    path.write_text(f'input a = "{adapters}/llama_r8"\nparam lam = 0.5\nparam mu = 1\n'
                    'output mu*lam*a -> "out/s"\n', encoding="utf-8")
    status, _, err = cli("run", str(path), "--set", "mu=2", "--sweep", "lam=0.25,1", "--device", "cpu")
    assert status == 0, err
    a = lora(adapters / "llama_r8")
    for lam in (0.25, 1.0):  # paper mode: (2·lam)·a scales A and B alike
        got = lora(tmp_path / "out" / f"s.lam={lam:.2f}")
        for key in a:
            assert torch.allclose(got[key].float(), 2 * lam * a[key].float(), atol=1e-6), (lam, key)


# -- sweeps: names, limits and refusals -------------------------------------------------------------


def test_sweep_directory_names_share_one_format_per_axis(sweep_program: Path) -> None:
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0:1:0.5", "--device", "cpu")
    assert status == 0, err
    assert sorted(p.name for p in (sweep_program.parent / "out").iterdir()) == [
        "mix.lam=0.0", "mix.lam=0.5", "mix.lam=1.0"]


def test_sweep_suffixes_are_unique_and_the_api_agrees(sweep_program: Path, tmp_path: Path) -> None:
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0.1234561,0.1234562", "--device", "cpu")
    assert status == 0, err
    names = sorted(p.name for p in (sweep_program.parent / "out").iterdir())
    assert names == ["mix.lam=0.1234561", "mix.lam=0.1234562"]
    api_program = pemlang.load(sweep_program, device="cpu")
    list(api_program.sweep(lam=[0.1234561, 0.1234562], save=True, force=True))
    assert sorted(p.name for p in (sweep_program.parent / "out").iterdir()) == names
    from pemlang.api import sweep_decimals, sweep_suffix

    decimals = sweep_decimals({"lam": [0.0, 0.1, 1.0]})
    assert [sweep_suffix({"lam": v}, decimals) for v in (0.0, 0.1, 1.0)] == ["lam=0.0", "lam=0.1", "lam=1.0"]


@pytest.mark.parametrize("spec", ["lam=0.5,0.5", "lam=0.1,0.10"])
def test_sweep_refuses_duplicate_values(sweep_program: Path, spec: str) -> None:
    status, _, err = cli("run", str(sweep_program), "--sweep", spec, "--device", "cpu")
    assert status == 2 and "twice" in err, err
    assert not (sweep_program.parent / "out").exists()


def test_sweep_refuses_a_param_given_twice(sweep_program: Path) -> None:
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0,1", "--sweep", "lam=0.5", "--device", "cpu")
    assert status == 2 and "lam" in err and "twice" in err, err
    assert not (sweep_program.parent / "out").exists()


@pytest.mark.parametrize("spec", ["lam=0:inf:1", "lam=-inf:0:1", "lam=nan,1", "lam=0,1e400"])
def test_sweep_refuses_non_finite_values(sweep_program: Path, spec: str) -> None:
    status, _, err = cli("run", str(sweep_program), "--sweep", spec, "--device", "cpu")
    assert status == 1 and "error[E029]" in err and "finite" in err and "internal error" not in err, err
    assert "--> --sweep:1:" in err


def test_sweep_point_limit_is_checked_without_building_the_list(sweep_program: Path) -> None:
    import time

    start = time.perf_counter()
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0:1e12:1", "--device", "cpu")
    assert status == 1 and "error[E029]" in err and "--max-points" in err, err
    assert time.perf_counter() - start < 5
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0:1:0.25", "--max-points", "4", "--device", "cpu")
    assert status == 1 and "lam: 5 grid points is more than the limit of 4" in err, err
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0,1", "--sweep", "mu=1,2", "--device", "cpu",
                         "--max-points", "3")
    assert status == 1 and "error[E029]: the sweep has 4 points, more than the limit of 3" in err, err
    assert not (sweep_program.parent / "out").exists()
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0:1:0.25", "--max-points", "5", "--device", "cpu")
    assert status == 0, err


def test_sweep_refuses_more_bytes_than_free_space(sweep_program: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0:1:0.5", "--device", "cpu")
    assert status == 1 and "error[E018]" in err and "free" in err, err
    assert not (sweep_program.parent / "out").exists()


def test_a_sweep_grid_is_checked_against_the_disk_before_it_is_built(sweep_program: Path) -> None:
    """A billion points with --max-points raised is refused for the disk space at once, no point
    built: under a 3 GiB memory cap (so that a regression fails here, not the machine), where
    building the grid first ended in `internal error: MemoryError`."""
    import os
    import resource
    import subprocess
    import sys

    def capped() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "run", str(sweep_program), "--sweep",
                           "lam=0:1:0.000000001", "--max-points", "2000000000", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120, preexec_fn=capped,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert done.returncode == 1 and "error[E018]: the outputs need" in done.stderr, done.stderr
    assert not (sweep_program.parent / "out").exists()


def test_sweep_and_tune_share_one_rule_for_grids(sweep_program: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A step that does not divide the range: `--sweep` once stopped silently at 0.9 while `tune
    --param` refused; now both refuse it with the same diagnostic and hint."""
    from pemlang.cli import parse_sweep
    from pemlang.diagnostics import PemError, render
    from pemlang.tune import parse_range

    status, _, err = cli("run", str(sweep_program), "--sweep", "lam=0:1:0.3", "--device", "cpu")
    assert status == 1 and not (sweep_program.parent / "out").exists(), err
    expected = """error[E029]: lam: the step 0.3 does not divide 0:1 into whole steps
 --> {label}:1:9
  |
1 | lam=0:1:0.3
  |         ^^^
  = hint: e.g. lam=0:0.9:0.3 (both ends are points of the grid)"""
    assert expected.format(label="--sweep") in err, err
    with pytest.raises(PemError) as swept:
        parse_sweep("lam=0:1:0.3")
    with pytest.raises(PemError) as tuned:
        parse_range("lam=0:1:0.3")
    assert render(swept.value.diagnostics[0]) == expected.format(label="--sweep")
    assert render(tuned.value.diagnostics[0]) == expected.format(label="--param")
    for spec in ("lam=0:1:0.2", "lam=-1:1:0.25", "lam=0:1e-300:1e-303"):  # where it divides, the same points
        assert list(parse_sweep(spec, max_points=5000)[1]) == parse_range(spec, max_points=5000).grid
    assert list(parse_sweep("lam=0:1:0.2")[1]) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]


@pytest.mark.parametrize("spec", ["w=1:1.00000000000000000001:1e-20", "w=1e16:1.0000000000000002e16:1"])
def test_a_grid_whose_points_would_round_to_one_float_is_refused_by_both(spec: str) -> None:
    """Points closer than a float can tell apart were one value listed twice: exit 2 after the
    inputs were read (from an attack); now E029 at the step, from the one rule."""
    from pemlang.cli import parse_sweep
    from pemlang.diagnostics import PemError
    from pemlang.tune import parse_range

    for parse in (parse_sweep, parse_range):
        with pytest.raises(PemError) as refused:
            parse(spec)
        diagnostic = refused.value.diagnostics[0]
        assert diagnostic.code == "E029" and "points of the grid would repeat" in diagnostic.message
        assert diagnostic.source is not None and diagnostic.source.snippet(diagnostic.span) == spec.rsplit(":", 1)[1]


def test_readme_sweep_commands_run_in_order(example_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's sweep commands, run one after the other in a fresh copy of the examples."""
    import shlex
    import shutil

    section = README.read_text(encoding="utf-8").split("## λ sweeps", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    pemlang ")]
    assert len(commands) == 2
    shutil.copytree(example_root / "examples", tmp_path / "examples", ignore=shutil.ignore_patterns("out"))
    monkeypatch.chdir(tmp_path)
    for command in commands:
        words = shlex.split(command.split("#", 1)[0])
        status, _, err = cli(*words[1:], "--device", "cpu")
        assert status == 0, (command, err)
        for name in re.findall(r"\.λ=[0-9.]+", command.split("#", 1)[1]):
            assert (tmp_path / "examples" / "out" / f"detoxified{name}").is_dir(), name


def test_a_scalar_in_a_sweep_is_one_point(adapters: Path) -> None:
    program = pemlang.compile("k*a", inputs={"a": adapters / "llama_r8"}, params={"k": 1.0}, device="cpu")
    [point] = list(program.sweep(k=0.5))
    assert point.params == {"k": 0.5}
    expected = program.evaluate(k=0.5)["k*a"]
    assert all(torch.equal(point.tensors["k*a"][key], expected[key]) for key in expected)
    [again] = list(program.sweep({"k": 2}))
    assert again.params == {"k": 2.0}
    for bad in ("0.5", [0.5, "x"], None, True):
        with pytest.raises(pemlang.CompileError) as caught:
            list(program.sweep(k=bad))
        [diagnostic] = caught.value.diagnostics
        assert diagnostic.code == "E017" and "which is not a number" in diagnostic.message, diagnostic.message


def test_dtype_is_an_option_of_save_and_evaluate_not_a_param(adapters: Path, tmp_path: Path) -> None:
    """`save(dtype=…)` writes that dtype, as `compile(…, dtype=…)` does; it is not read as a param."""
    inputs = {"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"}
    program = pemlang.compile("0.3*a + 0.7*b", inputs=inputs, device="cpu")
    half = pemlang.compile("0.3*a + 0.7*b", inputs=inputs, device="cpu", dtype="float16")
    [written] = program.save(tmp_path / "h", dtype="float16")
    [oracle] = half.save(tmp_path / "oracle")
    got, expected = lora(written), lora(oracle)
    full = program.evaluate()["0.3*a + 0.7*b"]
    assert got.keys() == expected.keys() == full.keys()
    for key in got:
        assert got[key].dtype == torch.float16 and torch.equal(got[key], expected[key])
        assert torch.equal(got[key], full[key].to(torch.float16))
    evaluated = program.evaluate(dtype="bfloat16")["0.3*a + 0.7*b"]
    assert {t.dtype for t in evaluated.values()} == {torch.bfloat16}
    assert {t.dtype for t in program.evaluate()["0.3*a + 0.7*b"].values()} == {torch.float32}  # only that call
    assert {step.dtype for step in program.plan(dtype="float16").outputs[0].layers} == {"F16"}
    with pytest.raises(ValueError, match="unknown dtype 'float8'"):
        program.save(tmp_path / "x", dtype="float8")


def test_api_errors_spell_the_api_and_the_cli_spells_the_cli(adapters: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """An unusable device is said as the caller gave it: `device="cuda"` to the API, `--device
    cuda` on the command line (whose sweeps and tuning run through the API)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    said = 'device="cuda": no CUDA device is available (use device="cpu" or "auto")'
    program = pemlang.compile("w*a + (1 - w)*b", inputs={"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"},
                              params={"w": 0.5}, device="cuda")
    for attempt in (lambda: program.evaluate(), lambda: program.save(tmp_path / "o"),
                    lambda: list(program.sweep(w=[0.0, 1.0])),
                    lambda: pemlang.compile("a", inputs={"a": adapters / "llama_r8"}).evaluate(device="cuda")):
        with pytest.raises(ValueError) as caught:
            attempt()
        assert str(caught.value) == said
    assert not (tmp_path / "o").exists()
    pem = tmp_path / "sweep.pem"
    pem.write_text(f'input a = "{adapters / "llama_r8"}"\ninput b = "{adapters / "llama_r8_b"}"\nparam w = 0.5\n'
                   f'output w*a + (1 - w)*b -> "{tmp_path / "out"}"\n', encoding="utf-8")
    status = main(["run", str(pem), "--sweep", "w=0,1", "--device", "cuda"])
    err = capsys.readouterr().err
    assert status == 2
    assert "--device cuda: no CUDA device is available (use --device cpu or auto)" in err and 'device="' not in err
