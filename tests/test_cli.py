"""The command line as a user runs it: exit codes, output, and what `check` imports."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pemlang.cli import main

REPO = Path(__file__).resolve().parent.parent


def pemlang(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pemlang.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def program(adapters: Path, tmp_path: Path) -> Path:
    path = tmp_path / "mix.pem"
    path.write_text(f'''input a = "{adapters}/llama_r8"
input b = "{adapters}/llama_r8_b"
input c = "{adapters}/llama_r8_c"
param lam = 0.5
output lam*a + (1 - lam)*(b - c) -> "out/mix"
''')
    return path


def test_check_ok_exit_0(program: Path) -> None:
    result = pemlang("check", str(program))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "ok:" in result.stdout and "3 inputs" in result.stdout


def test_check_errors_exit_1_with_a_diagnostic_not_a_traceback(adapters: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text(f'input a = "{adapters}/llama_r8"\ninput r4 = "{adapters}/llama_r4"\noutput a + r4 -> "o"\n')
    result = pemlang("check", str(bad))
    assert result.returncode == 1
    assert "error[E010]" in result.stderr and f"{bad}:3:8" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [[], ["check"], ["check", "/no/such/file.pem"], ["frobnicate"],
                                  ["check", "x.pem", "--set", "novalue"]])
def test_misuse_exits_2(args: list[str], tmp_path: Path) -> None:
    (tmp_path / "x.pem").write_text("")
    result = pemlang(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_check_never_imports_torch(program: Path) -> None:
    code = ("import sys; from pemlang.cli import main; status = main(['check', sys.argv[1]]); "
            "heavy = [m for m in ('torch', 'peft', 'transformers', 'safetensors', 'rich', 'pydantic') "
            "if m in sys.modules]; print(heavy); sys.exit(status)")
    result = subprocess.run([sys.executable, "-c", code, str(program)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_inspect_reads_clearly(adapters: Path) -> None:
    result = pemlang("inspect", str(adapters / "llama_pattern"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "LoRA" in out and "tiny-org/tiny-llama" in out and "rank_pattern" in out
    # grouped over block indices, split where a pattern changes rank or alpha
    assert "model.layers.[0-1].self_attn.k_proj" in out
    assert "model.layers.1.self_attn.q_proj" in out and "model.layers.0.self_attn.q_proj" in out
    heads = pemlang("inspect", str(adapters / "llama_cls")).stdout
    assert "score.weight" in heads and "3×32" in heads
    refused = pemlang("inspect", str(adapters / "llama_dora")).stdout
    assert "DoRA" in refused


def test_inspect_missing_exit_1(tmp_path: Path) -> None:
    result = pemlang("inspect", str(tmp_path / "nothing"))
    assert result.returncode == 1 and "error[E012]" in result.stderr


def test_internal_errors_say_so(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                program: Path) -> None:
    import pemlang.check

    def boom(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(pemlang.check, "check_source", boom)
    assert main(["check", str(program)]) == 70
    err = capsys.readouterr().err
    assert "internal error" in err and "report" in err and "Traceback" not in err


def test_out_of_memory_is_no_internal_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                            program: Path) -> None:
    """A MemoryError (an input too large for the machine) says so, exit 1: not 'internal error', exit 70."""
    import pemlang.check

    def too_large(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(pemlang.check, "check_source", too_large)
    assert main(["check", str(program)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pemlang: error: out of memory: what this `pemlang check` reads or builds"), err
    assert "internal error" not in err and "Traceback" not in err


def test_check_is_fast(program: Path) -> None:
    """Not a timing assertion (those live in benchmarks): a smoke test that check returns promptly."""
    start = time.perf_counter()
    assert pemlang("check", str(program)).returncode == 0
    assert time.perf_counter() - start < 30


def test_plan_explains_before_running(program: Path) -> None:
    result = pemlang("plan", str(program))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("mode paper", "lam = 0.5", "alpha", "beta", "-0.5", "A = Σ alpha_i·A_i",
                     "model.layers.[0-1].self_attn.q_proj", "reads", "writes"):
        assert expected in out, expected
    assert not (program.parent / "out").exists()


def test_run_prints_a_summary_and_writes(program: Path) -> None:
    result = pemlang("run", str(program), "--device", "auto")
    assert result.returncode == 0, result.stderr
    assert "device: " in result.stderr
    assert "wrote out/mix: LoRA r=8, 8 layers" in result.stdout or "wrote " in result.stdout
    assert (program.parent / "out" / "mix" / "adapter_config.json").is_file()
    again = pemlang("run", str(program))
    assert again.returncode == 1 and "error[E018]" in again.stderr


def test_eval_expression_may_start_with_minus(adapters: Path, tmp_path: Path) -> None:
    result = pemlang("eval", "--input", f"a={adapters}/llama_r8", "--input", f"b={adapters}/llama_r8_b",
                     "--out", str(tmp_path / "neg"), "--mode", "exact", "--", "-a", "+", "2*b")
    assert result.returncode == 0, result.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "neg" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata()["pemlang.expression"] == "-a + 2*b"


def test_eval_diagnostics_point_into_the_arguments(adapters: Path, tmp_path: Path) -> None:
    result = pemlang("eval", "--input", f"a={adapters}/llama_r8", "--input", f"r4={adapters}/missing",
                     "--out", str(tmp_path / "x"), "a + r", cwd=tmp_path)
    assert result.returncode == 1
    assert "--> --input:1:4" in result.stderr and "error[E012]" in result.stderr
    assert "--> <expression>:1:5" in result.stderr and "did you mean `r4`?" in result.stderr


def test_unavailable_cuda_is_misuse(program: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = pemlang("run", str(program), "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


@pytest.mark.parametrize("device", ["gpu", "tpu", "cuda:x", "cuda:", "cpu:0", ""])
@pytest.mark.parametrize("command", ["run", "eval", "repl"])
def test_bad_device_is_misuse_at_parse_time(command: str, device: str, program: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = {"run": ["run", str(program)], "repl": ["repl", str(program)],
            "eval": ["eval", "--input", f"a={program}", "--out", str(tmp_path / "o"), "a"]}[command]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--device", device])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "auto, cpu, cuda, cuda:N" in err and "internal error" not in err
    assert not (program.parent / "out").exists()


@pytest.mark.parametrize("device", ["cuda:128", "cuda:2147483648", "cuda:" + "9" * 5000])
@pytest.mark.parametrize("command", ["run", "eval", "repl", "tune"])
def test_a_cuda_index_no_gpu_can_have_is_misuse(command: str, device: str, program: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """torch keeps a device index in 8 bits: cuda:128 named another GPU, cuda:2147483648 raised
    torch's own error as an internal error. Refused where the option is read."""
    args = {"run": ["run", str(program)], "repl": ["repl", str(program)], "tune": ["tune", str(program)],
            "eval": ["eval", "--input", f"a={program}", "--out", str(tmp_path / "o"), "a"]}[command]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--device", device])
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "N in cuda:N is a GPU's index, from 0 (the first GPU) to at most 127" in err, err
    assert "internal error" not in err and len(err) < 1000


@pytest.mark.parametrize("device", ["cuda:00", "cuda:01", "cuda:007"])
def test_a_cuda_index_with_leading_zeros_is_misuse_not_torchs_error(device: str, program: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """torch refuses `cuda:01` with a RuntimeError of its own (an internal error, exit 70, before)."""
    import pemlang

    with pytest.raises(SystemExit) as exited:
        main(["run", str(program), "--device", device])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"write cuda:{int(device[5:])}" in err and "internal error" not in err, err
    with pytest.raises(ValueError, match="no leading zeros"):
        pemlang.load(program).evaluate(device=device)


def test_a_cuda_index_no_gpu_can_have_in_a_config_or_the_api(adapters: Path, tmp_path: Path) -> None:
    import pemlang

    config = tmp_path / "merge.yaml"
    config.write_text(f"inputs: {{a: {adapters}/llama_r8}}\nexpression: 2*a\noutput: out/o\n"
                      "device: cuda:2147483648\n")
    result = pemlang_cli_check(config)
    assert result.returncode == 1 and "error[E025]: `device`: unknown device 'cuda:2147483648'" in result.stderr, \
        result.stderr
    assert "--> " in result.stderr and "device: cuda:2147483648" in result.stderr
    with pytest.raises(ValueError, match="at most 127"):
        pemlang.compile(text=f'input a = "{adapters}/llama_r8"\noutput 2*a -> "o"\n', base_dir=tmp_path,
                        device="cuda:2147483648")
    program = pemlang.compile(text=f'input a = "{adapters}/llama_r8"\noutput 2*a -> "o"\n', base_dir=tmp_path)
    with pytest.raises(ValueError, match="at most 127"):
        program.evaluate(device="cuda:2147483648")


def pemlang_cli_check(path: Path) -> subprocess.CompletedProcess[str]:
    return pemlang("check", str(path))


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_forms_accepted_by_the_parser(device: str) -> None:
    from pemlang.cli import build_parser

    assert build_parser().parse_args(["run", "p.pem", "--device", device]).device == device


def _metadata(adapter_dir: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        return dict(f.metadata())


def test_eval_options_after_the_expression_are_options(adapters: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    (out / "old").mkdir(parents=True)  # exists: only --force lets eval replace it
    status = main(["eval", "--input", f"a={adapters}/llama_r8", "0.5*a", "+", "0.5*a", "--out", str(out),
                   "--force", "--mode", "exact", "--device", "cpu"])
    assert status == 0
    meta = _metadata(out)
    assert meta["pemlang.expression"] == "0.5*a + 0.5*a" and meta["pemlang.mode"] == "exact"
    assert not (out / "old").exists()


def test_eval_double_dash_still_protects_a_leading_minus(adapters: Path, tmp_path: Path) -> None:
    status = main(["eval", "--out", str(tmp_path / "n"), "--input", f"a={adapters}/llama_r8", "--device", "cpu",
                   "--", "-a", "--force"])  # after `--`, everything is the expression
    assert status == 1  # `-a --force` is not an expression: a syntax error, not an option


def test_eval_heads_follows_the_e022_hint(adapters: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = ["--input", f"a={adapters}/llama_cls", "--input", f"b={adapters}/llama_cls_b", "--device", "cpu"]
    assert main(["eval", *inputs, "--out", str(tmp_path / "x"), "a + b"]) == 1
    assert "error[E022]" in capsys.readouterr().err
    assert main(["eval", *inputs, "--out", str(tmp_path / "from_a"), "a + b", "--heads", "from", "a"]) == 0
    assert main(["eval", *inputs, "--heads", "drop", "--out", str(tmp_path / "dropped"), "a + b"]) == 0
    from safetensors.torch import load_file

    config = __import__("json").loads((tmp_path / "dropped" / "adapter_config.json").read_text())
    assert not config.get("modules_to_save")
    own = {k: v for k, v in load_file(str(adapters / "llama_cls" / "adapter_model.safetensors")).items()
           if "lora_" not in k}
    written = load_file(str(tmp_path / "from_a" / "adapter_model.safetensors"))
    assert own and all(written[k].equal(v) for k, v in own.items())  # a's heads, unchanged
    assert main(["eval", *inputs, "--out", str(tmp_path / "y"), "a + b", "--heads", "from", "c"]) == 1
    err = capsys.readouterr().err
    assert "error[E002]: unknown name `c`" in err and "--> --heads:1:6" in err


@pytest.mark.parametrize("heads", [["mix"], ["from"], []])
def test_eval_heads_misuse_exits_2(heads: list[str], adapters: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--input", f"a={adapters}/llama_cls", "--out", str(tmp_path / "x"), "a", "--heads", *heads])
    assert exited.value.code == 2


def test_no_arguments_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([])
    err = capsys.readouterr().err
    assert exited.value.code == 2
    for command, help_line in [("check", "parse and type-check a program"), ("run", "evaluate a program and write"),
                               ("plan", "print the lowered evaluation plan"), ("eval", "evaluate one expression"),
                               ("repl", "an interactive session"), ("inspect", "print an adapter's type signature")]:
        assert any(line.split()[:1] == [command] and help_line in line for line in err.splitlines()), command
    assert "pemlang COMMAND --help" in err


def test_user_facing_text_cites_the_readme_not_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    """Users have the README, not SPEC.md: what they read cites the README's own sections."""
    import re

    from pemlang import repl
    from pemlang.config import schema_text

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    headings = set(re.findall(r"^## (.+)$", readme, flags=re.M))
    texts = {"README.md": readme, "config.schema.json": schema_text(), "repl :help": repl.HELP,
             **{p.name: p.read_text(encoding="utf-8") for p in (REPO / "examples").glob("*.pem")}}
    for command in ["check", "run", "plan", "eval", "repl", "inspect"]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[f"pemlang {command} --help"] = capsys.readouterr().out
    for name, text in texts.items():
        assert "SPEC" not in text, name
        for cited in re.findall(r"see '([^']+)' in the README", text):
            assert cited in headings, (name, cited)
    cited_by_examples = [c for p in (REPO / "examples").glob("*.pem")
                         for c in re.findall(r"see '([^']+)' in the README", p.read_text(encoding="utf-8"))]
    assert len(cited_by_examples) >= 6  # each example says where its operators are described


# -- paths as written: `~`, and relative to the file -------------------------------------------------


@pytest.fixture
def home(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home directory holding two adapters; the working directory elsewhere."""
    import shutil

    home = tmp_path / "home"
    for name in ("llama_r8", "llama_r8_b"):
        shutil.copytree(adapters / name, home / "adapters" / name)
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    return home


def test_tilde_is_the_home_directory_in_programs_configs_and_options(home: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from safetensors.torch import load_file

    program = tmp_path / "p.pem"
    program.write_text('input a = "~/adapters/llama_r8"\ninput b = "~/adapters/llama_r8_b"\n'
                       'output 0.5*a + 0.5*b -> "~/out/p"\n')
    assert main(["run", str(program), "--device", "cpu"]) == 0, capsys.readouterr().err
    config = tmp_path / "c.yaml"
    config.write_text("inputs:\n  a: ~/adapters/llama_r8\n  b: ~/adapters/llama_r8_b\n"
                      "expression: 0.5*a + 0.5*b\noutput: ~/out/c\n")
    assert main(["run", str(config), "--device", "cpu"]) == 0, capsys.readouterr().err
    assert main(["eval", "--input", "a=~/adapters/llama_r8", "--input", "b=~/adapters/llama_r8_b",
                 "--out", "~/out/e", "--device", "cpu", "0.5*a + 0.5*b"]) == 0, capsys.readouterr().err
    written = [load_file(home / "out" / name / "adapter_model.safetensors") for name in ("p", "c", "e")]
    assert all(w.keys() == written[0].keys() and all(torch_equal(w[k], written[0][k]) for k in w) for w in written)
    assert not (tmp_path / "work" / "~").exists() and not (tmp_path / "~").exists()


def test_tilde_is_the_home_directory_in_every_path_option(home: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """From a new-user trial: `check ~/x.pem`, `inspect ~/DIR`, `pemlang.load("~/x.pem")`, the REPL's
    :load and :inspect, and tune's --study/--data/--save-best (where the shell leaves `~` as it is,
    `--save-best=~/x`) took `~` as a directory name: a `~/` folder appeared in the working directory."""
    import io

    import pemlang
    from pemlang import repl

    (home / "p.pem").write_text('input a = "~/adapters/llama_r8"\noutput 2*a -> "~/out/p"\n')
    assert main(["check", "~/p.pem"]) == 0, capsys.readouterr().err
    assert main(["inspect", "~/adapters/llama_r8"]) == 0, capsys.readouterr().err
    assert pemlang.load("~/p.pem").params == {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        repl.Session(device="cpu").handle(":load ~/p.pem")
        repl.Session(device="cpu").handle(":inspect ~/adapters/llama_r8")
    assert "error" not in out.getvalue() and "loaded" in out.getvalue() and "LoRA" in out.getvalue(), out.getvalue()
    assert main(["tune", "--show", "~/no.db"]) == 1
    assert f"no such study: {home / 'no.db'}" in capsys.readouterr().err
    assert main(["tune", "~/p.pem", "--base", "~/nowhere", "--objective", "math:fabs", "--param", "a=0:1",
                 "--save-best=~/best", "--study=~/s.db"]) == 1
    capsys.readouterr()
    assert not (tmp_path / "work" / "~").exists()


def torch_equal(a, b) -> bool:  # type: ignore[no-untyped-def]
    import torch

    return bool(torch.equal(a, b))


def test_tune_base_with_a_tilde(home: Path) -> None:
    from peft_factory import base_model

    from pemlang.tune.model import check_base

    base_model().save_pretrained(home / "base")
    check_base("~/base", load=True)  # found, and its config loads
    with pytest.raises(Exception, match=f"no such directory: {home}/nothing"):
        check_base("~/nothing")


def test_a_path_relative_to_the_working_directory_gets_a_hint(home: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Paths in a file are relative to the file: a path that exists only from the working directory
    is still an error, with a hint saying the rule and the path that would work."""
    import os

    os.chdir(home)
    (tmp_path / "programs").mkdir()
    program = tmp_path / "programs" / "p.pem"
    program.write_text('input a = "adapters/llama_r8"\noutput a -> "out/a"\n')
    assert main(["check", str(program)]) == 1
    err = capsys.readouterr().err
    assert "error[E012]" in err and "adapter directory not found" in err
    assert ("hint: paths in a file are relative to the file's directory "
            f"({tmp_path / 'programs'}), not to the working directory, where adapters/llama_r8 exists: "
            "write ../home/adapters/llama_r8") in err
    os.chdir(tmp_path)  # from here the path leads nowhere either: no hint
    assert main(["check", str(program)]) == 1
    assert "working directory" not in capsys.readouterr().err


def _subcommands() -> dict[str, object]:
    import argparse

    from pemlang.cli import build_parser

    [commands] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def test_every_option_and_argument_has_help() -> None:
    missing = [f"{name} {action.dest}" for name, parser in _subcommands().items()
               for action in parser._actions if not action.help]  # type: ignore[attr-defined]
    assert missing == []


def test_help_says_what_options_do_where_they_are(capsys: pytest.CaptureFixture[str]) -> None:
    def helps(command: str) -> dict[str, str]:
        parser = _subcommands()[command]
        return {action.option_strings[-1] if action.option_strings else action.dest: action.help
                for action in parser._actions}  # type: ignore[attr-defined]

    for command in ("check", "plan"):  # they write nothing: --force replaces nothing there
        assert "replace" not in helps(command)["--force"].split(":")[0] and "writes nothing" in helps(command)["--force"]
    assert "replace" in helps("run")["--force"]
    assert "hf://" in _subcommands()["inspect"].format_usage() and "Hub" in helps("inspect")["adapter"]  # type: ignore[attr-defined]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "points in all" in helps("tune")["--max-points"] and "1,000 points in all" in readme
    assert "per param" not in helps("tune")["--max-points"]
    assert "so that pip takes the CPU build" not in readme and "download.pytorch.org/whl/cpu" in readme
