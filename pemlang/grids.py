"""A param's range or grid as written on the command line: `NAME=LO:HI` (a range) and
`NAME=LO:HI:STEP` (a grid: both ends included, the step dividing the range into whole steps).

One parser and one rule for `tune --param`, `run --sweep` and the API: every problem is an E029
diagnostic pointing into the text, and a grid is counted, in decimal from the numbers as written,
before any of its points is built (`GridValues` computes each point when it is asked for)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from decimal import Context, Decimal, Inexact, InvalidOperation, Overflow, localcontext
from typing import overload

from .diagnostics import PemError, error
from .source import Source, Span

RANGE_FORMS = "write NAME=LO:HI for a range, NAME=LO:HI:STEP for a grid, e.g. λ=0:1:0.1"
GRID_FORMS = "write NAME=LO:HI:STEP (both ends included) or a list NAME=V1,V2,..., e.g. λ=0:1:0.1"

# Wide enough that LO, HI and the count of steps between them are exact for any finite bounds.
# An operation that would round, overflow or need more digits (DivisionImpossible) raises.
_EXACT = Context(prec=2000, Emax=999_999, Emin=-999_999, traps=[Inexact, Overflow, InvalidOperation])


@dataclass(frozen=True)
class GridValues(Sequence[float]):
    """The points LO, LO+STEP, …, LO+(count-1)·STEP, each computed in decimal when asked for (0:1:0.1
    gives 0.3, not 0.30000000000000004); `len` is free, so a grid is counted without being built."""

    low: Decimal
    step: Decimal
    count: int

    def __len__(self) -> int:
        return self.count

    @overload
    def __getitem__(self, index: int) -> float: ...
    @overload
    def __getitem__(self, index: slice) -> list[float]: ...
    def __getitem__(self, index: int | slice) -> float | list[float]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.count))]
        if index < 0:
            index += self.count
        if not 0 <= index < self.count:
            raise IndexError("grid index out of range")
        return float(self.low + index * self.step)

    def __iter__(self) -> Iterator[float]:
        return (float(self.low + i * self.step) for i in range(self.count))


@dataclass(frozen=True)
class ParsedRange:
    """`NAME=LO:HI` or `NAME=LO:HI:STEP` as written: exact decimals, and for a grid its point count."""

    name: str
    low: Decimal
    high: Decimal
    step: Decimal | None
    count: int | None  # the grid's points; None for a range
    text: str

    @property
    def values(self) -> GridValues:
        """The grid's points (lazily); ValueError for a range."""
        if self.step is None or self.count is None:
            raise ValueError(f"{self.name} has no step")
        return GridValues(self.low, self.step, self.count)


def range_error(text: str, message: str, start: int = 0, end: int | None = None, hints: Sequence[str] = (),
                *, label: str = "--param") -> PemError:
    """An E029 diagnostic pointing into `text` (the argument of `label`)."""
    end = len(text) if end is None else end
    forms = GRID_FORMS if label == "--sweep" else RANGE_FORMS
    return PemError([error("E029", message, Source(text, label), Span(start, max(end, start + 1)),
                           hints=hints or [forms])])


def grid_count(low: Decimal, high: Decimal, step: Decimal) -> tuple[int, bool]:
    """How many points LO:HI:STEP has from LO (both ends included), and whether STEP divides HI − LO
    into whole steps; exact (ArithmeticError when the count is beyond any limit)."""
    with localcontext(_EXACT):
        steps, remainder = divmod(high - low, step)
    return int(steps) + 1, remainder == 0


def parse_number(text: str, start: int, end: int, name: str, *, label: str) -> Decimal:
    """The number written at text[start:end], finite as a float; E029 otherwise."""
    piece = text[start:end].strip()
    try:
        number = Decimal(piece)
    except InvalidOperation:
        raise range_error(text, f"{name}: {piece!r} is not a number", start, end, label=label) from None
    if not number.is_finite() or not math.isfinite(float(number)):
        raise range_error(text, f"{name}: {piece!r} is not a finite number", start, end, label=label,
                          hints=["the values of a param are finite numbers"])
    return number


def parse_grid(text: str, *, label: str = "--param", max_points: int = 1000, need_step: bool = False) -> ParsedRange:
    """`λ=0:1` (a range, unless `need_step`) or `λ=0:1:0.1` (a grid) → a ParsedRange; PemError (E029,
    pointing into the text) otherwise: a step that does not divide the range, or a grid of more than
    `max_points` points (counted, never built)."""
    if not isinstance(text, str):
        raise range_error(str(text), "a param range is text: NAME=LO:HI[:STEP]", label=label)
    name, sep, spec = text.partition("=")
    stripped = name.strip()
    if not sep or not stripped:
        raise range_error(text, f"expected NAME=LO:HI{'' if need_step else '[:STEP]'}, got {text!r}", label=label)
    if not stripped.isidentifier():
        raise range_error(text, f"{stripped!r} is not a param name", 0, len(name), label=label)
    fields: list[tuple[int, int]] = []
    position = len(name) + 1
    for part in spec.split(":"):
        fields.append((position, position + len(part)))
        position += len(part) + 1
    if len(fields) not in ((3,) if need_step else (2, 3)):
        expected = "LO:HI:STEP" if need_step else "LO:HI or LO:HI:STEP"
        hints = [f"a sweep needs a step, e.g. {stripped}={spec.strip()}:0.1"] if need_step and len(fields) == 2 else []
        raise range_error(text, f"{stripped}: expected {expected}, got {spec!r}", len(name) + 1, label=label,
                          hints=hints)
    low, high, *rest = (parse_number(text, start, end, stripped, label=label) for start, end in fields)
    if not math.isfinite(float(high) - float(low)):
        raise range_error(text, f"{stripped}: the range is wider than a float can hold", fields[0][0], fields[1][1],
                          label=label, hints=["give bounds whose difference is a finite number"])
    if not low < high:
        hints = [f"for one value, write {stripped}={text[fields[0][0]:fields[0][1]].strip()}"] \
            if low == high and label == "--sweep" else []
        raise range_error(text, f"{stripped}: the range {text[fields[0][0]:fields[1][1]].strip()} is empty "
                          "(LO must be below HI)", fields[0][0], fields[1][1], label=label, hints=hints)
    if not rest:
        return ParsedRange(stripped, low, high, None, None, text)
    step = rest[0]
    if not step > 0:
        raise range_error(text, f"{stripped}: the step must be above 0", *fields[2], label=label)
    try:
        count, whole = grid_count(low, high, step)
    except ArithmeticError:  # more steps than even an exact context holds: a step far too small
        raise range_error(text, f"{stripped}: the step is far too small for the range", *fields[2], label=label,
                          hints=["use a larger step"]) from None
    top = max(abs(float(low)), abs(float(high)))
    if float(step) < 2 * math.ulp(top):  # neighbouring points could round to one float
        raise range_error(text, f"{stripped}: the step {step} is below what a float can tell apart at {top:g}: "
                          "points of the grid would repeat", *fields[2], label=label,
                          hints=[f"use a step of at least {2 * math.ulp(top):.3g}"])
    if count > max_points:
        shown = f"{count:,}" if count < 10**15 else f"about {Decimal(count):.3g}"
        raise range_error(text, f"{stripped}: {shown} grid points is more than the limit of {max_points:,}",
                          *fields[2], label=label, hints=["use a larger step, or --max-points N"])
    if not whole:
        last = low + step * (count - 1)
        raise range_error(text, f"{stripped}: the step {step} does not divide {low}:{high} into whole steps",
                          *fields[2], label=label, hints=[f"e.g. {stripped}={low}:{last}:{step} (both ends are "
                                                          "points of the grid)"])
    return ParsedRange(stripped, low, high, step, count, text)
