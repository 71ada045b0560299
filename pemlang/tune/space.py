"""The search space: `NAME=LO:HI` (a range) and `NAME=LO:HI:STEP` (a grid), parsed with E029 diagnostics
pointing into the text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

from ..diagnostics import error
from ..source import Source, Span
from .errors import TuneError


@dataclass(frozen=True)
class ParamRange:
    """`NAME=LO:HI` (a continuous range) or `NAME=LO:HI:STEP` (a grid, both ends included)."""

    name: str
    low: float
    high: float
    step: float | None = None
    text: str = ""  # as the user wrote it, for diagnostics

    @property
    def grid(self) -> list[float]:
        """The grid's values, computed in decimal from the numbers as written (0:1:0.1 gives 0.3,
        not 0.30000000000000004)."""
        if self.step is None:
            raise ValueError(f"{self.name} has no step")
        low, step = Decimal(repr(self.low)), Decimal(repr(self.step))
        count = int(round((Decimal(repr(self.high)) - low) / step)) + 1
        return [float(low + i * step) for i in range(count)]

    def describe(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}" + (f":{self.step:g}" if self.step is not None else "")


def range_error(text: str, message: str, start: int = 0, end: int | None = None,
                 hints: Sequence[str] = ()) -> TuneError:
    end = len(text) if end is None else end
    return TuneError([error("E029", message, Source(text, "--param"), Span(start, max(end, start + 1)),
                            hints=hints or ["write NAME=LO:HI for a range, NAME=LO:HI:STEP for a grid, e.g. λ=0:1:0.1"])])


def parse_range(text: str, *, max_points: int = 1000) -> ParamRange:
    """`λ=0:1` or `λ=0:1:0.1` → a ParamRange; TuneError (E029, pointing into the text) otherwise."""
    if not isinstance(text, str):
        raise range_error(str(text), "a param range is text: NAME=LO:HI[:STEP]")
    name, sep, spec = text.partition("=")
    stripped = name.strip()
    if not sep or not stripped:
        raise range_error(text, f"expected NAME=LO:HI[:STEP], got {text!r}")
    if not stripped.isidentifier():
        raise range_error(text, f"{stripped!r} is not a param name", 0, len(name))
    fields: list[tuple[int, int]] = []
    position = len(name) + 1
    for part in spec.split(":"):
        fields.append((position, position + len(part)))
        position += len(part) + 1
    if len(fields) not in (2, 3):
        raise range_error(text, f"{stripped}: expected LO:HI or LO:HI:STEP, got {spec!r}", len(name) + 1)
    numbers: list[Decimal] = []
    for start, end in fields:
        piece = text[start:end].strip()
        try:
            number = Decimal(piece)
        except InvalidOperation:
            raise range_error(text, f"{stripped}: {piece!r} is not a number", start, end) from None
        if not number.is_finite() or not math.isfinite(float(number)):
            raise range_error(text, f"{stripped}: {piece!r} is not a finite number", start, end,
                               hints=["the bounds of a param are finite numbers"])
        numbers.append(number)
    low, high = numbers[0], numbers[1]
    if not math.isfinite(float(high) - float(low)):
        raise range_error(text, f"{stripped}: the range is wider than a float can hold", fields[0][0], fields[1][1],
                           hints=["give bounds whose difference is a finite number"])
    if not low < high:
        raise range_error(text, f"{stripped}: the range {text[fields[0][0]:fields[1][1]].strip()} is empty "
                           "(LO must be below HI)", fields[0][0], fields[1][1])
    step = None
    if len(numbers) == 3:
        step = numbers[2]
        if not step > 0:
            raise range_error(text, f"{stripped}: the step must be above 0", *fields[2])
        try:
            count = (high - low) / step
            whole = count == count.to_integral_value()
        except ArithmeticError:  # decimal's overflow or underflow: a step far too small for the range
            raise range_error(text, f"{stripped}: the step is far too small for the range", *fields[2],
                               hints=["use a larger step"]) from None
        if count + 1 > max_points:
            shown = f"{int(count) + 1:,}" if count < 10**15 else f"about {float(count):.3g}"
            raise range_error(text, f"{stripped}: {shown} grid points is more than the limit of {max_points:,}",
                               *fields[2], hints=["use a larger step, or --max-points N"])
        if not whole:
            raise range_error(text, f"{stripped}: the step {step} does not divide {low}:{high} into whole steps",
                               *fields[2], hints=[f"e.g. {stripped}={low}:{low + step * int(count)}:{step}"])
    return ParamRange(stripped, float(low), float(high), float(step) if step is not None else None, text)
