"""The `pemlang` command line ('Commands' in the README). Exit status: 0 success; 1 the input had errors
(diagnostics on stderr); 2 command-line misuse.

Heavy imports (torch, rich) happen inside the commands that need them, so `pemlang check`
starts fast and never imports torch.
"""

from __future__ import annotations

if __name__ == "__main__":  # `python -m pemlang.cli`: Ctrl-C and SIGTERM are handled from here on
    from pemlang import interrupts as _interrupts

    _interrupts.install()
    _interrupts.hold()  # raised inside main(), where it becomes a quiet exit 130

import argparse
import contextlib
import math
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .about import ISSUES_URL, __version__
from .backend import device_problem  # light: torch is imported only to run
from .diagnostics import Diagnostic, PemError, emit, error, summary
from .display import LayerProgress, TrialTable, print_tune_result
from .source import CONFIG_SUFFIXES, Source, Span
from .sourcefiles import read_source

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Command-line misuse (exit 2)."""


def parse_set(text: str):  # type: ignore[no-untyped-def]
    """`NAME=VALUE` from `--set` → an Override, or a diagnostic pointing into the argument."""
    from .checked import Override

    source = Source(text, "--set")
    name, sep, value = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise UsageError(f"--set expects NAME=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        return error("E017", f"--set {name}: {value.strip()!r} is not a number", source,
                     Span(len(text) - len(value), len(text)), hints=[f"e.g. --set {name}=0.3"])
    if number != number or number in (float("inf"), float("-inf")):
        return error("E017", f"--set {name}: the value must be finite", source,
                     Span(len(text) - len(value), len(text)))
    return Override(name, number, source)


def _overrides(values: Sequence[str]) -> tuple[list[Any], list[Diagnostic]]:
    overrides: list[Any] = []
    diagnostics: list[Diagnostic] = []
    for text in values:
        parsed = parse_set(text)
        (diagnostics if isinstance(parsed, Diagnostic) else overrides).append(parsed)
    return overrides, diagnostics


def _read_program_file(path: str) -> Source:
    try:
        return read_source(path)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; give a .pem file") from None
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


MAX_SHOWN = 50  # a file that is not a program at all should not scroll for pages


def _report(diagnostics: Sequence[Diagnostic]) -> None:
    if diagnostics:
        emit(diagnostics[:MAX_SHOWN])
        if len(diagnostics) > MAX_SHOWN:
            print(f"… {len(diagnostics) - MAX_SHOWN} more not shown (the first {MAX_SHOWN} are above; "
                  "is this a pemlang program?)", file=sys.stderr)
        line = summary(diagnostics)
        if line:
            print(f"{line} found", file=sys.stderr)


# -- commands -----------------------------------------------------------------------------------


def _program_file(args: argparse.Namespace) -> tuple[Source, bool]:
    """FILE's text, and whether it is a config (else a .pem program); --key only with a config."""
    is_config = Path(args.file).suffix.lower() in CONFIG_SUFFIXES
    if args.key is not None and not is_config:
        raise UsageError("--key names a block inside a config file (.yaml, .yml, .json, .toml)")
    return _read_program_file(args.file), is_config


def _load_checked(args: argparse.Namespace, *, force: bool):  # type: ignore[no-untyped-def]
    """Read and check FILE (a .pem program or a YAML/JSON/TOML config): (checked or None, diagnostics)."""
    overrides, bad_sets = _overrides(args.set)
    source, is_config = _program_file(args)
    writes = args.command not in ("check", "plan")  # an existing output is a warning where nothing is written
    if is_config:  # pydantic and yaml are imported only for configs
        from .config import DTYPES, check_config, read_config
        from .diagnostics import PemError

        try:
            located = read_config(args.file, key=args.key, text=source.text)
        except PemError as exc:
            return None, [*exc.diagnostics, *bad_sets]
        checked = check_config(located, overrides=overrides, force=force, allow_pickle=args.allow_pickle,
                               require_output=args.command != "check", writes=writes,
                               max_rank=getattr(args, "max_rank", None))
        if getattr(args, "device", "unset") is None:  # the command line wins over the config
            args.device = located.config.device
        if getattr(args, "dtype", "unset") is None and located.config.dtype:
            args.dtype = DTYPES[located.config.dtype]
    else:
        from .check import check_source

        checked = check_source(source, overrides=overrides, force=force, allow_pickle=args.allow_pickle,
                               writes=writes)
        checked = _limit_ranks(checked, getattr(args, "max_rank", None))
    return checked, [*checked.diagnostics, *bad_sets]


def _limit_ranks(checked, max_rank: int | None):  # type: ignore[no-untyped-def]
    """`--max-rank N`: E034 at every output above rank N (with the svd form that fits as the hint)."""
    if max_rank is None:
        return checked
    from dataclasses import replace

    from .lower import rank_limit

    return replace(checked, diagnostics=(*checked.diagnostics,
                                         *rank_limit(checked, max_rank, given=f"--max-rank {max_rank}")))


def cmd_check(args: argparse.Namespace) -> int:
    checked, diagnostics = _load_checked(args, force=args.force)
    _report(diagnostics)
    if checked is None or any(d.is_error for d in diagnostics):
        return EXIT_ERRORS
    outputs = ", ".join(o.name or o.expression for o in checked.outputs) or "none"
    print(f"ok: {args.file}: mode {checked.mode}, {len(checked.inputs)} input"
          f"{'s' if len(checked.inputs) != 1 else ''}, outputs: {outputs}")
    for out in checked.outputs:  # a full model: what will be written, from the base's headers
        if out.into is not None:
            from .basemodel import merge_summary
            from .formatting import visible

            print(visible(f"{out.name or out.expression} -> {out.path}: merged into {out.into.written}"))
            for line in merge_summary(out.into, out.changes):
                print(visible(f"  {line}"))
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .adapters import AdapterError, read_adapter
    from .inspection import is_model_directory, render_adapter, render_model

    location, pinned = args.adapter, None
    if args.adapter.startswith("hf://"):  # an adapter on the Hub: its snapshot in the cache
        from . import hub

        try:
            resolved = hub.locate(args.adapter, allow_pickle=args.allow_pickle)
        except hub.HubError as exc:
            _report([error("E012", exc.message, Source(args.adapter, "ADAPTER"), Span(0, len(args.adapter)),
                           hints=exc.hints)])
            return EXIT_ERRORS
        location, pinned = resolved.directory, resolved.pinned
    if pinned is None and is_model_directory(os.path.expanduser(location)):  # a model (one pemlang merged?)
        from .basemodel import BaseModelError, read_base

        try:
            render_model(read_base(Path(os.path.expanduser(location)), location, allow_pickle=args.allow_pickle))
        except BaseModelError as exc:
            _report([error(exc.code, exc.message.replace("the base model", "the model"), notes=exc.notes,
                           hints=exc.hints)])
            return EXIT_ERRORS
        return EXIT_OK
    try:
        adapter = read_adapter(location, allow_pickle=args.allow_pickle)
    except AdapterError as exc:
        _report([error(exc.code, exc.message, notes=exc.notes, hints=exc.hints)])
        return EXIT_ERRORS
    if pinned is not None:
        from .formatting import visible

        print(visible(f"{pinned}  (cached at {adapter.path})"))
    render_adapter(adapter)
    if adapter.truncated:
        _report([error("E013", f"{adapter.weights_file.name} is truncated", notes=[str(adapter.weights_file)],
                       hints=["the file was cut off (an interrupted copy or download?): fetch it again"])])
        return EXIT_ERRORS
    return EXIT_OK


def _dtype(text: str) -> str:
    from .plan import dtype_name

    try:
        return dtype_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _device(text: str) -> str:
    """`--device`: one of auto, cpu, cuda, cuda:N (whether that CUDA device exists is known only at run time)."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


SEED_LIMIT = 2**32  # the samplers' (numpy's) seeds are below this


def _seed(text: str) -> int:
    """`--seed`: a whole number from 0 to 2**32 - 1 (read without converting thousands of digits)."""
    digits = text.strip().lstrip("+")
    if not digits.isdecimal() or not digits.isascii() or len(digits.lstrip("0")) > 10 or int(digits) >= SEED_LIMIT:
        shown = text if len(text) <= 30 else text[:30] + "…"
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to {SEED_LIMIT - 1}, got {shown!r}")
    return int(digits)


def _heads(text: str) -> str:
    """`--heads`: `drop` or `from NAME`."""
    words = text.split()
    if words == ["drop"] or len(words) == 2 and words[0] == "from" and words[1].isidentifier():
        return " ".join(words)
    raise argparse.ArgumentTypeError(f"expected `drop` or `from NAME`, got {text!r}")


def _size(text: str) -> int:
    from .formatting import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _spelled(exc: ValueError) -> str:
    """A ValueError from the API, as the command line says it (`--device cuda`, not `device="cuda"`)."""
    from .backend import DeviceError

    return exc.spelled(api=False) if isinstance(exc, DeviceError) else str(exc)


def _check_program(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """Read and check the FILE of run/plan, showing its diagnostics: (checked, failed)."""
    checked, diagnostics = _load_checked(args, force=getattr(args, "force", False))
    _report(diagnostics)
    return checked, checked is None or any(d.is_error for d in diagnostics)


def _execute_and_write(checked, args: argparse.Namespace) -> int:  # type: ignore[no-untyped-def]
    from .diagnostics import PemError
    from .lower import lower
    from .run import resharded, stream, summary_line

    try:
        plan = resharded(lower(checked, dtype=args.dtype), args.max_shard_size)
    except ValueError as exc:  # --max-shard-size without an output merged into a base
        raise UsageError(str(exc)) from None
    total = sum(len(out.layers) for out in plan.outputs)
    try:
        with LayerProgress(total) as advance:
            result = stream(checked, device=args.device or "auto", dtype=args.dtype, force=args.force,
                            on_layer=advance, plan=plan)
    except ValueError as exc:  # an unusable --device
        raise UsageError(str(exc)) from None
    except PemError as exc:  # E014/E027, refused by the writer's guard, or an OS error while writing
        _report(exc.diagnostics)
        return EXIT_ERRORS
    _report(result.diagnostics)
    print(result.device_note, file=sys.stderr)
    for index, out in enumerate(result.plan.outputs):  # with the ranks the data chose (svd with energy=)
        print(f"wrote {summary_line(out, result.dropped[index] if result.dropped else ())}")
    device = result.device_note.removeprefix("device: ").split(" ")[0]
    print(f"{len(plan.outputs)} output{'s' if len(plan.outputs) != 1 else ''} in {result.seconds:.2f} s on {device}")
    return EXIT_OK


DEFAULT_MAX_POINTS = 1000


def parse_sweep(text: str, max_points: int = DEFAULT_MAX_POINTS) -> tuple[str, Sequence[float]]:
    """`lam=0:1:0.1` (a grid, as `tune --param` reads one: both ends included, the step dividing the
    range) or `lam=0,0.25,0.5` → (name, values).

    A grid's values are computed when asked for: it is counted, and refused beyond `max_points`,
    without being built. Every problem with a value is an E029 diagnostic pointing into the argument
    (PemError); a list that names a value twice is misuse (UsageError)."""
    from .grids import parse_grid, parse_number, range_error

    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name or not spec.strip():
        raise UsageError(f"--sweep expects NAME=START:STOP:STEP or NAME=V1,V2,..., got {text!r}")
    if ":" in spec:
        parsed = parse_grid(text, label="--sweep", max_points=max_points, need_step=True)
        return parsed.name, parsed.values
    fields: list[tuple[int, int]] = []  # each value's span in `text`, for diagnostics
    position = len(text) - len(spec)
    for part in spec.split(","):
        fields.append((position, position + len(part)))
        position += len(part) + 1
    if len(fields) > max_points:
        raise range_error(text, f"{name}: {len(fields):,} values is more than the limit of {max_points:,}",
                          label="--sweep", hints=["--max-points N raises the limit"])
    values = [float(parse_number(text, start, end, name, label="--sweep")) for start, end in fields]
    from .api import first_repeat

    repeated = first_repeat(values)
    if repeated is not None:
        raise UsageError(f"--sweep {name}: the value {repeated!r} is listed twice; each point needs its own directory")
    return name, values


def cmd_sweep(args: argparse.Namespace) -> int:
    import time

    from .api import CompileError, from_config
    from .api import compile as compile_program
    from .check import did_you_mean
    from .diagnostics import PemError

    grid: dict[str, Sequence[float]] = {}  # a grid's values are computed only when the sweep reaches them
    problems: list[Diagnostic] = []
    for text in args.sweep:
        try:
            name, values = parse_sweep(text, args.max_points)
        except PemError as exc:
            problems.extend(exc.diagnostics)
            continue
        if name in grid:
            raise UsageError(f"--sweep {name} is given twice; list every value in one --sweep ({name}=V1,V2,...)")
        grid[name] = values
    total = math.prod(len(values) for values in grid.values())  # counted, never built
    if not problems and total > args.max_points:
        problems.append(error("E029", f"the sweep has {total:,} points, more than the limit of {args.max_points:,}",
                              hints=["use larger steps, fewer values, or --max-points N"]))
    if problems:
        _report(problems)
        return EXIT_ERRORS
    overrides, bad_sets = _overrides(args.set)
    if bad_sets:
        _report(bad_sets)
        return EXIT_ERRORS
    fixed = {o.name: o.value for o in overrides}
    if clash := sorted(set(grid) & set(fixed)):
        raise UsageError(f"{clash[0]} is given both by --set and --sweep")
    source, is_config = _program_file(args)
    start = time.perf_counter()
    try:
        if is_config:
            program = from_config(args.file, key=args.key, params=fixed, device=args.device, dtype=args.dtype,
                                  allow_pickle=args.allow_pickle, max_rank=args.max_rank)
        else:
            program = compile_program(source=source, params=fixed or None,
                                      device=args.device or "auto", dtype=args.dtype, allow_pickle=args.allow_pickle,
                                      max_rank=args.max_rank)
        unknown = [error("E017", f"--sweep names `{name}`, which is not a param of the program",
                         Source(text, "--sweep"), Span(0, len(name)),
                         notes=[f"the program's params: {', '.join(program.params) or 'none'}"],
                         hints=did_you_mean(name, program.params))
                   for text in args.sweep if (name := text.partition("=")[0].strip()) not in program.params]
        if unknown:
            _report(unknown)
            return EXIT_ERRORS
        program.paper_warnings()  # W002, once, before the points
        _report(program.warnings)
        written = 0
        # Every point is checked, and every directory guarded, before anything is computed.
        with LayerProgress(total, "points") as advance:
            for _ in program.sweep(grid, save=True, force=args.force):
                written += len(program.checked.outputs)
                if advance is not None:
                    advance()
    except CompileError as exc:
        _report(exc.diagnostics)
        return EXIT_ERRORS
    except PemError as exc:  # a point whose result is not finite
        _report(exc.diagnostics)
        return EXIT_ERRORS
    except ValueError as exc:
        raise UsageError(_spelled(exc)) from None
    names = ", ".join(f"{k} = {v[0]:g}…{v[-1]:g} ({len(v)} values)" for k, v in grid.items())
    print(f"wrote {written} adapters ({total} points: {names}) in {time.perf_counter() - start:.2f} s")
    return EXIT_OK


def cmd_tune_show(args: argparse.Namespace) -> int:
    from .tune import TuneError, open_study, plot_beside, summarise

    path = Path(args.show)
    try:
        study = open_study(path, direction="minimize", sampler=None, settings=None, create=False)
        result = summarise(study, study_path=path)
    except TuneError as exc:
        _report(exc.diagnostics)
        return EXIT_ERRORS
    except Exception as exc:  # noqa: BLE001 - a damaged study: the database's own error
        _report([error("E033", f"cannot read the study {path}: {type(exc).__name__}: {str(exc)[:200]}",
                       Source(str(path), "--show"), Span(0, max(1, len(str(path)))))])
        return EXIT_ERRORS
    settings = study.user_attrs.get("pemlang", {})
    names = [s.partition("=")[0] for s in settings.get("space", [])] or sorted({k for t in result.trials for k in t["params"]})
    print(f"{path}: {result.objective}, {result.direction}d over {', '.join(settings.get('space', names))}")
    TrialTable(names, result.objective, live=False).show(result.trials, result.best_number)
    if result.trials:
        result.plot, result.plot_note = plot_beside(result, path, names)
    print_tune_result(result, names)
    return EXIT_OK


def cmd_tune(args: argparse.Namespace) -> int:
    from .api import compile as compile_program
    from .api import from_config
    from .tune import DataObjective, TuneOptions, parse_range, tune

    if args.show is not None:
        if args.file is not None:
            raise UsageError("--show reads a study; give it without FILE")
        return cmd_tune_show(args)
    if args.file is None:
        raise UsageError("tune needs FILE (the program), or --show STUDY")
    if args.base is None:
        raise UsageError("tune needs --base MODEL: the model the adapters were trained on")
    if (args.data is None) == (args.objective is None):
        raise UsageError("tune needs exactly one objective: --data FILE.jsonl or --objective MODULE:FUNCTION")
    if not args.param:
        raise UsageError("tune needs at least one --param NAME=LO:HI[:STEP]")
    if args.no_save and args.save_best:
        raise UsageError("--save-best DIR and --no-save contradict each other: give one")
    overrides, bad_sets = _overrides(args.set)
    problems: list[Diagnostic] = list(bad_sets)
    space = []
    for text in args.param:
        try:
            space.append(parse_range(text, max_points=args.max_points))
        except PemError as exc:
            problems.extend(exc.diagnostics)
    if problems:
        _report(problems)
        return EXIT_ERRORS
    fixed = {o.name: o.value for o in overrides}
    if clash := sorted({r.name for r in space} & set(fixed)):
        raise UsageError(f"{clash[0]} is given both by --set and --param")
    source, is_config = _program_file(args)
    ray_address = args.ray if args.ray not in (None, "") else None
    use_ray = args.ray is not None or bool(os.environ.get("RAY_ADDRESS"))
    if use_ray and ray_address is None:
        ray_address = os.environ.get("RAY_ADDRESS") or None
    study = Path(args.study) if args.study else Path(args.file).with_suffix(".tune.db")
    table: TrialTable | None = None
    try:
        if is_config:
            program = from_config(args.file, key=args.key, params=fixed, device=args.device,
                                  allow_pickle=args.allow_pickle)
        else:
            program = compile_program(source=source, params=fixed or None, device=args.device or "auto",
                                      allow_pickle=args.allow_pickle)
        program.paper_warnings()  # W002, once, before the trials
        _report(program.warnings)
        objective: Any = DataObjective.read(args.data, batch_size=args.batch_size) if args.data else args.objective
        options = TuneOptions(space=space, objective=objective, base=args.base, output=args.output, trials=args.trials,
                              sampler=args.sampler, direction=args.direction, study=study, seed=args.seed,
                              ray=use_ray, ray_address=ray_address, cpus_per_trial=args.cpus_per_trial,
                              gpus_per_trial=args.gpus_per_trial, device=args.device, tokenizer=args.tokenizer,
                              fail_fast=args.fail_fast, save=not args.no_save,
                              save_dir=Path(args.save_best) if args.save_best else None, force=args.force,
                              max_points=args.max_points)
        if options.save_dir is not None and len(program.outputs) != 1:
            raise UsageError("--save-best DIR applies to a program with one output")
        names = [r.name for r in space]
        labels: list[str] = []

        def started(objective_text: str, resuming: str | None) -> None:
            labels.append(objective_text)  # the table's column: loss, accuracy or value
            if resuming:
                print(resuming, file=sys.stderr)

        def row(trial: dict[str, Any]) -> None:
            nonlocal table
            if table is None:
                table = TrialTable(names, labels[-1] if labels else "value", quiet_errors=args.fail_fast)
            table.add(trial)

        result = tune(program, options, on_trial=row, on_start=started)
    except PemError as exc:  # CompileError, TuneError, a write refused: diagnostics
        if table is not None:
            table.close()  # before the diagnostics, so they follow the table
        _report(exc.diagnostics)
        return EXIT_ERRORS
    except ValueError as exc:
        raise UsageError(_spelled(exc)) from None
    finally:
        if table is not None:
            table.close()
    print_tune_result(result, names)
    for path in result.saved:
        print(f"wrote {path} (the best point; how it was chosen is in its provenance: pemlang inspect {path})")
    if result.best_params is None:
        print("no trial completed: nothing to write", file=sys.stderr)
        return EXIT_ERRORS
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    if args.sweep:
        if args.max_shard_size is not None:
            raise UsageError("--max-shard-size applies to a full model (`into`), which a sweep does not write")
        return cmd_sweep(args)
    checked, failed = _check_program(args)
    if failed:
        return EXIT_ERRORS
    if not checked.outputs:
        print("nothing to do: the program has no output", file=sys.stderr)
        return EXIT_OK
    return _execute_and_write(checked, args)


def cmd_plan(args: argparse.Namespace) -> int:
    from .lower import lower
    from .plan import format_plan

    checked, failed = _check_program(args)
    if failed:
        return EXIT_ERRORS
    format_plan(lower(checked, dtype=args.dtype))
    return EXIT_OK


def cmd_eval(args: argparse.Namespace) -> int:
    from . import ast
    from .check import Checker, is_name
    from .parser import parse_expression

    words = list(args.expression)
    if words and words[0] == "--":
        words = words[1:]
    expression = " ".join(words)
    if not expression.strip():
        raise UsageError("eval needs an expression (put `--` before one that starts with '-')")
    source = Source(expression, "<expression>")
    checker = Checker(source, mode=args.mode, force=args.force, allow_pickle=args.allow_pickle, spelling="cli")
    diagnostics: list[Diagnostic] = []
    bases: dict[str, str] = {}
    for text in args.input_base:
        name, sep, base = text.partition("=")
        if not sep or not name.strip() or not base.strip():
            raise UsageError(f"--input-base expects NAME=ORG/MODEL, got {text!r}")
        if name.strip() in bases:
            raise UsageError(f"--input-base {name.strip()} is given twice")
        bases[name.strip()] = base.strip()
    named = {text.partition("=")[0].strip() for text in args.input}
    if unknown := sorted(set(bases) - named):
        raise UsageError(f"--input-base {unknown[0]}: there is no --input {unknown[0]}=...")
    checker.prefetch(text.partition("=")[2] for text in args.input)
    for text in args.input:
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or not path:
            raise UsageError(f"--input expects NAME=PATH, got {text!r}")
        if not is_name(name.strip()):
            raise UsageError(f"--input {text!r}: {name.strip()!r} cannot name an input (a name is a letter or _ "
                             "followed by letters, digits or _, and not a keyword or function, e.g. yelp_lm)")
        arg_source = Source(text, "--input")
        checker.add_input(ast.Name(name.strip(), Span(0, len(name))), path, Span(len(name) + 1, len(text)),
                          source=arg_source, stated_base=bases.get(name.strip()))
    if args.heads is not None:  # `--heads from NAME`: checked like a `heads` statement, pointing into the option
        heads_source = Source(args.heads, "--heads")
        policy, _, owner = args.heads.partition(" ")
        checker.source = heads_source
        checker.statement(ast.HeadsStmt(policy, ast.Name(owner, Span(5, 5 + len(owner))) if owner else None,  # type: ignore[arg-type]
                                        Span(0, len(args.heads))))
        checker.source = source
    expr, syntax = parse_expression(source)
    diagnostics += syntax
    if expr is not None:
        out_source = Source(args.out, "--out")
        into_source = Source(args.into, "--into") if args.into is not None else None
        checker.add_output(expr, args.out, Span(0, len(args.out)), expr.span, path_source=out_source,
                           into=args.into, into_span=Span(0, len(args.into or "")), into_source=into_source)
    checker.finish(require_output=False)
    checked = _limit_ranks(checker.result(), args.max_rank)
    diagnostics = list(checked.diagnostics) + syntax
    _report(diagnostics)
    if any(d.is_error for d in diagnostics):
        return EXIT_ERRORS
    return _execute_and_write(checked, args)


def cmd_repl(args: argparse.Namespace) -> int:
    from .repl import default_history, run

    history = Path(args.history) if args.history else default_history()
    return run(args.file, device=args.device, allow_pickle=args.allow_pickle, history=history)


# -- the parser ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    expression_anywhere = False  # eval: options may come before, after or between the words of EXPR

    def error(self, message: str):  # type: ignore[no-untyped-def,override]
        self.print_usage(sys.stderr)
        print(f"pemlang: error: {message}", file=sys.stderr)
        if self._subparsers is not None and "COMMAND" in message:  # `pemlang` alone: what can it do?
            commands = next(a for a in self._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
            print("\ncommands:", file=sys.stderr)
            for choice in commands._choices_actions:
                print(f"  {choice.dest:<9} {choice.help}", file=sys.stderr)
            print("\n`pemlang COMMAND --help` describes one.", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        if self.expression_anywhere and args is not None:
            args = self._options_first(list(args))
        return super().parse_known_args(args, namespace)

    def _options_first(self, args: list[str]) -> list[str]:
        """The options (with their values) first, then `--` and the words of the expression, wherever
        they were given; after a `--` everything is the expression. `--heads from NAME` is one option."""
        options: list[str] = []
        words: list[str] = []
        i = 0
        while i < len(args):
            arg = args[i]
            if arg == "--":
                words += args[i + 1:]
                break
            name, has_value, _ = arg.partition("=")
            matches = [o for o in self._option_string_actions if o == name] or \
                      [o for o in self._option_string_actions if name.startswith("--") and o.startswith(name)]
            if len(matches) == 1 and arg.startswith("-"):
                action = self._option_string_actions[matches[0]]
                options.append(arg)
                if not has_value and action.nargs != 0 and i + 1 < len(args):
                    if action.dest == "heads" and args[i + 1] == "from" and i + 2 < len(args):
                        options.append(f"from {args[i + 2]}")
                        i += 1
                    else:
                        options.append(args[i + 1])
                    i += 1
            elif arg.startswith("-") and arg[1:2].isalpha() or arg.startswith("--") and arg != "--":
                options.append(arg)  # an unknown option: argparse says so
            else:
                words.append(arg)  # `-`, `-0.5*a`, `-(a + b)` are words of the expression
            i += 1
        return [*options, "--", *words] if words else options


ALLOW_PICKLE = ("accept adapter_model.bin (pickled) adapters, and pytorch_model.bin base models for `into`, "
                "where there is no safetensors file; they are loaded with torch's weights_only=True "
                "(a merged model is written as safetensors)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pemlang", description="Compose PEFT adapters (LoRA, (IA)3) by arithmetic.")
    parser.add_argument("--version", action="version", version=f"pemlang {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def program_options(p: argparse.ArgumentParser, *, writes: bool) -> None:
        p.add_argument("file", metavar="FILE", help="the program: FILE.pem, or a config FILE.{yaml,json,toml}")
        p.add_argument("--key", metavar="DOTTED.PATH", default=None,
                       help="in a config file, where the pemlang block is (e.g. train.merge); default: the top level")
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a `param` (repeatable)")
        p.add_argument("--force", action="store_true",
                       help="replace existing output directories" if writes else
                       "writes nothing here: an output directory that exists is not reported (a warning "
                       "without it), as `run --force` would replace it")
        p.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE)

    check = commands.add_parser("check", help="parse and type-check a program; reads headers only")
    program_options(check, writes=False)
    check.set_defaults(handler=cmd_check)

    def run_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", type=_device, default=None, metavar="auto|cpu|cuda|cuda:N",
                       help="where to compute (auto: CUDA when available, else the CPU)")
        p.add_argument("--dtype", type=_dtype, default=None, metavar="DTYPE",
                       help="dtype to write (float32, float16, bfloat16); default: the inputs' dtype")
        p.add_argument("--max-rank", type=_positive_int, default=None, metavar="N",
                       help="refuse an output whose rank is above N at any layer (a serving stack's limit, e.g. "
                            "vLLM's max_lora_rank; the error shows the svd that fits); overrides a config's max_rank")
        p.add_argument("--max-shard-size", type=_size, default=None, metavar="SIZE",
                       help="a full model (`into`): write its weights in new shards of at most SIZE (2GB, 500MB, "
                            "1.5GiB, bytes) with an index, rather than as the base's files")

    run = commands.add_parser("run", help="evaluate a program and write its outputs")
    program_options(run, writes=True)
    run_options(run)
    run.add_argument("--sweep", action="append", default=[], metavar="NAME=START:STOP:STEP",
                     help="write one adapter per value (or list V1,V2,...) of a param; inputs are read once")
    run.add_argument("--max-points", type=_positive_int, default=DEFAULT_MAX_POINTS, metavar="N",
                     help=f"refuse a sweep of more than N points in all (default {DEFAULT_MAX_POINTS})")
    run.set_defaults(handler=cmd_run)

    plan = commands.add_parser("plan", help="print the lowered evaluation plan")
    program_options(plan, writes=False)
    plan.add_argument("--dtype", type=_dtype, default=None, metavar="DTYPE",
                      help="plan for this output dtype (float32, float16, bfloat16); default: the inputs' dtype")
    plan.set_defaults(handler=cmd_plan)

    evaluate = commands.add_parser("eval", help="evaluate one expression over adapters named on the command line")
    evaluate.add_argument("--input", action="append", default=[], metavar="NAME=PATH", help="an input adapter")
    evaluate.add_argument("--input-base", action="append", default=[], metavar="NAME=ORG/MODEL",
                          help="take input NAME as trained on this base model (when its config records another "
                               "name for it; a warning says so)")
    evaluate.add_argument("--out", required=True, metavar="DIR",
                          help="the output directory: an adapter, or with --into a full model")
    evaluate.add_argument("--into", default=None, metavar="BASE",
                          help="write a full model instead: the result merged into the base model directory BASE "
                               "(config.json + safetensors weights), which is never written")
    evaluate.add_argument("--mode", choices=["paper", "exact"], default="paper",
                          help="paper (the default: the paper's operators on the parameters A and B) or exact "
                               "(on each layer's ΔW = B·A; svd, prune, dare, ties, core, knots, tsv and iso need it)")
    evaluate.add_argument("--force", action="store_true", help="replace an existing output directory")
    evaluate.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE)
    evaluate.add_argument("--heads", type=_heads, default=None, metavar="drop|from NAME",
                          help="modules_to_save: `drop` writes none, `from NAME` takes input NAME's unchanged")
    run_options(evaluate)
    evaluate.add_argument("expression", nargs=argparse.REMAINDER, metavar="EXPR",
                          help="the expression (options may follow it); put `--` before it when it starts with '-'")
    evaluate.expression_anywhere = True
    evaluate.set_defaults(handler=cmd_eval)

    repl = commands.add_parser("repl", help="an interactive session: statements, expressions and :commands")
    repl.add_argument("file", nargs="?", metavar="FILE.pem", help="a program to load first")
    repl.add_argument("--device", type=_device, default="auto", metavar="auto|cpu|cuda|cuda:N",
                      help="where :save and output statements compute (auto: CUDA when available, else the CPU)")
    repl.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE)
    repl.add_argument("--history", default=None, metavar="FILE",
                      help="history file (default $PEMLANG_HISTORY or ~/.pemlang_history)")
    repl.set_defaults(handler=cmd_repl)

    tune = commands.add_parser(
        "tune", help="choose params on a metric: trials in memory (or on Ray), the best point written",
        description="Choose a program's params on your own metric. The base model is loaded once; each trial "
                    "evaluates the program in memory and puts the merged adapter into it in place.")
    tune.add_argument("file", nargs="?", metavar="FILE", help="the program: FILE.pem, or a config file")
    tune.add_argument("--key", metavar="DOTTED.PATH", default=None, help="in a config file, where the pemlang block is")
    tune.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="fix a `param` (repeatable)")
    tune.add_argument("--base", metavar="MODEL", help="the base model: a save_pretrained directory or a cached Hub id")
    tune.add_argument("--param", action="append", default=[], metavar="NAME=LO:HI[:STEP]",
                      help="a param to tune, over a range (or a grid with STEP); repeatable")
    tune.add_argument("--data", metavar="FILE.jsonl", help='{"input": …, "output": …} records: minimise the '
                      "causal-LM loss of the outputs (maximise accuracy for a classifier head)")
    tune.add_argument("--objective", metavar="MODULE:FUNCTION",
                      help="your metric: FUNCTION(model, params) -> float, given the PeftModel of the trial")
    tune.add_argument("--trials", type=_positive_int, default=None, metavar="N",
                      help="trials in all, counting a resumed study's (default: the grid's size, else 30)")
    tune.add_argument("--sampler", choices=["tpe", "grid", "cmaes", "random"], default=None,
                      help="the search (default: grid when every --param has a STEP, else tpe)")
    tune.add_argument("--direction", choices=["minimize", "maximize"], default=None,
                      help="default: minimize (maximize for accuracy)")
    tune.add_argument("--study", metavar="FILE.db", default=None,
                      help="the SQLite study: rerunning resumes it (default FILE's name with .tune.db)")
    tune.add_argument("--seed", type=_seed, default=0, help="the sampler's seed, 0 to 2**32 - 1 (default 0)")
    tune.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                      help="run trials on Ray Tune (a new local instance, or the cluster at ADDRESS; RAY_ADDRESS too)")
    tune.add_argument("--cpus-per-trial", type=float, default=1.0, metavar="N", help="with --ray (default 1)")
    tune.add_argument("--gpus-per-trial", type=float, default=None, metavar="N",
                      help="with --ray (default 1 when the cluster has GPUs, else 0)")
    tune.add_argument("--output", metavar="NAME", default=None, help="the output to tune, when the program has several")
    tune.add_argument("--tokenizer", metavar="NAME", default=None, help="for --data (default: the base model's)")
    tune.add_argument("--batch-size", type=_positive_int, default=8, metavar="N", help="for --data (default 8)")
    tune.add_argument("--fail-fast", action="store_true", help="stop at the first trial that fails")
    tune.add_argument("--save-best", metavar="DIR", default=None,
                      help="where to write the best point (default: the program's output directory)")
    tune.add_argument("--no-save", action="store_true", help="write no adapter")
    tune.add_argument("--force", action="store_true", help="replace an existing output directory")
    tune.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE)
    tune.add_argument("--device", type=_device, default=None, metavar="auto|cpu|cuda|cuda:N",
                      help="where the base model and each trial run (auto: CUDA when available, else the CPU)")
    tune.add_argument("--max-points", type=_positive_int, default=DEFAULT_MAX_POINTS, metavar="N",
                      help=f"refuse a grid of more than N points in all (default {DEFAULT_MAX_POINTS})")
    tune.add_argument("--show", metavar="STUDY", default=None, help="print a study's trials, best point and plot")
    tune.set_defaults(handler=cmd_tune)

    inspect = commands.add_parser("inspect", help="print an adapter's type signature, or what a model directory is "
                                                   "(a merged model: how it was made)")
    inspect.add_argument("adapter", metavar="ADAPTER_DIR|hf://ORG/NAME[@REV]",
                         help="a PEFT adapter directory, or an adapter on the Hugging Face Hub; also a model "
                              "directory (a base, or a model pemlang merged)")
    inspect.add_argument("--allow-pickle", action="store_true", help=ALLOW_PICKLE)
    inspect.set_defaults(handler=cmd_inspect)
    return parser


def _command(argv: Sequence[str] | None) -> str:
    """`pemlang run ` (the command being run, for a message), or `command ` when it is not known."""
    words = list(sys.argv[1:] if argv is None else argv)
    known = next((w for w in words if w in ("check", "run", "plan", "eval", "repl", "tune", "inspect")), None)
    return f"`pemlang {known}` " if known else "command "


PATH_OPTIONS = ("file", "adapter", "out", "history", "data", "study", "tokenizer", "save_best", "show", "base", "into")


def _expand_home(args: argparse.Namespace) -> None:
    """A leading `~` in a path option means the home directory, also where the shell left it as it
    is (`--save-best=~/x`, a quoted "~/x"): a directory named `~` is never made by mistake."""
    for name in PATH_OPTIONS:
        value = getattr(args, name, None)
        if isinstance(value, str) and value.startswith("~"):
            setattr(args, name, os.path.expanduser(value))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pemlang` console script.

    SIGINT and SIGTERM (what timeout, systemd and Kubernetes send) are handled from the first line:
    either ends the command quietly with exit 130, nothing partial written."""
    from . import interrupts

    interrupts.install()
    try:
        interrupts.release()
        parser = build_parser()
        args = parser.parse_args(argv)
        _expand_home(args)
        return int(args.handler(args))
    except UsageError as exc:
        print(f"pemlang: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PemError as exc:  # a user error found outside a check (e.g. a file that is not UTF-8)
        _report(exc.diagnostics)
        return 1
    except KeyboardInterrupt:
        interrupts.quiet()
        print("pemlang: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout went away (`pemlang tune --show F.db | head`): stop quietly
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except MemoryError:  # what the command was given is too large for this machine: not a bug
        print(f"pemlang: error: out of memory: what this {_command(argv)}reads or builds (inputs, data, a sweep or a "
              "grid) does not fit in this machine's memory; nothing was written", file=sys.stderr)
        return EXIT_ERRORS
    except Exception as exc:  # an internal bug: never a bare traceback for the user
        if interrupts.interrupted():  # a library turned the interruption into another exception
            interrupts.quiet()
            print("pemlang: interrupted", file=sys.stderr)
            return 130
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"This is a bug in pemlang {__version__}, not in your input. Please report it at {ISSUES_URL} "
              "with the command you ran; set PEMLANG_TRACEBACK=1 to print the traceback.", file=sys.stderr)
        if os.environ.get("PEMLANG_TRACEBACK"):
            traceback.print_exc()
        return 70
    finally:
        interrupts.restore()


if __name__ == "__main__":
    sys.exit(main())
