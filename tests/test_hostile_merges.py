"""Hostile input against the streaming writer and the merge functions (found by an attack on them)."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pemlang.cli import main


def cli(*args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    previous = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = main(list(args))
    finally:
        os.chdir(previous)
    return status, out.getvalue(), err.getvalue()


def program(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_an_input_with_a_claim_beside_it_is_still_never_removed(adapters: Path, tmp_path: Path) -> None:
    """Even a directory that looks exactly like a dead writer's retired output — the name and its
    claim file — is left alone when it is one of the run's inputs."""
    retired = tmp_path / ".o.99-x_y.pemlang-old"
    shutil.copytree(adapters / "llama_r8", retired)
    (tmp_path / ".o.99-x_y.pemlang-old.claim").touch()
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{retired}"\noutput 2*a -> "o"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 0, err
    assert (retired / "adapter_model.safetensors").exists()


def test_repl_set_that_breaks_an_earlier_entry_is_refused(adapters: Path, tmp_path: Path) -> None:
    script = (f'mode exact\ninput a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\nparam d = 0.3\n'
              f't = ties(a, b, density=d)\n:set d=0\n:save svd(t, rank=2) {tmp_path / "r5"}\n')
    result = subprocess.run([sys.executable, "-m", "pemlang.cli", "repl"], input=script, capture_output=True,
                            text=True, cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "`density` must be a number in (0, 1]" in result.stdout + result.stderr
    assert "`d` keeps its value" in result.stdout + result.stderr
    assert (tmp_path / "r5" / "adapter_model.safetensors").exists()  # saved with d = 0.3


def test_huge_finite_values_in_a_dense_merge_are_reduced_not_crashed(adapters: Path, tmp_path: Path) -> None:
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\n'
                                       'output svd(dare(3e38*a, p=0.5, seed=1), rank=2) -> "o"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status in (0, 1) and "internal error" not in err, err
    if status == 0:
        assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "o" / "adapter_model.safetensors")).values())
    else:
        assert "error[E027]" in err


def test_functions_nested_to_the_parsers_limit_lower_and_run(adapters: Path, tmp_path: Path) -> None:
    expression = "a"
    for _ in range(199):
        expression = f"prune({expression}, density=0.9)"
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\n'
                                       f'output svd({expression}, rank=2) -> "o"\n')
    for command in ("plan", "run"):
        status, _, err = cli(command, str(path), *(["--device", "cpu"] if command == "run" else []))
        assert status == 0, err[-2000:]


def test_a_sweep_that_fails_later_says_which_points_were_written(adapters: Path, tmp_path: Path) -> None:
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\nparam k = 1\n'
                                       'output svd(k*prune(a, density=0.5), rank=2) -> "swk/o"\n')
    status, _, err = cli("run", str(path), "--sweep", "k=1,2,1e12", "--dtype", "float16", "--device", "cpu")
    assert status == 1 and "error[E027]" in err, err
    assert "the 2 points before it were written (k=1.0, k=2.0)" in err and "nothing was written" not in err
    assert sorted(p.name for p in (tmp_path / "swk").iterdir()) == ["o.k=1.0", "o.k=2.0"]


def test_a_write_error_names_the_output_that_failed(adapters: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = program(tmp_path / "p.pem", f'input a = "{adapters}/llama_r8"\n'
                                       'output 2*a -> "first"\noutput 3*a -> "second"\n')
    real = os.pwrite

    def failing(fd: int, data: bytes, offset: int) -> int:
        if ".first." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", failing)
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 1 and "/first: No space left on device" in err and "second" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pem"]


def test_directories_made_for_a_failed_run_are_removed(adapters: Path, tmp_path: Path) -> None:
    path = program(tmp_path / "p.pem", f'mode exact\ninput n = "{adapters}/llama_nan"\n'
                                       'output svd(prune(n, density=0.5), rank=2) -> "deep/x/y/o"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 1 and "error[E014]" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pem"]


def test_seeds_are_exact_integers_up_to_2_63(adapters: Path, tmp_path: Path) -> None:
    def run(seed: str, name: str) -> dict[str, torch.Tensor]:
        path = program(tmp_path / f"{name}.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\n'
                                                 f'output svd(dare(a, p=0.5, seed={seed}), rank=4) -> "{name}"\n')
        status, _, err = cli("run", str(path), "--device", "cpu")
        assert status == 0, err
        return load_file(str(tmp_path / name / "adapter_model.safetensors"))

    first, second = run(str(2**53), "s1"), run(str(2**53 + 1), "s2")
    assert any(not torch.equal(first[k], second[k]) for k in first)
    run(str(2**63 - 1), "s3")
    path = program(tmp_path / "big.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\n'
                                         f'output svd(dare(a, p=0.5, seed={2**63}), rank=4) -> "s4"\n')
    status, _, err = cli("check", str(path))
    assert status == 1 and "from 0 to 2**63 − 1" in err, err


def test_a_dense_term_needs_svd_whatever_its_coefficient(adapters: Path, tmp_path: Path) -> None:
    for expression in ("0*prune(a, density=0.5)", "0*ties(a, b, density=0.5) + a"):
        path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\n'
                                           f'input b = "{adapters}/llama_r8_b"\noutput {expression} -> "o"\n')
        status, _, err = cli("check", str(path))
        assert status == 1 and "error[E028]" in err, (expression, err)


def test_svd_factors_share_the_singular_values(adapters: Path, tmp_path: Path) -> None:
    """B = U·√S and A = √S·Vᵀ: each component's norms are equal, so a half-precision output holds
    factors of about √ of ΔW's scale."""
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\n'
                                       f'input b = "{adapters}/llama_r8_b"\noutput svd(a + b, rank=6) -> "o"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 0, err
    tensors = load_file(str(tmp_path / "o" / "adapter_model.safetensors"))
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        a, b = tensors[key].double(), tensors[key.replace("lora_A", "lora_B")].double()
        assert torch.allclose(a.norm(dim=1), b.norm(dim=0), rtol=1e-4), key


def test_a_non_finite_input_that_dare_would_drop_is_still_reported(adapters: Path, tmp_path: Path) -> None:
    """dare can drop every entry a NaN reaches; the input is still not finite: E014, nothing written."""
    path = program(tmp_path / "p.pem", f'mode exact\ninput n = "{adapters}/llama_nan"\n'
                                       'output svd(dare(n, p=0.99999, seed=2), rank=8) -> "o"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 1 and "error[E014]" in err and "v_proj" in err, err
    assert not (tmp_path / "o").exists()


def test_an_overflow_inside_a_space_is_e027_and_its_hint_asks_for_no_dtype_already_in_use(
        adapters: Path, tmp_path: Path) -> None:
    """core(3e38*a + 3e38*b): the aligned coordinates overflow float32. E027, the previous output
    left as it was, and no "write a wider dtype (--dtype float32)" when the output is float32."""
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\n'
                                       'param k = 1\noutput core(k*a + k*b) -> "o"\n')
    status, _, err = cli("run", str(path), "--device", "cpu")
    assert status == 0, err
    before = (tmp_path / "o" / "adapter_model.safetensors").read_bytes()
    status, _, err = cli("run", str(path), "--device", "cpu", "--force", "--set", "k=3e38")
    assert status == 1 and "error[E027]" in err and "core(k*a + k*b)" in err, err
    assert "hint: use smaller coefficients; nothing was written" in err and "--dtype" not in err, err
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == before
    status, _, err = cli("run", str(path), "--device", "cpu", "--force", "--set", "k=1e12", "--dtype", "float16")
    assert status == 1 and "error[E027]" in err and "write a wider dtype (--dtype float32" in err, err


def test_an_option_out_of_its_range_is_shown_unrounded(adapters: Path, tmp_path: Path) -> None:
    """keep=1.0000000000000002 is above 1: the note says so, not "= 1" (a value the rule accepts)."""
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\nparam k = 1\n'
                                       'output tsv(a, keep=k) -> "o"\n')
    status, _, err = cli("check", str(path), "--set", "k=1.0000000000000002")
    assert status == 1 and "`keep` must be a number in (0, 1]" in err, err
    assert "note: it is k = 1.0000000000000002" in err, err


@pytest.mark.parametrize(("expression", "blamed", "hint"), [
    # the dense term is the prune; the ties inside core(…) is low-rank from here
    ("tsv(core(ties(a, b, density=0.2)) + prune(a, density=0.1))", "prune(a, density=0.1)",
     "give it as `core(prune(a, density=0.1))` (merged in the inputs' shared basis: low-rank) or as "
     "`svd(prune(a, density=0.1), rank=R)`"),
    # core(prune(svd(…))) would be refused in turn: svd alone is offered
    ("iso(prune(svd(a, rank=2), density=0.5))", "prune(svd(a, rank=2), density=0.5)",
     "hint: give it as `svd(prune(svd(a, rank=2), density=0.5), rank=R)`\n"),
])
def test_a_dense_argument_of_tsv_or_iso_is_named_and_the_hint_is_accepted(
        expression: str, blamed: str, hint: str, adapters: Path, tmp_path: Path) -> None:
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\n'
                                       f'output {expression} -> "o"\n')
    status, _, err = cli("check", str(path))
    assert status == 1 and "needs a low-rank argument" in err, err
    assert f"note: `{blamed}` gives every layer a dense weight update" in err and hint in err, err


def test_a_function_named_without_its_call_is_said_so(adapters: Path, tmp_path: Path) -> None:
    """`core + a` said "unknown name `core`; did you mean `core`?"."""
    path = program(tmp_path / "p.pem", f'mode exact\ninput a = "{adapters}/llama_r8"\noutput core + a -> "o"\n')
    status, _, err = cli("check", str(path))
    assert status == 1 and "error[E002]: `core` is a function, not a value: call it" in err, err
    assert "hint: usage: `core(E)`" in err and "did you mean" not in err, err
