"""Text → AST. Lark parses each statement; its errors become E001 diagnostics.

A program is first split into statements (one per logical line; a newline inside parentheses
continues the statement), and each is parsed on its own, so every syntax error of a file is
reported in one run. The Lark transformer only builds nodes: no check runs inside it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from . import ast
from .diagnostics import Diagnostic, error
from .source import Source, Span
from .suggest import did_you_mean

# A line that plainly starts a new statement: a keyword, or an unindented `name =`.
_DEFINITION = re.compile(r"\s*(?:input\s+|param\s+)?([^\W\d]\w*)\s*=(?!=)")
_STATEMENT_START = re.compile(r"[ \t]*(input|param|output|mode|heads)[ \t]|[^\W\d]\w*[ \t]*=(?!=)")

# How deeply an expression may nest: operands of unary minus, right operands of binary operators
# and call arguments. A left-associative chain (`a + b + c + ...`) does not nest: every stage
# walks it in a loop, so it may be as long as memory allows.
MAX_NESTING = 200


def grammar_text() -> str:
    """The grammar: inside the installed package (wheel), or the repository's grammar/ folder."""
    packaged = resources.files("pemlang").joinpath("grammar/pem.lark")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "grammar" / "pem.lark").read_text(encoding="utf-8")


@lru_cache(maxsize=1)
def _lark() -> Lark:
    return Lark(grammar_text(), parser="lalr", propagate_positions=True, maybe_placeholders=False,
                cache=True)


# -- splitting into statements ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Chunk:
    start: int
    end: int
    unclosed: int | None = None  # offset of an opening parenthesis never closed
    unmatched: int | None = None  # offset of a closing parenthesis with no opening one


def _split(text: str) -> list[_Chunk]:
    chunks: list[_Chunk] = []
    start = 0
    opens: list[int] = []
    unmatched: int | None = None
    i = 0
    n = len(text)

    def close(end: int) -> None:
        nonlocal start, unmatched
        chunks.append(_Chunk(start, end, opens[0] if opens else None, unmatched))
        opens.clear()
        unmatched = None
        start = end + 1

    while i < n:
        ch = text[i]
        if ch == '"':
            i += 1
            while i < n and text[i] not in '"\n':
                i += 2 if text[i] == "\\" else 1
            if i < n and text[i] == '"':
                i += 1
            continue
        if ch == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if ch == "(":
            opens.append(i)
        elif ch == ")":
            if opens:
                opens.pop()
            elif unmatched is None:
                unmatched = i
        elif ch == "\n" and (not opens or _STATEMENT_START.match(text, i + 1)):
            # Inside parentheses a newline continues the statement, unless the next line plainly
            # starts a new statement: then the parenthesis was left open.
            close(i)
        i += 1
    close(n)
    return [c for c in chunks if _is_code(text[c.start : c.end])]


def _is_code(text: str) -> bool:
    return any(line.split("#", 1)[0].strip() for line in text.splitlines())


# -- the transformer: nodes only ----------------------------------------------------------------


def _unquote(token: str) -> str:
    return re.sub(r'\\(["\\])', r"\1", token[1:-1])


@v_args(meta=True)
class _Build(Transformer):
    def __init__(self, offset: int):
        super().__init__()
        self.offset = offset

    def _span(self, meta) -> Span:  # type: ignore[no-untyped-def]
        return Span(meta.start_pos + self.offset, meta.end_pos + self.offset)

    def _tok(self, token: Token) -> Span:
        assert token.start_pos is not None and token.end_pos is not None
        return Span(token.start_pos + self.offset, token.end_pos + self.offset)

    def _name(self, token: Token) -> ast.Name:
        return ast.Name(str(token), self._tok(token))

    def number(self, meta, children):  # type: ignore[no-untyped-def]
        return ast.Number(float(children[0]), self._span(meta))

    def name(self, meta, children):  # type: ignore[no-untyped-def]
        return self._name(children[0])

    def neg(self, meta, children):  # type: ignore[no-untyped-def]
        return ast.Neg(children[1], self._span(meta))

    def _binop(self, op: ast.BinaryOperator, meta, children):  # type: ignore[no-untyped-def]
        return ast.BinOp(op, children[0], children[2], self._span(meta))

    def add(self, meta, children):  # type: ignore[no-untyped-def]
        return self._binop("+", meta, children)

    def sub(self, meta, children):  # type: ignore[no-untyped-def]
        return self._binop("-", meta, children)

    def mul(self, meta, children):  # type: ignore[no-untyped-def]
        return self._binop("*", meta, children)

    def div(self, meta, children):  # type: ignore[no-untyped-def]
        return self._binop("/", meta, children)

    def paren(self, meta, children):  # type: ignore[no-untyped-def]
        # The parentheses vanish from the tree; the span widens to include them.
        return replace(children[0], span=self._span(meta))

    def keyword(self, meta, children):  # type: ignore[no-untyped-def]
        return ast.Keyword(self._name(children[0]), children[1], self._span(meta))

    def text_keyword(self, meta, children):  # type: ignore[no-untyped-def]
        name, text = children
        return ast.Keyword(self._name(name), ast.Text(_unquote(text), self._tok(text)), self._span(meta))

    def arguments(self, meta, children):  # type: ignore[no-untyped-def]
        return children

    def call(self, meta, children):  # type: ignore[no-untyped-def]
        arguments = children[1] if len(children) > 1 else []
        args = tuple(a for a in arguments if not isinstance(a, ast.Keyword))
        kwargs = tuple(a for a in arguments if isinstance(a, ast.Keyword))
        return ast.Call(self._name(children[0]), args, kwargs, self._span(meta))

    def mode_stmt(self, meta, children):  # type: ignore[no-untyped-def]
        return ast.ModeStmt(self._name(children[0]), self._span(meta))

    def input_stmt(self, meta, children):  # type: ignore[no-untyped-def]
        name, path, *base = children
        return ast.InputStmt(self._name(name), _unquote(path), self._tok(path), self._span(meta),
                             _unquote(base[0]) if base else None, self._tok(base[0]) if base else ast.Span(0, 0))

    def param_stmt(self, meta, children):  # type: ignore[no-untyped-def]
        return ast.ParamStmt(self._name(children[0]), children[1], self._span(meta))

    def binding(self, meta, children):  # type: ignore[no-untyped-def]
        return ast.Binding(self._name(children[0]), children[1], self._span(meta))

    def output_stmt(self, meta, children):  # type: ignore[no-untyped-def]
        value, *into, path = children
        return ast.OutputStmt(value, _unquote(path), self._tok(path), self._span(meta),
                              _unquote(into[0]) if into else None, self._tok(into[0]) if into else ast.Span(0, 0))

    def heads_stmt(self, meta, children):  # type: ignore[no-untyped-def]
        policy = str(children[0])
        source = self._name(children[1]) if len(children) > 1 else None
        return ast.HeadsStmt(policy, source, self._span(meta))  # type: ignore[arg-type]

    def expr_stmt(self, meta, children):  # type: ignore[no-untyped-def]
        return ast.ExprStmt(children[0], self._span(meta))

    def build(self, tree: Tree) -> ast.Statement:
        """Transform bottom-up in a loop (Lark's own transform recurses once per tree level)."""
        built: dict[int, object] = {}
        for subtree in tree.iter_subtrees():  # children come before their parents
            children = [built[id(c)] if isinstance(c, Tree) else c for c in subtree.children]
            built[id(subtree)] = self._call_userfunc(subtree, children)
        return built[id(tree)]  # type: ignore[return-value]


def _too_deep(stmt: ast.Statement) -> ast.Expr | None:
    """The first sub-expression nested more than MAX_NESTING levels deep, if any."""
    roots: list[ast.Expr] = []
    match stmt:
        case ast.ParamStmt(value=value) | ast.Binding(value=value) | ast.OutputStmt(value=value) \
                | ast.ExprStmt(value=value):
            roots.append(value)
    stack = [(root, 0) for root in roots]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            return node
        match node:
            case ast.BinOp(lhs=lhs, rhs=rhs):
                stack += [(rhs, depth + 1), (lhs, depth)]
            case ast.Neg(operand=operand):
                stack.append((operand, depth + 1))
            case ast.Call(args=args, kwargs=kwargs):
                stack += [(k.value, depth + 1) for k in reversed(kwargs) if not isinstance(k.value, ast.Text)]
                stack += [(a, depth + 1) for a in reversed(args)]
    return None


# -- syntax errors ------------------------------------------------------------------------------

_OPERAND_TERMINALS = {"NAME", "NUMBER", "LPAR", "MINUS"}
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": 'a quoted path ("...")',
    "$END": "the end of the statement",
    "<END-OF-FILE>": "the end of the statement",  # what Lark's fallback lexer calls it
    "HEADS_FROM": "'from'",
    "HEADS_DROP": "'drop'",
    "HEADS_MIX": "'mix'",
    "_INTO": "'into'",
    "_BASE": "'base'",
}


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_WORDS:
        return _TERMINAL_WORDS[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name
    if pattern.type == "str":
        return f"'{pattern.value}'"
    return {"PLUS": "'+'", "MINUS": "'-'", "STAR": "'*'", "SLASH": "'/'"}.get(name, name.lower())


_KEYWORDS = {"_INTO": "into", "_BASE": "base", "HEADS_FROM": "from", "HEADS_DROP": "drop", "HEADS_MIX": "mix"}


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of statement"
    if token.type == "NAME":
        return f"name '{token}'"
    if token.type == "NUMBER":
        return f"number {token}"
    if token.type == "STRING":
        return f"string {token}"
    return f"'{token}'"


def _plausible(expected: set[str], before: str) -> set[str]:
    """Drop terminals that LALR's merged lookahead sets allow but this context cannot use."""
    code = before.split("#", 1)[0]
    if code.count("(") <= code.count(")"):
        expected = expected - {"RPAR", "COMMA"}
    if not code.lstrip().startswith("output"):
        expected = expected - {"__ANON_0", "_INTO"}
    if {"PLUS", "STAR"} <= expected:
        expected = expected - {"LPAR"}  # a call's '(' after a name: rarely what was meant
    return expected


def _syntax_error(exc: UnexpectedInput, source: Source, chunk: _Chunk) -> Diagnostic:
    text = source.text
    if isinstance(exc, UnexpectedCharacters):
        pos = chunk.start + (exc.pos_in_stream or 0)
        char = text[pos]
        char_hints: list[str] = []
        if char == "'":
            char_hints.append('strings are written in double quotes: "adapters/name"')
        elif char == '"':
            char_hints.append("this string is not closed before the end of the line")
        return error("E001", f"unexpected character {char!r}", source, Span(pos, pos + 1), hints=char_hints)
    assert isinstance(exc, UnexpectedToken)
    token = exc.token
    expected = set(exc.expected)
    if token.type == "$END":
        end = chunk.end
        while end > chunk.start and text[end - 1].isspace():
            end -= 1
        # Point just past the last character of the statement (ignoring a trailing comment).
        stmt = text[chunk.start : end]
        code_end = chunk.start + len(stmt.split("#", 1)[0].rstrip()) if "#" in stmt else end
        span = Span(code_end, code_end)
    else:
        span = Span(chunk.start + token.start_pos, chunk.start + token.end_pos)  # type: ignore[operator]
    expected = _plausible(expected, text[chunk.start : span.start])
    notes: list[str] = []
    hints: list[str] = []
    if {"NUMBER", "LPAR"} <= expected:
        found = "the end of the statement" if token.type == "$END" else _describe_token(token)
        message = f"expected an expression, found {found}"
    else:
        message = f"unexpected {_describe_token(token)}"
        words = sorted({_describe_terminal(t) for t in expected})
        if words:
            notes.append("expected " + (", ".join(words[:-1]) + " or " + words[-1] if len(words) > 1
                                         else words[0]))
    before = text[chunk.start : span.start].split("#", 1)[0]
    keyword = (did_you_mean(str(token).lower(), sorted(_KEYWORDS[t] for t in expected if t in _KEYWORDS))
               if token.type == "NAME" else [])
    if keyword:  # a misspelt keyword: `intoo`, `bsae`
        hints += keyword
    elif token.type == "NAME" and "STRING" in expected:
        rest = text[span.start : chunk.end].split("#", 1)[0].strip()
        path = re.split(r'\s+(?:->|into|base)(?:\s|"|$)|"|\s+#', rest, maxsplit=1)[0].strip()
        hints.append(f'paths are written in double quotes: "{path}"')
    elif str(token) == "into" and before.lstrip().startswith("output") and "->" in before:
        hints.append('`into "BASE"` comes before the arrow: output EXPR into "BASE" -> "DIR"')
    elif token.type in {"NAME", "NUMBER", "LPAR"} and {"PLUS", "STAR"} <= expected:
        hints.append("an operator (+ - * /) may be missing before this")
    elif token.type == "STRING" and "__ANON_0" in expected:
        hints.append('an output is written `output NAME -> "path"`')
    return error("E001", message, source, span, notes=notes, hints=hints)


# -- entry points -------------------------------------------------------------------------------


MAX_SYNTAX_ERRORS = 200  # then parsing stops: a file with more is not a program with typos


def parse_program(source: Source) -> tuple[ast.Program, list[Diagnostic]]:
    """Parse a whole program; statements with syntax errors are left out and reported (up to
    MAX_SYNTAX_ERRORS, then parsing stops with one more diagnostic saying so)."""
    statements: list[ast.Statement] = []
    diagnostics: list[Diagnostic] = []
    broken: set[str] = set()
    for chunk in _split(source.text):
        stmt, diag = _parse_chunk(source, chunk)
        if diag is not None:
            if len(diagnostics) == MAX_SYNTAX_ERRORS:
                diagnostics.append(error("E001", f"more than {MAX_SYNTAX_ERRORS} syntax errors: stopped reading here",
                                         source, Span(chunk.start, chunk.start + 1),
                                         hints=["is this a pemlang program? (a .pem file or a config)"]))
                break
            diagnostics.append(diag)
            if defined := _DEFINITION.match(source.text, chunk.start):
                broken.add(defined.group(1))
        elif stmt is not None:
            statements.append(stmt)
    return ast.Program(tuple(statements), frozenset(broken)), diagnostics


def _parse_chunk(source: Source, chunk: _Chunk) -> tuple[ast.Statement | None, Diagnostic | None]:
    if chunk.unmatched is not None:
        return None, error("E001", "unmatched ')'", source, Span(chunk.unmatched, chunk.unmatched + 1),
                           hints=["remove it, or add the '(' it closes"])
    if chunk.unclosed is not None:
        return None, error("E001", "unclosed parenthesis", source, Span(chunk.unclosed, chunk.unclosed + 1),
                           hints=["add the ')' that closes it"])
    text = source.text[chunk.start : chunk.end]
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        return None, _syntax_error(exc, source, chunk)
    stmt = _Build(chunk.start).build(tree)
    deep = _too_deep(stmt)
    if deep is not None:
        return None, error("E001", f"expression nested deeper than {MAX_NESTING} levels", source,
                           Span(deep.span.start, deep.span.start + 1),
                           notes=["each operator, unary minus and call inside another nests one level "
                                  "(parentheses alone do not)"],
                           hints=["bind the inner parts to names (`x = ...`) and combine the names"])
    return stmt, None


def parse_expression(source: Source) -> tuple[ast.Expr | None, list[Diagnostic]]:
    """Parse text that must be a single bare expression (e.g. `pemlang eval`)."""
    program, diagnostics = parse_program(source)
    if diagnostics:
        return None, diagnostics
    stmts = program.statements
    if len(stmts) == 1 and isinstance(stmts[0], ast.ExprStmt):
        return stmts[0].value, []
    span = stmts[0].span if stmts else Span(0, len(source.text))
    return None, [error("E001", "expected a single expression", source, span,
                        hints=["statements such as `input` or bindings belong in a .pem file"])]
