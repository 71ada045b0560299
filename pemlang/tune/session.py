"""One tuning, from its options to the best adapter: the options settled against the program, what it
must never write over, the study opened and locked, the trials run (here or on Ray), the result
plotted and the best point saved with how it was chosen."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..diagnostics import error
from ..hashing import sha256_file
from ..source import Source, Span
from .errors import TuneError
from .local import run_local
from .model import Worker, absolute, check_base, is_classifier
from .objectives import DataObjective, describe_objective, import_objective
from .plot import plot_beside, same_file
from .raytune import WorkerJob, run_ray
from .results import OnTrial, TuneResult, summarise
from .space import ParamRange, range_error
from .study import (
    SAMPLERS,
    STUDY_NAME,
    StudyLock,
    distributions,
    is_done,
    load_optuna,
    make_sampler,
    open_study,
    recover,
    storage_errors,
    study_error,
)

DEFAULT_TRIALS = 30  # for the samplers that are not a grid
SEED_LIMIT = 2**32  # the samplers' (numpy's) seeds are below this


@dataclass
class TuneOptions:
    space: list[ParamRange]
    objective: Any  # DataObjective | str (MODULE:FUNCTION) | callable
    base: Any
    output: str | None = None
    trials: int | None = None
    sampler: str | None = None
    direction: str | None = None
    study: Path | None = None
    seed: int = 0
    ray: bool = False
    ray_address: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None
    device: str | None = None
    tokenizer: str | None = None
    fail_fast: bool = False
    save: bool = True
    save_dir: Path | None = None
    force: bool = False
    max_points: int = 1000  # the most grid points in all


def settle(program: Any, options: TuneOptions) -> tuple[str, bool, str, str, int]:
    """Check the options against the program before anything loads: (output, whether it has a
    classifier head, sampler, direction, total trials). TuneError (E029) for a param the program
    does not have."""
    from ..check import did_you_mean

    problems = []
    names = [r.name for r in options.space]
    for r in options.space:
        if r.name not in program.params:
            text = r.text or r.describe()
            problems.append(error("E029", f"`{r.name}` is not a param of the program", Source(text, "--param"),
                                  Span(0, max(1, len(text.partition("=")[0]))),
                                  notes=[f"the program's params: {', '.join(program.params) or 'none'}"],
                                  hints=did_you_mean(r.name, program.params) or
                                  ["only `param`s declared in the program can be tuned"]))
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(error("E029", f"`{repeated[0]}` is given two ranges", Source(repeated[0], "--param"),
                              Span(0, len(repeated[0]))))
    if not options.space:
        problems.append(error("E029", "nothing to tune: give at least one --param NAME=LO:HI[:STEP]"))
    if problems:
        raise TuneError(problems)
    if options.output is not None:
        if options.output not in program.outputs:
            raise TuneError([error("E029", f"the program has no output {options.output!r}",
                                   notes=[f"its outputs: {', '.join(program.outputs)}"])])
        output = options.output
    elif len(program.outputs) == 1:
        output = program.outputs[0]
    else:
        raise TuneError([error("E029", f"the program has {len(program.outputs)} outputs: name the one to tune",
                               notes=[f"its outputs: {', '.join(program.outputs) or 'none'}"],
                               hints=["--output NAME (output= in the API)"])])
    seed = options.seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        shown = (f"an int of {seed.bit_length()} bits" if isinstance(seed, int) and seed.bit_length() > 64
                 else repr(seed)[:40])  # never thousands of digits (nor the error converting them raises)
        raise ValueError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, not {shown}")
    stepped = all(r.step is not None for r in options.space)
    sampler = options.sampler or ("grid" if stepped else "tpe")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (expected {', '.join(SAMPLERS)})")
    if sampler == "grid" and not stepped:
        missing = next(r for r in options.space if r.step is None)
        raise range_error(missing.text or missing.describe(), f"{missing.name}: a grid needs a step",
                           hints=[f"e.g. {missing.name}={missing.low:g}:{missing.high:g}:0.1, or --sampler tpe"])
    if sampler == "cmaes" and len(options.space) < 2:
        raise TuneError([error("E029", "CMA-ES searches two or more params; this tuning has one",
                               hints=["use --sampler tpe, or grid with a step"])])
    classifier = is_classifier(program.plan().outputs[program.outputs.index(output)].config)
    direction = options.direction or ("maximize" if classifier and isinstance(options.objective, DataObjective)
                                      else "minimize")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', not {direction!r}")
    grid_size = math.prod(r.count for r in options.space) if sampler == "grid" else None
    if grid_size is not None and grid_size > options.max_points:
        raise TuneError([error("E029", f"the grid has {grid_size:,} points, more than the limit of "
                               f"{options.max_points:,}", hints=["use larger steps, fewer params, --sampler tpe, "
                                                                 "or --max-points N"])])
    total = options.trials if options.trials is not None else (grid_size or DEFAULT_TRIALS)
    if grid_size is not None:
        total = min(total, grid_size)
    if total < 1:
        raise ValueError("trials must be at least 1")
    return output, classifier, sampler, direction, total


def input_digests(program: Any) -> dict[str, str]:
    """Per input, the sha256 of its config and weights (as provenance records them), so that a study
    is not resumed over inputs that changed at the same path."""
    digests = {}
    for name, adapter in sorted(program.checked.inputs.items()):
        try:
            digests[name] = "/".join(sha256_file(f)[:16] for f in (adapter.path / "adapter_config.json",
                                                                    adapter.weights_file))
        except OSError:
            digests[name] = "unreadable"
    return digests


def protected_paths(program: Any, options: TuneOptions, objective: Any) -> dict[str, Path]:
    """Everything a tuning reads, which nothing it writes may replace: the program's inputs and file,
    the base model, tokenizer, data file and the objective's module."""
    paths: dict[str, Path] = {f"input `{name}`": adapter.path for name, adapter in program.checked.inputs.items()}
    source = getattr(program.checked, "source", None)
    if source is not None and not source.filename.startswith(("<", "--")) and Path(source.filename).exists():
        paths["the program file"] = Path(source.filename)
    for label, value in (("the base model", options.base), ("the tokenizer", options.tokenizer)):
        if isinstance(value, str | Path) and Path(value).exists():
            paths[label] = Path(value)
    if isinstance(options.objective, DataObjective):
        paths["the data file"] = Path(options.objective.path)
    module = sys.modules.get(getattr(objective, "__module__", "") or "")
    module_file = getattr(getattr(objective, "__code__", None), "co_filename", None) or getattr(module, "__file__", None)
    if module_file and isinstance(options.objective, str) and Path(module_file).exists():
        paths["the objective's module"] = Path(module_file)
    return {label: Path(os.path.abspath(path)) for label, path in paths.items()}


def _tuned_by(directory: Path, study_file: str) -> bool:
    """Whether `directory` holds the best point a tuning with study `study_file` wrote (a resumed
    tuning rewrites it; anything else needs --force)."""
    from ..adapters import read_safetensors_header
    from ..writer import provenance_field

    try:
        _, metadata, _, _ = read_safetensors_header(directory / "adapter_model.safetensors")
    except Exception:  # noqa: BLE001 - missing, unreadable or foreign: not ours
        return False
    tuned = provenance_field(metadata, "pemlang.tune")
    return isinstance(tuned, dict) and tuned.get("study") == study_file


def tune(program: Any, options: TuneOptions, *, on_trial: OnTrial | None = None,
         on_start: Callable[[str, str | None], None] | None = None) -> TuneResult:
    """Tune `program` (an api.Program) as `options` say; the heart of `pemlang tune` and `Program.tune`.

    `on_start(objective, resuming)` is called before the first trial with the objective's
    description and, when the study already has trials, a line saying so."""
    output, classifier, sampler_name, direction, total = settle(program, options)
    objective = options.objective
    search_path = (os.getcwd(),)
    if isinstance(objective, str):
        objective_fn: Any = import_objective(objective)  # fails here, before anything loads
    elif callable(objective) or isinstance(objective, DataObjective):
        objective_fn = objective
    else:
        raise ValueError(f"objective must be a callable, MODULE:FUNCTION or a data file, not {type(objective).__name__}")
    description = describe_objective(objective, classifier)
    settings = {
        "program": hashlib.sha256(program.checked.source.text.encode()).hexdigest()
        if getattr(program.checked, "source", None) is not None else "",
        "params": {k: v for k, v in sorted(program.params.items()) if k not in {r.name for r in options.space}},
        "inputs": input_digests(program),
        "output": output,
        "objective": description,
        "space": [r.describe() for r in options.space],
        "base": str(absolute(options.base)) if isinstance(options.base, str | Path) else type(options.base).__name__,
        "tokenizer": str(absolute(options.tokenizer)) if options.tokenizer else None,
    }
    study_path = Path(options.study) if options.study is not None else None
    study_file = str(study_path.resolve()) if study_path is not None else None  # as the best point records it
    protected = protected_paths(program, options, objective_fn)
    destinations = ([options.save_dir.resolve()] if options.save_dir is not None else
                    [o.path for o in program.checked.outputs if o.path is not None])
    if options.save:  # refuse an output that cannot be written before any trial runs
        from ..writer import destination_problems

        ours = [d for d in destinations if study_file is not None and _tuned_by(d, study_file)]
        kept = {**protected, **({"the study": Path(study_file)} if study_file is not None else {})}
        problems = destination_problems([d for d in destinations if d not in ours], kept, force=options.force)
        problems += destination_problems(ours, kept, force=True)  # this study's own best: rewritten
        if problems:
            from dataclasses import replace

            raise TuneError([replace(d, hints=(*d.hints, "or write the best point elsewhere (--save-best DIR, "
                                               "save= in the API), or nowhere (--no-save)")) for d in problems])
    if study_path is not None:
        clash = next((name for name, path in protected.items() if same_file(path, study_path)), None)
        if clash is not None:
            raise study_error(study_path, f"the study would be written over {clash}",
                              hints=["give --study a new file name"])
    check_base(options.base, load=False)  # a mistyped --base is said as such, before a study is made or compared
    optuna = load_optuna()
    with StudyLock(study_path) as lock, storage_errors(study_path, lock):  # a study deleted or locked: E033
        probe = open_study(study_path, direction=direction, sampler=None, settings=settings) if study_path else None
        existing = len(probe.trials) if probe is not None else 0
        sampler = make_sampler(sampler_name, options.space, seed=options.seed, offset=existing)
        if probe is not None:
            study = optuna.load_study(study_name=STUDY_NAME, storage=probe._storage, sampler=sampler)
        else:
            study = open_study(None, direction=direction, sampler=sampler, settings=settings)
        recovered = recover(study)
        done = sum(is_done(t) for t in study.get_trials(deepcopy=False))
        if on_start:
            on_start(description, f"resuming {study_path}: {done} of {total} trials done"
                     + (f", {recovered} cut off by an interruption to run again" if recovered else "") if done else None)
        dists = distributions(options.space, sampler_name)
        if done < total:
            if options.ray or (options.ray_address is not None):
                if program._recipe is None:
                    raise ValueError("this program cannot be rebuilt on Ray workers: compile it with "
                                     "pemlang.compile, pemlang.load or pemlang.from_config")
                check_base(options.base)  # in the driver, from its config alone: not once per worker
                job = WorkerJob(program._recipe, output, absolute(options.base), objective,
                                absolute(options.tokenizer), options.device, search_path)
                run_ray(job, study, dists, total, address=options.ray_address,
                        cpus_per_trial=options.cpus_per_trial, gpus_per_trial=options.gpus_per_trial,
                        on_trial=on_trial, fail_fast=options.fail_fast)
            else:
                worker = Worker(program, output, options.base, objective_fn, tokenizer=options.tokenizer,
                                device=options.device)
                run_local(worker, study, dists, total, on_trial=on_trial, fail_fast=options.fail_fast)
    with storage_errors(study_path):
        result = summarise(study, study_path=study_path)
    result.objective = description
    if study_path is not None:
        result.plot, result.plot_note = plot_beside(result, study_path, [r.name for r in options.space], protected)
    if options.save and result.best_params is not None:
        provenance = {"pemlang.tune": json.dumps({
            "objective": description, "direction": direction, "value": result.best_value,
            "params": result.best_params, "trial": result.best_number,
            "trials": sum(t["state"] == "complete" for t in result.trials),
            "space": [r.describe() for r in options.space],
            "study": study_file}, sort_keys=True, ensure_ascii=False)}
        replace_ours = study_file is not None and all(_tuned_by(d, study_file) for d in destinations if d.exists())
        result.saved = program.save(options.save_dir, result.best_params, force=options.force or replace_ours,
                                    provenance=provenance)
    return result
