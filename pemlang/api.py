"""The Python API ("Python API" in the README): compile once, evaluate many times.

    import pemlang

    program = pemlang.compile("lam*a + (1 - lam)*b", inputs={"a": "adapters/a", "b": "adapters/b"},
                              params={"lam": 0.5})
    tensors = program.evaluate(lam=0.3)             # {output: {PEFT key: tensor}}
    program.save("out/mix", lam=0.3)                # a PEFT adapter directory
    model = program.load_into(base_model, lam=0.3)  # a PeftModel, in memory
    for params, tensors in program.sweep(lam=[0.0, 0.5, 1.0]): ...

A program is parsed and type-checked when compiled; adapter signatures are read once, and input
tensors are read from disk once and kept on the device between evaluations. User errors raise
`PemError`, whose diagnostics render as on the command line.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import ast, hub
from .adapters import Adapter, read_adapter
from .backend import DeviceError
from .check import Checker, check_parsed, default_base_dir, is_name
from .checked import CheckedProgram, Mode, Override
from .diagnostics import CompileError, Diagnostic, PemError, first_line
from .parser import parse_expression, parse_program
from .plan import Dropped, Plan, dtype_name
from .source import Source, Span, source_from_text
from .sourcefiles import read_source


class AdapterCache:
    """Adapter signatures by path, re-read only when the files change (mtime, size)."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, bool], tuple[tuple[int, ...], Adapter]] = {}

    def __call__(self, path: Path, *, allow_pickle: bool = False) -> Adapter:
        key = (str(path), allow_pickle)
        stamp = self._stamp(path)
        hit = self._entries.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        adapter = read_adapter(path, allow_pickle=allow_pickle)
        self._entries[key] = (stamp, adapter)
        return adapter

    @staticmethod
    def _stamp(path: Path) -> tuple[int, ...]:
        stamp: list[int] = []
        for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
            try:
                st = (path / name).stat()
                stamp += [st.st_mtime_ns, st.st_size]
            except OSError:
                stamp += [0, -1]
        return tuple(stamp)


Frontend = Callable[[Sequence[Override], AdapterCache], CheckedProgram]


@dataclass
class Evaluation:
    """One evaluation: the parameters used, the plan, and per output its tensors (PEFT keys)."""

    params: dict[str, float]
    plan: Plan
    tensors: dict[str, dict[str, Any]]
    warnings: list[Diagnostic]
    # Per output, what each of its svd calls dropped: pemlang.plan.Dropped(call, layers, largest, mean),
    # the largest and mean share of ‖ΔW‖²_F not kept over its layers.
    dropped: dict[str, list[Dropped]] = field(default_factory=dict)


def _numbers(params: Mapping[str, Any]) -> dict[str, tuple[float, Source]]:
    """Param values given to the API as (float, source for diagnostics); CompileError (E017) for a
    value that is not a number, E026 for one that is not a finite float."""
    numbers: dict[str, tuple[float, Source]] = {}
    problems = []
    for name, value in params.items():
        source = Source(f"{name}={value!r}", "params")
        span = Span(len(str(name)) + 1, len(source.text))
        if not is_name(name):
            problems.append(Diagnostic("E017", f"params has {name!r}, which is not a param name", source,
                                       Span(0, max(1, len(str(name)))), hints=("a param name is an identifier",)))
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(Diagnostic("E017", f"params gives `{name}` the value {value!r}, which is not a number",
                                       source, span, hints=(f"pass a number, e.g. {name}=0.5",)))
            continue
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            problems.append(Diagnostic("E026", f"params gives `{name}` a value that is not a finite number",
                                       source, span, hints=("parameters are finite numbers",)))
            continue
        numbers[name] = (number, source)
    if problems:
        raise CompileError(problems)
    return numbers


class Program:
    """A compiled program: parsed and checked once, evaluated with any parameter values."""

    def __init__(self, frontend: Frontend, *, params: Mapping[str, float] | None = None, device: str = "auto",
                 dtype: str | None = None, max_rank: int | None = None, allow_pickle: bool = False):
        self._frontend = frontend
        self._allow_pickle = allow_pickle  # for save(into=…): a pickled base model too
        # Outputs above this rank are E034 (with the svd form that fits as the hint); a config's
        # block checks its own (and from_config's), as `max_rank` then says.
        self.max_rank = _max_rank(max_rank)
        self._limit = self.max_rank
        # What each output's svd calls dropped at the last evaluate, save or sweep point: {output: [Dropped]}.
        self.dropped: dict[str, list[Dropped]] = {}
        self._fixed = dict(params or {})  # param values given at compile time: under every evaluation
        self._adapters = AdapterCache()
        from .backend import device_problem

        problem = device_problem(device)
        if problem is not None:
            raise ValueError(problem)
        self.device = device
        self.dtype = dtype_name(dtype) if dtype is not None else None  # ValueError for an unknown dtype
        self._tensor_cache: Any = None
        # How to compile this program again (a Ray worker does, in its own process): (function, kwargs).
        self._recipe: tuple[Callable[..., Program], dict[str, Any]] | None = None
        self.checked = self._check({})  # raises CompileError with every diagnostic
        # The checker's warnings; W002 joins them once an evaluation (or a sweep or tune, before
        # its first point) has measured the inputs' A matrices: once per program.
        self.warnings = [d for d in self.checked.diagnostics if not d.is_error]
        self._measured = False

    # -- facts ---------------------------------------------------------------------------------
    @property
    def params(self) -> dict[str, float]:
        """The declared parameters and their default values."""
        return dict(self.checked.params)

    @property
    def outputs(self) -> list[str]:
        """Output names: the binding's name, else the output expression's text."""
        return [o.name or o.expression for o in self.checked.outputs]

    @property
    def mode(self) -> Mode:
        return self.checked.mode

    def paper_warnings(self, device: str | None = None) -> list[Diagnostic]:
        """W002 (paper mode over LoRA inputs whose A matrices differ), measured once per program by
        reading the inputs' A matrices, and added to `warnings`; [] when there is nothing to say."""
        if not self._measured:
            from .backend.torch_backend import TensorCache
            from .run import measure_paper

            if self._tensor_cache is None:
                self._tensor_cache = TensorCache()
            try:
                self._note(measure_paper(self.checked, device=device or self.device, dtype=self.dtype,
                                         cache=self._tensor_cache))
            except DeviceError as exc:
                raise exc.as_api() from None
        return [d for d in self.warnings if d.code == "W002"]

    def _note(self, diagnostics: Iterable[Diagnostic]) -> None:
        """W002 measured while evaluating joins `warnings`, once per program."""
        self._measured = True
        if not any(d.code == "W002" for d in self.warnings):
            self.warnings.extend(d for d in diagnostics if d.code == "W002")

    # -- stages --------------------------------------------------------------------------------
    def _check(self, params: Mapping[str, float]) -> CheckedProgram:
        overrides = [Override(name, number, source, what="params")
                     for name, (number, source) in _numbers({**self._fixed, **params}).items()]
        checked = self._frontend(overrides, self._adapters)
        if self._limit is not None:
            from dataclasses import replace

            from .lower import rank_limit

            checked = replace(checked, diagnostics=(*checked.diagnostics, *rank_limit(
                checked, self._limit, given=f"the rank limit {self._limit}")))  # max_rank=, or run --sweep's --max-rank
        errors = [d for d in checked.diagnostics if d.is_error]
        if errors:
            raise CompileError(errors)
        return checked

    def _dtype(self, dtype: str | None) -> str | None:
        """The dtype of one call: its own `dtype=`, else the program's (ValueError for an unknown one)."""
        return dtype_name(dtype) if dtype is not None else self.dtype

    def plan(self, params: Mapping[str, float] | None = None, *, dtype: str | None = None, **kw: float) -> Plan:
        """The lowered evaluation plan for these parameter values."""
        from .lower import lower

        dtype = self._dtype(dtype)
        return lower(self._check({**(params or {}), **kw}), dtype=dtype)

    def evaluate(self, params: Mapping[str, float] | None = None, *, device: str | None = None,
                 dtype: str | None = None, **kw: float) -> dict[str, dict[str, Any]]:
        """Tensors of every output, by output name: {PEFT state-dict key: CPU tensor}. `dtype`
        (`float16`, …) overrides the program's for this call."""
        dtype = self._dtype(dtype)
        return self._evaluate({**(params or {}), **kw}, device, dtype=dtype).tensors

    def _evaluate(self, params: Mapping[str, float], device: str | None,
                  checked: CheckedProgram | None = None, *, dtype: str | None = None) -> Evaluation:
        from .backend.torch_backend import TensorCache
        from .run import execute

        checked = checked if checked is not None else self._check(params)
        if self._tensor_cache is None:
            self._tensor_cache = TensorCache()
        try:
            result = execute(checked, device=device or self.device, dtype=dtype or self.dtype,
                             cache=self._tensor_cache)
        except CompileError:
            raise
        except PemError as exc:  # a non-finite input or result (E014, E027)
            raise CompileError(exc.diagnostics) from None
        except DeviceError as exc:  # said as the API spells it: device="cuda"
            raise exc.as_api() from None
        self._note(result.diagnostics)
        names = [o.name or o.expression for o in checked.outputs]
        self.dropped = dict(zip(names, result.dropped, strict=True))
        return Evaluation({**checked.params}, result.plan, dict(zip(names, result.tensors, strict=True)),
                          result.diagnostics, dict(self.dropped))

    def save(self, directory: str | Path | None = None, params: Mapping[str, float] | None = None, *,
             into: str | Path | None = None, device: str | None = None, dtype: str | None = None,
             force: bool = False, provenance: Mapping[str, str] | None = None,
             max_shard_size: int | str | None = None, **kw: float) -> list[Path]:
        """Write the outputs as PEFT adapter directories, streaming: each layer goes to disk as it
        is computed, so memory does not grow with the output.

        A program whose outputs have directories writes there; `directory` gives the directory of
        a single-output program compiled without one (an expression). `into` (a base model
        directory or `hf://ORG/NAME[@REV]`, relative to the working directory) writes the output
        merged into that base instead: a full model, as `output x into "BASE" -> "DIR"` does (its
        warnings, W008, join `warnings`); `max_shard_size` (bytes, or "2GB", "500MB") writes its
        weights in new shards of at most that size. `dtype` (`float16`, …) overrides the program's
        for this call. `provenance` adds entries (`pemlang.…` keys) to the metadata recorded in the written
        header."""
        from dataclasses import replace

        from .lower import lower
        from .run import stream

        dtype = self._dtype(dtype)
        checked = self._check({**(params or {}), **kw})
        if into is not None:
            checked = self._merged(checked, into, directory, allow_pickle=self._allow_pickle)
            self.warnings.extend(d for d in checked.diagnostics if not d.is_error and d not in self.warnings)
        plan = self._placed(lower(checked, dtype=dtype), directory=directory)
        if max_shard_size is not None:
            from .formatting import parse_size
            from .run import resharded

            plan = resharded(plan, parse_size(max_shard_size))  # ValueError: not a size, or no full model
        if provenance:
            plan = replace(plan, provenance=tuple(sorted(provenance.items())))
        try:
            result = stream(checked, device=device or self.device, dtype=dtype, force=force, plan=plan)
            self._note(result.diagnostics)
            self.dropped = dict(zip([o.name or o.expression for o in checked.outputs], result.dropped, strict=True))
        except CompileError:
            raise
        except DeviceError as exc:
            raise exc.as_api() from None
        except PemError as exc:  # the writer's guard, an OS error while writing (E018), E014, E027
            raise CompileError(exc.diagnostics) from None
        return [o.path for o in plan.outputs if o.path is not None]

    @staticmethod
    def _merged(checked: CheckedProgram, into: str | Path, directory: str | Path | None, *,
                allow_pickle: bool = False) -> CheckedProgram:
        """`checked` with its one output merged into the base model `into` (save(into=…))."""
        from .check import attach_into

        if isinstance(into, bool) or not isinstance(into, str | os.PathLike):
            raise TypeError(f"into must be a base model directory (a str or Path), not {type(into).__name__}")
        if len(checked.outputs) != 1:
            raise ValueError("into= can be given only for a program with exactly one output (a program file "
                             "names each output's base with `output x into \"BASE\" -> \"DIR\"`)")
        out = checked.outputs[0]
        if directory is None and out.path is None:
            raise ValueError("this program's output has no directory: pass directory=")
        path = Path(directory).resolve() if directory is not None else out.path
        merged = attach_into(checked, os.fspath(into), path, base_dir=Path.cwd(), what="into=",
                             allow_pickle=allow_pickle)
        errors = [d for d in merged.diagnostics if d.is_error]
        if errors:
            raise CompileError(errors)
        return merged

    @staticmethod
    def _placed(plan: Plan, *, directory: str | Path | None = None, suffix: str | None = None) -> Plan:
        """The plan with its outputs' directories: `directory` for a single-output program, `suffix`
        appended to each directory's name (sweeps)."""
        from dataclasses import replace

        outputs = plan.outputs
        if directory is not None:
            if len(outputs) != 1:
                raise ValueError("a directory can be given only for a program with exactly one output")
            outputs = (replace(outputs[0], path=Path(directory).resolve()),)
        elif any(o.path is None for o in outputs):
            raise ValueError("this program's outputs have no directory: pass directory=")
        if suffix:
            outputs = tuple(replace(o, path=o.path.with_name(f"{o.path.name}.{suffix}")) for o in outputs)  # type: ignore[union-attr]
        return replace(plan, outputs=outputs)

    def write(self, evaluation: Evaluation, *, directory: str | Path | None = None, suffix: str | None = None,
              force: bool = False) -> list[Path]:
        """Write an evaluation's outputs; `suffix` is appended to each directory's name (sweeps)."""
        from .run import RunResult, write_outputs

        plan = self._placed(evaluation.plan, directory=directory, suffix=suffix)
        try:
            return write_outputs(RunResult(plan, list(evaluation.tensors.values()), evaluation.warnings,
                                           dropped=list(evaluation.dropped.values())), force=force)
        except PemError as exc:  # the writer's guard, or an OS error while writing (E018)
            raise CompileError(exc.diagnostics) from None

    def sweep(self, grid: Mapping[str, Iterable[float] | float] | None = None, *, device: str | None = None,
              dtype: str | None = None, callback: Callable[[Evaluation], None] | None = None, save: bool = False,
              force: bool = False, **axes: Iterable[float] | float) -> Iterator[Evaluation]:
        """Evaluate over the product of parameter values, inputs read once; yields (and passes to
        `callback`) one Evaluation per point. Every point is type-checked before any is computed.
        With `save`, each point's outputs are written to `DIR.NAME=VALUE` beside each output DIR (one
        number format per axis, `sweep_suffix`); every directory is checked, and the bytes to write
        against the free disk space, before any point is computed. A single number is one point."""
        from .grids import GridValues

        dtype = self._dtype(dtype)
        # A grid from the command line (GridValues) is counted, and its bytes checked against the
        # free space, before any of its points is built.
        lists: dict[str, Sequence[float]] = {
            name: values if isinstance(values, GridValues) else _axis(name, values)
            for name, values in {**(grid or {}), **axes}.items()}
        names = list(lists)
        unknown = [name for name in names if name not in self.params]
        if unknown:
            raise CompileError([Diagnostic("E017", f"sweep names `{name}`, which is not a param of the program",
                                           Source(name, "sweep"), Span(0, len(name)),
                                           notes=(f"the program's params: {', '.join(self.params) or 'none'}",))
                                for name in unknown])
        count = math.prod(len(values) for values in lists.values())
        if save and count:
            try:
                first = self._check({name: values[0] for name, values in lists.items()})
            except CompileError:
                pass  # every point's diagnostics are reported below
            else:
                problem = self._sweep_space(first, count, dtype=dtype)
                if problem is not None:
                    raise CompileError([problem])
        decimals = sweep_decimals(lists)  # raises ValueError on a value listed twice
        points = [dict(zip(names, values, strict=True)) for values in itertools.product(*lists.values())]
        problems: dict[tuple[object, ...], tuple[Diagnostic, list[Mapping[str, float]]]] = {}
        checked: list[CheckedProgram] = []
        for point in points:
            try:
                checked.append(self._check(point))
            except CompileError as exc:
                for d in exc.diagnostics:
                    key = (d.code, d.message, d.source.filename if d.source else None, d.span)
                    problems.setdefault(key, (d, []))[1].append(point)
        if problems:
            raise CompileError([_at_points(d, where) for d, where in problems.values()])
        suffixes = [sweep_suffix(point, decimals) for point in points]
        if save and checked:
            self._guard_sweep(checked, suffixes, force=force, dtype=dtype)
        if checked:
            self.paper_warnings(device)  # in `warnings` before the first point
        for number, (point, program, suffix) in enumerate(zip(points, checked, suffixes, strict=True)):
            try:
                evaluation = self._evaluate(point, device, program, dtype=dtype)
            except PemError as exc:  # a non-finite input or result (E014, E027): name the point
                diagnostics = [_at_points(d, [point]) for d in exc.diagnostics]
                if save and number:  # the points before this one were written, each whole
                    from dataclasses import replace as _replace

                    written = ", ".join(suffixes[:number][:3]) + (" …" if number > 3 else "")
                    diagnostics = [_replace(d, notes=(*d.notes, f"the {number} point{'s' if number > 1 else ''} "
                                                      f"before it were written ({written}); this one and the "
                                                      "later ones were not"),
                                            hints=tuple(h.replace("nothing was written",
                                                                  "this point was not written") for h in d.hints))
                                   for d in diagnostics]
                raise CompileError(diagnostics) from None
            if save:
                self.write(evaluation, suffix=suffix, force=force)
            if callback is not None:
                callback(evaluation)
            yield evaluation

    def _guard_sweep(self, checked: Sequence[CheckedProgram], suffixes: Sequence[str], *, force: bool,
                     dtype: str | None) -> None:
        """Before computing any point: every directory of every point passes the writer's guard
        (inputs, existing directories, two points on one directory), and the bytes to write fit
        the free disk space."""
        from .run import into_refused
        from .writer import destination_problems

        try:
            into_refused(checked[0].outputs, "a sweep")
        except PemError as exc:
            raise CompileError(exc.diagnostics) from None
        destinations = [o.path.with_name(f"{o.path.name}.{suffix}")  # type: ignore[union-attr]
                        for program, suffix in zip(checked, suffixes, strict=True) for o in program.outputs]
        inputs = {name: adapter.path for name, adapter in checked[0].inputs.items()}
        problems = destination_problems(destinations, inputs, force=force)
        space = self._sweep_space(checked[0], len(checked), dtype=dtype)
        if space is not None:
            problems.append(space)
        if problems:
            raise CompileError(problems)

    def _sweep_space(self, checked: CheckedProgram, points: int, *, dtype: str | None) -> Diagnostic | None:
        """E018 when `points` points, each writing what `checked` writes, exceed the free disk space."""
        from .lower import lower
        from .writer import check_free_space

        if any(o.path is None for o in checked.outputs):
            raise ValueError("this program's outputs have no directory: a sweep cannot save it")
        plan = lower(checked, dtype=dtype)
        return check_free_space([o.path for o in checked.outputs],  # type: ignore[misc]
                                points * sum(o.bytes_written for o in plan.outputs))

    def load_into(self, model: Any, params: Mapping[str, float] | None = None, *, output: str | None = None,
                  adapter_name: str = "pemlang", device: str | None = None, **kw: float) -> Any:
        """Load an output into a model in memory: a PeftModel gains adapter `adapter_name` (made
        active); a transformers model is wrapped into a PeftModel; a path (or Hub id) of a base
        model is loaded with transformers first, as `tune` loads its base. Returns the PeftModel.
        CompileError (E009) when the model's layers have other shapes than the output's."""
        evaluation = self._evaluate({**(params or {}), **kw}, device)
        names = list(evaluation.tensors)
        if output is None and len(names) != 1:
            raise ValueError(f"the program has {len(names)} outputs: name one with output=")
        name = output or names[0]
        if isinstance(model, str | Path):
            model = _load_model(model, evaluation.plan.outputs[names.index(name)].config)
        return self._install(model, evaluation, name, adapter_name)

    @staticmethod
    def _install(model: Any, evaluation: Evaluation, name: str, adapter_name: str) -> Any:
        """Put output `name` of `evaluation` into `model` as adapter `adapter_name` (see load_into)."""
        import warnings

        from peft import PeftConfig, PeftModel, get_peft_model, set_peft_model_state_dict

        index = list(evaluation.tensors).index(name)
        config = PeftConfig.from_peft_type(**evaluation.plan.outputs[index].config)
        config.inference_mode = True
        given_peft = isinstance(model, PeftModel)
        if given_peft:
            model.add_adapter(adapter_name, config)
        else:
            # get_peft_model records the model it wraps as the base (and warns that it "renamed" the
            # base the inputs recorded): record it here, as PEFT would, so that nothing warns.
            config.base_model_name_or_path = model.__dict__.get("name_or_path") or None
            with warnings.catch_warnings():  # PEFT's own use of a property transformers deprecated
                warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                        category=FutureWarning)
                model = get_peft_model(model, config, adapter_name=adapter_name)
        misfits = _misfits(model, evaluation.tensors[name], adapter_name,
                           evaluation.plan.outputs[index].config.get("base_model_name_or_path"))
        if misfits is not None:  # the model is left as it was given
            if given_peft:
                model.delete_adapter(adapter_name)
            else:
                model.unload()  # the layers get_peft_model put into it, taken out again
            raise CompileError([misfits])
        result = set_peft_model_state_dict(model, evaluation.tensors[name], adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"pemlang produced keys PEFT did not expect: {unexpected[:3]}")
        model.set_adapter(adapter_name)
        return model

    def tune(self, base: Any, params: Mapping[str, Any], *, data: str | Path | None = None,
             objective: Callable[[Any, dict[str, float]], float] | str | None = None, trials: int | None = None,
             sampler: str | None = None, direction: str | None = None, study: str | Path | None = None,
             seed: int = 0, ray: bool | str = False, cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None,
             output: str | None = None, tokenizer: str | None = None, fail_fast: bool = False,
             save: str | Path | bool | None = None, force: bool = False, batch_size: int = 8,
             on_trial: Callable[[dict[str, Any]], None] | None = None) -> Any:
        """Choose params on a metric ("Tuning λ" in the README); returns a `pemlang.tune.TuneResult`.

        `base`: the base model (a path or Hub id, or a loaded transformers model). `params`: per
        tuned param a range `(lo, hi)` or grid `(lo, hi, step)`, or the text `"lo:hi[:step]"`.
        The objective is `data` (a JSONL file: causal-LM loss, or accuracy for a classifier head)
        or `objective(model, params) -> float` (a callable, or "module:function"). `study`: a
        SQLite file to keep (and resume) the study in. `ray`: True, or a cluster address, to run
        trials on Ray Tune. `save`: a directory for the best point (default: the program's output
        directory, when it has one; False: write nothing)."""
        from .tune import DataObjective, TuneOptions, parse_range, tune

        if (data is None) == (objective is None):
            raise ValueError("give exactly one of data= (a JSONL file) or objective= (a callable)")
        for label, number in (("trials", trials), ("batch_size", batch_size)):
            if number is not None and (isinstance(number, bool) or not isinstance(number, int) or number < 1):
                raise ValueError(f"{label} must be a whole number of at least 1, not {number!r}")
        space = []
        for name, bounds in params.items():
            text = _range_text(bounds)
            try:
                space.append(parse_range(f"{name}={text}"))
            except PemError as exc:
                raise CompileError(exc.diagnostics) from None
        has_paths = all(o.path is not None for o in self.checked.outputs)
        options = TuneOptions(
            space=space, base=base, output=output, trials=trials, sampler=sampler, direction=direction,
            study=Path(study) if study is not None else None, seed=seed, ray=bool(ray),
            ray_address=ray if isinstance(ray, str) else None, cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial, tokenizer=tokenizer, fail_fast=fail_fast, force=force,
            save=save is not False and (isinstance(save, str | Path) or has_paths),
            save_dir=Path(save) if isinstance(save, str | Path) else None,
            objective=None)
        try:
            options.objective = DataObjective.read(data, batch_size=batch_size) if data is not None else objective
            self.paper_warnings()  # in `warnings` before the first trial
            return tune(self, options, on_trial=on_trial)
        except CompileError:
            raise
        except DeviceError as exc:
            raise exc.as_api() from None
        except PemError as exc:
            raise CompileError(exc.diagnostics) from None


def _load_model(name: str | Path, config: Mapping[str, Any]) -> Any:
    """The base model at a path (or a Hub id), loaded with transformers as `tune` loads its base:
    with a classification head when the output has one. FileNotFoundError when there is none."""
    import warnings

    text = str(name)
    local = Path(text).expanduser()
    if not local.exists() and not hub.is_repo_id(text):
        raise FileNotFoundError(f"no such directory: {text}")
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{text} is not a saved model (it has no config.json)")

    def failure(message: str, hints: Sequence[str] = ()) -> CompileError:
        return CompileError([Diagnostic("E032", message, Source(text, "model"), Span(0, max(1, len(text))),
                                        hints=tuple(hints) or ("pass the base model the inputs were trained on: a "
                                                               "directory written by save_pretrained, or a Hub id",))])

    if not local.exists():
        try:
            hub.reach(text, "config.json")
        except hub.Unreachable as exc:
            raise failure(f"{text} could not be downloaded ({exc}) and is not in the cache",
                          hub.UNREACHABLE_HINTS) from None
        except Exception as exc:  # noqa: BLE001 - the Hub's answer (not found, gated, …)
            raise failure(f"cannot load the model {text!r}: {first_line(exc)}") from None
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForSequenceClassification if config.get("task_type") == "SEQ_CLS" else AutoModelForCausalLM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls.from_pretrained(str(local) if local.exists() else text).eval()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise failure(f"cannot load the model {text!r}: {first_line(exc)}") from None


def _misfits(model: Any, tensors: Mapping[str, Any], adapter_name: str, base: str | None) -> Diagnostic | None:
    """E009 naming the layers whose tensors do not have the shapes of `model`'s adapter (a model of
    another width or architecture than the inputs were trained on), with both shapes."""
    from peft import get_peft_model_state_dict

    expected = {key: tuple(value.shape) for key, value in  # (no embedding layers: PEFT would ask the Hub)
                get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False).items()}
    wrong = [(key, tuple(tensors[key].shape), expected[key]) for key in sorted(tensors)
             if key in expected and tuple(tensors[key].shape) != expected[key]]
    if not wrong:
        return None

    def dims(shape: tuple[int, ...]) -> str:
        return "×".join(map(str, shape))

    key, ours, theirs = wrong[0]
    layer = key.removeprefix("base_model.model.")
    return Diagnostic("E009", f"the model does not fit this output: {layer} is {dims(ours)} in the output, "
                      f"{dims(theirs)} in the model",
                      notes=tuple(f"also {k.removeprefix('base_model.model.')}: {dims(o)} in the output, {dims(t)} "
                                  "in the model" for k, o, t in wrong[1:4])
                      + ((f"and {len(wrong) - 4} more",) if len(wrong) > 4 else ()),
                      hints=("use the base model the inputs were trained on"
                             + (f" (they record {base})" if base else ""),))


def _max_rank(value: Any) -> int | None:
    """The API's `max_rank=`: None, or a whole number ≥ 1 (ValueError otherwise)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_rank must be a whole number ≥ 1 (or None), not {value!r}")
    return value


def _axis(name: str, values: Any) -> list[float]:
    """A sweep's values for param `name`: an iterable of numbers, or one number (one point);
    CompileError (E017) for a value that is not a number."""
    import numbers

    if isinstance(values, str | bytes):
        items = [values]
    else:
        try:
            items = list(values)
        except TypeError:  # a scalar: one point
            items = [values]
    for value in items:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            source = Source(f"{name}={value!r}", "sweep")
            raise CompileError([Diagnostic("E017", f"sweep gives `{name}` the value {value!r}, which is not a number",
                                           source, Span(len(name) + 1, len(source.text)),
                                           hints=(f"pass a number or a list of numbers, e.g. {name}=[0.0, 0.5, 1.0]",))])
    return [float(value) for value in items]


def _range_text(bounds: Any) -> str:
    """A tuning range given to the API — "lo:hi[:step]", or (lo, hi[, step]) — as the CLI's text."""
    if isinstance(bounds, str):
        return bounds
    try:
        items = list(bounds)
    except TypeError:
        return repr(bounds)
    return ":".join(repr(b) if isinstance(b, float) else str(b) for b in items)


def _decimals(values: Sequence[float]) -> int | None:
    """The fewest decimals (at least one) that write every value exactly; None when fixed-point
    notation would need more than 20 (then each value is written in its shortest exact form)."""
    for decimals in range(1, 21):
        if all(float(f"{v:.{decimals}f}") == v for v in values):
            return decimals
    return None


def sweep_decimals(grid: Mapping[str, Sequence[float]]) -> dict[str, int | None]:
    """Per axis of a sweep, the decimals every point's directory name uses (`sweep_suffix`): one
    format across the axis, with enough digits that each value is written exactly, so distinct
    values never share a directory. Raises ValueError when an axis lists a value twice."""
    decimals: dict[str, int | None] = {}
    for name, values in grid.items():
        repeated = first_repeat(values)
        if repeated is not None:
            raise ValueError(f"--sweep {name}: the value {repeated!r} is listed twice (each point needs its own "
                             "directory)")
        decimals[name] = _decimals(list(values))
    return decimals


def first_repeat(values: Iterable[float]) -> float | None:
    """The first value that occurs a second time, or None when all differ."""
    seen: set[float] = set()
    for value in values:
        if value in seen:
            return value
        seen.add(value)
    return None


def sweep_suffix(point: Mapping[str, float], decimals: Mapping[str, int | None] | None = None) -> str:
    """`lam=0.30` for one point of a sweep: appended to each output directory's name.

    `decimals` (from `sweep_decimals` over the whole sweep) gives every point of an axis one
    format; without it, the point alone decides."""
    parts = []
    for name, value in point.items():
        places = decimals[name] if decimals is not None and name in decimals else _decimals([value])
        parts.append(f"{name}={value:.{places}f}" if places is not None else f"{name}={value!r}")
    return ",".join(parts)


def _at_points(diagnostic: Diagnostic, points: Sequence[Mapping[str, float]]) -> Diagnostic:
    from dataclasses import replace

    shown = "; ".join(", ".join(f"{k}={v:g}" for k, v in p.items()) for p in points[:4])
    more = f" and {len(points) - 4} more" if len(points) > 4 else ""
    return replace(diagnostic, notes=(*diagnostic.notes, f"at {shown}{more}"))


# -- front ends -------------------------------------------------------------------------------------


def _file_frontend(source: Source, *, allow_pickle: bool, base_dir: Path | None) -> Frontend:
    program, syntax = parse_program(source)  # parsed once
    if syntax:
        raise CompileError(syntax)

    def check(overrides: Sequence[Override], cache: AdapterCache) -> CheckedProgram:
        # Existing output directories are the writer's concern (save(force=...)), not compile's.
        return check_parsed(source, program, (), overrides=overrides, force=True,
                            allow_pickle=allow_pickle, read=cache, base_dir=base_dir or default_base_dir(source))

    return check


def _expression_frontend(expression: str, inputs: Mapping[str, str | Path], *, mode: Mode,
                         params: Mapping[str, float], heads: str | None, allow_pickle: bool,
                         base_dir: Path | None) -> Frontend:
    bad = [name for name in inputs if not is_name(name)]
    if bad:
        raise ValueError(f"{bad[0]!r} cannot name an input (a name is a letter or _ followed by letters, digits "
                         "or _, and not a keyword or function)")
    lines = [f"param {name} = {ast.format_number(number)}" for name, (number, _) in _numbers(params).items()]
    if heads:
        lines.append(f"heads {heads}")
    prelude = "".join(line + "\n" for line in lines)
    prelude_source = Source(prelude, "params")
    prelude_program, syntax = parse_program(prelude_source)
    source = Source(expression, "<expression>")
    expr, expr_syntax = parse_expression(source)
    if syntax or expr_syntax:
        raise CompileError([*syntax, *expr_syntax])
    assert expr is not None

    def check(overrides: Sequence[Override], cache: AdapterCache) -> CheckedProgram:
        checker = Checker(source, mode=mode, base_dir=base_dir or Path.cwd(), overrides=overrides,
                          allow_pickle=allow_pickle, read=cache, spelling="api")
        checker.prefetch(str(path) for path in inputs.values())
        for name, path in inputs.items():
            text = f"{name}={path}"
            checker.add_input(ast.Name(name, Span(0, len(name))), str(path), Span(len(name) + 1, len(text)),
                              source=Source(text, "inputs"))
        original = checker.source
        checker.source = prelude_source  # params and heads are declared in their own source
        for stmt in prelude_program.statements:
            checker.statement(stmt)
        checker.source = original
        checker.add_output(expr, None, expr.span, expr.span)
        checker.finish(require_output=False)
        return checker.result()

    return check


def compile(expression: str | None = None, *, inputs: Mapping[str, str | Path] | None = None,  # noqa: A001
            params: Mapping[str, float] | None = None, mode: Mode = "paper", heads: str | None = None,
            file: str | Path | None = None, text: str | None = None, device: str = "auto",
            dtype: str | None = None, allow_pickle: bool = False, base_dir: str | Path | None = None,
            source: Source | None = None, max_rank: int | None = None) -> Program:
    """Compile a program: an `expression` over named `inputs`, a .pem `file`, or program `text`.
    `max_rank`: an output whose rank is above it at any layer is an error (E034).

    Raises CompileError (a PemError) with every diagnostic when the program has errors."""
    chosen = sum(x is not None for x in (expression, file, text, source))
    if chosen != 1:
        raise ValueError("compile() takes exactly one of expression=, file= or text=")
    if mode not in ("paper", "exact"):
        raise ValueError(f"mode must be 'paper' or 'exact', not {mode!r}")
    root = Path(base_dir) if base_dir is not None else None
    if expression is not None:
        frontend = _expression_frontend(expression, inputs or {}, mode=mode, params=params or {}, heads=heads,
                                        allow_pickle=allow_pickle, base_dir=root)
        program = Program(frontend, device=device, dtype=dtype, max_rank=max_rank, allow_pickle=allow_pickle)
        program._recipe = (compile, dict(expression=expression, inputs=dict(inputs or {}), params=dict(params or {}),
                                         mode=mode, heads=heads, device=device, dtype=dtype,
                                         allow_pickle=allow_pickle, base_dir=root or Path.cwd(), max_rank=max_rank))
        return program
    if file is not None:
        file = os.path.expanduser(file)  # `~/merge.pem`: the home directory, as in paths inside programs
        try:
            source = read_source(file)  # a missing file raises FileNotFoundError, as open() does
        except CompileError:
            raise
        except PemError as exc:  # not UTF-8
            raise CompileError(exc.diagnostics) from None
    elif source is None:
        source = source_from_text(text or "", "<text>")
    frontend = _file_frontend(source, allow_pickle=allow_pickle, base_dir=root)
    program = Program(frontend, params=params, device=device, dtype=dtype, max_rank=max_rank,
                      allow_pickle=allow_pickle)
    program._recipe = (compile, dict(source=source, params=dict(params or {}), device=device, dtype=dtype,
                                     allow_pickle=allow_pickle, base_dir=root or default_base_dir(source),
                                     max_rank=max_rank))
    return program


def from_config(config: str | Path | Mapping[str, Any] | Any, *, key: str | None = None,
                params: Mapping[str, float] | None = None, base_dir: str | Path | None = None,
                device: str | None = None, dtype: str | None = None, allow_pickle: bool = False,
                max_rank: int | None = None) -> Program:
    """Compile a config block ("Configs" in the README): a YAML/JSON/TOML file (`key`: the dotted path of the block
    inside a larger config), or a mapping or PemConfig already in memory (paths relative to
    `base_dir`, default the working directory). `params` override the block's, as --set does;
    `max_rank` the block's `max_rank`. Diagnostics name the file and line of the field."""
    from .config import DTYPES, Located, check_config, from_mapping, read_config

    try:
        if isinstance(config, str | Path):
            config = os.path.expanduser(config)
            located: Located = read_config(config, key=key)
        else:
            located = from_mapping(config, base_dir=Path(base_dir) if base_dir is not None else Path.cwd())
    except PemError as exc:
        raise CompileError(exc.diagnostics) from None
    if base_dir is not None:
        located.base_dir = Path(base_dir)

    def check(overrides: Sequence[Override], cache: AdapterCache) -> CheckedProgram:
        return check_config(located, overrides=overrides, force=True, allow_pickle=allow_pickle, read=cache,
                            require_output=False, max_rank=limit, max_rank_spelled="the rank limit {}")

    limit = _max_rank(max_rank)
    chosen_dtype = dtype or (DTYPES[located.config.dtype] if located.config.dtype else None)
    program = Program(check, params=params, device=device or located.config.device or "auto", dtype=chosen_dtype,
                      allow_pickle=allow_pickle)
    program.max_rank = limit if limit is not None else located.config.max_rank  # the block checks it
    program._recipe = (from_config, dict(config=Path(config).resolve() if isinstance(config, str | Path) else config,
                                         key=key, params=dict(params or {}), base_dir=located.base_dir,
                                         device=device, dtype=dtype, allow_pickle=allow_pickle, max_rank=max_rank))
    return program


def load(path: str | Path, *, key: str | None = None, **options: Any) -> Program:
    """Compile a .pem file or a config file (`pemlang.load("transfer.pem")`, `pemlang.load("train.yaml",
    key="merge")`)."""
    from .config import is_config_path

    if is_config_path(path):
        return from_config(path, key=key, **options)
    if key is not None:
        raise ValueError("key= applies to config files (.yaml, .yml, .json, .toml)")
    return compile(file=path, **options)
