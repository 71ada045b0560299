"""The checker's typing: the coefficients alpha/beta of SPEC §2, written out from the SPEC's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pemlang.check import check_source
from pemlang.checked import InputRef, ModuleValue
from pemlang.source import Source


def coefficients(adapters: Path, expression: str, mode: str = "paper") -> dict[str, tuple[float, float]]:
    text = f"""mode {mode}
input a = "{adapters}/llama_r8"
input b = "{adapters}/llama_r8_b"
input c = "{adapters}/llama_r8_c"
input t = "{adapters}/llama_r8_c"
param λ = 0.3
x = {expression}
"""
    checker_result = check_source(Source(text))
    errors = [d for d in checker_result.diagnostics if d.is_error]
    assert not errors, errors
    from pemlang.check import Checker
    from pemlang.parser import parse_program

    program, _ = parse_program(Source(text))
    checker = Checker(Source(text))
    for stmt in program.statements:
        checker.statement(stmt)
    value = checker.env["x"].value
    assert isinstance(value, ModuleValue)
    return {t.source.name: (t.alpha, t.beta) for t in value.terms if isinstance(t.source, InputRef)}


LAM = 0.3
# SPEC §2.1's worked examples, plus a few more; (alpha, beta) per input.
CASES = [
    ("0.5*a + 0.5*b", {"a": (0.5, 0.5), "b": (0.5, 0.5)}),
    ("a - b", {"a": (1, 1), "b": (1, -1)}),
    ("λ*a + (1-λ)*(b - c)", {"a": (LAM, LAM), "b": (1 - LAM, 1 - LAM), "c": (1 - LAM, -(1 - LAM))}),
    ("-(0.7*t)", {"t": (0.7, -0.7)}),
    ("0.7*(-t)", {"t": (0.7, -0.7)}),
    ("(1+λ)*a - λ*t", {"a": (1 + LAM, 1 + LAM), "t": (LAM, -LAM)}),
    ("a ⊕ b ⊖ c", {"a": (1, 1), "b": (1, 1), "c": (1, -1)}),
    ("a + a", {"a": (2, 2)}),
    ("a - a", {"a": (2, 0)}),
    ("(a + b) / 4", {"a": (0.25, 0.25), "b": (0.25, 0.25)}),
    ("-(-a)", {"a": (1, 1)}),
]


@pytest.mark.parametrize(("expression", "expected"), CASES)
def test_alpha_beta(adapters: Path, expression: str, expected: dict[str, tuple[float, float]]) -> None:
    actual = coefficients(adapters, expression)
    assert actual.keys() == expected.keys()
    for name, (alpha, beta) in expected.items():
        assert actual[name] == pytest.approx((alpha, beta), abs=1e-12)


def test_all_errors_of_a_program_are_collected(adapters: Path) -> None:
    text = f"""input a = "{adapters}/llama_r8"
input r4 = "{adapters}/llama_r4"
input ia3 = "{adapters}/llama_ia3"
x = a * a
y = a + r4
z = a + ia3
w = 1 / 0
output x -> "{adapters}/../out_x"
bad = (a
"""
    result = check_source(Source(text))
    assert [d.code for d in result.diagnostics if d.is_error] == ["E003", "E010", "E007", "E015", "E001"]


def test_exact_mode_accepts_what_paper_mode_refuses(adapters: Path) -> None:
    body = f"""input a = "{adapters}/llama_r8"
input r4 = "{adapters}/llama_r4"
input qv = "{adapters}/llama_qv"
output a + r4 - qv -> "{adapters}/../out_exact"
"""
    paper = check_source(Source(body))
    exact = check_source(Source("mode exact\n" + body))
    assert [d.code for d in paper.diagnostics if d.is_error] == ["E010"]
    assert exact.ok
    (output,) = exact.outputs
    layer = output.value.type.layers["model.layers.0.self_attn.q_proj"]
    assert layer.rank == 8 + 4 + 8  # type: ignore[union-attr]
    assert output.value.type.layers["model.layers.0.self_attn.k_proj"].rank == 8 + 4  # type: ignore[union-attr]


# -- hardening (issue 8) -------------------------------------------------------------------------


def codes(result) -> list[str]:  # type: ignore[no-untyped-def]
    return [d.code for d in result.diagnostics]


def two_inputs(adapters: Path) -> str:
    return f'input a = "{adapters}/llama_r8"\ninput b = "{adapters}/llama_r8_b"\n'


@pytest.mark.parametrize(("body", "snippet", "value"), [
    ('param l = 1e400\noutput l*a + b -> "o"\n', "1e400", "inf"),
    ('output 1e400*a + b -> "o"\n', "1e400", "inf"),
    ('output a/1e-320 + b -> "o"\n', "a/1e-320", "inf"),
    ('output 1e300*1e300*a + b -> "o"\n', "1e300*1e300", "inf"),
    ('output 1e39*a + b -> "o"\n', "1e39*a", "1e+39"),
    ('output 3e38*a + 3e38*a + b -> "o"\n', "3e38*a + 3e38*a", "6e+38"),
])
def test_non_finite_or_float32_overflowing_numbers_are_E026(adapters: Path, tmp_path: Path, body: str,
                                                            snippet: str, value: str) -> None:
    text = two_inputs(adapters) + body
    result = check_source(Source(text, "p.pem"), base_dir=tmp_path)
    errors = [d for d in result.diagnostics if d.is_error]
    assert [d.code for d in errors] == ["E026"], result.diagnostics
    (diag,) = errors
    assert diag.span is not None and text[diag.span.start : diag.span.end] == snippet
    assert any(value in note for note in diag.notes), diag.notes


def test_a_set_value_overflowing_float32_is_E026_at_the_expression(adapters: Path, tmp_path: Path) -> None:
    from pemlang.checked import Override

    text = two_inputs(adapters) + 'param λ = 0.5\noutput λ*a + (1 - λ)*b -> "o"\n'
    result = check_source(Source(text, "p.pem"), base_dir=tmp_path,
                          overrides=[Override("λ", 1e39, Source("λ=1e39", "--set"))])
    errors = [d for d in result.diagnostics if d.is_error]
    assert [d.code for d in errors] == ["E026", "E026"]
    assert [text[d.span.start : d.span.end] for d in errors if d.span] == ["λ*a", "(1 - λ)*b"]
    assert "-1e+39" in errors[1].notes[0]
    # big scalars that fold back into range are fine
    ok = check_source(Source(two_inputs(adapters) + 'output 1e39/1e39*a + 1e-300*b -> "o"\n'), base_dir=tmp_path)
    assert ok.ok, ok.diagnostics


def test_svd_rank_that_is_not_finite_is_a_diagnostic(adapters: Path, tmp_path: Path) -> None:
    for rank in ("1e400", "1e300*1e300"):
        text = "mode exact\n" + two_inputs(adapters) + f'output svd(a, rank={rank}) + b -> "o"\n'
        result = check_source(Source(text), base_dir=tmp_path)
        assert [d.code for d in result.diagnostics if d.is_error] == ["E026"]


def test_deep_but_sane_programs_check_and_lower(adapters: Path, tmp_path: Path) -> None:
    from pemlang.lower import lower
    from pemlang.plan import format_plan

    text = (two_inputs(adapters) + "param p = " + " + ".join(["0.0001"] * 5000) + "\n"
            + "output p*(" + " + ".join(["a", "b"] * 250) + ') -> "o"\n')
    result = check_source(Source(text), base_dir=tmp_path)
    assert result.ok, result.diagnostics
    assert result.params["p"] == pytest.approx(0.5)
    (output,) = result.outputs
    assert {t.source.name: t.beta for t in output.value.terms} == pytest.approx({"a": 125, "b": 125})  # type: ignore[union-attr]
    import io

    from rich.console import Console

    plan = lower(result)
    stream = io.StringIO()
    format_plan(plan, Console(file=stream, width=200))
    assert "output" in stream.getvalue()


@pytest.mark.parametrize(("expression", "deep"), [
    ("(" * 500 + "a" + ")" * 500, False),  # parentheses alone do not nest anything
    ("-" * 500 + "a", True),
    ("-(" * 500 + "a" + ")" * 500, True),
    ("a + (" * 400 + "b" + ")" * 400, True),
    ("svd(" * 300 + "a" + ", rank=1)" * 300, True),
])
def test_absurd_nesting_is_a_diagnostic(adapters: Path, tmp_path: Path, expression: str, deep: bool) -> None:
    text = "mode exact\n" + two_inputs(adapters) + f'output {expression} -> "o"\n'
    result = check_source(Source(text, "p.pem"), base_dir=tmp_path)
    if not deep:
        assert result.ok, result.diagnostics
        return
    errors = [d for d in result.diagnostics if d.is_error]
    assert [d.code for d in errors] == ["E001"]
    assert "nested deeper than" in errors[0].message
    assert errors[0].span is not None and text.index("output") < errors[0].span.start < len(text)


@pytest.mark.parametrize(("statement", "code"), [
    ('input c = "x\0y"\n', "E012"),
    ('input c = "' + "x" * 5000 + '"\n', "E012"),
    ('output a + b -> "x\0y"\n', "E018"),
    ('output a + b -> "' + "x" * 5000 + '"\n', "E018"),
    ('output a + b -> "' + "d/" * 3000 + 'x"\n', "E018"),
])
def test_unusable_paths_are_diagnostics_at_the_path(adapters: Path, tmp_path: Path, statement: str,
                                                    code: str) -> None:
    text = two_inputs(adapters) + 'x = a + b\n' + statement
    result = check_source(Source(text), base_dir=tmp_path)
    errors = [d for d in result.diagnostics if d.is_error]
    assert [d.code for d in errors] == [code]
    assert errors[0].span is not None and text[errors[0].span.start] == '"'


def test_many_outputs_check_in_near_linear_time(adapters: Path, tmp_path: Path) -> None:
    import time

    lines = [two_inputs(adapters)] + [f'output a + b -> "out/o{i}"\n' for i in range(1000)]
    lines.append('output a - b -> "out/o500"\n')  # the one clash
    start = time.perf_counter()
    result = check_source(Source("".join(lines)), base_dir=tmp_path)
    elapsed = time.perf_counter() - start
    assert codes(result) == ["E018"]
    assert "line 503" in result.diagnostics[0].notes[0]
    assert len(result.outputs) == 1001
    assert elapsed < 4, elapsed


def test_did_you_mean_over_many_names_is_fast_and_right(adapters: Path, tmp_path: Path) -> None:
    import time

    lines = [two_inputs(adapters)] + [f"task_{i:05d} = 0.5*a\n" for i in range(10000)]
    lines += ["output task_07431 + task_00001 + task_O2718 -> \"o\"\n"]
    lines += [f"y{i} = tsak_{i:05d}\n" for i in range(0, 10000, 100)]  # 100 more typos
    start = time.perf_counter()
    result = check_source(Source("".join(lines)), base_dir=tmp_path)
    elapsed = time.perf_counter() - start
    errors = [d for d in result.diagnostics if d.is_error]
    assert len(errors) == 101 and {d.code for d in errors} == {"E002"}
    assert errors[0].message == "unknown name `task_O2718`"
    assert errors[0].hints == ("did you mean `task_02718`?",)
    assert errors[1].hints == ("did you mean `task_00000`?",)
    assert errors[-1].hints == ("did you mean `task_09900`?",)
    # Not a speed target: a guard against the quadratic scan (minutes), loose enough for a loaded CI machine.
    assert elapsed < 60, elapsed


def test_did_you_mean_keeps_difflib_answers_on_small_scopes() -> None:
    import difflib
    import random

    from pemlang.check import did_you_mean
    from pemlang.suggest import RANKED

    rng = random.Random(8)
    alphabet = "abcdeλ_1"
    for _ in range(300):
        scope = ["".join(rng.choices(alphabet, k=rng.randint(1, 9))) for _ in range(rng.randint(1, RANKED))]
        name = "".join(rng.choices(alphabet, k=rng.randint(1, 9)))
        expected = difflib.get_close_matches(name, scope, n=1, cutoff=0.6)
        assert did_you_mean(name, scope) == ([f"did you mean `{expected[0]}`?"] if expected else [])


def test_did_you_mean_finds_a_typo_as_close_as_difflib_in_large_scopes() -> None:
    import difflib
    import random
    import string

    from pemlang.check import closest_name

    rng = random.Random(3)
    for _ in range(100):
        scope = list(dict.fromkeys("".join(rng.choices(string.ascii_lowercase + "_", k=rng.randint(4, 12))) for _ in range(2000)))
        target = rng.choice(scope)
        i = rng.randrange(len(target))
        typo = target[:i] + rng.choice(string.ascii_lowercase.replace(target[i], "")) + target[i + 1:]
        if typo in scope:
            continue
        best = difflib.get_close_matches(typo, scope, n=1, cutoff=0.6)[0]  # the whole scope, by brute force
        got = closest_name(typo, scope)
        assert got is not None
        assert difflib.SequenceMatcher(None, typo, got).ratio() == difflib.SequenceMatcher(None, typo, best).ratio()


def test_did_you_mean_does_bounded_work_per_unknown_name(adapters: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """4,000 unknown names in a scope of 4,000 names: difflib compares a bounded number of
    candidates per unknown name (counted by difflib itself), not the scope."""
    import difflib

    compared = [0]
    set_seq1 = difflib.SequenceMatcher.set_seq1

    def counting(self: difflib.SequenceMatcher, a: str) -> None:  # type: ignore[type-arg]
        compared[0] += 1
        set_seq1(self, a)

    monkeypatch.setattr(difflib.SequenceMatcher, "set_seq1", counting)

    def work(count: int) -> int:
        compared[0] = 0
        lines = [two_inputs(adapters)] + [f"x{i} = y{i}\n" for i in range(count)]
        result = check_source(Source("".join(lines)), base_dir=tmp_path)
        assert [d.code for d in result.diagnostics if d.is_error] == ["E002"] * count
        return compared[0]

    from pemlang import suggest

    scanned = suggest.WORK["scanned"]
    assert work(4000) <= 100 * 4000  # at most 100 difflib comparisons per unknown name
    assert suggest.WORK["scanned"] - scanned <= 2000 * 4000  # and a bounded look at the index


def test_a_typo_does_not_also_warn_that_the_meant_input_is_unused(adapters: Path, tmp_path: Path) -> None:
    text = f'input instruct = "{adapters}/llama_r8"\ninput toxic = "{adapters}/llama_r8_b"\n' \
           'output instrcut - toxic -> "o"\n'
    result = check_source(Source(text), base_dir=tmp_path)
    assert codes(result) == ["E002"]
    assert result.diagnostics[0].hints == ("did you mean `instruct`?",)


def test_existing_output_is_a_note_when_nothing_will_be_written(adapters: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    text = two_inputs(adapters) + 'output a + b -> "out"\n'
    writing = check_source(Source(text), base_dir=tmp_path)
    assert codes(writing) == ["E018"]
    checking = check_source(Source(text), base_dir=tmp_path, writes=False)
    assert codes(checking) == ["W005"] and checking.ok
    assert any("--force" in line for line in checking.diagnostics[0].notes + checking.diagnostics[0].hints)
    forced = check_source(Source(text), base_dir=tmp_path, writes=False, force=True)
    assert codes(forced) == []


def test_unwritable_destinations_are_E018_at_check_time(adapters: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for written in ("afile/out", "afile/deeper/out", "dangling", "/proc/self/pemlang-out", "/sys/pemlang-out"):
        text = two_inputs(adapters) + f'output a + b -> "{written}"\n'
        for writes in (True, False):
            result = check_source(Source(text), base_dir=tmp_path, writes=writes, force=True)
            assert codes(result) == ["E018"], (written, result.diagnostics)
            diag = result.diagnostics[0]
            assert diag.span is not None and text[diag.span.start : diag.span.end] == f'"{written}"'
            assert diag.notes, diag


def test_a_read_only_parent_is_E018(adapters: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == readonly else real_access(p, mode))
    text = two_inputs(adapters) + 'output a + b -> "ro/new/out"\n'
    result = check_source(Source(text), base_dir=tmp_path)
    assert codes(result) == ["E018"]
    assert any("ro" in note for note in result.diagnostics[0].notes)


def test_check_and_plan_pass_with_an_existing_output_and_run_refuses(adapters: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from pemlang.cli import main

    (tmp_path / "out").mkdir()
    program = tmp_path / "p.pem"
    program.write_text(two_inputs(adapters) + 'output a + b -> "out"\n')
    assert main(["check", str(program)]) == 0
    assert main(["plan", str(program)]) == 0
    assert "warning[W005]" in capsys.readouterr().err
    assert main(["run", str(program), "--device", "cpu"]) == 1
    assert "error[E018]: output directory already exists" in capsys.readouterr().err


def test_symlink_loops_are_diagnostics(adapters: Path, tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    text = two_inputs(adapters) + 'input c = "loop"\noutput a + b -> "loop"\noutput a - b -> "loop/x"\n'
    result = check_source(Source(text), base_dir=tmp_path)
    assert [d.code for d in result.diagnostics if d.is_error] == ["E012", "E018", "E018"], result.diagnostics
