"""Typed program → Plan: per output, per layer, the coefficients and shapes of each input (README "Two meanings of `+`").

Scalars were folded and repeated sources merged by the checker; lowering decides, per layer,
which terms contribute, the output rank (paper: the inputs' rank; exact: the sum of the
contributing ranks; svd: min(R, stacked rank, d, k)), the dtype, and the adapter_config.json.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import ast
from .adapters import config_owner
from .basemodel import BaseModel, Change, layout
from .checked import CallRef, CheckedOutput, CheckedProgram, InputRef, ModuleValue, Term
from .diagnostics import Diagnostic, error
from .operators import OPERATORS, low_rank
from .plan import DTYPE_BYTES, CallStep, HeadStep, LayerStep, OutputPlan, Plan, PlanInput, PlanTerm, pattern_key, recursion_room
from .types import Ia3Layer, LoraLayer


class _Lowering:
    def __init__(self, program: CheckedProgram, dtype: str | None):
        self.program = program
        self.dtype = dtype
        self.calls: dict[int, CallStep] = {}

    # sources
    def source_id(self, term: Term) -> str:
        if isinstance(term.source, InputRef):
            return term.source.name
        return self.call(term.source).id

    def plan_terms(self, value: ModuleValue) -> tuple[PlanTerm, ...]:
        return tuple(PlanTerm(self.source_id(t), t.alpha, t.beta) for t in value.terms)

    def call(self, ref: CallRef) -> CallStep:
        if ref.id in self.calls:
            return self.calls[ref.id]
        args = tuple(self.plan_terms(arg) for arg in ref.args)  # nested calls get their ids first
        shapes: dict[str, tuple[int, int]] = {}
        for arg in ref.args:
            for key, layer in arg.type.layers.items():
                assert isinstance(layer, LoraLayer)
                shapes[key] = (layer.out_features, layer.in_features)
        layer_ranks = {}
        adaptive = False
        if ref.op == "svd":
            layer_ranks, adaptive = self.svd_ranks(ref, shapes)
        elif not ref.dense:
            options = dict(ref.options)
            for key, shape in shapes.items():
                if OPERATORS[ref.op].space:  # every input the expression names, whatever its coefficient
                    inputs = self.program.inputs
                    ranks = [inputs[n].type.layers[key].rank for n in ref.args[0].leaf_inputs()  # type: ignore[union-attr]
                             if key in inputs[n].type.layers]
                else:
                    ranks = [self.stacked_rank(arg, key, shape) for arg in ref.args]
                layer_ranks[key] = low_rank(ref.op, options, [r for r in ranks if r > 0], shape)
        step = CallStep(f"{ref.op}#{len(self.calls) + 1}", ref.op, ref.text, args, dict(ref.options), layer_ranks,
                        shapes, adaptive)
        self.calls[ref.id] = step
        return step

    def stacked_rank(self, arg: ModuleValue, key: str, shape: tuple[int, int]) -> int:
        """The rank of an argument's factors stacked at one layer (its terms of non-zero beta); a
        dense ΔW has full rank."""
        live = [t for t in arg.terms if t.beta != 0]
        if self.dense_at(live, key):
            return min(shape)
        return sum(self.layer_rank(t, key) for t in live)

    def dense_at(self, terms: list[Term], key: str) -> bool:
        """Whether a dense function's result (prune, dare, ties) among `terms` has the layer."""
        return any(isinstance(t.source, CallRef) and t.source.dense and self.has_layer(t, key) for t in terms)

    def svd_ranks(self, ref: CallRef, shapes: dict[str, tuple[int, int]]) -> tuple[dict[str, int], bool]:
        """svd's rank per layer, min(R, max_rank, stacked rank, out, in), and whether the ranks are
        only upper bounds (adaptive): with `energy=` the data chooses each layer's rank below that
        bound; over an adaptive low-rank argument the stacked rank is known only as it runs."""
        (arg,) = ref.args
        options = dict(ref.options)
        caps = [int(options[k]) for k in ("rank", "max_rank") if k in options]
        live = [t for t in arg.terms if t.beta != 0]
        layer_ranks = {}
        adaptive = "energy" in options
        for key, shape in shapes.items():
            if not self.dense_at(live, key):  # (a dense ΔW has full rank, whatever the rest)
                adaptive = adaptive or any(self.adaptive(t, key) for t in live)
            layer_ranks[key] = min(*caps, self.stacked_rank(arg, key, shape), *shape)
        return layer_ranks, adaptive

    def adaptive(self, term: Term, key: str) -> bool:
        """Whether a low-rank source's rank at a layer is chosen from the data (see svd_ranks)."""
        return isinstance(term.source, CallRef) and not term.source.dense and self.call(term.source).adaptive \
            and self.layer_rank(term, key) > 0

    def has_layer(self, term: Term, key: str) -> bool:
        if isinstance(term.source, InputRef):
            return key in self.program.inputs[term.source.name].type.layers
        return key in self.call(term.source).layer_shapes

    def layer_rank(self, term: Term, key: str) -> int:
        """The rank a low-rank source contributes to one layer in exact mode (0: it has no such layer)."""
        if isinstance(term.source, InputRef):
            layer = self.program.inputs[term.source.name].type.layers.get(key)
            return layer.rank if isinstance(layer, LoraLayer) else 0
        return self.call(term.source).layer_ranks.get(key, 0)

    def first_input(self, value: ModuleValue) -> str:
        for term in value.terms:
            if isinstance(term.source, InputRef):
                return term.source.name
            return self.first_input(term.source.args[0])
        raise AssertionError("a module value has at least one term")

    def out_dtype(self, dtype: str) -> str:
        return self.dtype or dtype

    # outputs
    def output(self, out: CheckedOutput) -> OutputPlan:
        value = out.value
        inputs = self.program.inputs
        first = self.first_input(value)
        first_type = inputs[first].type
        terms = self.plan_terms(value)
        steps: list[LayerStep] = []
        exact = self.program.mode == "exact"
        if value.type.kind == "ia3":
            for key in sorted(value.type.layers):
                contributing = tuple(PlanTerm(t.source.name, t.alpha, t.beta) for t in value.terms  # type: ignore[union-attr]
                                     if key in inputs[t.source.name].type.layers)  # type: ignore[union-attr]
                layer = inputs[contributing[0].source].type.layers[key]
                assert isinstance(layer, Ia3Layer)
                steps.append(LayerStep(key, "ia3", contributing, 0, layer.shape, 1.0, self.out_dtype(layer.dtype)))
        elif not exact:
            for key, layer in first_type.layers.items():
                assert isinstance(layer, LoraLayer)
                steps.append(LayerStep(key, "paper", terms, layer.rank, (layer.out_features, layer.in_features),
                                       layer.scaling, self.out_dtype(layer.dtype)))
        else:
            for key in sorted(value.type.layers):
                ranked = [(t, self.layer_rank(t, key)) for t in value.terms if t.beta != 0]
                ranked = [(t, r) for t, r in ranked if r > 0]
                shape_layer = value.type.layers[key]
                assert isinstance(shape_layer, LoraLayer)
                dtype = self._lora_dtype(ranked[0][0], key) if ranked else shape_layer.dtype
                steps.append(LayerStep(
                    key, "concat", tuple(PlanTerm(self.source_id(t), t.alpha, t.beta) for t, _ in ranked),
                    sum(r for _, r in ranked) or 1, (shape_layer.out_features, shape_layer.in_features),
                    1.0, self.out_dtype(dtype), any(self.adaptive(t, key) for t, _ in ranked)))
        heads, heads_note, modules_to_save = self.heads(value)
        config = self.config(value, first, steps, modules_to_save)
        bytes_read = self._bytes_read(steps, heads)
        bytes_written = sum(self._step_bytes(step) for step in steps) + sum(
            _numel(h.shape) * DTYPE_BYTES[h.dtype] for h in heads)
        if out.into is not None:
            return merged_output(OutputPlan(out.name, out.expression, out.path, value.type.kind, terms, tuple(steps),
                                            tuple(heads), heads_note, config, bytes_read, out.into.nbytes),
                                 out.into, out.changes)
        return OutputPlan(out.name, out.expression, out.path, value.type.kind, terms, tuple(steps), tuple(heads),
                          heads_note, config, bytes_read, bytes_written)

    def _lora_dtype(self, term: Term, key: str) -> str:
        if isinstance(term.source, InputRef):
            layer = self.program.inputs[term.source.name].type.layers[key]
            return layer.dtype
        having = [t for arg in term.source.args for t in arg.terms if self.has_layer(t, key)]
        # A space has its layers' rank even when every coefficient inside is 0 (core(a - a)).
        first = next((t for t in having if t.beta != 0), having[0])
        return self._lora_dtype(first, key)

    @staticmethod
    def _step_bytes(step: LayerStep) -> int:
        size = DTYPE_BYTES[step.dtype]
        if step.op == "ia3":
            return _numel(step.shape) * size
        out_features, in_features = step.shape
        return step.rank * (out_features + in_features) * size

    def _bytes_read(self, steps: list[LayerStep], heads: list[HeadStep]) -> int:
        used: set[tuple[str, str]] = set()

        def visit(source: str, key: str) -> None:
            if source in self.program.inputs:
                used.add((source, key))
            else:
                step = next(s for s in self.calls.values() if s.id == source)
                for term in step.terms:
                    visit(term.source, key)

        for step in steps:
            for term in step.terms:
                visit(term.source, step.key)
        total = sum(self.program.inputs[name].type.layers[key].nbytes for name, key in used
                    if key in self.program.inputs[name].type.layers)
        for head in heads:
            total += sum(self.program.inputs[t.source].type.heads[head.key].nbytes for t in head.terms)
        return total

    def heads(self, value: ModuleValue) -> tuple[list[HeadStep], str, list[str] | None]:
        inputs = self.program.inputs
        policy = self.program.heads
        if policy is not None and policy.policy == "drop":
            return [], "dropped (heads drop)", None
        if policy is not None and policy.policy == "from":
            assert policy.source is not None
            name = policy.source.id
            steps = [HeadStep(k, (PlanTerm(name, 1.0, 1.0),), h.shape, self.out_dtype(h.dtype), h.module_name)
                     for k, h in inputs[name].type.heads.items()]
            return steps, f"{', '.join(h.key for h in steps)} from {name}, unchanged", \
                inputs[name].config.get("modules_to_save")
        betas = {n: b for n, b in value.input_betas().items() if b != 0.0 and inputs[n].type.heads}
        if not betas:
            return [], "none", None
        first = next(iter(betas))
        steps = [HeadStep(k, tuple(PlanTerm(n, b, b) for n, b in betas.items()), h.shape, self.out_dtype(h.dtype),
                          h.module_name)
                 for k, h in inputs[first].type.heads.items()]
        mix = ", ".join(f"{n} {b:.6g}" for n, b in betas.items())
        return steps, f"{', '.join(h.key for h in steps)}: convex mix of {mix}", \
            inputs[first].config.get("modules_to_save")

    def config(self, value: ModuleValue, first: str, steps: list[LayerStep],
               modules_to_save: list[str] | None) -> dict[str, Any]:
        source = self.program.inputs[first]
        config = copy.deepcopy(source.config)
        # The task type and architecture follow the heads' owner (or the first input, heads drop).
        policy = self.program.heads
        owner = self.program.inputs[config_owner(
            value.input_betas(), value.input_betas(), self.program.inputs,
            policy.policy if policy is not None else None,
            policy.source.id if policy is not None and policy.source is not None else None)]
        config["task_type"] = owner.config.get("task_type")
        config["auto_mapping"] = owner.config.get("auto_mapping")
        config["base_model_name_or_path"] = value.type.base.name
        config["revision"] = value.type.base.revision
        config["inference_mode"] = True
        config["modules_to_save"] = modules_to_save
        keys = [step.key for step in steps]
        if set(keys) != set(source.type.layers):
            # The layer set differs from the first input's: name every layer exactly.
            config["target_modules"] = sorted(keys)
            for field_name in ("layers_to_transform", "layers_pattern", "exclude_modules"):
                config[field_name] = None
            if value.type.kind == "ia3":
                config["feedforward_modules"] = sorted(
                    s.key for s in steps if len(s.shape) == 2 and s.shape[0] == 1 and s.shape[1] != 1)
        if value.type.kind == "lora" and self.program.mode == "exact":
            config.update(rank_fields(steps))
        return config


def rank_fields(steps: Sequence[LayerStep]) -> dict[str, Any]:
    """Exact mode's rank fields of adapter_config.json: scalings are folded into B, so every layer
    is written with lora_alpha = r (scaling 1); the commonest rank is `r`, the others patterns."""
    rank = Counter(step.rank for step in steps).most_common(1)[0][0]
    return {"r": rank, "lora_alpha": rank, "use_rslora": False,
            "rank_pattern": {pattern_key(s.key): s.rank for s in steps if s.rank != rank},
            "alpha_pattern": {pattern_key(s.key): s.rank for s in steps if s.rank != rank}}


def with_ranks(out: OutputPlan, ranks: Mapping[str, int]) -> OutputPlan:
    """An output whose ranks were chosen from the data (`svd(…, energy=e)`), with the ranks its
    layers got (`ranks`: layer key → rank, as computed): steps, adapter_config.json's r and
    rank/alpha patterns, and the bytes written follow them. Other outputs are returned as they are."""
    if not any(step.adaptive for step in out.layers):
        return out
    steps = tuple(replace(step, rank=ranks[step.key], adaptive=False) if step.adaptive else step
                  for step in out.layers)
    config = {**out.config, **rank_fields(steps)}
    written = out.bytes_written - sum(_Lowering._step_bytes(s) for s in out.layers) + sum(
        _Lowering._step_bytes(s) for s in steps)
    return replace(out, layers=steps, config=config, bytes_written=written)


def merged_output(out: OutputPlan, base: BaseModel, changes: Sequence[Change]) -> OutputPlan:
    """An output merged into `base`: its layers and heads computed in fp32 (the factors the merge
    adds are never rounded to an adapter's dtype) and visited in the order of the base's files, so
    the base is read front to back."""
    position = {change.layer: (base.where[change.target], base.files[base.where[change.target]]
                               .tensors[change.target].begin) for change in changes if change.how != "ia3_bias"}
    steps = sorted((replace(step, dtype="F32") for step in out.layers), key=lambda s: position.get(s.key, (0, 0)))
    heads = sorted((replace(head, dtype="F32") for head in out.heads), key=lambda h: position.get(h.key, (0, 0)))
    return replace(out, layers=tuple(steps), heads=tuple(heads), into=base, changes=tuple(changes),
                   shards=layout(base))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def lower(program: CheckedProgram, *, dtype: str | None = None, filename: str | None = None) -> Plan:
    """Lower a checked program (it must have no errors) to an evaluation plan."""
    if not program.ok:
        raise ValueError("cannot lower a program with errors")
    lowering = _Lowering(program, dtype)
    with recursion_room():
        outputs = tuple(lowering.output(out) for out in program.outputs)
    inputs = {name: PlanInput(name, adapter.path, program.input_written.get(name, str(adapter.path)), adapter)
              for name, adapter in program.inputs.items()}
    return Plan(filename or program.source.filename, program.source.text, program.mode, dict(program.params),
                inputs, {s.id: s for s in lowering.calls.values()}, outputs)


def rank_limit(program: CheckedProgram, max_rank: int, *, given: str) -> list[Diagnostic]:
    """E034 at every output whose rank is above `max_rank` at some layer (a serving stack's limit:
    vLLM's `max_lora_rank`), with the `svd` form that fits it as the hint; `given` says how the
    user gave the limit (`--max-rank 16`, `max_rank: 16`). An output whose ranks are chosen from the
    data (`svd(…, energy=e)`) is refused when the largest rank they may reach is above it. An output
    merged into its base model is a full model: the limit does not concern it."""
    if not program.ok:
        return []
    with recursion_room():
        lowering = _Lowering(program, None)
        outputs = [(checked, lowering.output(checked)) for checked in program.outputs]
    problems = []
    for checked, out in outputs:
        if checked.into is not None:
            continue  # merged into its base: a full model, which has no adapter rank to cap
        over = [step for step in out.layers if out.kind == "lora" and step.rank > max_rank]
        if not over:
            continue
        top = max(step.rank for step in over)
        chosen = any(step.adaptive for step in over)
        name = checked.name or checked.expression
        name = name if len(name) <= 40 else name[:39] + "…"
        notes = [f"rank above {max_rank} at {len(over)} of its {len(out.layers)} layers, e.g. {over[0].key} "
                 f"(rank {over[0].rank})"]
        if chosen:
            notes.append("svd(…, energy=e) chooses each layer's rank from the data, up to the rank shown")
        problems.append(error(
            "E034", f"output `{name}` {'may reach' if chosen else 'has'} rank {top}, above {given}",
            checked.source or program.source, checked.expr_span or checked.span, notes=notes,
            hints=[_svd_form(program, checked, max_rank)]))
    return problems


def _svd_form(program: CheckedProgram, checked: CheckedOutput, max_rank: int) -> str:
    """The hint of E034: the output written through an svd that keeps at most `max_rank`: the
    output's own svd with its rank (or max_rank) lowered, else the output wrapped in one."""
    from .checked import spell_mode
    from .parser import parse_expression
    from .source import Source

    terms = checked.value.terms
    ref = terms[0].source if len(terms) == 1 and terms[0].beta == 1.0 else None
    if isinstance(ref, CallRef) and ref.op == "svd":
        call, _ = parse_expression(Source(ref.text, "svd"))
        if isinstance(call, ast.Call) and call.args:
            argument = ref.text[call.args[0].span.start:call.args[-1].span.end]
            options = dict(ref.options)
            if "energy" in options:
                share = f"{float(options['energy']):.6g}"
                return (f"svd({argument}, energy={share}, max_rank={max_rank}): per layer the smallest rank that "
                        f"keeps a share {share} of ‖ΔW‖², at most {max_rank}")
            return f"svd({argument}, rank={max_rank}): the best rank-{max_rank} approximation per layer"
    written = checked.name or checked.expression  # a bound name as the user wrote it
    expression = " ".join(" ".join(line.split("#")[0] for line in written.splitlines()).split())
    expression = expression if len(expression) <= 60 else "…"
    form = (f"svd({expression}, rank={max_rank}): the best rank-{max_rank} approximation per layer (or "
            f"`energy=e, max_rank={max_rank}`: per layer the smallest rank keeping a share e of ‖ΔW‖², at most "
            f"{max_rank})")
    if program.mode != "exact":
        form += f"; svd needs {spell_mode(program.spelling)}, which adds the weight updates ΔW themselves"
    return form
