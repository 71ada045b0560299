"""The search space: `NAME=LO:HI` (a range) and `NAME=LO:HI:STEP` (a grid), parsed by pemlang.grids
(the rule `run --sweep` follows too) with E029 diagnostics pointing into the text."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..diagnostics import PemError
from ..grids import GridValues, parse_grid
from ..grids import range_error as grid_error
from .errors import TuneError


@dataclass(frozen=True)
class ParamRange:
    """`NAME=LO:HI` (a continuous range) or `NAME=LO:HI:STEP` (a grid, both ends included)."""

    name: str
    low: float
    high: float
    step: float | None = None
    text: str = ""  # as the user wrote it, for diagnostics
    points: GridValues | None = field(default=None, compare=False)  # a grid's values, as the parser counted them

    @property
    def count(self) -> int:
        """How many points the grid has (without building it)."""
        return len(self._points())

    @property
    def grid(self) -> list[float]:
        """The grid's values as a list (computed in decimal: 0:1:0.1 gives 0.3, not 0.30000000000000004)."""
        return list(self._points())

    def _points(self) -> GridValues:
        if self.points is None:
            raise ValueError(f"{self.name} has no step")
        return self.points

    def describe(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}" + (f":{self.step:g}" if self.step is not None else "")


def range_error(text: str, message: str, start: int = 0, end: int | None = None,
                hints: Sequence[str] = ()) -> TuneError:
    return TuneError(grid_error(text, message, start, end, hints).diagnostics)


def parse_range(text: str, *, max_points: int = 1000) -> ParamRange:
    """`λ=0:1` or `λ=0:1:0.1` → a ParamRange; TuneError (E029, pointing into the text) otherwise."""
    try:
        parsed = parse_grid(text, label="--param", max_points=max_points)
    except PemError as exc:
        raise TuneError(exc.diagnostics) from None
    return ParamRange(parsed.name, float(parsed.low), float(parsed.high),
                      float(parsed.step) if parsed.step is not None else None, text,
                      parsed.values if parsed.step is not None else None)
