"""The REPL, driven through prompt_toolkit's own pipe input (keys as typed: Enter is \\r, Tab is \\t,
Up is ESC [ A) and, for scripts, through a pipe to `pemlang repl`. Results are checked against the
formulas on the adapters' files, diagnostics against the file renderer's format."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from safetensors.torch import load_file

from pemlang import repl

REPO = Path(__file__).resolve().parent.parent


def drive(keys: str | list[str], history: Path, file: str | None = None) -> str:
    """Type `keys` into a REPL session; returns what it printed. A list is typed in chunks with a
    pause between them, as a person types: completion and history loading run in the background."""
    out = io.StringIO()
    chunks = [keys] if isinstance(keys, str) else keys

    def typist(pipe) -> None:  # type: ignore[no-untyped-def]
        for chunk in chunks:
            pipe.send_text(chunk)
            time.sleep(0.4)
        pipe.close()  # the end of input: the prompt sees EOF (Ctrl-D)

    with create_pipe_input() as pipe, contextlib.redirect_stdout(out):
        thread = threading.Thread(target=typist, args=(pipe,), daemon=True)
        thread.start()
        status = repl.run(file, device="cpu", history=history, input=pipe, output=DummyOutput())
        thread.join()
    assert status == 0
    return out.getvalue()


def lora(adapter_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(adapter_dir / "adapter_model.safetensors")).items()}


@pytest.fixture
def inputs(adapters: Path) -> str:
    return f'input a = "{adapters}/llama_r8"\rinput b = "{adapters}/llama_r8_b"\r'


def test_statements_expressions_and_save(inputs: str, adapters: Path, tmp_path: Path) -> None:
    out = drive(inputs + "param lam = 0.3\rmix = lam*a + (1 - lam)*b\rmix\rlam\r"
                f":save mix {tmp_path}/mix\r", tmp_path / "history")
    assert 'mix : LoRA module, base "tiny-org/tiny-llama", 8 layers, rank 8' in out
    assert "(0.3, 0.3)·a + (0.7, 0.7)·b" in out
    assert "lam : number = 0.3" in out
    assert f"wrote {tmp_path}/mix" in out
    got, a, b = lora(tmp_path / "mix"), lora(adapters / "llama_r8"), lora(adapters / "llama_r8_b")
    for key in a:  # paper mode, equal ranks and scalings: A and B both mix with (0.3, 0.7)
        assert torch.allclose(got[key], 0.3 * a[key] + 0.7 * b[key], atol=1e-6), key


def test_set_changes_a_param_for_later_evaluations(inputs: str, adapters: Path, tmp_path: Path) -> None:
    out = drive(inputs + "param lam = 0.3\r:set lam=0.9\rmix = lam*a + (1 - lam)*b\r"
                f'output mix -> "{tmp_path}/mix"\r', tmp_path / "history")
    assert "lam = 0.9" in out and f"wrote {tmp_path}/mix" in out
    got, a, b = lora(tmp_path / "mix"), lora(adapters / "llama_r8"), lora(adapters / "llama_r8_b")
    for key in a:
        assert torch.allclose(got[key], 0.9 * a[key] + 0.1 * b[key], atol=1e-6), key


def test_diagnostics_point_into_the_typed_line_and_change_nothing(inputs: str, tmp_path: Path) -> None:
    out = drive(inputs + "x = a + bb\r:type 2 * (a *  b)\r:names\r", tmp_path / "history")
    assert ("error[E002]: unknown name `bb`\n"
            " --> <repl>:1:9\n"
            "  |\n"
            "1 | x = a + bb\n"
            "  |         ^^\n"
            "  = hint: did you mean `b`?\n") in out
    assert ("error[E003]: cannot multiply two modules\n"
            " --> <repl>:1:11\n"
            "  |\n"
            "1 | :type 2 * (a *  b)\n"
            "  |           ^^^^^^^^\n") in out
    assert "inputs: a, b\n" in out and "bindings" not in out  # the failed binding was not kept


def test_multi_line_entries_continue_while_parentheses_are_open(inputs: str, tmp_path: Path) -> None:
    out = drive(inputs + "m = (a +\rb) / 2\rm\r", tmp_path / "history")
    assert "m : LoRA module" in out and "(0.5, 0.5)·a + (0.5, 0.5)·b" in out


def test_tab_completes_names_and_commands(adapters: Path, tmp_path: Path) -> None:
    out = drive([f'input yelp_lm = "{adapters}/llama_r8"\r:ty', "\t", " yel", "\t", "\r"], tmp_path / "history")
    assert "yelp_lm : LoRA module" in out


def test_history_persists_across_sessions(inputs: str, tmp_path: Path) -> None:
    history = tmp_path / "history"
    drive(inputs + "0.25*a\r", history)
    assert "0.25*a" in history.read_text(encoding="utf-8")
    up = "\x1b[A"
    out = drive(["", up * 3, "\r", up * 3, "\r", up * 3, "\r"], history)  # the three entries again
    assert "0.25*a : LoRA module" in out


def test_load_plan_inspect_and_mode(adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "prog.pem"
    program.write_text(f'input a = "{adapters}/llama_r8"\ninput c = "{adapters}/llama_r4"\n'
                       'output a -> "out/a"\n', encoding="utf-8")
    out = drive(":plan a + c\rmode exact\r:plan a + c\r:inspect c\r:load nowhere.pem\r:frobnicate\r",
                tmp_path / "history", file=str(program))
    assert "loaded" in out and "1 output not written (use :save)" in out
    assert "error[E010]" in out  # paper mode: ranks 8 and 4 do not add
    assert "mode exact" in out and "per layer (concat)" in out and "B = [beta_1·s_1·B_1" in out
    assert "r / lora_alpha" in out  # the inspect table
    assert "error[E012]: cannot read nowhere.pem" in out
    assert "error[E020]: unknown command `:frobnicate`" in out


def test_highlighting_classes() -> None:
    fragments = repl.tokens('mix = 0.5*a + svd(b, rank=2)  # note', {"a": "input", "mix": "binding"})
    styles = {text: style for style, text in fragments}
    assert styles["mix"] == "class:pem.name.binding" and styles["a"] == "class:pem.name.input"
    assert styles["0.5"] == "class:pem.number" and styles["svd"] == "class:pem.function"
    assert styles["# note"] == "class:pem.comment" and styles["b"] == "class:pem.name"


def test_piped_script(adapters: Path, tmp_path: Path) -> None:
    script = f'input a = "{adapters}/llama_r8"\n-(a\n  + a)\n:type 3*a\n:quit\n:type a\n'
    result = subprocess.run([sys.executable, "-m", "pemlang.cli", "repl"], input=script, capture_output=True,
                            text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "-(a\n  + a) : LoRA module" in result.stdout and "(2, -2)·a" in result.stdout
    assert result.stdout.count("LoRA module") == 2  # nothing after :quit


def test_readme_session(example_root: Path) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("    $ pemlang repl examples/domain_transfer.pem"):]
    section = section[: section.index("\n\n")]
    typed = [line.removeprefix("    pem> ") for line in section.splitlines() if line.startswith("    pem> ")]
    shown = [line[4:] for line in section.splitlines()[1:] if not line.startswith("    pem> ")]
    result = subprocess.run([sys.executable, "-m", "pemlang.cli", "repl", "examples/domain_transfer.pem"],
                            input="\n".join(typed).replace("yelp_cls_03", "yelp_cls_03 --force") + "\n",
                            capture_output=True, text=True, cwd=example_root, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines() == shown  # every line the README shows, and nothing else
    assert (example_root / "examples" / "out" / "yelp_cls_03" / "adapter_model.safetensors").exists()


def piped(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pemlang.cli", "repl", *args], input=script, capture_output=True,
                          text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_an_entry_ending_in_an_operator_continues(inputs: str, adapters: Path, tmp_path: Path) -> None:
    out = drive(inputs + "y = a +\rb\ry\rz = 2 *  # a comment\r  a\rz\r", tmp_path / "history")
    assert "error" not in out, out
    assert "y : LoRA module" in out and "(1, 1)·a + (1, 1)·b" in out and "(2, 2)·a" in out
    script = f'input a = "{adapters}/llama_r8"\ny = a +\n  a -\n  0.5*a\ny\n'
    result = piped(script, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "y : LoRA module" in result.stdout and "(2.5, 1.5)·a" in result.stdout  # alpha drops the sign


def test_a_missing_file_on_the_command_line_is_misuse(tmp_path: Path) -> None:
    result = piped(":names\n", "nosuch.pem", cwd=tmp_path)
    assert result.returncode == 2
    assert "nosuch.pem" in result.stderr and "No such file" in result.stderr and ":load" not in result.stderr


def test_a_file_with_errors_on_the_command_line_exits_1(adapters: Path, tmp_path: Path) -> None:
    program = tmp_path / "bad.pem"
    program.write_text(f'input a = "{adapters}/llama_r8"\nx = a + bb\n', encoding="utf-8")
    result = piped(":names\n", str(program), cwd=tmp_path)
    assert result.returncode == 1
    assert f"--> {program}:2:9" in result.stderr and "unknown name `bb`" in result.stderr


def test_a_piped_script_with_a_failing_entry_exits_1(adapters: Path, tmp_path: Path) -> None:
    script = f'input a = "{adapters}/llama_r8"\nx = a + bb\n2*a\n'
    result = piped(script, cwd=tmp_path)
    assert result.returncode == 1
    assert "error[E002]" in result.stdout and "2*a : LoRA module" in result.stdout  # it went on
    assert piped(script.replace("bb", "a") + ":quit\n", cwd=tmp_path).returncode == 0
    assert piped(script + ":quit\n", cwd=tmp_path).returncode == 1


def test_type_shows_the_heads_an_output_would_carry(adapters: Path, tmp_path: Path) -> None:
    base = f'input c = "{adapters}/llama_cls"\ninput a = "{adapters}/llama_r8"\n'
    result = piped(base + "heads from c\n:type a\na\n", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count(", 1 head\n") == 2, result.stdout  # `output a` would write c's head
    result = piped(base + "heads drop\n:type c\n", cwd=tmp_path)
    assert result.returncode == 0, result.stdout
    assert "c : LoRA module" in result.stdout and "head" not in result.stdout.split("c : LoRA module")[1]


def test_an_internal_error_ends_one_entry_not_the_session(inputs: str, monkeypatch: pytest.MonkeyPatch,
                                                          adapters: Path) -> None:
    def boom(self, *args):  # type: ignore[no-untyped-def]
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(repl.Session, "cmd_names", boom)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f'input a = "{adapters}/llama_r8"\n:names\n2*a\n'))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = repl.run(None, device="cpu")
    text = out.getvalue()
    assert status == 1
    assert "internal error: RuntimeError: simulated bug" in text and "report" in text and "Traceback" not in text
    assert "2*a : LoRA module" in text  # the session went on


def test_out_of_memory_ends_one_entry_as_no_internal_error(monkeypatch: pytest.MonkeyPatch, adapters: Path) -> None:
    def too_large(self, *args):  # type: ignore[no-untyped-def]
        raise MemoryError

    monkeypatch.setattr(repl.Session, "cmd_names", too_large)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f'input a = "{adapters}/llama_r8"\n:names\n2*a\n'))
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        status = repl.run(None, device="cpu")
    text = out.getvalue()
    assert status == 1 and "error: out of memory" in text and "internal error" not in text, text
    assert "2*a : LoRA module" in text  # the session went on



def test_an_unavailable_device_is_misuse_at_the_start(adapters: Path, tmp_path: Path) -> None:
    """`--device cuda` without CUDA ends the REPL before its first entry (exit 2), not at the first :save."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    script = f'input a = "{adapters}/llama_r8"\n3*a\n:save 2*a {tmp_path}/x\n'
    result = piped(script, "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == ("pemlang: error: --device cuda: no CUDA device is available "
                             "(use --device cpu or auto)\n")
    assert result.stdout == "" and not (tmp_path / "x").exists()


def test_a_file_whose_output_statements_have_errors_exits_1(adapters: Path, tmp_path: Path) -> None:
    """An `output` statement is checked when its file is loaded (only not written): errors in it
    end `pemlang repl FILE` with exit 1, as the README promises, and `:load` reports them."""
    program = tmp_path / "bad.pem"
    program.write_text(f'input a = "{adapters}/llama_r8"\noutput a + bb -> "out"\n', encoding="utf-8")
    result = piped(":names\n", str(program), cwd=tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"--> {program}:2:12" in result.stderr and "unknown name `bb`" in result.stderr
    assert "not written" not in result.stdout + result.stderr
    result = piped(f":load {program}\n:names\n", cwd=tmp_path)
    assert result.returncode == 1 and "error[E002]: unknown name `bb`" in result.stdout, result.stdout
    assert "inputs:" not in result.stdout  # the file changed nothing
    (tmp_path / "out").mkdir()  # an existing output is not an error: the file's outputs are not written
    program.write_text(f'input a = "{adapters}/llama_r8"\noutput 2 * a -> "out"\n', encoding="utf-8")
    result = piped(":names\n", str(program), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == (f"loaded {program}: 1 name in scope; 1 output not written (use :save)\n"
                             "inputs: a\n")


def test_a_misspelt_save_flag_is_named(adapters: Path, tmp_path: Path) -> None:
    result = piped(f'input a = "{adapters}/llama_r8"\n:save 2*a out --forc\n', cwd=tmp_path)
    assert result.returncode == 1
    assert result.stdout == ("error[E020]: unknown option `--forc` of :save\n"
                             " --> <repl>:1:15\n"
                             "  |\n"
                             "1 | :save 2*a out --forc\n"
                             "  |               ^^^^^^\n"
                             "  = hint: did you mean `--force`?\n\n"), result.stdout
    assert not (tmp_path / "out").exists()
    result = piped(f'input a = "{adapters}/llama_r8"\n:save 2*a "o u t" --force\n', cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "o u t" / "adapter_model.safetensors").exists(), result.stdout


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


HISTORY_WARNING = "pemlang: warning: history is kept in memory for this session: "


def test_the_history_file_is_never_a_file_of_an_input(adapters: Path, tmp_path: Path) -> None:
    """`--history` (or $PEMLANG_HISTORY) naming an input's file, a file inside an input's directory
    (an input declared during the session included) or the program file: nothing is written there,
    the session says so once and keeps its history in memory."""
    import shutil

    shutil.copytree(adapters / "llama_r8", tmp_path / "a")
    before = files_of(tmp_path / "a")
    typed = f'input a = "{tmp_path}/a"\r0.25*a\r2*a\r'
    for history in (tmp_path / "a" / "adapter_config.json", tmp_path / "a" / "history"):
        out = drive(typed, history)
        assert files_of(tmp_path / "a") == before, history
        assert out.count(HISTORY_WARNING) == 1 and str(history) in out, out
        assert "2*a : LoRA module" in out
    program = tmp_path / "empty.pem"  # a history file as far as its contents go (none)
    program.write_bytes(b"")
    out = drive(typed, program, file=str(program))
    assert program.read_bytes() == b"" and files_of(tmp_path / "a") == before
    assert f"{HISTORY_WARNING}{program} is the program file {program} or inside it" in out, out


def test_save_never_replaces_the_directory_that_holds_the_history(adapters: Path, tmp_path: Path) -> None:
    """From an attack: `:save a DIR --force` onto the directory holding the history file deleted the
    history and wrote the later entries into the new adapter. Now refused (E018), history intact."""
    directory = tmp_path / "work"
    directory.mkdir()
    history = directory / "history"
    history.write_text("\n# 2026-01-01 00:00:00.000000\n+old entry\n", encoding="utf-8")
    out = drive([f'input a = "{adapters}/llama_r8"\r', f":save 2*a {directory} --force\r", f"output a -> \"{directory}\"\r",
                 "0.5*a\r"], history)
    assert "error[E018]: output would overwrite input `the session's history file`" in out, out
    assert sorted(p.name for p in directory.iterdir()) == ["history"]
    text = history.read_text(encoding="utf-8")
    assert "+old entry" in text and "+0.5*a" in text


def test_a_file_that_is_not_a_history_file_is_never_appended_to(adapters: Path, tmp_path: Path) -> None:
    import shutil

    config = tmp_path / "train.json"
    config.write_text('{"lr": 0.001}\n', encoding="utf-8")
    weights = tmp_path / "model.safetensors"
    shutil.copy(adapters / "llama_r8" / "adapter_model.safetensors", weights)
    up = "\x1b[A"
    for history in (config, weights):
        before = history.read_bytes()
        out = drive([f'input a = "{adapters}/llama_r8"\r0.25*a\r', up + "\r"], history)
        assert history.read_bytes() == before
        assert out.count(HISTORY_WARNING) == 1, out
        assert f"{HISTORY_WARNING}{history} is not a history file\n  hint: give another file with --history FILE" in out
        assert out.count("0.25*a : LoRA module") == 2, out  # kept in memory: Up recalls the entry


def test_a_full_disk_under_save_is_e018_naming_the_directory(adapters: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = io.StringIO()
    session = repl.Session(device="cpu", out=out)
    session.handle(f'input a = "{adapters}/llama_r8"')
    monkeypatch.setattr(os, "pwrite", full)
    session.handle(f":save 2*a {tmp_path}/x")
    text = out.getvalue()
    assert f"error[E018]: cannot write output {tmp_path}/x: {os.strerror(errno.ENOSPC)}" in text, text
    assert "internal error" not in text and session.failed and list(tmp_path.iterdir()) == []


def test_a_config_is_not_loaded_as_a_program(tmp_path: Path) -> None:
    """From a new-user trial: `pemlang repl train.yaml` printed eleven E001 errors about `:`."""
    config = tmp_path / "train.yaml"
    config.write_text("merge:\n  expression: a\n")
    result = piped(":names\n", str(config), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == (f"pemlang: error: the REPL loads .pem programs; {config} is a config (`pemlang run "
                             f"{config}` runs it, `pemlang check {config}` checks it)\n")


def test_an_output_statement_over_a_directory_says_how_to_replace_it(adapters: Path, tmp_path: Path) -> None:
    """From a new-user trial: the hint said "pass --force", and `output … --force` is a syntax error."""
    (tmp_path / "out").mkdir()
    result = piped(f'input a = "{adapters}/llama_r8"\noutput a -> "out"\n', cwd=tmp_path)
    assert result.returncode == 1
    assert "error[E018]: output directory already exists" in result.stdout, result.stdout
    assert "hint: replace it with `:save EXPR DIR --force` (an `output` statement never replaces)" in result.stdout


def test_a_name_defined_twice_says_where_first(adapters: Path, tmp_path: Path) -> None:
    """From a new-user trial: E016's note said "on line 1" for eval's --input, and for a second
    :load "line 10" of the first file without naming it."""
    first, second = tmp_path / "first.pem", tmp_path / "second.pem"
    first.write_text(f'input a = "{adapters}/llama_r8"\n\nparam lam = 0.5\n')
    second.write_text("param lam = 0.3\n")
    result = piped(f":load {first}\n:load {second}\n", cwd=tmp_path)
    assert "note: first defined as a param on line 3 of first.pem" in result.stdout, result.stdout  # cwd: tmp_path
    done = subprocess.run([sys.executable, "-m", "pemlang.cli", "eval", "--input", f"a={adapters}/llama_r8",
                           "--input", f"a={adapters}/llama_r8_b", "--out", str(tmp_path / "o"), "a"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 1
    assert f"note: first defined as an input by --input 'a={adapters}/llama_r8'" in done.stderr, done.stderr
