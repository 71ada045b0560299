"""The typed program the checker produces, and lowering, running and the faces consume: each
module-valued expression a linear form Σ (alpha, beta) · source over the inputs and function results
(alpha scales A, beta scales B), scalars folded, the outputs, and the settings a program was checked with."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import ast
from .adapters import Adapter
from .basemodel import BaseModel, Change
from .diagnostics import Diagnostic
from .operators import OPERATORS
from .source import Source, Span
from .types import ModuleType

Mode = Literal["paper", "exact"]
MODES: tuple[Mode, ...] = ("paper", "exact")

_call_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class InputRef:
    """A term's source: one input adapter, by name."""

    name: str

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, eq=False)
class CallRef:
    """A term's source: a function's result (`svd`, `prune`, `dare`, `ties`; see operators.py)
    over module arguments, with its options (`rank`, `density`…).

    Compared by identity: each call is its own source."""

    op: str
    args: tuple[ModuleValue, ...]
    options: tuple[tuple[str, float | str], ...]
    id: int = field(default_factory=lambda: next(_call_ids))
    text: str = field(default="f(...)", compare=False)

    def describe(self) -> str:
        return self.text

    def option(self, name: str) -> float | str:
        return dict(self.options)[name]

    @property
    def dense(self) -> bool:
        """Whether the result is a dense ΔW per layer (the element-wise merges)."""
        return OPERATORS[self.op].dense


TermSource = InputRef | CallRef


@dataclass(frozen=True, slots=True)
class Term:
    """`alpha` scales A (paper mode); `beta` scales B, (IA)3 offsets and heads (paper mode's λ·(A, B) and ⊖)."""

    source: TermSource
    alpha: float
    beta: float


@dataclass(frozen=True)
class ScalarValue:
    value: float


@dataclass(frozen=True)
class ModuleValue:
    """A linear form Σ (alpha_i, beta_i) · source_i, and its module type."""

    terms: tuple[Term, ...]
    type: ModuleType

    @property
    def label(self) -> str:
        """A name to speak of this value by in notes: its first source."""
        return self.terms[0].source.describe() if self.terms else "0"

    def scaled(self, factor: float) -> ModuleValue:
        """λ·(A, B) = (λA, λB)."""
        return ModuleValue(tuple(Term(t.source, t.alpha * factor, t.beta * factor) for t in self.terms),
                           self.type)

    def negated(self) -> ModuleValue:
        """⊖(A, B) = (A, −B): alpha is kept, beta changes sign."""
        return ModuleValue(tuple(Term(t.source, t.alpha, -t.beta) for t in self.terms), self.type)

    def plus(self, other: ModuleValue, combined: ModuleType) -> ModuleValue:
        """(A1, B1) ⊕ (A2, B2): coefficients add; a source that occurs twice is one term."""
        merged: dict[TermSource, Term] = {}
        for term in self.terms + other.terms:
            if term.source in merged:
                old = merged[term.source]
                merged[term.source] = Term(term.source, old.alpha + term.alpha, old.beta + term.beta)
            else:
                merged[term.source] = term
        return ModuleValue(tuple(merged.values()), combined)

    def input_betas(self) -> dict[str, float]:
        """beta per input, with function results expanded into the inputs they came from as the
        function combines them: `ties` is the mean of its arguments, the others pass their one
        argument on (what heads, which no function acts on, follow)."""
        betas: dict[str, float] = {}
        for term in self.terms:
            if isinstance(term.source, InputRef):
                betas[term.source.name] = betas.get(term.source.name, 0.0) + term.beta
            else:
                share = 1 / len(term.source.args) if OPERATORS[term.source.op].mean else 1.0
                for arg in term.source.args:
                    for name, inner in arg.input_betas().items():
                        betas[name] = betas.get(name, 0.0) + term.beta * share * inner
        return betas

    @property
    def means(self) -> list[str]:
        """The functions in this value that are a mean of their arguments (`ties(…)`), as written."""
        return [found for t in self.terms if isinstance(t.source, CallRef)
                for found in ([t.source.text] if OPERATORS[t.source.op].mean else [])
                + [m for arg in t.source.args for m in arg.means]]

    def leaf_inputs(self) -> list[str]:
        """The inputs this value names, through the functions in it, in order of appearance (what a
        space, `core` or `knots`, aligns)."""
        names: dict[str, None] = {}
        for term in self.terms:
            if isinstance(term.source, InputRef):
                names[term.source.name] = None
            else:
                for arg in term.source.args:
                    names.update(dict.fromkeys(arg.leaf_inputs()))
        return list(names)

    def first_call(self, wanted: Callable[[CallRef], bool]) -> CallRef | None:
        """The first function call in this value (outermost first) that `wanted` accepts."""
        for term in self.terms:
            if isinstance(term.source, CallRef):
                if wanted(term.source):
                    return term.source
                for arg in term.source.args:
                    found = arg.first_call(wanted)
                    if found is not None:
                        return found
        return None

    @property
    def ranks_from_data(self) -> bool:
        """Whether its ranks are chosen from the data when it runs (`svd(…, energy=e)`, or a low-rank
        value made of one): its type's ranks are then upper bounds."""
        return any(isinstance(t.source, CallRef) and not t.source.dense and t.beta != 0
                   and ("energy" in dict(t.source.options) or any(a.ranks_from_data for a in t.source.args))
                   for t in self.terms)

    @property
    def dense(self) -> bool:
        """Whether this value holds a dense ΔW per layer (a merge not yet reduced by `svd`)."""
        return any(isinstance(t.source, CallRef) and t.source.dense for t in self.terms)  # whatever its coefficient


class Poison:
    """The value of an expression whose error was already reported (stops cascades)."""


POISON = Poison()
Value = ScalarValue | ModuleValue | Poison


@dataclass
class Entry:
    """A name in scope."""

    kind: Literal["input", "param", "binding"]
    value: Value
    span: Span
    used: bool = False
    source: Source | None = None  # where the name was defined, when not the program (eval's --input)


@dataclass(frozen=True)
class Override:
    """A `--set NAME=VALUE` from the command line, with its own source for diagnostics."""

    name: str
    value: float
    source: Source
    what: str = "--set"  # how the user gave it, for messages: `--set`, `params`


# Where the program came from, for hints that name a setting: a .pem file or config ("program"),
# `pemlang eval`'s options ("cli"), or `pemlang.compile(expression)`'s arguments ("api").
Spelling = Literal["program", "cli", "api"]
_SPELLINGS = {"program": ("`mode {}`", "`heads {}`"), "cli": ("`--mode {}`", "`--heads \"{}\"`"),
              "api": ("`mode=\"{}\"`", "`heads=\"{}\"`")}


def spell_mode(spelling: Spelling, value: str = "exact") -> str:
    """`mode exact` as the user would write it where the program came from."""
    return _SPELLINGS[spelling][0].format(value)


def spell_heads(spelling: Spelling, value: str) -> str:
    """`heads from NAME` / `heads drop` as the user would write it where the program came from."""
    return _SPELLINGS[spelling][1].format(value)


@dataclass(frozen=True)
class CheckedOutput:
    name: str | None
    expression: str
    path: Path | None  # None: evaluated to tensors only (the Python API)
    value: ModuleValue
    span: Span
    expr_span: Span | None = None
    source: Source | None = None  # where expr_span is (a config's output has its own), when not the program's
    into: BaseModel | None = None  # `into "BASE"`: the base model the output is merged into (a full model)
    changes: tuple[Change, ...] = ()  # with `into`: the base tensors the module changes


@dataclass(frozen=True)
class CheckedProgram:
    """The typed program: what lowering needs, and every diagnostic found."""

    source: Source
    mode: Mode
    inputs: dict[str, Adapter]
    params: dict[str, float]
    outputs: tuple[CheckedOutput, ...]
    heads: ast.HeadsStmt | None
    diagnostics: tuple[Diagnostic, ...]
    input_written: dict[str, str] = field(default_factory=dict)  # paths as the program wrote them
    input_spans: dict[str, tuple[Source, Span]] = field(default_factory=dict)
    spelling: Spelling = "program"

    @property
    def ok(self) -> bool:
        return not any(d.is_error for d in self.diagnostics)
