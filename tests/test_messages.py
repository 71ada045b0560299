"""What a user reads: hints spelled for the front end in use, long lines, floods of errors, API
argument mistakes as diagnostics."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

import pemlang
from pemlang.cli import MAX_SHOWN, main
from pemlang.diagnostics import error, render
from pemlang.source import Source, Span


def cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(list(args))
    return status, out.getvalue(), err.getvalue()


def test_hints_spell_heads_and_mode_as_the_front_end_takes_them(adapters: Path, tmp_path: Path) -> None:
    """E022 and the exact-mode hints: `heads from a` in a file, `--heads "from a"` for eval,
    `heads="from a"` in the API."""
    status, _, err = cli("eval", "--input", f"a={adapters}/llama_cls", "--input", f"b={adapters}/llama_r8",
                         "--out", str(tmp_path / "o"), "a + b")
    assert status == 1 and "error[E022]" in err and '`--heads "from a"`' in err and "`heads from" not in err, err
    status, _, err = cli("eval", "--input", f"a={adapters}/llama_r8", "--input", f"b={adapters}/llama_r4",
                         "--out", str(tmp_path / "o"), "a + b")
    assert status == 1 and "`--mode exact`" in err and "`mode exact`" not in err, err
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.compile("a + b", inputs={"a": adapters / "llama_cls", "b": adapters / "llama_r8"})
    assert '`heads="from a"`' in str(caught.value)
    program = tmp_path / "p.pem"
    program.write_text(f'input a = "{adapters}/llama_cls"\ninput b = "{adapters}/llama_r8"\noutput a + b -> "o"\n',
                       encoding="utf-8")
    status, _, err = cli("check", str(program))
    assert status == 1 and "`heads from a`" in err, err


def test_api_params_that_are_not_numbers_are_e017(adapters: Path) -> None:
    program = pemlang.compile(text=f'input a = "{adapters}/llama_r8"\nparam l = 0.5\noutput l*a -> "o"\n')
    for bad in ("x", None, [1], True):
        with pytest.raises(pemlang.CompileError) as caught:
            program.plan(l=bad)  # type: ignore[arg-type]
        assert caught.value.diagnostics[0].code == "E017" and "not a number" in str(caught.value)
    with pytest.raises(pemlang.CompileError) as caught:
        program.plan(mu=0.3)
    assert "params names `mu`" in str(caught.value)


def test_api_dtype_takes_the_clis_names(adapters: Path, tmp_path: Path) -> None:
    text = f'input a = "{adapters}/llama_r8"\noutput 2*a -> "o"\n'
    for name, stored in (("float16", "F16"), ("bf16", "BF16"), ("F32", "F32")):
        plan = pemlang.compile(text=text, dtype=name).plan()
        assert {step.dtype for step in plan.outputs[0].layers} == {stored}
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        pemlang.compile(text=text, dtype="int8")


def test_a_program_file_that_is_not_utf8_is_a_compile_error(tmp_path: Path) -> None:
    path = tmp_path / "p.pem"
    path.write_bytes(b'output \xff -> "o"\n')
    with pytest.raises(pemlang.CompileError) as caught:
        pemlang.load(path)
    assert caught.value.diagnostics[0].code == "E001"
    with pytest.raises(FileNotFoundError):
        pemlang.load(tmp_path / "missing.pem")


def test_a_very_long_line_is_shown_as_a_window_around_the_span() -> None:
    text = "output " + " + ".join(["a"] * 5000) + " + zz -> \"o\""
    start = text.index("zz")
    shown = render(error("E002", "unknown name `zz`", Source(text, "x.pem"), Span(start, start + 2))).splitlines()
    assert all(len(line) < 250 for line in shown), max(map(len, shown))
    source_line, carets = shown[3], shown[4]
    assert source_line.startswith("1 | …") and "zz" in source_line
    assert carets.index("^") == source_line.index("zz") and carets.count("^") == 2


def test_a_file_that_is_not_a_program_does_not_flood_the_terminal(tmp_path: Path) -> None:
    path = tmp_path / "notes.pem"
    path.write_text("".join(f"this is line {i} of some prose, not a program.\n" for i in range(300)), encoding="utf-8")
    status, _, err = cli("check", str(path))
    assert status == 1
    assert err.count("error[") == MAX_SHOWN  # of 200 syntax errors and one saying reading stopped there
    assert f"… {201 - MAX_SHOWN} more not shown" in err and "201 errors found" in err


def test_a_sweep_over_the_limit_says_how_many_points(adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "p.pem"
    program.write_text(f'input a = "{adapters}/llama_r8"\nparam l = 1\noutput l*a -> "o"\n', encoding="utf-8")
    status, _, err = cli("run", str(program), "--sweep", "l=0:100:0.05")
    assert status == 1 and "error[E029]: l: 2,001 grid points is more than the limit of 1,000" in err, err


def test_api_evaluate_and_save_of_a_non_finite_result_are_compile_errors(adapters: Path, tmp_path: Path) -> None:
    program = pemlang.compile(text=f'input a = "{adapters}/llama_r8"\nparam l = 1\noutput l*a -> "o"\n',
                              base_dir=tmp_path, dtype="float16")
    for call in (lambda: program.evaluate(l=1e6, device="cpu"), lambda: program.save(l=1e6, device="cpu")):
        with pytest.raises(pemlang.CompileError) as caught:
            call()
        assert caught.value.diagnostics[0].code == "E027"
    assert not (tmp_path / "o").exists()


def test_api_arguments_are_checked(adapters: Path) -> None:
    inputs = {"a": adapters / "llama_r8", "b": adapters / "llama_r8_b"}
    for mode in ("EXACT", "fast", None, 1):
        with pytest.raises(ValueError, match="mode must be 'paper' or 'exact'"):
            pemlang.compile("a + b", inputs=inputs, mode=mode)  # type: ignore[arg-type]
    for device in ("tpu", "gpu", "cuda:x", None):
        with pytest.raises(ValueError, match="unknown device"):
            pemlang.compile("a + b", inputs=inputs, device=device)  # type: ignore[arg-type]
    program = pemlang.compile("a + b", inputs=inputs)
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        program.evaluate(device="tpu")
    for value, code in ((float("nan"), "E026"), (float("inf"), "E026"), (10**400, "E026"), ("x", "E017")):
        with pytest.raises(pemlang.CompileError) as caught:
            pemlang.compile("l*a", inputs=inputs, params={"l": value})
        assert [d.code for d in caught.value.diagnostics] == [code], str(caught.value)
        assert "unknown name" not in str(caught.value)
    with pytest.raises(pemlang.CompileError) as caught:  # a name cannot smuggle in statements
        pemlang.compile("l*a", inputs=inputs, params={'l = 1\noutput a -> "evil"\nparam m': 1.0})
    assert caught.value.diagnostics[0].code == "E017"
    evaluated = pemlang.compile("l*a", inputs=inputs, params={"l": 0.5})
    with pytest.raises(pemlang.CompileError) as caught:
        evaluated.evaluate(l=float("nan"))
    assert "params gives `l`" in str(caught.value) and "--set" not in str(caught.value)


@pytest.mark.parametrize("name", ["a b", "1x", "input", "svd", "x-y", ""])
def test_input_names_are_names_in_eval_and_the_api(adapters: Path, tmp_path: Path, name: str) -> None:
    status, _, err = cli("eval", "--input", f"{name}={adapters}/llama_r8", "--out", str(tmp_path / "o"), "2*a")
    assert status == 2 and "Traceback" not in err, err
    with pytest.raises(ValueError, match="cannot name an input"):
        pemlang.compile("2*a", inputs={name: adapters / "llama_r8"})


def test_a_keyword_argument_given_twice_is_e020(adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "p.pem"
    program.write_text(f'mode exact\ninput a = "{adapters}/llama_r8"\noutput svd(a, rank=4, rank=5) -> "o"\n',
                       encoding="utf-8")
    status, _, err = cli("check", str(program))
    assert status == 1 and "error[E020]" in err and "`rank=` is given twice" in err, err


def test_w002_cosine_of_huge_a_matrices_is_measured_in_float64(adapters: Path, tmp_path: Path) -> None:
    """A cosine does not depend on scale: A·1e30 against the same A measures 1, not an overflow's 0."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    big = tmp_path / "big"
    shutil.copytree(adapters / "llama_r8", big)
    weights = big / "adapter_model.safetensors"
    tensors = {k: v * 1e30 if "lora_A" in k else v for k, v in load_file(str(weights)).items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})
    status, _, err = cli("eval", "--input", f"a={big}", "--input", f"b={adapters}/llama_r8",
                         "--out", str(tmp_path / "o"), "--device", "cpu", "0.5*a + 0.5*b")
    assert status == 0 and "W002" not in err, err
    assert torch.isfinite(load_file(str(tmp_path / "o" / "adapter_model.safetensors"))[
        next(k for k in tensors if "lora_A" in k)]).all()


def test_sweep_ranges_are_the_decimals_written_not_float_noise() -> None:
    from pemlang.api import sweep_decimals, sweep_suffix
    from pemlang.cli import parse_sweep

    name, values = parse_sweep("λ=0:1:0.000005", max_points=300_000)
    assert len(values) == 200_001 and values[3] == 0.000015 and values[-1] == 1.0
    decimals = sweep_decimals({name: values})
    assert [sweep_suffix({name: v}, decimals) for v in values[:3]] == ["λ=0.000000", "λ=0.000005", "λ=0.000010"]
    name, values = parse_sweep("λ=0:1e-300:1e-303", max_points=2000)  # tiny steps are not "listed twice"
    assert len(values) == 1001 and len(set(values)) == 1001


def test_a_missing_directory_names_a_close_one_beside_it(tmp_path: Path) -> None:
    """A mistyped input or base directory is named with the directory beside it that it most
    likely meant; a name close to nothing gets no guess."""
    from peft_factory import lora, save_base

    lora(tmp_path / "adapters" / "theta1", 1)
    save_base(tmp_path / "adapters" / "base")
    program = tmp_path / "p.pem"
    for text, hint in [
        ('input a = "adapters/thta1"\noutput a -> "out/m"\n', "did you mean adapters/theta1?"),
        ('input a = "adapters/theta1"\noutput a into "adapters/bse" -> "out/m"\n', "did you mean adapters/base?"),
        ('input a = "adapters/zzzzzzzz"\noutput a -> "out/m"\n', None),
    ]:
        program.write_text("mode exact\n" + text, encoding="utf-8")
        with contextlib.chdir(tmp_path):
            status, _, err = cli("check", "p.pem")
        assert status == 1 and "no such directory" in err, err
        if hint is None:
            assert "did you mean" not in err, err
        else:
            assert f"= hint: {hint}" in err, err
