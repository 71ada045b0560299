"""AST → typed program, collecting every diagnostic (README "A program", "Two meanings of `+`", "Diagnostics").

Every module-valued expression is typed as a linear form over its sources (the inputs, and the
results of `svd(...)`): per source the coefficients alpha and beta (README "Two meanings of `+`"). Scalars fold here.
The values it builds, and the CheckedProgram it returns, are defined in checked.py.
The checker reads adapter signatures only (config + safetensors header), never tensor data.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import ast, hub
from .adapters import EMBEDDING_LORA, Adapter, AdapterError, config_owner, read_adapter, task_of
from .basefit import IntoChecks
from .calls import CallChecks, _fmt
from .checked import (
    MODES,
    POISON,
    CallRef,
    CheckedOutput,
    CheckedProgram,
    Entry,
    InputRef,
    Mode,
    ModuleValue,
    Override,
    Poison,
    ScalarValue,
    Spelling,
    Term,
    Value,
    spell_heads,
    spell_mode,
)
from .diagnostics import Diagnostic, display_path, error, warning
from .operators import FUNCTIONS, OPERATORS, low_rank
from .paths import resolve_written, shorten, unusable, unwritable
from .source import Source, Span
from .sourcefiles import read_source
from .suggest import NameIndex, closest_name, did_you_mean
from .types import BaseModelRef, Ia3Layer, Layer, LoraLayer, ModuleType, architecture_families

KEYWORDS = ("input", "param", "output", "mode", "heads")
NAME_PATTERN = r"[^\W\d]\w*"  # the grammar's NAME


def is_name(text: object) -> bool:
    """Whether `text` can name an input or param: a letter or _ then letters, digits or _, and
    not a keyword or function."""
    return (isinstance(text, str) and re.fullmatch(NAME_PATTERN, text) is not None
            and text not in KEYWORDS and text not in FUNCTIONS)




# Output tensors are computed and stored in float32 at widest: a coefficient beyond its range
# would write infinities.
FLOAT32_MAX = 3.4028234663852886e38


# -- combining module types ---------------------------------------------------------------------


def _listing(keys: Iterable[str], limit: int = 3) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


class Checker(CallChecks, IntoChecks):
    """Types statements one by one (a file, or REPL lines), collecting diagnostics."""

    def __init__(self, source: Source, *, mode: Mode = "paper", base_dir: Path | None = None,
                 overrides: Iterable[Override] = (), force: bool = False, allow_pickle: bool = False,
                 read: Callable[..., Adapter] = read_adapter, writes: bool = True,
                 spelling: Spelling = "program"):
        self.source = source
        self.spelling: Spelling = spelling  # how hints spell `mode exact`, `heads from NAME`
        self.force_hint = "pass --force to replace it"  # the REPL's `output` statement says how it is done there
        self.mode: Mode = mode
        self.base_dir = base_dir if base_dir is not None else Path.cwd()
        self.overrides = {o.name: o for o in overrides}
        self.force = force
        # Whether the caller will write the outputs (run, eval): an existing output is then an error
        # without --force; for check and plan, which write nothing, it is a warning.
        self.writes = writes
        self.allow_pickle = allow_pickle
        self.read = read
        self.env: dict[str, Entry] = {}
        self._names = NameIndex(FUNCTIONS)  # the names in scope, for "did you mean" (see _scope)
        self._indexed = 0
        self.inputs: dict[str, Adapter] = {}
        self.input_paths: dict[str, Path] = {}
        self.input_reals: dict[str, Path] = {}  # resolved once: every output is compared with them
        self.output_reals: dict[Path, Span] = {}
        self.suggested: set[str] = set()  # names offered by a did-you-mean hint of an error
        self.input_written: dict[str, str] = {}
        self.input_spans: dict[str, tuple[Source, Span]] = {}
        self.binding_text: dict[str, str] = {}
        self.params: dict[str, float] = {}
        self.outputs: list[CheckedOutput] = []
        self.heads: ast.HeadsStmt | None = None
        self.diagnostics: list[Diagnostic] = []
        self.broken_names: frozenset[str] = frozenset()
        self._statements_seen = 0
        self._current_span = Span(0, 0)  # the output statement being checked
        self.hub_found: dict[str, hub.Resolved | hub.HubError] = {}  # hf:// ids resolved ahead (prefetch)
        self.bases_read: dict[Path, Any] = {}  # `into` base models read, by resolved directory (basefit)

    # reporting
    def _error(self, code: str, message: str, span: Span | None, *, source: Source | None = None,
               **kw) -> Poison:  # type: ignore[no-untyped-def]
        self.diagnostics.append(error(code, message, source or self.source, span, **kw))
        return POISON

    def _warn(self, code: str, message: str, span: Span | None, *, source: Source | None = None,
              **kw) -> None:  # type: ignore[no-untyped-def]
        self.diagnostics.append(warning(code, message, source or self.source, span, **kw))

    # -- statements ----------------------------------------------------------------------------

    def prefetch(self, written: Iterable[str]) -> None:
        """Resolve the Hub ids among the inputs `written` before they are added, concurrently."""
        self.hub_found.update(hub.locate_all(written, allow_pickle=self.allow_pickle, headers_only=not self.writes))

    def program(self, program: ast.Program) -> CheckedProgram:
        """Check a whole program and report unused names and missing overrides."""
        self.broken_names = program.broken_names
        self.prefetch(stmt.path for stmt in program.statements if isinstance(stmt, ast.InputStmt))
        for stmt in program.statements:
            if isinstance(stmt, ast.ExprStmt):
                self.expr(stmt.value)  # still checked, so its errors are reported too
                self._error("E024", "a bare expression does nothing in a file", stmt.span,
                            hints=["bind it (`name = ...`) or write it (`output ... -> \"DIR\"`); bare "
                                   "expressions belong in the REPL and `pemlang eval`"])
                continue
            self.statement(stmt)
        self.finish()
        return self.result()

    def result(self) -> CheckedProgram:
        ordered = sorted(self.diagnostics, key=lambda d: (d.source is not self.source,
                                                           d.span.start if d.span else 0))
        return CheckedProgram(self.source, self.mode, dict(self.inputs), dict(self.params),
                              tuple(self.outputs), self.heads, tuple(ordered), dict(self.input_written),
                              dict(self.input_spans), self.spelling)

    def finish(self, *, require_output: bool = True) -> None:
        for name, override in self.overrides.items():
            if name not in self.params:
                params = [n for n, e in self.env.items() if e.kind == "param"]
                notes = ([f"the program's params: {', '.join(params)}"] if params
                         else ["the program declares no `param`"])
                self.diagnostics.append(error(
                    "E017", f"{override.what} names `{name}`, which is not a param of the program",
                    override.source, Span(0, len(name)), notes=notes, hints=did_you_mean(name, params)))
        syntax_errors = any(d.code == "E001" for d in self.diagnostics)
        for name, entry in self.env.items():
            if name in self.suggested:
                continue  # a typo meant it: the E002 says so, "never used" would mislead
            if not syntax_errors and not entry.used and entry.kind in ("input", "binding"):
                self._warn("W003", f"{entry.kind} `{name}` is never used", entry.span, source=entry.source,
                           hints=[f"remove it, or write it out with `output {name} -> \"DIR\"`"]
                           if entry.kind == "binding" else [])
        if require_output and not self.outputs and not any(d.is_error for d in self.diagnostics):
            self._warn("W003", "the program writes no output", Span(len(self.source.text), len(self.source.text)),
                       hints=['add `output NAME -> "DIR"`'])

    def statement(self, stmt: ast.Statement) -> Value | None:
        """Check one statement; returns the value of a bare expression (for the REPL)."""
        index = self._statements_seen
        self._statements_seen += 1
        match stmt:
            case ast.ModeStmt(mode=mode):
                self._mode(mode, stmt.span, first=index == 0)
            case ast.InputStmt(name=name, path=path, path_span=path_span, base=base, base_span=base_span):
                self.add_input(name, path, path_span, stated_base=base, base_span=base_span)
            case ast.ParamStmt(name=name, value=value):
                if self._declare(name, "param"):
                    override = self.overrides.get(name.id)
                    if override is not None and not math.isfinite(override.value):
                        self.diagnostics.append(error(
                            "E026", f"{override.what} gives `{name.id}` a value that is not a finite number",
                            override.source, Span(0, len(override.source.text)),
                            notes=[f"it is {_fmt(override.value)}"]))
                        self.env[name.id] = Entry("param", POISON, name.span, source=self.source)
                        return None
                    scalar = self._scalar(value, what="a param")
                    number: float | None = override.value if override is not None else (
                        scalar.value if isinstance(scalar, ScalarValue) else None)
                    if number is not None:
                        self.params[name.id] = number
                        self.env[name.id] = Entry("param", ScalarValue(number), name.span, source=self.source)
                    else:
                        self.env[name.id] = Entry("param", POISON, name.span, source=self.source)
            case ast.Binding(name=name, value=value):
                if self._declare(name, "binding"):
                    self.env[name.id] = Entry("binding", self.expr(value), name.span, source=self.source)
                    self.binding_text[name.id] = self.source.snippet(value.span)
            case ast.OutputStmt(value=value, path=path, path_span=path_span, into=into, into_span=into_span):
                self.add_output(value, path, path_span, stmt.span, into=into, into_span=into_span)
            case ast.HeadsStmt():
                self._heads(stmt)
            case ast.ExprStmt(value=value):
                return self.expr(value)
        return None

    def _mode(self, mode: ast.Name, span: Span, *, first: bool) -> None:
        if mode.id not in MODES:
            self._error("E021", f"unknown mode `{mode.id}`", mode.span,
                        notes=["the modes are `paper` (the paper's operators) and `exact` (the weight update ΔW)"],
                        hints=did_you_mean(mode.id, MODES))
        elif not first:
            self._error("E021", "`mode` must be the first statement", span,
                        hints=["move it to the top of the file: it decides how every expression is read"])
        else:
            self.mode = mode.id  # type: ignore[assignment]

    def _declare(self, name: ast.Name, kind: str, source: Source | None = None) -> bool:
        if name.id in FUNCTIONS:
            self._error("E016", f"`{name.id}` is a built-in function and cannot be redefined", name.span,
                        source=source)
            return False
        previous = self.env.get(name.id)
        if previous is None:
            return True
        where = previous.source or self.source
        line, _ = where.line_col(previous.span.start)
        place = (f"by {where.filename} {where.text!r}" if where.filename.startswith("--") else  # eval's --input
                 f"on line {line}" if where.filename == (source or self.source).filename
                 else f"on line {line} of {display_path(where.filename)}")
        self._error("E016", f"`{name.id}` is defined twice", name.span, source=source,
                    notes=[f"first defined as {'an' if previous.kind == 'input' else 'a'} {previous.kind} {place}"],
                    hints=["pick another name: a program defines each name once"])
        return False

    def _with_stated_base(self, name: ast.Name, adapter: Adapter, stated: str, span: Span,
                          source: Source | None) -> Adapter:
        """The adapter taken as trained on `stated` (normalised like a recorded base); W006 when that
        differs from what its config records, so the choice is visible, never silent."""
        from .adapters import valid_text

        if not valid_text(stated):
            self._error("E024", f"input `{name.id}`: the base is not valid text (control characters, line breaks "
                        "or lone surrogates)", span, source=source,
                        hints=['write the base model\'s name on one line, e.g. base "meta-llama/Llama-2-7b-hf"'])
            return adapter
        base = BaseModelRef.from_config(stated.strip() or None, None)
        recorded = adapter.type.base
        if base.name is None:
            self._error("E024", f"input `{name.id}`: an empty base", span, source=source,
                        hints=['write the base model\'s name, e.g. base "meta-llama/Llama-2-7b-hf"'])
            return adapter
        if recorded.name != base.name:
            self._warn("W006", f"input `{name.id}` is taken as trained on {base.describe()}", span, source=source,
                       notes=[f"its adapter_config.json records base {recorded.describe()}"],
                       hints=["the program says so; pemlang cannot check that these are the same model"])
        revision = recorded.revision if recorded.name == base.name else base.revision
        return replace(adapter, type=replace(adapter.type, base=BaseModelRef(base.name, revision)))

    def add_input(self, name: ast.Name, written: str, path_span: Span, source: Source | None = None, *,
                  stated_base: str | None = None, base_span: Span | None = None) -> None:
        """Declare an input adapter: read its signature (config + header) and bind the name. With
        `stated_base` (`input x = "dir" base "org/name"`) the input is taken as trained on that base,
        whatever its config records, and a warning (W006) says so."""
        if not self._declare(name, "input", source):
            return
        pinned = None
        if written.startswith("hf://"):  # an adapter on the Hugging Face Hub: its snapshot in the cache
            try:
                # `check` and `plan` need headers only: uncached weights are not downloaded for them
                resolved = self.hub_found.get(written) or hub.locate(written, allow_pickle=self.allow_pickle,
                                                                     headers_only=not self.writes)
                if isinstance(resolved, hub.HubError):
                    raise resolved
            except hub.HubError as exc:
                self.env[name.id] = Entry("input", POISON, name.span, source=source or self.source)
                self._error("E012", f"input `{name.id}`: {exc.message}", path_span, source=source, hints=exc.hints)
                return
            path = resolved.directory
            pinned = resolved.pinned
        else:
            path = resolve_written(self.base_dir, written)
        problem = unusable(path)
        if problem is not None:
            self.env[name.id] = Entry("input", POISON, name.span, source=source or self.source)
            self._error("E012", f"input `{name.id}`: {problem}", path_span, source=source,
                        notes=[shorten(display_path(path))])
            return
        try:
            adapter = self.read(path, allow_pickle=self.allow_pickle)
        except AdapterError as exc:
            self.env[name.id] = Entry("input", POISON, name.span, source=source or self.source)
            self._error(exc.code, f"input `{name.id}`: {exc.message}", path_span, source=source,
                        notes=exc.notes, hints=[*exc.hints, *self._elsewhere(written, path)])
            return
        self.input_paths[name.id] = path
        self.input_reals[name.id] = path.resolve()
        if adapter.unsupported:
            features = adapter.unsupported
            self.env[name.id] = Entry("input", POISON, name.span, source=source or self.source)
            embeddings = features[0].startswith(EMBEDDING_LORA)
            self._error("E011", f"input `{name.id}`: {EMBEDDING_LORA} is not supported" if embeddings else
                        f"input `{name.id}` uses {features[0]}, which pemlang does not support",
                        path_span, source=source,
                        notes=[features[0]] * embeddings + [f"also: {f}" for f in features[1:]] + [display_path(path)],
                        hints=["pemlang composes plain LoRA and (IA)3 exactly and refuses anything it "
                               "cannot compose exactly; merge this adapter into its base model instead"])
            return
        if adapter.truncated:
            self.env[name.id] = Entry("input", POISON, name.span, source=source or self.source)
            self._error("E013", f"input `{name.id}`: {adapter.weights_file.name} is truncated",
                        path_span, source=source,
                        notes=[f"{display_path(adapter.weights_file)}: the header promises "
                               f"{adapter.data_start + adapter.data_bytes_expected} bytes, the file has "
                               f"{adapter.file_size}"],
                        hints=["the file was cut off (an interrupted copy or download?): fetch it again"])
            return
        if stated_base is not None:
            adapter = self._with_stated_base(name, adapter, stated_base, base_span or path_span, source)
        if not adapter.type.base.recorded:
            self._warn("W001", f"input `{name.id}` does not record its base model", path_span, source=source,
                       notes=[f"{display_path(path / 'adapter_config.json')}: base_model_name_or_path is null"],
                       hints=["pemlang cannot check that this input shares a base model with the others; "
                              "set base_model_name_or_path in its adapter_config.json"])
        self.inputs[name.id] = adapter
        self.input_written[name.id] = pinned or written  # a Hub id is recorded at the commit that was read
        self.input_spans[name.id] = (source or self.source, path_span)
        value = ModuleValue((Term(InputRef(name.id), 1.0, 1.0),), adapter.type)
        self.env[name.id] = Entry("input", value, name.span, source=source or self.source)

    def _elsewhere(self, written: str, path: Path) -> list[str]:
        """A hint when a missing relative path exists from the working directory, not the file's."""
        here = resolve_written(Path.cwd(), written)
        if path.exists() or here == path or not here.exists():
            return []
        return [f"paths in a file are relative to the file's directory ({shorten(str(self.base_dir))}), not to "
                f"the working directory, where {written} exists: write {shorten(os.path.relpath(here, self.base_dir))}"]

    def add_output(self, expr: ast.Expr, written: str | None, path_span: Span, span: Span,
                   path_source: Source | None = None, *, into: str | None = None, into_span: Span | None = None,
                   into_source: Source | None = None) -> None:
        """Declare an output: `expr` must be a module; its directory must not clobber anything.
        `written` None declares an output evaluated to tensors only. `into` (a base model directory)
        makes it a full model: the module merged into that base (README "Merging into the base model")."""
        value = self.expr(expr)
        if isinstance(value, ScalarValue):
            self._error("E019", "an output must be a module, but this is a number", expr.span,
                        notes=[f"it evaluates to {_fmt(value.value)}"])
        path = None if written is None else resolve_written(self.base_dir, written)
        if path is not None:
            self._current_span = span
            self._check_output_path(path, path_span, path_source)
        if isinstance(value, ModuleValue) and value.dense:
            snippet = self.source.snippet(expr.span)
            self._error("E028", "this output is a dense weight update: write it through `svd(…, rank=R)`", expr.span,
                        notes=["prune, dare and ties give every layer a dense ΔW, which a LoRA adapter cannot hold "
                               "as it is"],
                        hints=[f"output svd({snippet if len(snippet) <= 60 else '…'}, rank=16): the best rank-16 "
                               "approximation per layer (pick the rank for the size you want)"]
                        + ([] if value.first_call(lambda ref: not ref.dense) is not None else
                           [f"or merge in the inputs' shared basis, where the result is low-rank as it is: "
                            f"output core({snippet if len(snippet) <= 60 else '…'}) (adapters trained separately "
                            "do not share one: see `core` and `knots` in the README)"]))
            value = POISON
        merged = None
        if isinstance(value, ModuleValue) and into is not None:
            merged = self._check_into(value, into, into_span or span, expr.span, into_source, path, path_span,
                                      path_source)
            if merged is None:
                value = POISON
        if isinstance(value, ModuleValue):
            errors = len([d for d in self.diagnostics if d.is_error])
            self._check_heads(value, expr.span)
            if len([d for d in self.diagnostics if d.is_error]) == errors:
                self._check_tasks(value, expr.span)
            output_name = expr.id if isinstance(expr, ast.Name) else None
            expression = self.binding_text.get(output_name or "", self.source.snippet(expr.span))
            self.outputs.append(CheckedOutput(output_name, expression, path, value, span, expr.span, self.source,
                                              *(merged or (None, ()))))

    def _check_output_path(self, path: Path, path_span: Span, path_source: Source | None) -> None:
        def fail(message: str, *notes: str, hints: Iterable[str] = ()) -> None:
            self._error("E018", message, path_span, source=path_source, notes=notes, hints=hints)

        problem = unusable(path)
        if problem is not None:
            return fail(f"output path cannot be used: {problem}", shorten(display_path(path)))
        real = path.resolve()
        bad_path = False
        for name, input_real in self.input_reals.items():
            if real == input_real or input_real.is_relative_to(real) or real.is_relative_to(input_real):
                bad_path = True
                where = ("is the input's directory" if real == input_real else
                         "contains the input" if input_real.is_relative_to(real) else "is inside the input")
                fail(f"output would overwrite input `{name}`", f"{display_path(path)} {where}",
                     hints=["inputs are never written: choose another output directory"])
        other = self.output_reals.get(real)
        if other is not None:
            bad_path = True
            fail("two outputs write the same directory",
                 f"{display_path(path)} is also written on line {self.source.line_col(other.start)[0]}")
        else:
            self.output_reals[real] = self._current_span
        if bad_path:
            return None
        reason = unwritable(path, real)
        if reason is not None:
            return fail("cannot write the output here", reason,
                        hints=["choose a directory you can write to"])
        if path.exists() and not path.is_dir():
            return fail("output path is a file", display_path(path),
                        hints=["an output is a directory: choose another path"])
        if path.exists() and not self.force:
            if self.writes:
                return fail("output directory already exists", display_path(path), hints=[self.force_hint])
            self._warn("W005", "output directory already exists", path_span, source=path_source,
                       notes=[display_path(path)], hints=["`pemlang run` will need --force to replace it"])
        return None

    def _heads(self, stmt: ast.HeadsStmt) -> None:
        if self.heads is not None:
            self._error("E016", "`heads` is given twice", stmt.span)
            return
        if stmt.source is not None:
            entry = self.env.get(stmt.source.id)
            if entry is None:
                self._error("E002", f"unknown name `{stmt.source.id}`", stmt.source.span,
                            hints=did_you_mean(stmt.source.id, self.inputs))
                return
            entry.used = True
            if entry.kind != "input":
                self._error("E019", f"`heads from` needs an input, and `{stmt.source.id}` is a {entry.kind}",
                            stmt.source.span)
                return
            adapter = self.inputs.get(stmt.source.id)
            if adapter is not None and not adapter.type.heads:
                self._error("E022", f"input `{stmt.source.id}` has no heads (modules_to_save) to take",
                            stmt.source.span,
                            hints=["name an input whose adapter_config.json lists modules_to_save"])
                return
        self.heads = stmt

    def _check_heads(self, value: ModuleValue, span: Span) -> None:
        """Full tensors (heads) mix only as a convex combination."""
        if self.heads is not None and self.heads.policy in ("from", "drop"):
            return
        betas = {n: b for n, b in value.input_betas().items() if b != 0.0}
        with_heads = {n: set(self.inputs[n].type.heads) for n in betas if self.inputs[n].type.heads}
        if not with_heads:
            return
        first = next(iter(with_heads))
        hints = [f"{spell_heads(self.spelling, 'from ' + first)} takes the heads of one input unchanged; "
                 f"{spell_heads(self.spelling, 'drop')} writes none"]
        lacking = [n for n in betas if set(self.inputs[n].type.heads) != with_heads[first]]
        if lacking:
            self._error("E022", "the inputs do not have the same heads (modules_to_save)", span,
                        notes=[f"{n}: {_listing(self.inputs[n].type.heads) or 'no heads'}"
                               for n in [first, *lacking]], hints=hints)
            return
        total = sum(betas.values())
        if any(b < 0 for b in betas.values()) or not math.isclose(total, 1.0, rel_tol=1e-9, abs_tol=1e-9):
            self._error("E022", "heads (modules_to_save) mix only as a convex combination", span,
                        notes=["coefficients: " + ", ".join(f"{n} {_fmt(b)}" for n, b in betas.items())
                               + f" (sum {_fmt(total)}); full tensors combine only when every coefficient "
                               "is ≥ 0 and they sum to 1",
                               *[f"{m} is the mean of its arguments: so are their heads" for m in value.means[:1]]],
                        hints=hints)

    def _check_tasks(self, value: ModuleValue, span: Span) -> None:
        """W004: inputs made for different tasks or model classes; say which the output takes.
        Not after `heads from NAME`, which states it: the output takes NAME's."""
        betas = value.input_betas()
        tasks = {name: task_of(self.inputs[name]) for name in betas}
        policy = self.heads.policy if self.heads is not None else None
        if len(set(tasks.values())) < 2 or policy == "from":
            return
        owner = config_owner(betas, betas, self.inputs, policy, None)
        why = ("the first input (`heads drop`)" if policy == "drop" else
               "whose heads it takes" if betas[owner] != 0 and self.inputs[owner].type.heads else
               "the first input")
        task_type, architecture = tasks[owner]
        self._warn("W004", "the inputs differ in task type or architecture", span,
                   notes=[f"{name}: task type {t or 'not recorded'}, architecture {a or 'not recorded'}"
                          for name, (t, a) in tasks.items()]
                   + [f"the output takes task type {task_type or 'not recorded'} and architecture "
                      f"{architecture or 'not recorded'} from `{owner}`, {why}"],
                   hints=[f"{spell_heads(self.spelling, 'from NAME')} states the input whose heads, task type and architecture "
                          "the output takes"])

    def _scope(self) -> NameIndex:
        """The names in scope and the functions, indexed once: names are only ever added to env, so
        the newest len(env) − indexed are the ones not indexed yet."""
        for name in itertools.islice(reversed(self.env), len(self.env) - self._indexed):
            self._names.add(name)
        self._indexed = len(self.env)
        return self._names

    # -- expressions -----------------------------------------------------------------------------

    def _scalar(self, expr: ast.Expr, *, what: str) -> ScalarValue | Poison:
        value = self.expr(expr)
        if isinstance(value, ModuleValue):
            return self._error("E019", f"{what} must be a number, but this is a module", expr.span)
        return value

    def expr(self, expr: ast.Expr) -> Value:
        """The value of an expression; errors are recorded and give POISON."""
        match expr:
            case ast.Number(value=number):
                if not math.isfinite(number):
                    return self._error("E026", "this number is too large", expr.span,
                                       notes=[f"it reads as {_fmt(number)}: the largest number is about 1.8e308"])
                return ScalarValue(number)
            case ast.Name(id=name):
                entry = self.env.get(name)
                if entry is None and name in self.broken_names:
                    return POISON  # its definition's syntax error is already reported
                if entry is None and name in OPERATORS:  # `core + a`: a function named, not called
                    return self._error("E002", f"`{name}` is a function, not a value: call it", expr.span,
                                       hints=[f"usage: `{OPERATORS[name].usage}`"])
                if entry is None:
                    meant = closest_name(name, self._scope())
                    if meant is not None:
                        self.suggested.add(meant)
                    return self._error("E002", f"unknown name `{name}`", expr.span,
                                       hints=[f"did you mean `{meant}`?"] if meant else [])
                entry.used = True
                return entry.value
            case ast.Neg(operand=operand):
                operand_value = self.expr(operand)
                if isinstance(operand_value, ScalarValue):
                    return ScalarValue(-operand_value.value)
                return operand_value.negated() if isinstance(operand_value, ModuleValue) else POISON
            case ast.BinOp():
                # A left-associative chain `a + b + c + ...` is folded in a loop, however long.
                spine: list[ast.BinOp] = []
                node: ast.Expr = expr
                while isinstance(node, ast.BinOp):
                    spine.append(node)
                    node = node.lhs
                value = self.expr(node)
                for binop in reversed(spine):
                    value = self._in_range(binop, self._binop(binop, binop.op, value, self.expr(binop.rhs)))
                return value
            case ast.Call():
                return self._call(expr)
        raise TypeError(f"not an expression: {expr!r}")

    def _binop(self, expr: ast.BinOp, op: str, lhs: Value, rhs: Value) -> Value:
        if isinstance(lhs, Poison) or isinstance(rhs, Poison):
            return POISON
        if isinstance(lhs, ScalarValue) and isinstance(rhs, ScalarValue):
            if op == "/" and rhs.value == 0:
                return self._error("E015", "division by zero", expr.rhs.span,
                                   notes=[f"`{self.source.snippet(expr.rhs.span)}` is 0"])
            result = {"+": lhs.value + rhs.value, "-": lhs.value - rhs.value,
                      "*": lhs.value * rhs.value, "/": lhs.value / rhs.value if rhs.value else 0.0}[op]
            if not math.isfinite(result):
                return self._error("E026", "this number overflows", expr.span,
                                   notes=[f"`{self.source.snippet(expr.span)}` is {_fmt(result)}"])
            return ScalarValue(result)
        if op in "+-":
            if isinstance(lhs, ModuleValue) and isinstance(rhs, ModuleValue):
                return self._add(expr, lhs, rhs.negated() if op == "-" else rhs)
            scalar_side = expr.lhs if isinstance(lhs, ScalarValue) else expr.rhs
            return self._error("E005", f"cannot {'add' if op == '+' else 'subtract'} a number and a module",
                               expr.span,
                               notes=[f"`{self.source.snippet(scalar_side.span)}` is a number"],
                               hints=["modules are scaled by numbers and added to modules: e.g. `0.5*a + 0.5*b`"])
        if op == "*":
            if isinstance(lhs, ModuleValue) and isinstance(rhs, ModuleValue):
                return self._error("E003", "cannot multiply two modules", expr.span,
                                   notes=["module arithmetic is linear: modules are added, subtracted and "
                                          "scaled by numbers"],
                                   hints=["to mix two modules, weight them: `0.5*a + 0.5*b`"])
            module, factor = (lhs, rhs) if isinstance(lhs, ModuleValue) else (rhs, lhs)
            assert isinstance(module, ModuleValue) and isinstance(factor, ScalarValue)
            return module.scaled(factor.value)
        # op == "/"
        if isinstance(rhs, ModuleValue):
            return self._error("E004", "cannot divide by a module", expr.rhs.span,
                               notes=["module arithmetic is linear: a module can only be divided by a number"])
        assert isinstance(lhs, ModuleValue) and isinstance(rhs, ScalarValue)
        if rhs.value == 0:
            return self._error("E015", "division by zero", expr.rhs.span,
                               notes=[f"`{self.source.snippet(expr.rhs.span)}` is 0"])
        return lhs.scaled(1.0 / rhs.value)

    def _in_range(self, expr: ast.BinOp, value: Value) -> Value:
        """A module whose coefficients would overflow the tensors they scale is an error."""
        if not isinstance(value, ModuleValue):
            return value
        for term in value.terms:
            for coefficient in (term.beta, term.alpha):
                if not math.isfinite(coefficient) or abs(coefficient) > FLOAT32_MAX:
                    return self._error(
                        "E026", "a coefficient of this module is out of range", expr.span,
                        notes=[f"the coefficient of `{term.source.describe()}` would be {_fmt(coefficient)}; "
                               "tensors hold numbers up to about 3.4e38 (float32)"],
                        hints=["scale by a smaller number"])
        return value

    def _add(self, expr: ast.BinOp, lhs: ModuleValue, rhs: ModuleValue) -> Value:
        combined = self._combine_types(expr.span, lhs, rhs)
        if combined is None:
            return POISON
        return lhs.plus(rhs, combined)

    def _combine_types(self, span: Span, lhs: ModuleValue, rhs: ModuleValue) -> ModuleType | None:
        lt, rt = lhs.type, rhs.type
        ln, rn = lhs.label, rhs.label
        if lt.kind != rt.kind:
            names = {"lora": "LoRA", "ia3": "(IA)3"}
            self._error("E007", f"cannot combine a {names[lt.kind]} module with an {names[rt.kind]} module", span,
                        notes=[f"{ln}: {names[lt.kind]}; {rn}: {names[rt.kind]}"],
                        hints=["LoRA adds a low-rank update to weights, (IA)3 rescales activations: "
                               "they have no common arithmetic"])
            return None
        if not lt.base.same_as(rt.base):
            # Stating a base helps only where the models could be one: not when layer shapes differ.
            differ = next((k for k in sorted(lt.layers.keys() & rt.layers.keys())
                           if _shape_of(lt.layers[k]) != _shape_of(rt.layers[k])), None)
            shapes = ([] if differ is None else
                      [f"the layer shapes differ too ({differ}: {ln} {_shape_of(lt.layers[differ])}, {rn} "
                       f"{_shape_of(rt.layers[differ])}): these are different models, not one model recorded "
                       "under two names"])
            self._error("E006", "cannot add modules trained on different base models", span,
                        notes=[f"{ln}: base {lt.base.describe()}; {rn}: base {rt.base.describe()}", *shapes],
                        hints=[] if shapes else
                        ["if they are the same model recorded differently, say so where the input is "
                         f"declared: input NAME = \"DIR\" base {ast.format_string(lt.base.name or '')} "
                         f"(in a config: bases: {{NAME: {json.dumps(lt.base.name)}}}; for eval: "
                         f"--input-base NAME={lt.base.name})"])
            return None
        only_left = lt.layers.keys() - rt.layers.keys()
        only_right = rt.layers.keys() - lt.layers.keys()
        common = lt.layers.keys() & rt.layers.keys()
        families_differ = not (architecture_families(lt.layers) & architecture_families(rt.layers))
        if (only_left or only_right) and (families_differ or (lt.kind == "lora" and self.mode == "paper")):
            if families_differ and not common:
                message = "cannot add modules of different architectures"
                hints: list[str] = []
            else:
                message = "cannot add modules that adapt different layers in paper mode"
                hints = [f"{spell_mode(self.spelling)} adds the weight updates, so a layer adapted by only some inputs gets "
                         "only their contributions"]
            notes = []
            if only_left:
                notes.append(f"only {ln} adapts: {_listing(only_left)}")
            if only_right:
                notes.append(f"only {rn} adapts: {_listing(only_right)}")
            if lt.architecture and rt.architecture and lt.architecture != rt.architecture:
                notes.append(f"{ln}: {lt.architecture}; {rn}: {rt.architecture}")
            self._error("E008", message, span, notes=notes, hints=hints)
            return None
        shape_mismatch = [k for k in sorted(common) if _shape_of(lt.layers[k]) != _shape_of(rt.layers[k])]
        head_mismatch = [k for k in sorted(lt.heads.keys() & rt.heads.keys())
                         if lt.heads[k].shape != rt.heads[k].shape]
        if shape_mismatch or head_mismatch:
            key = (shape_mismatch or head_mismatch)[0]
            if shape_mismatch:
                left, right = _shape_of(lt.layers[key]), _shape_of(rt.layers[key])
            else:
                left, right = _dims(lt.heads[key].shape), _dims(rt.heads[key].shape)
            count = len(shape_mismatch) + len(head_mismatch)
            self._error("E009", "layer shapes differ: the modules come from different architectures", span,
                        notes=[f"{key}: {ln} {left}, {rn} {right}"]
                        + ([f"{count - 1} more layers differ"] if count > 1 else []))
            return None
        if lt.kind == "lora" and self.mode == "paper":
            rank_mismatch = [k for k in sorted(common)
                             if lt.layers[k].rank != rt.layers[k].rank]  # type: ignore[union-attr]
            if rank_mismatch:
                key = rank_mismatch[0]
                self._error("E010", "cannot add LoRA modules of different ranks in paper mode", span,
                            notes=[f"{key}: {ln} has rank {lt.layers[key].rank}, "  # type: ignore[union-attr]
                                   f"{rn} has rank {rt.layers[key].rank}"]  # type: ignore[union-attr]
                            + ([f"{len(rank_mismatch) - 1} more layers differ"] if len(rank_mismatch) > 1 else []),
                            hints=["paper mode adds A and B component-wise, which needs equal ranks; "
                                   f"{spell_mode(self.spelling)} adds the weight updates ΔW = s·B·A of any ranks"])
                return None
        layers = dict(lt.layers)
        if self.mode == "exact" and lt.kind == "lora":
            for key, layer in rt.layers.items():
                mine = layers.get(key)
                layers[key] = layer if mine is None else replace(
                    mine, rank=mine.rank + layer.rank, alpha=float(mine.rank + layer.rank), use_rslora=False)  # type: ignore[union-attr,arg-type]
        else:
            for key, layer in rt.layers.items():
                layers.setdefault(key, layer)
        base = lt.base if lt.base.recorded else rt.base
        return ModuleType(lt.kind, base, dict(sorted(layers.items())), {**rt.heads, **lt.heads},
                          lt.architecture or rt.architecture)

    def _call(self, call: ast.Call) -> Value:
        """A function call, by its entry in operators.OPERATORS: arguments, options, mode, kind."""
        name = call.func.id
        if name not in OPERATORS:
            entry = self.env.get(name)
            if entry is not None:
                entry.used = True
                return self._error("E020", f"`{name}` is a {entry.kind}, not a function", call.func.span)
            return self._error("E020", f"unknown function `{name}`", call.func.span,
                               notes=[f"the functions are: {', '.join(FUNCTIONS)}"],
                               hints=did_you_mean(name, FUNCTIONS))
        op = OPERATORS[name]
        usage = [f"usage: `{op.usage}`: {op.summary}"]
        args = [self.expr(a) for a in call.args]
        seen: set[str] = set()
        for k in call.kwargs:
            if k.name.id in seen:
                return self._error("E020", f"`{k.name.id}=` is given twice", k.name.span,
                                   hints=[f"give `{k.name.id}=` once"])
            seen.add(k.name.id)
            if k.name.id not in op.option_names:
                return self._error("E020", f"{name}() has no argument `{k.name.id}`", k.name.span,
                                   hints=did_you_mean(k.name.id, list(op.option_names)) or usage)
        numbers = [expr for arg, expr in zip(args, call.args, strict=True) if isinstance(arg, ScalarValue)]
        if numbers and op.options and len(args) > 1:
            return self._error("E020", f"{name}() takes its options by name", numbers[0].span,
                               notes=[f"`{self.source.snippet(numbers[0].span)}` is a number given by position"],
                               hints=[f"write `{op.options[0].name}=…`; {usage[0]}"])
        if not args or (len(args) != 1 and not op.many):
            return self._error("E020", f"{name}() takes {'modules' if op.many else 'one module'}, "
                               f"{len(args)} given", call.span, hints=usage)
        missing = [o.name for o in op.options if o.default is None and not o.optional and o.name not in seen]
        if missing:
            return self._error("E020", f"{name}() needs `{missing[0]}=`", call.span, hints=usage)
        if op.one_of and self._one_of(op, call, usage) is None:
            return POISON
        options = self._options(op, call, usage)
        if options is None or any(isinstance(a, Poison) for a in args):
            return POISON
        if self.mode != "exact":
            return self._error("E020", f"{name}() needs `mode exact`", call.func.span,
                               notes=[f"{name} acts on the weight update ΔW, which paper mode does not compute"],
                               hints=["use exact mode: `mode exact` as a file's first statement, "
                                      "`mode: exact` in a config, `--mode exact` with `pemlang eval`, "
                                      '`mode="exact"` in the API'])
        for arg, expr in zip(args, call.args, strict=True):
            if not isinstance(arg, ModuleValue):
                return self._error("E019", f"{name}() needs a module, but this is a number", expr.span)
            if arg.type.kind != "lora":
                return self._error("E020", f"{name}() applies to LoRA modules", expr.span,
                                   notes=[f"`{self.source.snippet(expr.span)}` is an (IA)3 module, whose vectors "
                                          "rescale activations: it has no weight update ΔW to act on"])
        modules = [a for a in args if isinstance(a, ModuleValue)]
        combined = modules[0].type
        for module, expr in zip(modules[1:], call.args[1:], strict=True):  # ties: the arguments combine like a sum
            joined = self._combine_types(expr.span, ModuleValue(modules[0].terms, combined), module)
            if joined is None:
                return POISON
            combined = joined
        problem = self._argument_problem(op, modules, call)
        if problem is not None:
            return problem
        if op.dense:
            result_type = combined
        elif name == "svd":  # per layer its rank (at most R, or max_rank), never above its argument's
            result_type = self._svd_type(call, combined, options, dense=any(m.dense for m in modules))
        else:  # low-rank: a rank per layer (operators.low_rank)
            layers: dict[str, Layer] = {}
            for key, layer in combined.layers.items():
                if not isinstance(layer, LoraLayer):
                    continue
                if op.space:
                    ranks = [self.inputs[n].type.layers[key].rank for n in modules[0].leaf_inputs()  # type: ignore[union-attr]
                             if key in self.inputs[n].type.layers]
                else:
                    ranks = [m.type.layers[key].rank for m in modules if key in m.type.layers]  # type: ignore[union-attr]
                rank = low_rank(name, options, ranks, (layer.out_features, layer.in_features))
                layers[key] = replace(layer, rank=rank, alpha=float(rank), use_rslora=False)
            result_type = ModuleType("lora", combined.base, layers, combined.heads, combined.architecture)
        ref = CallRef(name, tuple(modules), tuple(sorted(options.items())), text=self.source.snippet(call.span))
        return ModuleValue((Term(ref, 1.0, 1.0),), result_type)


def _shape_of(layer: LoraLayer | Ia3Layer) -> str:
    if isinstance(layer, LoraLayer):
        return layer.shape_text + (" (fan_in_fan_out)" if layer.fan_in_fan_out else "")
    return layer.shape_text + (" (feed-forward)" if layer.feedforward else "")


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def default_base_dir(source: Source) -> Path:
    """Paths in a file are relative to the file; elsewhere to the working directory."""
    if source.filename.startswith("<") or source.filename.startswith("--"):
        return Path.cwd()
    return Path(source.filename).resolve().parent


def check_parsed(source: Source, program: ast.Program, syntax: Iterable[Diagnostic] = (),
                 **options) -> CheckedProgram:  # type: ignore[no-untyped-def]
    """Check an already parsed program (a λ sweep parses once and checks per value)."""
    options.setdefault("base_dir", default_base_dir(source))
    checker = Checker(source, **options)
    checker.diagnostics.extend(syntax)
    return checker.program(program)


def check_source(source: Source, **options) -> CheckedProgram:  # type: ignore[no-untyped-def]
    """Parse and check a program text; every diagnostic of both stages is in the result."""
    from .parser import parse_program

    program, syntax = parse_program(source)
    return check_parsed(source, program, syntax, **options)


def check_file(path: str | Path, **options) -> CheckedProgram:  # type: ignore[no-untyped-def]
    """Read, parse and check a .pem file."""
    return check_source(read_source(path), **options)


def attach_into(checked: CheckedProgram, written: str, out_path: Path | None, *, base_dir: Path,
                what: str = "into", index: int = 0, allow_pickle: bool = False) -> CheckedProgram:
    """`checked` with output `index` merged into the base model `written` and written to `out_path`:
    the checks of `output x into "BASE" -> "DIR"` for the API's `save(into=…)` and the REPL's
    `:save … --into`, diagnostics about BASE pointing into its text (a source named `what`). An
    error joins the diagnostics (the output is then left as it was)."""
    from dataclasses import replace

    out = checked.outputs[index]
    source = Source(written, what)
    span = Span(0, len(source.text))
    checker = Checker(out.source or checked.source, mode=checked.mode, base_dir=base_dir, writes=True,
                      spelling=checked.spelling, allow_pickle=allow_pickle)
    for name, adapter in checked.inputs.items():
        checker.inputs[name] = adapter
        checker.input_paths[name] = adapter.path
        checker.input_reals[name] = adapter.path.resolve()
    path_source = Source(str(out_path), "directory")
    merged = checker._check_into(out.value, written, span, out.expr_span or out.span, source, out_path,
                                 Span(0, len(path_source.text)), path_source)
    outputs = list(checked.outputs)
    if merged is not None:
        outputs[index] = replace(out, path=out_path, into=merged[0], changes=merged[1])
    return replace(checked, outputs=tuple(outputs), diagnostics=(*checked.diagnostics, *checker.diagnostics))
