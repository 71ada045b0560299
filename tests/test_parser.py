"""The grammar and parser: structure, aliases, spans, and laws checked with hypothesis."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pemlang import ast
from pemlang.ast import BinOp, Call, Keyword, Name, Neg, Number
from pemlang.parser import parse_expression, parse_program
from pemlang.source import Source


def expr(text: str) -> ast.Expr:
    value, diagnostics = parse_expression(Source(text))
    assert not diagnostics, diagnostics
    assert value is not None
    return value


def test_precedence_and_associativity() -> None:
    a, b, c = Name("a"), Name("b"), Name("c")
    assert expr("a + b * c") == BinOp("+", a, BinOp("*", b, c))
    assert expr("a - b - c") == BinOp("-", BinOp("-", a, b), c)
    assert expr("a / b / c") == BinOp("/", BinOp("/", a, b), c)
    # unary minus binds tighter than *
    assert expr("-a * b") == BinOp("*", Neg(a), b)
    assert expr("2 * -a") == BinOp("*", Number(2), Neg(a))
    assert expr("(a + b) * c") == BinOp("*", BinOp("+", a, b), c)


def test_paper_symbols_are_aliases() -> None:
    assert expr("a ⊕ b") == expr("a + b")
    assert expr("a ⊖ b") == expr("a - b")
    assert expr("⊖a") == expr("-a")
    assert expr("0.5·a × 2") == expr("0.5*a*2")


def test_numbers_names_and_calls() -> None:
    assert expr(".5") == Number(0.5)
    assert expr("1e-3") == Number(0.001)
    assert expr("2.") == Number(2.0)
    assert expr("θ_tox") == Name("θ_tox")
    assert expr("λ*a") == BinOp("*", Name("λ"), Name("a"))
    assert expr("svd(a + b, rank=8)") == Call(Name("svd"), (BinOp("+", Name("a"), Name("b")),),
                                              (Keyword(Name("rank"), Number(8)),))


def test_statements() -> None:
    text = '''# a comment
mode exact
input amazon_cls = "adapters/amazon_cls"   # trailing comment
param lam = 0.5
yelp_cls = lam*amazon_cls + (1 - lam)*(yelp_lm
                                      - amazon_lm)
heads from amazon_cls
output yelp_cls -> "out/yelp_cls"
'''
    program, diagnostics = parse_program(Source(text))
    assert not diagnostics
    kinds = [type(s).__name__ for s in program.statements]
    assert kinds == ["ModeStmt", "InputStmt", "ParamStmt", "Binding", "HeadsStmt", "OutputStmt"]
    input_stmt = program.statements[1]
    assert isinstance(input_stmt, ast.InputStmt) and input_stmt.path == "adapters/amazon_cls"
    assert text[input_stmt.path_span.start : input_stmt.path_span.end] == '"adapters/amazon_cls"'


def test_spans_point_at_the_source() -> None:
    text = "x = a + (b - c) * 2"
    program, _ = parse_program(Source(text))
    binding = program.statements[0]
    assert isinstance(binding, ast.Binding)
    value = binding.value
    assert isinstance(value, BinOp)
    assert text[value.span.start : value.span.end] == "a + (b - c) * 2"
    assert isinstance(value.rhs, BinOp)
    assert text[value.rhs.span.start : value.rhs.span.end] == "(b - c) * 2"
    assert isinstance(value.rhs.lhs, BinOp)
    assert text[value.rhs.lhs.span.start : value.rhs.lhs.span.end] == "(b - c)"


def test_every_broken_statement_is_reported() -> None:
    text = "x = a +\ny = (b\nz = c d\nw = 1\n"
    program, diagnostics = parse_program(Source(text, "t.pem"))
    assert [d.code for d in diagnostics] == ["E001", "E001", "E001"]
    assert [Source(text).line_col(d.span.start)[0] for d in diagnostics] == [1, 2, 3]  # type: ignore[union-attr]
    assert program.statements == (ast.Binding(Name("w"), Number(1)),)


@pytest.mark.parametrize(("line", "caret", "hint"), [
    ('output a intoo "b" -> "o"', "intoo", "did you mean `into`?"),
    ('input x = "a" basee "o/n"', "basee", "did you mean `base`?"),
    ("heads fromx a", "fromx", "did you mean `from`?"),
    ('output a -> "o" into "b"', "into", '`into "BASE"` comes before the arrow: output EXPR into "BASE" -> "DIR"'),
    ('output a into adapters/base -> "o"', "adapters", 'paths are written in double quotes: "adapters/base"'),
    ("output a -> out/m  # a comment", "out", 'paths are written in double quotes: "out/m"'),
])
def test_a_misspelt_or_misplaced_keyword_is_named(line: str, caret: str, hint: str) -> None:
    """A keyword is a whole word: `intoo` is a name (not `into` then `o`), and the error says which
    keyword was likely meant; a path's quoting hint stops where the path does."""
    _, diagnostics = parse_program(Source(line + "\n", "t.pem"))
    assert len(diagnostics) == 1 and diagnostics[0].code == "E001"
    assert diagnostics[0].span is not None
    assert line[diagnostics[0].span.start:diagnostics[0].span.end] == caret
    assert list(diagnostics[0].hints) == [hint]


def test_keywords_are_words_names_may_start_with() -> None:
    text = ('input base = "a" base "o/n"\ninput intoo = "b"\nfromage = base + intoo\n'
            'output fromage into"m" -> "o"\nheads from base\n')
    program, diagnostics = parse_program(Source(text, "t.pem"))
    assert diagnostics == []
    assert [type(s).__name__ for s in program.statements] == ["InputStmt", "InputStmt", "Binding", "OutputStmt",
                                                              "HeadsStmt"]
    output = program.statements[3]
    assert isinstance(output, ast.OutputStmt) and output.into == "m" and output.path == "o"


# -- laws ---------------------------------------------------------------------------------------

names = st.sampled_from(["a", "b", "amazon_cls", "λ", "θ_tox", "yelp_lm", "x1"])
numbers = st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False) | st.integers(0, 1000).map(float)


def expressions(depth: int = 4) -> st.SearchStrategy[ast.Expr]:
    leaves = st.one_of(numbers.map(Number), names.map(Name))
    return st.recursive(
        leaves,
        lambda inner: st.one_of(
            inner.map(Neg),
            st.tuples(st.sampled_from(["+", "-", "*", "/"]), inner, inner).map(lambda t: BinOp(*t)),
            st.tuples(names, st.lists(inner, max_size=2), st.lists(st.tuples(names, inner), max_size=2)).map(
                lambda t: Call(Name(t[0]), tuple(t[1]), tuple(Keyword(Name(k), v) for k, v in t[2]))),
        ),
        max_leaves=12,
    )


statements = st.one_of(
    st.tuples(names, expressions()).map(lambda t: ast.Binding(Name(t[0]), t[1])),
    st.tuples(names, expressions()).map(lambda t: ast.ParamStmt(Name(t[0]), t[1])),
    st.tuples(names, st.text(alphabet=string.ascii_letters + '/_."\\ λ', max_size=20)).map(
        lambda t: ast.InputStmt(Name(t[0]), t[1])),
    st.tuples(expressions(), st.text(alphabet=string.ascii_letters + "/_.", max_size=20)).map(
        lambda t: ast.OutputStmt(t[0], t[1])),
    st.sampled_from(["paper", "exact"]).map(lambda m: ast.ModeStmt(Name(m))),
    names.map(lambda n: ast.HeadsStmt("from", Name(n))),
    st.sampled_from(["drop", "mix"]).map(lambda p: ast.HeadsStmt(p)),  # type: ignore[arg-type]
)


@given(st.lists(statements, max_size=6))
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_print_then_parse_is_identity(stmts: list[ast.Statement]) -> None:
    program = ast.Program(tuple(stmts))
    text = ast.format_program(program)
    reparsed, diagnostics = parse_program(Source(text))
    assert not diagnostics, (text, diagnostics)
    assert reparsed == program


TOKENS = ["a", "b", "λ", "1", ".5", "2e3", "+", "-", "*", "/", "⊕", "⊖", "·", "×", "(", ")", ",", "=",
          "->", '"p"', "input", "param", "output", "mode", "heads", "from", "drop", "svd", "rank", "\n",
          " ", "#", "\"", "$", "'", "\t", "\\"]


def _check_diagnostics_are_well_formed(text: str) -> None:
    source = Source(text, "soup.pem")
    _, diagnostics = parse_program(source)
    for d in diagnostics:
        assert d.code == "E001"
        assert d.span is not None and 0 <= d.span.start <= d.span.end <= len(text)
        from pemlang.diagnostics import render

        rendered = render(d)
        assert rendered.startswith("error[E001]: ")
        assert "soup.pem:" in rendered


@given(st.lists(st.sampled_from(TOKENS), max_size=30).map("".join))
@settings(max_examples=400)
def test_token_soup_gives_only_diagnostics(text: str) -> None:
    _check_diagnostics_are_well_formed(text)


@given(st.text(max_size=60))
@settings(max_examples=300)
def test_arbitrary_text_gives_only_diagnostics(text: str) -> None:
    _check_diagnostics_are_well_formed(text)


# -- hardening (issue 8) -------------------------------------------------------------------------


def test_long_left_associative_chains_parse_and_print() -> None:
    text = " + ".join(f"x{i}" for i in range(5000)) + " * 2 - y / 3"
    value = expr(text)
    depth = 0
    node = value
    while isinstance(node, BinOp):
        node, depth = node.lhs, depth + 1
    assert depth == 5000 and node == Name("x0")  # 4999 `+` and one `-` on the left spine
    printed = ast.format_expr(value)
    assert printed == text
    assert ast.format_expr(expr(printed)) == text  # (== on 5,000-deep dataclasses would recurse)


def test_deep_nesting_is_one_diagnostic_at_the_place() -> None:
    text = "x = 1\ny = a + " + "-(" * 400 + "b" + ")" * 400 + "\nz = 2\n"
    program, diagnostics = parse_program(Source(text, "deep.pem"))
    assert [d.code for d in diagnostics] == ["E001"]
    (diag,) = diagnostics
    assert "nested deeper than" in diag.message
    assert diag.span is not None and Source(text).line_col(diag.span.start)[0] == 2
    assert program.statements == (ast.Binding(Name("x"), Number(1)), ast.Binding(Name("z"), Number(2)))
    # 200 levels still parse (and print back)
    ok = "-(" * 200 + "b" + ")" * 200
    assert ast.format_expr(expr(ok)) == "-" * 200 + "b"


def test_numbers_that_do_not_fit_a_float_print_and_reparse() -> None:
    assert expr("1e400") == Number(float("inf"))
    assert expr(ast.format_number(float("inf"))) == Number(float("inf"))
    assert ast.format_number(1e300) == "1e+300"
    assert ast.format_number(float("nan")) == "nan"


def test_read_source_accepts_a_bom_and_any_newline(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pemlang.sourcefiles import read_source

    path = tmp_path / "p.pem"
    path.write_bytes(b"\xef\xbb\xbfx = 1\r\ny = 2\rz = 3\n")
    source = read_source(path)
    assert source.text == "x = 1\ny = 2\nz = 3\n" and source.filename == str(path)
    program, diagnostics = parse_program(source)
    assert not diagnostics and len(program.statements) == 3


def test_read_source_reports_invalid_utf8_at_the_first_bad_byte(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pemlang.diagnostics import PemError, render
    from pemlang.sourcefiles import read_source

    path = tmp_path / "bad.pem"
    path.write_bytes(b"x = 1\ny = \xce\xbb + \xff\xfe b\n")  # line 2: `y = λ + ` then a bad byte
    try:
        read_source(path)
    except PemError as exc:
        (diag,) = exc.diagnostics
    else:
        raise AssertionError("invalid UTF-8 was accepted")
    assert diag.code == "E001" and "UTF-8" in diag.message
    assert diag.location() == f"{path}:2:9"  # columns count characters: λ is one
    assert "byte 0xff" in " ".join(diag.notes)
    assert "^" in render(diag)


def test_every_reader_of_program_files_accepts_cr_and_reports_bad_utf8(adapters, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import pemlang
    from pemlang.cli import main
    from pemlang.diagnostics import PemError

    text = f'input a = "{adapters}/llama_r8"\rinput b = "{adapters}/llama_r8_b"\r\noutput a + b -> "out"\r'
    compiled = pemlang.compile(text=text, base_dir=tmp_path)  # `\r` ends a line, as the CLI reads it
    assert len(compiled.plan().outputs) == 1
    path = tmp_path / "p.pem"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    pemlang.compile(file=path)  # no CompileError
    assert main(["check", str(path)]) == 0
    path.write_bytes(b"x = 1\n\xc3(\n")
    assert main(["check", str(path)]) == 1
    assert f"error[E001]: this file is not valid UTF-8\n --> {path}:2:1" in capsys.readouterr().err
    try:
        pemlang.compile(file=path)
    except PemError as exc:
        assert exc.diagnostics[0].location() == f"{path}:2:1"
    else:
        raise AssertionError("compile(file=) accepted invalid UTF-8")
