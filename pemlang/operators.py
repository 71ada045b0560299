"""The functions of the language, one entry each: `svd`, `prune`, `dare`, `ties`, `core`, `knots`,
`tsv`, `iso`.

An entry says everything about its function in one place: its signature and argument rules (what
the checker enforces, with the diagnostics' wording), its type rule (low-rank in → low-rank out
for `svd`, `tsv`, `iso`; dense per layer for the element-wise merges; a *space* — `core`, `knots` —
evaluates its argument expression in a basis shared by the inputs it names and turns it, dense or
not, into a low-rank result), how it shows in the plan, and the backend kernel that evaluates it per
layer (`KERNELS` in backend/dense.py, backend/align.py). Adding a function is adding an entry here
and its kernel. All act on each layer's weight update ΔW = s·B·A, in exact mode, on LoRA modules
("Functions" in the README).
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
    # A space (core, knots): its argument is an expression over inputs (of + - *, prune, dare, ties)
    # evaluated in a basis the inputs share; the result is low-rank whatever the expression is.
    space: bool = False
    # Whether an argument may be a dense ΔW per layer (tsv and iso read their arguments' singular
    # vectors from factors, so they need low-rank ones).
    takes_dense: bool = True
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
    Operator("core", "core(E)",
             "E evaluated in the Core Space of the inputs it names: each input's ΔW as an R×R matrix between "
             "the singular vectors of their stacked B and of their stacked A (R = the sum of their ranks); "
             "prune, dare and ties inside act on those R×R entries", False, (), dense=False, space=True),
    Operator("knots", "knots(E)",
             "E evaluated in the KnOTS basis: the SVD of the inputs' ΔW side by side, U·Σ·[V_1ᵀ … V_nᵀ], each "
             "input as its Σ·V_iᵀ; prune, dare and ties inside act on those", False, (), dense=False, space=True),
    Operator("tsv", "tsv(x1, x2, …, keep=f)",
             "TSV-M: each argument's top ⌈f·rank⌉ singular vectors, made orthogonal to one another (the "
             "nearest orthonormal bases) and summed with their singular values", True,
             (Option("keep", "density", default=1.0),), dense=False, takes_dense=False),
    Operator("iso", "iso(x)",
             "Iso-C: x's singular values all set to their mean (the spectrum flattened)", False, (), dense=False,
             takes_dense=False),
)}
FUNCTIONS = tuple(OPERATORS)


def dense_bytes(shape: tuple[int, ...]) -> int:
    """The memory of one dense fp32 ΔW of a layer (what `plan` shows for dense nodes)."""
    return math.prod(shape) * 4


def ceil_share(share: float, count: int) -> int:
    """⌈f·n⌉ with f as written (0.2 of 100 is 20, not the 21 that 0.2's binary value would give)."""
    from decimal import Decimal

    return min(count, math.ceil(Decimal(repr(float(share))) * count))


def low_rank(op: str, options: dict[str, float | str], ranks: list[int], shape: tuple[int, int]) -> int:
    """The rank the result of `core`, `knots`, `tsv` or `iso` has at one layer of shape (out, in),
    from the ranks of what it reads there: for iso its argument's stacked rank, for tsv each
    argument's, for core and knots each input's that the expression names. Never above min(out,
    in): a matrix of that shape has no higher rank. (svd's, which may depend on the data, is
    lowering's `svd_ranks`.)"""
    side = min(shape)
    if op == "tsv":
        return min(sum(ceil_share(float(options["keep"]), min(r, side)) for r in ranks), side)
    return min(sum(ranks), side)  # iso: x's rank; core, knots: R = Σ r_i
