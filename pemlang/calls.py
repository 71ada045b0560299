"""The checker's rules for a function call's arguments and options (operators.OPERATORS): what
`core`/`knots` accept inside, what `tsv`/`iso` need, svd's `rank=`/`energy=` and its result type,
and every option's value. A part of `check.Checker`, kept apart so each reads in one sitting."""

from __future__ import annotations

import math
from dataclasses import replace

from . import ast
from .checked import CallRef, ModuleValue, Poison, ScalarValue
from .operators import OPERATORS, Operator
from .types import Layer, LoraLayer, ModuleType


def _fmt(x: float) -> str:
    """A number as the program would write it (inf, -inf, nan as a reader says them)."""
    if not math.isfinite(x):
        return str(x)
    return ast.format_number(round(x, 12))


class CallChecks:
    """Methods of the Checker (which provides `_error`, `_warn`, `expr` and `source`)."""

    def _argument_problem(self, op: Operator, modules: list[ModuleValue], call: ast.Call) -> Poison | None:
        """What a space (core, knots) or a spectral function (tsv, iso) refuses in its arguments."""
        if op.space:
            inner = modules[0].first_call(lambda ref: not ref.dense)
            if inner is None:
                return None
            if OPERATORS[inner.op].space:
                return self._error(
                    "E020", f"{inner.op}() inside {op.name}(): one basis per merge", call.args[0].span,
                    notes=[f"`{inner.text}` aligns its inputs in a basis of its own; {op.name}() aligns the inputs "
                           "it names in another, and the two do not compose"],
                    hints=[f"align once, around the whole expression: `{op.name}(ties(a, b, density=0.2))`"])
            return self._error(
                "E020", f"{op.name}() aligns inputs: its expression is made of inputs, + - *, prune, dare and ties",
                call.args[0].span,
                notes=[f"`{inner.text}` is already a low-rank result, not an input {op.name}() can align"],
                hints=[f"apply {inner.op}() to the aligned result instead, e.g. `"
                       + {"svd": f"svd({op.name}(…), rank=R)", "tsv": f"tsv({op.name}(…), …)"}.get(
                           inner.op, f"{inner.op}({op.name}(…))") + "`"])
        for module, expr in zip(modules, call.args, strict=True):
            if not op.takes_dense and module.dense:
                # the dense term itself: a ties(…) inside a core(…) of this argument is low-rank here
                dense = next((t.source for t in module.terms if isinstance(t.source, CallRef) and t.source.dense), None)
                shown = dense.text if dense is not None else self.source.snippet(expr.span)
                alignable = dense is not None and all(a.first_call(lambda ref: not ref.dense) is None for a in dense.args)
                return self._error(
                    "E020", f"{op.name}() needs a low-rank argument, but this holds a dense ΔW per layer",
                    expr.span, notes=[f"`{shown}` gives every layer a dense weight update"],
                    hints=[(f"give it as `core({shown})` (merged in the inputs' shared basis: low-rank) or as "
                            if alignable else "give it as ") + f"`svd({shown}, rank=R)`"])
        return None

    def _one_of(self, op: Operator, call: ast.Call, usage: list[str]) -> bool | None:
        """Exactly one of `op.one_of` (svd: `rank=` or `energy=`) is given; None after an error."""
        given = [k for k in call.kwargs if k.name.id in op.one_of]
        either = " or ".join(f"`{name}=`" for name in op.one_of)
        if not given:
            self._error("E020", f"{op.name}() needs {either}", call.span, hints=usage)
            return None
        if len(given) > 1:
            self._error("E020", f"{op.name}() takes {either}, not both", given[1].name.span,
                        notes=[f"`{given[0].name.id}=` is given too"], hints=usage)
            return None
        return True

    def _svd_type(self, call: ast.Call, combined: ModuleType, options: dict[str, float | str], *,
                  dense: bool) -> ModuleType:
        """svd's result type: per layer the rank it writes, min(R or max_rank, the argument's rank,
        out, in) (a dense argument has full rank; with `energy=`, the largest rank the data can
        choose). A `rank=R` above the argument's rank at every layer is W007: nothing is dropped."""
        cap = min(int(options[k]) for k in ("rank", "max_rank") if k in options) \
            if "rank" in options or "max_rank" in options else None
        layers: dict[str, Layer] = {}
        bounds: list[int] = []
        for key, layer in combined.layers.items():
            if not isinstance(layer, LoraLayer):
                continue
            full = min(layer.out_features, layer.in_features)
            bound = full if dense else min(layer.rank, full)
            bounds.append(bound)
            rank = bound if cap is None else min(cap, bound)
            layers[key] = replace(layer, rank=rank, alpha=float(rank), use_rslora=False)
        if "rank" in options and bounds and int(options["rank"]) > max(bounds):
            rank_kw = next(k for k in call.kwargs if k.name.id == "rank")
            shown = self.source.snippet(rank_kw.value.span)
            if not isinstance(rank_kw.value, ast.Number):
                shown += f" = {int(options['rank'])}"  # a param, perhaps set by --set
            self._warn("W007", f"`rank={shown}` is above the rank of svd's argument (at most {max(bounds)} at every "
                       "layer): nothing is dropped", rank_kw.value.span,
                       notes=["a dense argument has the full rank of its layers' shapes, min(out, in), which svd keeps"
                              if dense else "the result keeps each layer's own rank: svd only refactorises it"],
                       hints=[f"a rank below {max(bounds)} compresses it; `energy=e` instead of `rank=` keeps per "
                              "layer the smallest rank that holds a share e of ‖ΔW‖²"])
        return ModuleType("lora", combined.base, layers, combined.heads, combined.architecture)

    def _options(self, op: Operator, call: ast.Call, usage: list[str]) -> dict[str, float | str] | None:
        """The call's options, checked against their rules; defaults filled in."""
        given = {k.name.id: k for k in call.kwargs}
        options: dict[str, float | str] = {}
        failed = False
        for option in op.options:
            keyword = given.get(option.name)
            if keyword is None:
                if option.optional:
                    continue
                assert option.default is not None
                options[option.name] = option.default
                continue
            raw = keyword.value
            value: float | str | None = None
            if isinstance(raw, ast.Text):
                value = raw.value if option.kind == "choice" else None
            elif option.kind == "seed":  # from the text as written: exact beyond 2**53
                text = self.source.snippet(raw.span)
                value = int(text) if isinstance(raw, ast.Number) and text.isdigit() else None
            elif option.kind != "choice":
                evaluated = self.expr(raw)
                if isinstance(evaluated, Poison):
                    failed = True
                    continue
                value = evaluated.value if isinstance(evaluated, ScalarValue) else None
            if value is None or not option.accepts(value):
                shown = self.source.snippet(raw.span)
                # the value as it is, not rounded: keep=1.0000000000000002 is refused, and "= 1" would not say why
                if not isinstance(value, str) and value is not None and shown != ast.format_number(value):
                    shown += f" = {ast.format_number(value)}"  # a param, perhaps set by --set or a sweep
                hints = usage
                if option.kind == "choice" and not isinstance(raw, ast.Text) and shown in option.choices:
                    hints = [f'a word is written in quotes: {option.name}="{shown}"', *usage]
                self._error("E020", f"{op.name}() `{option.name}` must be {option.rule}", raw.span,
                            notes=[f"it is {shown}"] if raw.span.end > raw.span.start else [], hints=hints)
                failed = True
                continue
            options[option.name] = int(value) if option.kind in ("seed", "rank") and not isinstance(value, str) \
                else value
        return None if failed else options


