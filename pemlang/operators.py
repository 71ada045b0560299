"""The functions of the language, one entry each: `svd`, `prune`, `dare`, `ties`.

An entry says everything about its function in one place: its signature and argument rules (what
the checker enforces, with the diagnostics' wording), its type rule (low-rank in → low-rank out
for `svd`; dense per layer for the element-wise merges), how it shows in the plan, and the name of
the backend kernel that evaluates it per layer (`KERNELS` in backend/dense.py). Adding a function
is adding an entry here and its kernel. All act on each layer's weight update ΔW = s·B·A, in
exact mode, on LoRA modules ("Functions" in the README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

OptionKind = Literal["rank", "density", "probability", "seed", "choice"]


@dataclass(frozen=True)
class Option:
    """A keyword argument: its rule, and its default when it may be left out."""

    name: str
    kind: OptionKind
    default: float | str | None = None  # None: required (unless optional)
    choices: tuple[str, ...] = ()
    optional: bool = False  # may be left out, with no default (svd's max_rank; rank or energy, see one_of)

    @property
    def rule(self) -> str:
        """What the value must be, for diagnostics."""
        return {
            "rank": "a whole number ≥ 1",
            "density": "a number in (0, 1]",
            "probability": "a number in [0, 1)",
            "seed": "a whole-number literal from 0 to 2**63 − 1 (e.g. 7), so that the program names its randomness",
            "choice": " or ".join(f'"{c}"' for c in self.choices),
        }[self.kind]

    def accepts(self, value: float | str) -> bool:
        """Whether a number (or, for a choice, a word) satisfies the rule."""
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if isinstance(value, str) or not math.isfinite(value):
            return False
        if self.kind == "rank":
            return value == int(value) and value >= 1
        if self.kind == "density":
            return 0 < value <= 1
        if self.kind == "probability":
            return 0 <= value < 1
        return isinstance(value, int) and 0 <= value < 2**63  # seed: an int read from its digits


@dataclass(frozen=True)
class Operator:
    """One function of the language."""

    name: str
    usage: str  # the signature, as hints show it
    summary: str  # what it computes, per layer (hints, plan)
    many: bool  # takes several modules (ties) or exactly one
    options: tuple[Option, ...]
    dense: bool  # its result is a dense ΔW per layer (written only through svd)
    # Whether the result is the mean of its arguments (ties: where they agree, the mean of the
    # trimmed updates), so that their heads (modules_to_save, full tensors that none of these
    # functions acts on) mix as their mean; otherwise a function passes its argument's heads on
    # as they are (svd, prune and dare keep x, or on average x).
    mean: bool = False
    # Options of which exactly one must be given (svd: `rank=` or `energy=`).
    one_of: tuple[str, ...] = ()

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def option(self, name: str) -> Option:
        return next(o for o in self.options if o.name == name)


OPERATORS: dict[str, Operator] = {op.name: op for op in (
    # svd: `rank=R` truncates every layer to rank R; `energy=e` keeps per layer the smallest rank
    # whose share of ‖ΔW‖²_F is ≥ e (a rank chosen from the data); `max_rank=N` caps either. Its
    # kernel reports the share of ‖ΔW‖²_F it dropped per layer (the run's summary, the metadata
    # and the model card show it per output).
    Operator("svd", "svd(x, rank=R | energy=e[, max_rank=N])",
             "the best rank-R approximation of x's weight update (energy=e: per layer the smallest rank "
             "keeping a share e of ‖ΔW‖²; max_rank=N caps the rank)", False,
             (Option("rank", "rank", optional=True), Option("energy", "density", optional=True),
              Option("max_rank", "rank", optional=True)), dense=False, one_of=("rank", "energy")),
    Operator("prune", "prune(x, density=d)",
             "x's weight update with only its ⌈d·n⌉ largest-magnitude entries kept", False,
             (Option("density", "density"),), dense=True),
    Operator("dare", "dare(x, p=q, seed=s)",
             "x's weight update with each entry dropped with probability q and the rest scaled by 1/(1−q)",
             False, (Option("p", "probability"), Option("seed", "seed", default=0)), dense=True),
    Operator("ties", 'ties(x1, x2, …, density=d, sign="total"|"frequency")',
             "TIES: each weight update trimmed to density d, a sign elected per entry, and the mean of the "
             "trimmed values that agree with it", True,
             (Option("density", "density"), Option("sign", "choice", default="total", choices=("total", "frequency"))),
             dense=True, mean=True),
)}
FUNCTIONS = tuple(OPERATORS)


def dense_bytes(shape: tuple[int, ...]) -> int:
    """The memory of one dense fp32 ΔW of a layer (what `plan` shows for dense nodes)."""
    return math.prod(shape) * 4
