"""Running a checked program end to end: lower → execute on a device → write PEFT adapters."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .checked import CheckedProgram, spell_mode
from .diagnostics import Diagnostic, PemError, display_path, error, warning
from .formatting import dropped_text, human_bytes
from .hashing import sha256_file
from .lower import lower, with_ranks
from .plan import PEFT_PREFIX, Dropped, OutputPlan, Plan, dropped

# Paper mode mixes A and B separately; when inputs' A differ (they drift in training, or started
# apart), B·A gains cross terms B_i·A_j. Below this mean cosine the user is told (W002).
A_COSINE_WARNING = 0.9
# Two independently initialised r×k matrices have a cosine of mean 0 and standard deviation
# 1/sqrt(r·k); the mean over L layers, sqrt(Σ 1/(r_l·k_l))/L. A mean cosine within this many of
# those standard deviations of 0 is what separate initialisations give (chance exceeds it about
# once in 16,000); inputs trained from one initialisation keep a cosine far above it (about 0.5
# after long training). Where A is so small that chance alone reaches SEPARATE_CAP, no more than
# SEPARATE_CAP is taken as "separate".
SEPARATE_SIGMAS = 4.0
SEPARATE_CAP = 0.25
FINITE_MAX = {"F16": 65504.0, "BF16": 3.3895313892515355e38, "F32": 3.4028234663852886e38,
              "F64": 1.7976931348623157e308}


@dataclass
class RunResult:
    plan: Plan  # with the ranks the data chose (svd with energy=), where an output's were not planned
    tensors: list[dict[str, Any]]
    diagnostics: list[Diagnostic] = field(default_factory=list)
    device_note: str = ""
    seconds: float = 0.0
    dropped: list[list[Dropped]] = field(default_factory=list)  # per output, what each of its svd calls dropped


def execute(program: CheckedProgram, *, device: str = "auto", dtype: str | None = None,
            on_layer: Callable[[], None] | None = None, plan: Plan | None = None,
            cache: Any = None) -> RunResult:
    """Evaluate every output to tensors (nothing is written). Raises PemError on E014.

    `cache` (a backend TensorCache) keeps input tensors on the device between evaluations, so a
    λ sweep or a REPL session reads each input once."""
    from . import interrupts

    with interrupts.deferred():  # Ctrl-C while torch imports waits for the import, then stops the run
        from .backend import resolve_device
        from .backend.torch_backend import TorchBackend

    start = time.perf_counter()
    plan = plan or lower(program, dtype=dtype)
    torch_device, note = resolve_device(device)
    tensors, report = TorchBackend(torch_device, cache=cache).run(plan, on_layer=on_layer)
    diagnostics = _diagnose(program, plan, report)
    plan = replace(plan, outputs=tuple(with_ranks(out, layer_ranks(shapes_of(result)))
                                       for out, result in zip(plan.outputs, tensors, strict=True)))
    return RunResult(plan, tensors, diagnostics, note, time.perf_counter() - start,
                     [dropped(plan, out, report.svd_dropped) for out in plan.outputs])


def shapes_of(tensors: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """PEFT key → shape, of an output's tensors."""
    return {key: tuple(tensor.shape) for key, tensor in tensors.items()}


def layer_ranks(shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Layer key → rank, from the shapes of an output's lora_A tensors (what `with_ranks` takes
    for an output whose ranks the data chose)."""
    suffix = ".lora_A.weight"
    return {key.removeprefix(PEFT_PREFIX).removesuffix(suffix): int(shape[0])
            for key, shape in shapes.items() if key.endswith(suffix)}


def _diagnose(program: CheckedProgram, plan: Plan, report: Any) -> list[Diagnostic]:
    """E014 (a non-finite input) or E027 (a non-finite result) as a raised PemError; otherwise the
    warnings the run measured (W002)."""
    if report.non_finite:
        diagnostics = []
        by_input: dict[str, list[str]] = {}
        for name, key in report.non_finite:
            by_input.setdefault(name, []).append(key)
        for name, keys in by_input.items():
            source, span = program.input_spans[name]
            diagnostics.append(error(
                "E014", f"input `{name}` holds non-finite values (NaN or infinity)", source, span,
                notes=[f"{len(keys)} tensor{'s' if len(keys) > 1 else ''}: {', '.join(keys[:3])}"
                       + (" …" if len(keys) > 3 else "")],
                hints=["the adapter is damaged or diverged in training; nothing was written"]))
        raise PemError(diagnostics)
    if report.non_finite_result is not None:
        index, key, dtype_name = report.non_finite_result
        checked = program.outputs[index]
        name = checked.name or checked.expression
        where = f" → {display_path(checked.path)}" if checked.path is not None else ""
        raise PemError([error(
            "E027", f"output `{name}` is not finite in {dtype_name} at {key}: the result, not an input, "
            "overflows", program.source, checked.expr_span or checked.span,
            notes=[f"output `{name}`{where}; the inputs' values are finite, the coefficients make this layer "
                   f"exceed the largest {dtype_name} number ({FINITE_MAX[dtype_name]:.4g})"],
            hints=["use smaller coefficients" + (", or write a wider dtype (--dtype float32; dtype=\"float32\" in the API)"
                                                 if dtype_name != "F32" else "") + "; nothing was written"])])
    return paper_warnings(program, plan, report.a_cosines)


def separate_bound(layers: dict[str, tuple[float, int]]) -> float:
    """The largest mean cosine that independent initialisations of these layers' A matrices
    plausibly give (see SEPARATE_SIGMAS); `layers`: layer → (cosine, entries of A)."""
    spread = math.sqrt(sum(1 / max(1, numel) for _, numel in layers.values())) / max(1, len(layers))
    return min(SEPARATE_SIGMAS * spread, SEPARATE_CAP)


def paper_warnings(program: CheckedProgram, plan: Plan,
                   a_cosines: dict[tuple[str, str], dict[str, tuple[float, int]]]) -> list[Diagnostic]:
    """W002, once for the whole program: paper mode over LoRA inputs whose A matrices differ, told
    apart as initialised separately (cosine ≈ 0: paper mode's result is not a merge of the
    inputs) or drifted apart in training from one initialisation (cosine well above 0, below
    A_COSINE_WARNING). `a_cosines`: per pair (input, first input), per layer (cosine, entries of A)."""
    separate: list[str] = []
    drifted: list[str] = []
    flagged: list[tuple[str, str]] = []
    for (name, first), layers in a_cosines.items():
        if not layers:
            continue
        values = [cosine for cosine, _ in layers.values()]
        mean = statistics.fmean(values)
        if mean >= A_COSINE_WARNING:
            continue
        bound = separate_bound(layers)
        measured = (f"{name} vs {first}: the cosine of their A matrices over {len(values)} layer"
                    f"{'s' if len(values) != 1 else ''} is mean {mean:.3f}, min {min(values):.3f}")
        if abs(mean) <= bound:
            separate.append(f"{measured}; matrices this size initialised independently give |mean| up to "
                            f"about {bound:.3f}: these were initialised separately")
        else:
            drifted.append(f"{measured}; well above the {bound:.3f} that independent initialisations give: "
                           "one initialisation, drifted apart in training")
        flagged.append((name, first))
    if not flagged:
        return []
    pairs_at = {(t.source, step.terms[0].source): i for i, out in reversed(list(enumerate(plan.outputs)))
                for step in out.layers if step.op == "paper" for t in step.terms[1:]}
    index = min(pairs_at.get(pair, 0) for pair in flagged)  # the first output that mixes a flagged pair
    checked = program.outputs[index]
    pairs = ", ".join(f"{name} vs {first}" for name, first in flagged)
    exact = spell_mode(program.spelling)
    if separate:
        message = f"paper mode over LoRA inputs that were initialised separately ({pairs})"
        why = ("paper mode adds A and B separately, so the product (ΣαA)(ΣβB) contains cross terms B_i·A_j "
               "(i ≠ j); with unrelated A matrices they are as large as the inputs' own terms, so the result is "
               "not a merge of the inputs")
        hint = (f"use {exact}: it adds the weight updates ΔW = s·B·A themselves, without cross terms "
                "(paper mode is meaningful only for adapters trained from one initialisation)")
    else:
        message = f"paper mode over LoRA inputs whose A matrices drifted apart in training ({pairs})"
        why = ("paper mode adds A and B separately, so the product (ΣαA)(ΣβB) contains cross terms B_i·A_j "
               "(i ≠ j), which are small only while the A matrices stay close (cosine near 1)")
        hint = f"{exact} adds the weight updates ΔW = s·B·A themselves, without cross terms"
    return [warning("W002", message, program.source, checked.expr_span or checked.span,
                    notes=[*separate, *drifted, why], hints=[hint])]


def measure_paper(program: CheckedProgram, *, device: str = "auto", dtype: str | None = None,
                  cache: Any = None) -> list[Diagnostic]:
    """W002 for a program before anything is computed (a sweep, tune): reads the inputs' A
    matrices of its paper-mode layers only. [] for a program without such layers."""
    plan = lower(program, dtype=dtype)
    if not any(step.op == "paper" and len(step.terms) > 1 for out in plan.outputs for step in out.layers):
        return []
    from . import interrupts

    with interrupts.deferred():
        from .backend import resolve_device
        from .backend.torch_backend import TorchBackend

    torch_device, _ = resolve_device(device)
    return paper_warnings(program, plan, TorchBackend(torch_device, cache=cache).a_cosines(plan))


def stream(program: CheckedProgram, *, device: str = "auto", dtype: str | None = None, force: bool = False,
           on_layer: Callable[[], None] | None = None, plan: Plan | None = None,
           protect: Mapping[str, Path] | None = None) -> RunResult:
    """Evaluate and write every output that has a directory, streaming: each output's file is laid
    out from the plan, every layer goes to disk as soon as it is computed (while the next one
    computes), and the inputs are hashed as they are read. Memory holds about one layer of every
    input and one output layer, whatever the size of the outputs. Outputs without a directory come
    back in `tensors` (in memory), the others as empty dicts.

    Every destination passes the writer's guard first; all outputs are staged and swapped into
    place only when every one is complete and finite, so an error (E014, E027, E018) writes nothing.
    `protect` names more files (the REPL's history) that no output may replace or contain."""
    from . import interrupts

    with interrupts.deferred():  # Ctrl-C while torch imports waits for the import, then stops the run
        from .backend import resolve_device
        from .backend.torch_backend import TorchBackend
    from .writer import SpilledAdapter, StagedAdapter, guard, metadata, staged

    start = time.perf_counter()
    plan = plan or lower(program, dtype=dtype)
    torch_device, note = resolve_device(device)
    destinations = [(index, out) for index, out in enumerate(plan.outputs) if out.path is not None]
    bases = {out.into.written: out.into.path for _, out in destinations if out.into is not None}
    guard([out.path for _, out in destinations if out.path is not None],
          {**{name: item.path for name, item in plan.inputs.items()}, **(protect or {})}, force=force, bases=bases)
    placeholder = {name: "0" * 64 for name in plan.inputs}  # a sha256 is 64 hex digits: the header's length is fixed
    with staged([out.path for _, out in destinations if out.path is not None], force=force,
                protect=[item.path for item in plan.inputs.values()] + list(bases.values())) as (stagings, writer):
        files: dict[int, Any] = {}  # StagedAdapter, or MergedModel for an output merged into its base
        try:
            for (index, out), staging in zip(destinations, stagings, strict=True):
                if out.into is not None:
                    from .intobase import MergedModel, merge_metadata

                    files[index] = MergedModel(staging, out, merge_metadata(metadata(plan, out, placeholder), out),
                                               destination=out.path)
                    continue
                # An output whose ranks the data chooses (svd with energy=) is spilled, then laid out.
                adapter = SpilledAdapter if any(step.adaptive for step in out.layers) else StagedAdapter
                files[index] = adapter(staging, output_entries(out), metadata(plan, out, placeholder), writer,
                                       destination=out.path)

            def sink(index: int, tensors: dict[str, Any], ready: Callable[[], None] | None) -> bool:
                if index not in files:
                    return False
                files[index].put(tensors, ready)
                return True

            tensors, report = TorchBackend(torch_device).run(plan, on_layer=on_layer, sink=sink, hash_inputs=True)
            diagnostics = _diagnose(program, plan, report)  # raises on E014/E027: staging is removed
            outputs = list(plan.outputs)
            for index, out in enumerate(plan.outputs):
                file = files.get(index)
                if out.into is not None:
                    continue  # merged into its base: a full model, no adapter ranks to record
                outputs[index] = with_ranks(out, file.ranks if isinstance(file, SpilledAdapter)
                                            else layer_ranks(shapes_of(tensors[index])))
            plan = replace(plan, outputs=tuple(outputs))
            report_dropped = [dropped(plan, out, report.svd_dropped) for out in plan.outputs]
            for index, _ in destinations:
                final = plan.outputs[index]
                meta = metadata(plan, final, report.sha256, report_dropped[index])
                if final.into is not None:
                    from .intobase import merge_metadata

                    meta = merge_metadata(meta, final)
                files[index].finish(final.config, meta)
        finally:
            for file in files.values():
                file.close()
    return RunResult(plan, tensors, diagnostics, note, time.perf_counter() - start, report_dropped)


def resharded(plan: Plan, max_shard_size: int | None) -> Plan:
    """The plan with its full models (`into`) written in new shards of at most `max_shard_size`
    bytes (`--max-shard-size`); ValueError when no output is merged into a base."""
    if max_shard_size is None:
        return plan
    if not any(out.into is not None for out in plan.outputs):
        raise ValueError("a max shard size applies to a full model: an output merged into its base "
                         "(`output x into \"BASE\" -> \"DIR\"`, --into BASE)")
    from .basemodel import layout

    return replace(plan, outputs=tuple(replace(out, shards=layout(out.into, max_shard_size))
                                       if out.into is not None else out for out in plan.outputs))


def output_entries(out: OutputPlan) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor an output will have: PEFT key → (safetensors dtype, shape), from the plan alone."""
    from .plan import tensor_key

    entries: dict[str, tuple[str, tuple[int, ...]]] = {}
    for step in out.layers:
        if step.op == "ia3":
            entries[tensor_key(step.key, "ia3_l")] = (step.dtype, tuple(step.shape))
        else:
            out_features, in_features = step.shape
            entries[tensor_key(step.key, "lora_A.weight")] = (step.dtype, (step.rank, in_features))
            entries[tensor_key(step.key, "lora_B.weight")] = (step.dtype, (out_features, step.rank))
    for head in out.heads:
        entries[f"base_model.model.{head.key}"] = (head.dtype, tuple(head.shape))
    return entries


def write_outputs(result: RunResult, *, force: bool = False, protect: Mapping[str, Path] | None = None) -> list[Path]:
    """Write every output of an executed plan (atomically; inputs hashed for provenance).

    Every destination passes the writer's guard before any is written (raises WriteError, a
    PemError with E018 diagnostics). Each output is atomic by itself; a kill between two outputs
    can leave the earlier ones complete and the later ones absent (or as they were). `protect`
    names more files (the REPL's history) that no output may replace or contain."""
    from .writer import guard, metadata, write_adapter

    into_refused(result.plan.outputs, "this way of writing")  # written only by `stream`: never as an adapter
    outputs = [(index, out, tensors) for index, (out, tensors) in
               enumerate(zip(result.plan.outputs, result.tensors, strict=True)) if out.path is not None]
    guard([out.path for _, out, _ in outputs if out.path is not None],
          {**{name: item.path for name, item in result.plan.inputs.items()}, **(protect or {})}, force=force)
    hashes = {name: sha256_file(item.adapter.weights_file) for name, item in result.plan.inputs.items()}
    written = []
    for index, out, tensors in outputs:
        assert out.path is not None
        lost = result.dropped[index] if len(result.dropped) == len(result.plan.outputs) else None
        write_adapter(out.path, tensors, out.config, metadata(result.plan, out, hashes, lost), force=force,
                      protect=[item.path for item in result.plan.inputs.values()])
        written.append(out.path)
    return written


def into_refused(outputs: Sequence[Any], who: str) -> None:
    """E024 when one of `outputs` (checked or planned) is merged into a base model: `who` (a sweep)
    does not write full models, and never writes an adapter in a merged model's place."""
    merged = [out for out in outputs if out.into is not None]
    if merged:
        raise PemError([error("E024", f"{who} does not merge into a base model (`into` {merged[0].into.written}): "
                              "each point would be a whole model",
                              notes=[f"output {merged[0].name or merged[0].expression}"],
                              hints=["write one point at a time with `pemlang run FILE.pem --set NAME=VALUE` (or "
                                     "`pemlang eval ... --into BASE`, `Program.save(DIR, into=BASE)`)"])])


def summary_line(out: OutputPlan, lost: Sequence[Dropped] = ()) -> str:
    """`out/yelp_cls: LoRA r=8, 8 layers, 28.5 KiB F32` — one output, for the run summary; for an
    output made through svd, what each svd call dropped (`; svd(a, rank=4) dropped 12.3% of ‖ΔW‖²
    at most, 8.1% on average over 8 layers`)."""
    if out.into is not None:  # the files as written (resharded or not), their size on disk
        changed = len(out.changes)
        names = [f.name for f in out.shards.files] if out.shards is not None else [f.path.name for f in out.into.files]
        size = sum(os.path.getsize(out.path / name) for name in names) if out.path is not None else out.into.nbytes
        base = out.into.written if out.into.written.startswith("hf://") else display_path(out.into.path)
        return (f"{display_path(out.path) if out.path is not None else out.name or out.expression}: "
                f"{'LoRA' if out.kind == 'lora' else '(IA)3'} merged into {base}, {changed} "
                f"tensor{'s' if changed != 1 else ''} changed in {len(names)} weight "
                f"file{'s' if len(names) != 1 else ''}, {human_bytes(size)}")
    ranks = sorted({step.rank for step in out.layers})
    kind = ("LoRA r=" + ("/".join(map(str, ranks)) if len(ranks) <= 3 else f"{ranks[0]}…{ranks[-1]}")
            if out.kind == "lora" else "(IA)3")
    dtypes = "/".join(sorted({step.dtype for step in out.layers}))
    modules = len({h.module or h.key for h in out.heads})
    heads = f", {modules} head{'s' if modules > 1 else ''}" if out.heads else ""
    where = display_path(out.path) if out.path is not None else (out.name or out.expression)
    report = "".join(f"; {dropped_text(d.call, d.layers, d.largest, d.mean)}" for d in lost)
    return (f"{where}: {kind}, {len(out.layers)} layers{heads}, "
            f"{human_bytes(out.bytes_written)} {dtypes}{report}")
