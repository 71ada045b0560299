"""The abstract syntax tree: frozen, slotted dataclasses whose spans are left out of equality,
so tests compare trees structurally. `format_program` / `format_expr` print a tree back as source
that re-parses to an equal tree."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from .source import Span

BinaryOperator = Literal["+", "-", "*", "/"]
HeadsPolicy = Literal["from", "drop", "mix"]

_NO_SPAN = Span(0, 0)


@dataclass(frozen=True, slots=True)
class Number:
    value: float
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Name:
    id: str
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Expr
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class BinOp:
    op: BinaryOperator
    lhs: Expr
    rhs: Expr
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Text:
    """A string argument of a function (`sign="total"`); not a value of its own."""

    value: str
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Keyword:
    name: Name
    value: Expr | Text
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Call:
    func: Name
    args: tuple[Expr, ...] = ()
    kwargs: tuple[Keyword, ...] = ()
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


Expr: TypeAlias = Number | Name | Neg | BinOp | Call


@dataclass(frozen=True, slots=True)
class ModeStmt:
    mode: Name
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class InputStmt:
    name: Name
    path: str
    path_span: Span = field(default=_NO_SPAN, compare=False, repr=False)
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)
    base: str | None = None  # `base "org/name"`: the program states the base the input was trained on
    base_span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ParamStmt:
    name: Name
    value: Expr
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Binding:
    name: Name
    value: Expr
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class OutputStmt:
    value: Expr
    path: str
    path_span: Span = field(default=_NO_SPAN, compare=False, repr=False)
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)
    into: str | None = None  # `output x into "BASE" -> "DIR"`: a full model, x merged into the base model BASE
    into_span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class HeadsStmt:
    policy: HeadsPolicy
    source: Name | None = None
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class ExprStmt:
    value: Expr
    span: Span = field(default=_NO_SPAN, compare=False, repr=False)


Statement: TypeAlias = ModeStmt | InputStmt | ParamStmt | Binding | OutputStmt | HeadsStmt | ExprStmt


@dataclass(frozen=True, slots=True)
class Program:
    statements: tuple[Statement, ...]
    # Names whose defining statement had a syntax error: their uses are not reported again.
    broken_names: frozenset[str] = field(default=frozenset(), compare=False)


# -- printing ---------------------------------------------------------------------------------

_PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}
_UNARY = 3
_ATOM = 4


def _precedence(expr: Expr) -> int:
    match expr:
        case BinOp(op=op):
            return _PRECEDENCE[op]
        case Neg():
            return _UNARY
        case _:
            return _ATOM


def format_number(value: float) -> str:
    """A number as source text that reads back as the same float (`1`, `0.5`, `1e-05`)."""
    if math.isnan(value):
        return "nan"  # no literal reads as NaN; shown in messages only
    if math.isinf(value):
        return "1e999" if value > 0 else "-1e999"  # reads back as infinity, as `1e400` does
    if value == int(value) and abs(value) < 1e16:
        return str(int(value))
    return repr(value)


def format_expr(expr: Expr) -> str:
    """Source text for an expression, with only the parentheses precedence needs."""
    match expr:
        case Number(value=value):
            return format_number(value)
        case Name(id=ident):
            return ident
        case Neg(operand=operand):
            inner = format_expr(operand)
            return f"-({inner})" if _precedence(operand) < _UNARY else f"-{inner}"
        case BinOp():
            # A left-associative chain `a + b + c + ...` is printed in a loop, however long.
            spine: list[BinOp] = []
            node: Expr = expr
            while isinstance(node, BinOp):
                spine.append(node)
                node = node.lhs
            text = format_expr(node)
            for binop in reversed(spine):
                prec = _PRECEDENCE[binop.op]
                if _precedence(binop.lhs) < prec:
                    text = f"({text})"
                right = format_expr(binop.rhs)
                if _precedence(binop.rhs) <= prec:  # left-associative: a - (b - c) keeps its parentheses
                    right = f"({right})"
                text = f"{text} {binop.op} {right}"
            return text
        case Call(func=func, args=args, kwargs=kwargs):
            parts = [format_expr(a) for a in args]
            parts += [f"{k.name.id}={format_string(k.value.value) if isinstance(k.value, Text) else format_expr(k.value)}"
                      for k in kwargs]
            return f"{func.id}({', '.join(parts)})"
    raise TypeError(f"not an expression: {expr!r}")


def format_string(text: str) -> str:
    """A path as a double-quoted string literal (only `\\` and `"` are escaped)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def format_statement(stmt: Statement) -> str:
    """Source text for one statement."""
    match stmt:
        case ModeStmt(mode=mode):
            return f"mode {mode.id}"
        case InputStmt(name=name, path=path, base=base):
            return f"input {name.id} = {format_string(path)}" + (f" base {format_string(base)}" if base else "")
        case ParamStmt(name=name, value=value):
            return f"param {name.id} = {format_expr(value)}"
        case Binding(name=name, value=value):
            return f"{name.id} = {format_expr(value)}"
        case OutputStmt(value=value, path=path, into=into):
            merged = f" into {format_string(into)}" if into is not None else ""
            return f"output {format_expr(value)}{merged} -> {format_string(path)}"
        case HeadsStmt(policy="from", source=source):
            assert source is not None
            return f"heads from {source.id}"
        case HeadsStmt(policy=policy):
            return f"heads {policy}"
        case ExprStmt(value=value):
            return format_expr(value)
    raise TypeError(f"not a statement: {stmt!r}")


def format_program(program: Program) -> str:
    """Source text for a whole program, one statement a line."""
    return "".join(format_statement(s) + "\n" for s in program.statements)
