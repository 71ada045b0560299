"""The evaluation plan: what lowering produces and the backend executes.

Per output, per layer, which sources combine how: the coefficients are folded numbers, ranks and
dtypes are decided, and the adapter_config.json to write is built. The plan holds no tensors;
`format_plan` prints it so that a user sees what will happen before it happens.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .adapters import Adapter
from .basemodel import BaseModel, Change, Layout, merge_summary
from .formatting import compact_indices, human_bytes

LayerOp = Literal["paper", "concat", "ia3"]
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True, slots=True)
class PlanTerm:
    """One source's contribution: an input's name, or an svd node's id (`svd#1`)."""

    source: str
    alpha: float
    beta: float


@dataclass(frozen=True, slots=True)
class LayerStep:
    """How one output layer is computed.

    paper:  A = Σ alpha_i·A_i;  B = Σ beta_i·(s_i/s_out)·B_i
    concat: A = [A_1; A_2; …];  B = [beta_1·s_1·B_1 | beta_2·s_2·B_2 | …], scaling 1
    ia3:    l = 1 + Σ beta_i·(l_i − 1)
    """

    key: str
    op: LayerOp
    terms: tuple[PlanTerm, ...]
    rank: int  # output rank (LoRA); 0 for (IA)3
    shape: tuple[int, ...]  # (out, in) for LoRA; the vector's shape for (IA)3
    scaling_out: float  # the scaling the written config gives this layer
    dtype: str  # safetensors dtype written
    # The rank is chosen from the data when the plan runs (a source is `svd(…, energy=e)`): `rank`
    # is its upper bound, and the written file is laid out once the layer is computed.
    adaptive: bool = False


@dataclass(frozen=True, slots=True)
class CallStep:
    """A function call (operators.OPERATORS), evaluated per layer from its arguments' ΔW.

    svd:   the best rank-R approximation of its argument's ΔW, low-rank
    prune, dare, ties: element-wise on ΔW, dense per layer
    """

    id: str  # `svd#1`, `ties#2`: what PlanTerm.source names
    op: str
    text: str
    args: tuple[tuple[PlanTerm, ...], ...]  # per argument, its sources and coefficients
    options: dict[str, float | str] = field(compare=False)
    layer_ranks: dict[str, int] = field(compare=False)  # svd: effective rank per layer: min(R, stacked, d, k)
    layer_shapes: dict[str, tuple[int, int]] = field(compare=False)  # (out, in) of every layer it has
    # Its layer_ranks are upper bounds, the ranks being chosen from the data as it runs (svd with
    # `energy=`, or an svd over such a result).
    adaptive: bool = field(default=False, compare=False)

    @property
    def terms(self) -> tuple[PlanTerm, ...]:
        """Every argument's terms (svd has one argument)."""
        return tuple(t for arg in self.args for t in arg)

    @property
    def dense(self) -> bool:
        from .operators import OPERATORS

        return OPERATORS[self.op].dense


@dataclass(frozen=True, slots=True)
class HeadStep:
    """A `modules_to_save` tensor: Σ beta_i·W_i over inputs (a convex mix), or one input's copy."""

    key: str
    terms: tuple[PlanTerm, ...]
    shape: tuple[int, ...]
    dtype: str
    module: str = ""  # the modules_to_save module (sub-tree) the tensor belongs to


@dataclass(frozen=True)
class OutputPlan:
    name: str | None
    expression: str
    path: Path | None
    kind: Literal["lora", "ia3"]
    terms: tuple[PlanTerm, ...]
    layers: tuple[LayerStep, ...]
    heads: tuple[HeadStep, ...]
    heads_note: str
    config: dict[str, Any]
    bytes_read: int
    bytes_written: int
    # `into "BASE"`: the base model the module is merged into, and the base tensors that change;
    # the layer steps then come in fp32 (ΔW is added in fp32, cast once to each tensor's dtype).
    into: BaseModel | None = field(default=None, compare=False, repr=False)
    changes: tuple[Change, ...] = field(default=(), compare=False, repr=False)
    shards: Layout | None = field(default=None, compare=False, repr=False)  # its weight files (--max-shard-size)


@dataclass(frozen=True)
class Dropped:
    """What one `svd` call dropped from an output: per layer the share of ‖ΔW‖²_F its truncation
    did not keep, its largest and its mean over the layers the output takes from it."""

    call: str  # the call as written: `svd(a + b, rank=8)`
    layers: int
    largest: float
    mean: float


@dataclass(frozen=True)
class PlanInput:
    name: str
    path: Path
    written: str  # the path as the program wrote it
    adapter: Adapter = field(compare=False, repr=False)


@dataclass(frozen=True)
class Plan:
    filename: str
    program: str
    mode: Literal["paper", "exact"]
    params: dict[str, float]
    inputs: dict[str, PlanInput]
    calls: dict[str, CallStep]  # function calls by id (`svd#1`)
    outputs: tuple[OutputPlan, ...]
    # Extra provenance for the written header (`pemlang.tune`: how a tuned point was chosen).
    provenance: tuple[tuple[str, str], ...] = ()


DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
# What users may write for an output dtype (CLI --dtype, config, API dtype=) → the safetensors name.
DTYPE_NAMES = {"f32": "F32", "fp32": "F32", "float32": "F32", "f16": "F16", "fp16": "F16", "float16": "F16",
               "half": "F16", "bf16": "BF16", "bfloat16": "BF16"}


def dtype_name(text: str) -> str:
    """`float16`, `fp16`, `F16`… → `F16`; ValueError naming the accepted forms otherwise."""
    if isinstance(text, str) and text.lower() in DTYPE_NAMES:
        return DTYPE_NAMES[text.lower()]
    raise ValueError(f"unknown dtype {text!r} (float32, float16 or bfloat16)")


@contextlib.contextmanager
def recursion_room(limit: int = 20_000) -> Iterator[None]:
    """Room for the recursion over function nodes (lowering, evaluation, provenance): a program may
    nest 200 calls (the parser's limit), a few Python frames each."""
    previous = sys.getrecursionlimit()
    sys.setrecursionlimit(max(previous, limit))
    try:
        yield
    finally:
        sys.setrecursionlimit(previous)


def tensor_key(layer_key: str, suffix: str) -> str:
    """The PEFT state-dict key of a layer's tensor (`lora_A.weight`, `lora_B.weight`, `ia3_l`)."""
    return f"{PEFT_PREFIX}{layer_key}.{suffix}"


def pattern_key(layer_key: str) -> str:
    """A rank_pattern/alpha_pattern key matching exactly one layer (PEFT reads them as regexes)."""
    return re.escape(layer_key)


def leaf_inputs(plan: Plan, terms: tuple[PlanTerm, ...]) -> list[str]:
    """The inputs some terms name, through the functions in them, in order of appearance (what
    `core` and `knots` align), whatever their coefficients."""
    names: dict[str, None] = {}

    def visit(source: str) -> None:
        if source in plan.inputs:
            names[source] = None
        else:
            for term in plan.calls[source].terms:
                visit(term.source)

    for term in terms:
        visit(term.source)
    return list(names)


def output_inputs(plan: Plan, out: OutputPlan) -> set[str]:
    """The inputs an output reads, through function calls and heads."""
    with recursion_room():
        return _output_inputs(plan, out)


def _output_inputs(plan: Plan, out: OutputPlan) -> set[str]:
    names: set[str] = set()

    def visit(source: str) -> None:
        if source in plan.inputs:
            names.add(source)
        else:
            for term in plan.calls[source].terms:
                visit(term.source)

    for term in out.terms:
        visit(term.source)
    names.update(t.source for head in out.heads for t in head.terms)
    return names


def svd_layers(plan: Plan, out: OutputPlan) -> dict[str, list[str]]:
    """The `svd` calls an output computes (by id, in the plan's order; those nested in other
    functions' arguments too), each with the layers the output takes from it."""
    found: dict[str, set[str]] = {}

    def visit(source: str, key: str) -> None:
        call = plan.calls.get(source)
        if call is None:
            return
        if call.dense:
            if key not in call.layer_shapes:
                return
        elif call.layer_ranks.get(key, 0) == 0:
            return
        if call.op == "svd":
            found.setdefault(call.id, set()).add(key)
        for term in call.terms:
            if term.beta != 0:
                visit(term.source, key)

    with recursion_room():
        for step in out.layers:
            for term in step.terms:
                visit(term.source, step.key)
    return {call_id: sorted(found[call_id]) for call_id in plan.calls if call_id in found}


def dropped(plan: Plan, out: OutputPlan, shares: Mapping[str, Mapping[str, float]] | None = None) -> list[Dropped]:
    """Per `svd` call of an output, what it dropped (`shares`: per call id, per layer, the share of
    ‖ΔW‖² not kept, as the backend measured it); zeros where `shares` is None (a placeholder of
    the final size)."""
    report = []
    for call_id, keys in svd_layers(plan, out).items():
        values = [float((shares or {}).get(call_id, {}).get(key, 0.0)) for key in keys]
        report.append(Dropped(plan.calls[call_id].text, len(keys), max(values), sum(values) / len(values)))
    return report


# -- printing -------------------------------------------------------------------------------------


def _number(x: float) -> str:
    return f"{x:.6g}"


def _bytes(n: int) -> str:
    return human_bytes(n)


def _inside_spaces(plan: Plan) -> dict[str, str]:
    """The element-wise calls evaluated only inside a space: call id → the space's id (they act on
    its aligned coordinates, not on a dense ΔW)."""
    from .operators import OPERATORS

    inside: dict[str, str] = {}
    outside: set[str] = set()
    seen: set[tuple[str, str | None]] = set()

    def visit(source: str, space: str | None) -> None:
        if source not in plan.calls or (source, space) in seen:
            return
        seen.add((source, space))
        call = plan.calls[source]
        if space is not None:
            inside.setdefault(source, space)
        else:
            outside.add(source)
        for term in call.terms:
            visit(term.source, call.id if OPERATORS[call.op].space else space)

    for out in plan.outputs:
        for term in out.terms:
            visit(term.source, None)
    return {k: v for k, v in inside.items() if k not in outside}


def _call_line(plan: Plan, call: CallStep) -> str:
    """What a function node does per layer, and for dense ones the memory of a layer."""
    from .operators import dense_bytes

    space = _inside_spaces(plan).get(call.id) if call.dense else None
    if space is not None:
        options = ", ".join(f"{k}={v}" for k, v in sorted(call.options.items()))
        return f"per layer on the aligned coordinates of {space} ({options}), not on a dense ΔW"

    largest = max((dense_bytes(shape) for shape in call.layer_shapes.values()), default=0)
    dense_terms = any(t.source in plan.calls and plan.calls[t.source].dense for t in call.terms)
    ranks = sorted(set(call.layer_ranks.values()))
    ranked = (f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {ranks[0]}–{ranks[-1]}") if ranks else "rank 0"
    if call.op == "svd":
        how = ("the dense ΔW factorised (a randomised range finder with power iterations on large layers)"
               if dense_terms else
               "thin QR of the stacked factors and an SVD of the small core")
        return f"per layer, {how}, {_svd_ranks(call)}"
    if call.op in ("core", "knots"):
        names = leaf_inputs(plan, call.args[0])
        stacked = max((call.layer_ranks.get(k, 0) for k in call.layer_shapes), default=0)
        biggest = max(call.layer_shapes.values(), key=lambda shape: shape[0] * shape[1], default=(0, 0))
        if call.op == "core":
            space = f"the Core Space of {', '.join(names)}: per layer {stacked}×{stacked} coordinates"
            aligned = stacked * stacked
        else:
            space = (f"the KnOTS basis of {', '.join(names)}: per layer the SVD of their ΔW side by side, "
                     f"{stacked}×{biggest[1]} coordinates at the largest layer")
            aligned = stacked * biggest[1]
        work = 8 * (biggest[0] + biggest[1]) * stacked + 4 * aligned * (1 + len(names))
        return (f"{space} (stacked rank R = Σ r_i, up to {stacked}), from thin QRs of the factors; result "
                f"{ranked}; about {_bytes(work)} per layer for the largest layer")
    if call.op == "tsv":
        keep = float(call.options["keep"])
        share = "all" if keep == 1 else f"the top {_number(100 * keep)}%"
        return (f"per layer {share} of each argument's singular vectors, made orthonormal side by side and "
                f"summed with their singular values; {ranked}")
    if call.op == "iso":
        return f"per layer the spectrum of its argument flattened to its mean singular value; {ranked}"
    options = ", ".join(f"{k}={v}" for k, v in sorted(call.options.items()))
    return (f"dense ΔW per layer ({options}); {_bytes(largest)} for the largest layer (arguments made of "
            f"inputs are formed a block of rows at a time, never whole)")


def _svd_ranks(call: CallStep) -> str:
    """What rank an svd node keeps per layer, as the plan says it: `truncated to rank 8`, `kept
    whole at rank 8 (rank=1000 is above its argument's rank)`, `the smallest rank keeping 90% …`."""
    ranks = sorted(set(call.layer_ranks.values()) - {0})
    shown = (str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}") if ranks else "0"
    binds = "max_rank" in call.options and ranks and int(call.options["max_rank"]) <= ranks[-1]
    cap = f", at most {call.options['max_rank']}" if binds else ""  # a max_rank above every layer's rank caps nothing
    if "energy" in call.options:
        return (f"the smallest rank that keeps {_number(100 * float(call.options['energy']))}% of ‖ΔW‖² per layer"
                f"{cap} (up to {shown}, chosen from the data)")
    asked = int(call.options["rank"])
    if ranks and asked > ranks[-1] and "max_rank" not in call.options:
        return f"kept whole at rank {shown}: the rank asked for is above its argument's, nothing is dropped"
    capped = "max_rank" in call.options and int(call.options["max_rank"]) < asked
    return f"truncated to rank {shown}" + (f" (max_rank={call.options['max_rank']})" if capped else "")


def format_plan(plan: Plan, console=None) -> None:  # type: ignore[no-untyped-def]
    """Print the plan: inputs, per output its coefficients, per-layer operations, sizes."""
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table


    console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    console.print(f"[bold]plan[/bold] for {escape(plan.filename)}: mode {plan.mode}"
                  + (", " + ", ".join(f"{k} = {_number(v)}" for k, v in plan.params.items()) if plan.params else ""))
    inputs = Table(show_edge=False, header_style="bold", title="inputs", title_justify="left")
    for column in ("name", "path", "kind", "base model", "layers", "size"):
        inputs.add_column(column)
    for item in plan.inputs.values():
        t = item.adapter.type
        ranks = sorted({getattr(layer, "rank", 0) for layer in t.layers.values()})
        kind = ("LoRA r=" + "/".join(map(str, ranks))) if t.kind == "lora" else "(IA)3"
        size = sum(layer.nbytes for layer in t.layers.values()) + sum(h.nbytes for h in t.heads.values())
        inputs.add_row(escape(item.name), escape(item.written), kind, t.base.name or "-", str(len(t.layers)), _bytes(size))
    console.print(inputs)
    for call in plan.calls.values():
        console.print(f"\n[bold]{call.id}[/bold] = {escape(call.text)}: {escape(_call_line(plan, call))}")
        for number, arg in enumerate(call.args, 1):
            prefix = f"  argument {number}: " if len(call.args) > 1 else "  "
            console.print(escape(prefix + ", ".join(f"{t.source}: beta {_number(t.beta)}" for t in arg)))
    for out in plan.outputs:
        console.print(f"\n[bold]output[/bold] {escape(out.name or out.expression)}"
                      + (f" -> {escape(str(out.path))}" if out.path is not None else ""))
        if out.name:
            console.print(f"  expression: {escape(out.expression)}")
        coefficients = Table(show_edge=False, header_style="bold")
        coefficients.add_column("source")
        coefficients.add_column("alpha", justify="right")
        coefficients.add_column("beta", justify="right")
        for term in out.terms:
            coefficients.add_row(term.source, _number(term.alpha) if plan.mode == "paper" and out.kind == "lora"
                                 else "-", _number(term.beta))
        console.print(coefficients)
        formula = {
            "paper": "A = Σ alpha_i·A_i;  B = Σ beta_i·(s_i/s_out)·B_i  (s_out: the first input's scaling)",
            "concat": "A = [A_1; A_2; …];  B = [beta_1·s_1·B_1 | beta_2·s_2·B_2 | …];  scaling 1 (no cross terms)",
            "ia3": "l = 1 + Σ beta_i·(l_i − 1)",
        }
        ops = sorted({step.op for step in out.layers})
        for op in ops:
            console.print(f"  per layer ({op}): {escape(formula[op])}")
        layers = Table(show_edge=False, header_style="bold")
        for column in ("layers", "op", "sources", "shape", "rank", "scaling", "dtype"):
            layers.add_column(column, no_wrap=column == "layers")
        groups: dict[tuple[str, ...], list[int | None]] = {}
        for step in out.layers:
            match = re.search(r"\.(\d+)\.", step.key)
            pattern = step.key[: match.start(1)] + "{}" + step.key[match.end(1):] if match else step.key
            row = (pattern, step.op, ", ".join(t.source for t in step.terms) or "(zero)",
                   "×".join(map(str, step.shape)),
                   (f"≤{step.rank}" if step.adaptive else str(step.rank)) if step.rank else "-",
                   _number(step.scaling_out) if out.kind == "lora" else "-", step.dtype)
            groups.setdefault(row, []).append(int(match.group(1)) if match else None)
        for (pattern, *rest), indices in groups.items():
            numbered = [i for i in indices if i is not None]
            name = pattern.format(f"[{compact_indices(numbered)}]" if len(numbered) > 1 else numbered[0]) \
                if "{}" in pattern else pattern
            layers.add_row(name, *rest)
        console.print(layers)
        console.print(f"  heads: {escape(out.heads_note)}")
        at_most = "at most " if any(step.adaptive for step in out.layers) else ""
        if out.into is not None:  # a full model: its weight files, and the tensors that change
            console.print(f"  merged into {escape(out.into.written)}; reads {_bytes(out.bytes_read)} of factors")
            for line in merge_summary(out.into, out.changes, out.shards):
                console.print(f"  {escape(line)}")
            continue
        console.print(f"  reads {_bytes(out.bytes_read)}, writes {at_most}{_bytes(out.bytes_written)}")
