"""The checker's typing: the coefficients alpha/beta of SPEC §2, written out from the SPEC's table."""

from __future__ import annotations

from pathlib import Path

import pytest

from pemlang.check import InputRef, ModuleValue, check_source
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
