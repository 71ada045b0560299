"""`pemlang repl [FILE.pem]`: statements and bare expressions as in files, one entry at a time.

    pem> input a = "adapters/theta1"
    pem> input b = "adapters/theta2"
    pem> :type 0.5*a + 0.5*b
    pem> :save 0.5*a + 0.5*b out/merged

Each entry is checked against everything accepted before it; an entry with an error is reported
(rendered exactly as for files, pointing into the typed line) and changes nothing. Adapter
signatures are read once and input tensors are kept on the device between evaluations.

The terminal front end is prompt_toolkit: persistent history, multi-line input while parentheses
are open or a line ends in an operator, tab completion of names, functions and commands, syntax
highlighting. When stdin is not a terminal, lines are read plainly (`pemlang repl < script`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from . import ast
from .about import ISSUES_URL, __version__
from .api import AdapterCache
from .check import Checker, did_you_mean
from .checked import POISON, CallRef, CheckedProgram, ModuleValue, Override, ScalarValue, Value
from .diagnostics import Diagnostic, PemError, display_path, emit, error
from .operators import FUNCTIONS, OPERATORS
from .parser import parse_expression, parse_program
from .source import CONFIG_SUFFIXES, Source, Span
from .sourcefiles import read_source

PROMPT, CONTINUATION = "pem> ", "...  "
KEYWORDS = ("input", "param", "output", "mode", "heads", "from", "drop", "paper", "exact")

COMMANDS = {
    ":type": ":type EXPR          the type of an expression (module or number) and its coefficients",
    ":plan": ":plan EXPR          the evaluation plan of an expression",
    ":inspect": ":inspect NAME|DIR   an input adapter's signature: kind, base, layers, ranks, sizes",
    ":load": ":load FILE.pem      run a program's statements in this session (outputs are not written)",
    ":set": ":set NAME=VALUE     give a param a new value",
    ":save": ":save EXPR DIR [--into BASE] [--force]   evaluate and write a PEFT adapter directory (with --into, "
             "a full model: EXPR merged into the base model BASE)",
    ":names": ":names             the inputs, params and bindings in scope",
    ":help": ":help              this help",
    ":quit": ":quit              leave (also Ctrl-D)",
}
HELP = """Statements as in a .pem file: `input NAME = "DIR"`, `param NAME = NUMBER`, `NAME = EXPR`,
`output EXPR -> "DIR"` and `output EXPR into "BASE" -> "DIR"` (evaluated and written at once), `mode exact`,
`heads from NAME`.
A bare expression prints its type. Commands:
""" + "\n".join(f"  {text}" for text in COMMANDS.values())


class _SessionAdapters(AdapterCache):
    """The session's adapter cache, which also remembers every directory read (the history file
    is never one of their files)."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: dict[Path, None] = {}

    def __call__(self, path: Path, *, allow_pickle: bool = False):  # type: ignore[no-untyped-def]
        self.paths.setdefault(Path(path), None)
        return super().__call__(path, allow_pickle=allow_pickle)


@dataclass
class _Entry:
    """An accepted statement, replayed into a fresh checker for each new entry."""

    stmt: ast.Statement
    source: Source
    base_dir: Path


class Session:
    """The REPL's state and its evaluation of one entry at a time (no terminal involved)."""

    def __init__(self, *, device: str = "auto", allow_pickle: bool = False, out: IO[str] | None = None):
        self.device = device
        self.allow_pickle = allow_pickle
        self.out = out
        self.entries: list[_Entry] = []
        self.mode = "paper"
        self.overrides: dict[str, Override] = {}
        self.adapters = _SessionAdapters()
        self.loaded: dict[Path, None] = {}  # program files read by the session (FILE, :load)
        self.tensors: Any = None
        self.scope: dict[str, str] = {}  # names in scope and their kinds, as of the last accepted entry
        self.failed = False  # whether an entry had an error (a piped script then exits 1)
        self.history: Path | None = None  # the history file being appended to, if any

    # -- output ---------------------------------------------------------------------------------
    @property
    def stream(self) -> IO[str]:
        return self.out if self.out is not None else sys.stdout

    def say(self, text: str) -> None:
        print(text, file=self.stream)

    def report(self, diagnostics: Iterable[Diagnostic]) -> None:
        diagnostics = list(diagnostics)
        if diagnostics:
            emit(diagnostics, self.stream)
        self.failed |= any(d.is_error for d in diagnostics)

    def console(self):  # type: ignore[no-untyped-def]
        from rich.console import Console

        return Console(file=self.stream, highlight=False, width=None if self.stream.isatty() else 120)

    # -- checking -------------------------------------------------------------------------------
    def _replayed(self, mode: str, *, force: bool = False) -> Checker:
        """A checker that has checked every accepted entry again; its diagnostics are theirs."""
        checker = Checker(Source("", "<repl>"), mode=mode,  # type: ignore[arg-type]
                          overrides=self.overrides.values(), force=force, allow_pickle=self.allow_pickle,
                          read=self.adapters)
        checker._statements_seen = 1  # a `mode` entry is handled by the session, not as a first statement
        checker.force_hint = "replace it with `:save EXPR DIR --force` (an `output` statement never replaces)"
        for entry in self.entries:
            checker.source, checker.base_dir = entry.source, entry.base_dir
            checker.statement(entry.stmt)
        return checker

    def checker(self, source: Source, *, mode: str | None = None, force: bool = False) -> Checker:
        """A checker that has seen every accepted entry; new diagnostics are those about `source`."""
        checker = self._replayed(mode or self.mode, force=force)
        checker.diagnostics.clear()
        checker.source, checker.base_dir = source, Path.cwd()
        return checker

    def read_files(self) -> dict[str, Path]:
        """What the session has read, by description: every adapter directory, every program file."""
        return {**{f"the input adapter {display_path(p)}": p for p in self.adapters.paths},
                **{f"the program file {display_path(p)}": p for p in self.loaded}}

    def names(self) -> dict[str, str]:
        """Names in scope and their kinds (for :names, completion and highlighting, on every key)."""
        return dict(self.scope)

    # -- entries --------------------------------------------------------------------------------
    def handle(self, text: str) -> bool:
        """Evaluate one entry; False when the user asked to leave. A bug in pemlang is reported as an
        internal error, and the session goes on."""
        try:
            return self._handle(text)
        except MemoryError:  # what the entry reads or builds is too large for this machine: not a bug
            self.failed = True
            self.say("error: out of memory: what this entry reads or builds does not fit in this machine's memory; "
                     "nothing was written, and the session goes on")
            return True
        except Exception as exc:
            self.failed = True
            self.say(f"internal error: {type(exc).__name__}: {exc}\n"
                     f"This is a bug in pemlang {__version__}, not in your input. Please report it at {ISSUES_URL} "
                     "with the entries you typed; set PEMLANG_TRACEBACK=1 to print the traceback.")
            if os.environ.get("PEMLANG_TRACEBACK"):
                import traceback

                traceback.print_exc()
            return True

    def _handle(self, text: str) -> bool:
        if not text.strip():
            return True
        stripped = text.strip()
        if stripped.startswith(":"):
            return self.command(Source(text, "<repl>"))
        source = Source(joined(text), "<repl>")
        try:
            self.statements(source, Path.cwd())
        except PemError as exc:
            self.report(exc.diagnostics)
        return True

    def load(self, path: Path) -> None:
        """Run a program file's statements in the session (its outputs are not written). Raises
        OSError when it cannot be read, PemError when it is not UTF-8 or has errors."""
        self.loaded.setdefault(Path(path), None)
        self.statements(read_source(path), path.resolve().parent, loading=True)

    def statements(self, source: Source, base_dir: Path, *, loading: bool = False) -> None:
        program, syntax = parse_program(source)
        if syntax:
            raise PemError(syntax)
        statements = list(program.statements)
        mode = self.mode
        if statements and isinstance(statements[0], ast.ModeStmt):
            mode = self._mode(statements.pop(0), source)  # type: ignore[arg-type]
        checker = self.checker(source, mode=mode)
        checker.base_dir = base_dir
        # A loaded file's outputs are checked as `pemlang check` checks them (an existing directory
        # is no error: nothing is written) and then set aside.
        values: list[tuple[ast.Expr, Value]] = []
        for stmt in statements:
            checker.writes = not (loading and isinstance(stmt, ast.OutputStmt))
            value = checker.statement(stmt)
            checker.writes = True
            if isinstance(stmt, ast.ExprStmt) and value is not None:
                values.append((stmt.value, value))
        outputs = len(checker.outputs) if loading else 0
        diagnostics = sorted((d for d in checker.diagnostics if not (loading and d.code == "W005")),
                             key=lambda d: d.span.start if d.span else 0)
        if any(d.is_error for d in diagnostics):
            raise PemError(diagnostics)
        self.report(diagnostics)
        if mode != self.mode:
            self.say(f"mode {mode}")
        self.mode = mode
        self.entries += [_Entry(s, source, base_dir) for s in statements
                         if not isinstance(s, ast.OutputStmt | ast.ExprStmt | ast.ModeStmt)]
        self.scope = {name: entry.kind for name, entry in checker.env.items()}
        for expr, value in values:
            self.say(self.describe(source.snippet(expr.span), value, self._heads(source, expr)))
        if checker.outputs and not loading:
            self.write(checker.result(), force=False)
        if loading:
            names = len(self.names())
            self.say(f"loaded {source.filename}: {names} name{'s' if names != 1 else ''} in scope"
                     + (f"; {outputs} output{'s' if outputs != 1 else ''} not written (use :save)" if outputs else ""))

    def _mode(self, stmt: ast.ModeStmt, source: Source) -> str:
        probe = Checker(source, read=self.adapters)
        probe.statement(stmt)
        if probe.diagnostics:
            raise PemError(probe.diagnostics)
        if probe.mode != self.mode and self.entries:  # everything so far must still check in the new mode
            errors = [d for d in self._replayed(probe.mode).diagnostics if d.is_error]
            if errors:
                raise PemError([error("E021", f"cannot switch to mode {probe.mode}: earlier entries do not "
                                      "check in it", source, stmt.span, notes=[f"{errors[0].location()}: "
                                                                                f"{errors[0].message}"])])
        return probe.mode

    def _heads(self, source: Source, expr: ast.Expr) -> str | None:
        """The heads (modules_to_save) that `output EXPR` would write, as `:type` shows them: ", 1 head",
        "" for none, or why they cannot be written; None for a number."""
        from .lower import lower

        checker = self.checker(source)
        if not isinstance(checker.expr(expr), ModuleValue) or any(d.is_error for d in checker.diagnostics):
            return None
        checker.diagnostics.clear()
        checker.add_output(expr, None, expr.span, expr.span)
        checked = checker.result()
        trouble = next((d for d in checked.diagnostics if d.is_error), None)
        if trouble is not None and trouble.code == "E028":
            return ", dense ΔW per layer (written only through svd(…, rank=R), or merged inside core(…)/knots(…))"
        if trouble is not None:
            return f", heads not writable ({trouble.code}: {trouble.message})"
        heads = len({head.module for head in lower(checked).outputs[0].heads})
        return f", {heads} head{'s' if heads != 1 else ''}" if heads else ""

    def describe(self, text: str, value: Value, heads: str | None = None) -> str:
        """`TEXT : TYPE` and its (alpha, beta) per source; `heads` as `_heads` gives it (default: the type's)."""
        if isinstance(value, ScalarValue):
            return f"{text} : number = {value.value:g}"
        if not isinstance(value, ModuleValue):
            return f"{text} : (error)"
        t = value.type
        kind = "LoRA" if t.kind == "lora" else "(IA)3"
        ranks = sorted({getattr(layer, "rank", 0) for layer in t.layers.values()} - {0})
        rank = (f", rank {ranks[0]}" if len(ranks) == 1 else f", ranks {ranks[0]}–{ranks[-1]}") if ranks else ""
        if rank and value.ranks_from_data:
            rank = f", rank up to {ranks[-1]} (chosen from the data per layer)"
        if value.dense:
            rank = ""  # a dense ΔW has no rank to speak of; `heads` says what it is
        elif len(value.terms) == 1 and isinstance(value.terms[0].source, CallRef) \
                and OPERATORS[value.terms[0].source.op].space:
            call = value.terms[0].source
            rank = f", low-rank{rank}, {call.op} space of {', '.join(call.args[0].leaf_inputs())}"
        if heads is None:
            modules = len(t.head_modules)
            heads = f", {modules} head{'s' if modules != 1 else ''}" if t.heads else ""
        terms = " + ".join(f"({term.alpha:g}, {term.beta:g})·{term.source.describe()}" for term in value.terms)
        return (f"{text} : {kind} module, base {t.base.describe()}, {len(t.layers)} layers{rank}{heads}\n"
                f"  = {terms or '0'}   (alpha, beta) per source, mode {self.mode}")

    # -- commands -------------------------------------------------------------------------------
    def command(self, source: Source) -> bool:
        text = source.text
        lead = len(text) - len(text.lstrip())
        name, _, rest = text.strip().partition(" ")
        name = ":quit" if name in (":q", ":exit") else name
        rest = rest.strip()
        rest_at = text.index(rest, lead + len(name)) if rest else len(text.rstrip())
        if name == ":quit":
            return False
        if name == ":help":
            self.say(HELP)
            return True
        if name not in COMMANDS:
            self.report([error("E020", f"unknown command `{name}`", source, Span(lead, lead + len(name)),
                               hints=did_you_mean(name, COMMANDS) or ["`:help` lists the commands"])])
            return True
        try:
            getattr(self, f"cmd_{name[1:]}")(source, rest, Span(rest_at, rest_at + len(rest)))
        except PemError as exc:
            self.report(exc.diagnostics)
        return True

    def _needs(self, source: Source, rest: str, what: str, usage: str) -> None:
        if not rest:
            raise PemError([error("E020", f"{source.text.split()[0]} needs {what}", source,
                                  Span(len(source.text.rstrip()), len(source.text.rstrip()) + 1),
                                  hints=[f"usage: {usage}"])])

    def _expression(self, source: Source, span: Span) -> ast.Expr:
        """Parse the expression at `span` of the typed line; diagnostics point into the line."""
        from .config import Embedded, relocate

        embedded = Embedded(Source(source.text[span.start:span.end], "<repl>"), source, [span.start], span)
        expr, syntax = parse_expression(embedded.source)
        if syntax or expr is None:
            raise PemError(relocate(syntax, [embedded], source))
        return _shift(expr, span.start)

    def _checked(self, source: Source, expr: ast.Expr, directory: str | None, path_span: Span,
                 *, force: bool = False, into: tuple[str, Span] | None = None) -> CheckedProgram:
        checker = self.checker(source, force=force)
        checker.add_output(expr, directory, path_span, expr.span, path_source=source,
                           into=into[0] if into else None, into_span=into[1] if into else None, into_source=source)
        checked = checker.result()
        if any(d.is_error for d in checked.diagnostics):
            raise PemError(checked.diagnostics)
        return checked

    def cmd_type(self, source: Source, rest: str, span: Span) -> None:
        self._needs(source, rest, "an expression", ":type EXPR")
        expr = self._expression(source, span)
        checker = self.checker(source)
        value = checker.expr(expr)
        if any(d.is_error for d in checker.diagnostics) or value is POISON:
            raise PemError(checker.diagnostics)
        self.say(self.describe(rest, value, self._heads(source, expr)))

    def cmd_plan(self, source: Source, rest: str, span: Span) -> None:
        from .lower import lower
        from .plan import format_plan

        self._needs(source, rest, "an expression", ":plan EXPR")
        checked = self._checked(source, self._expression(source, span), None, span)
        format_plan(lower(checked), self.console())

    def cmd_inspect(self, source: Source, rest: str, span: Span) -> None:
        from .adapters import AdapterError
        from .inspection import render_adapter

        self._needs(source, rest, "an input name or an adapter directory", ":inspect NAME|DIR")
        checker = self.checker(source)
        adapter = checker.inputs.get(rest)
        if adapter is None:
            if rest.isidentifier() and not Path(rest).exists():
                raise PemError([error("E002", f"no input named `{rest}`", source, span,
                                      hints=did_you_mean(rest, checker.inputs) or
                                      ["give an input's name or an adapter directory"])])
            location = Path(os.path.expanduser(rest)).resolve()
            if rest.startswith("hf://"):  # an adapter on the Hub: its snapshot in the cache
                from . import hub

                try:
                    location = hub.locate(rest, allow_pickle=self.allow_pickle).directory
                except hub.HubError as exc:
                    raise PemError([error("E012", exc.message, source, span, hints=exc.hints)]) from None
            try:
                adapter = self.adapters(location, allow_pickle=self.allow_pickle)
            except AdapterError as exc:
                raise PemError([error(exc.code, exc.message, source, span, notes=exc.notes, hints=exc.hints)]) from None
        render_adapter(adapter, self.console())

    def cmd_load(self, source: Source, rest: str, span: Span) -> None:
        self._needs(source, rest, "a file", ":load FILE.pem")
        path = Path(os.path.expanduser(rest.strip("'\"")))
        try:
            self.load(path)
        except OSError as exc:
            raise PemError([error("E012", f"cannot read {rest}: {exc.strerror or exc}", source, span)]) from None

    def cmd_set(self, source: Source, rest: str, span: Span) -> None:
        self._needs(source, rest, "NAME=VALUE", ":set NAME=VALUE")
        name, sep, value = rest.partition("=")
        name_span = Span(span.start, span.start + len(name.rstrip()))
        params = [n for n, kind in self.names().items() if kind == "param"]
        if name.strip() not in params:
            raise PemError([error("E017", f"`{name.strip()}` is not a param", source, name_span,
                                  notes=[f"params: {', '.join(params) or 'none yet (declare one with `param NAME = VALUE`)'}"],
                                  hints=did_you_mean(name.strip(), params))])
        try:
            number = float(value)
            if not sep or number != number or abs(number) == float("inf"):
                raise ValueError
        except ValueError:
            raise PemError([error("E017", f"`{value.strip() or '(nothing)'}` is not a finite number", source,
                                  Span(span.start + len(name) + 1, span.end), hints=[f"e.g. :set {name.strip()}=0.3"])]) from None
        previous = self.overrides.get(name.strip())
        self.overrides[name.strip()] = Override(name.strip(), number, source, what=":set")
        errors = [d for d in self._replayed(self.mode).diagnostics if d.is_error]
        if errors:  # an earlier entry does not check with this value: keep the old one, say why
            if previous is None:
                del self.overrides[name.strip()]
            else:
                self.overrides[name.strip()] = previous
            raise PemError([*errors, error("E017", f"`{name.strip()}` keeps its value: with {number:g}, the entries "
                                           "above have errors", source, span)])
        self.say(f"{name.strip()} = {number:g}")

    def cmd_save(self, source: Source, rest: str, span: Span) -> None:
        usage = ":save EXPR DIR [--into BASE] [--force]"
        self._needs(source, rest, "an expression and a directory", usage)
        body, force, into = rest, False, None
        while True:  # options after DIR: --force, --into BASE (or --into=BASE; BASE may be quoted)
            base = re.search(r'\s--into(?:=|\s+)("[^"]*"|[^\s"-]\S*)$', body)
            flag = base or re.search(r"\s(--[^\s\"]*)$", body)
            if flag is None:
                break
            at = Span(span.start + flag.start(1), span.start + flag.end(1))
            if base is not None and into is not None:
                raise PemError([error("E020", "option `--into` of :save is given twice", source, at)])
            if base is not None:
                into = (base.group(1).strip('"'), at)
            elif flag.group(1) in ("--into", "--into="):
                raise PemError([error("E020", "option `--into` of :save needs a base model directory", source, at,
                                      hints=[f"usage: {usage}"])])
            elif flag.group(1) == "--force":
                force = True
            else:
                raise PemError([error("E020", f"unknown option `{flag.group(1)}` of :save", source, at,
                                      hints=did_you_mean(flag.group(1), ["--force", "--into"])
                                      or [f"usage: {usage}"])])
            body = body[: flag.start()].rstrip()
        match = re.fullmatch(r'(.*?)\s+("[^"]*"|\S+)', body, flags=re.S)
        if match is None or not match.group(1).strip():
            raise PemError([error("E020", ":save needs an expression and a directory", source, span,
                                  hints=[f"usage: {usage}"])])
        directory = match.group(2).strip('"')
        expr = self._expression(source, Span(span.start, span.start + len(match.group(1).rstrip())))
        path_span = Span(span.start + match.start(2), span.start + match.end(2))
        checked = self._checked(source, expr, directory, path_span, force=force, into=into)
        self.write(checked, force=force)

    def cmd_names(self, source: Source, rest: str, span: Span) -> None:
        names = self.names()
        if not names:
            self.say("no names yet: `input NAME = \"DIR\"` declares one")
        for kind in ("input", "param", "binding"):
            chosen = [n for n, k in names.items() if k == kind]
            if chosen:
                self.say(f"{kind}s: {', '.join(chosen)}")

    # -- evaluation -----------------------------------------------------------------------------
    def write(self, checked: CheckedProgram, *, force: bool) -> None:
        from .backend import resolve_device
        from .backend.torch_backend import TensorCache
        from .run import execute, stream, summary_line, write_outputs
        from .writer import OutputExists

        try:
            resolve_device(self.device)  # an unavailable device is misuse: say so, and go on
        except ValueError as exc:
            self.failed = True
            self.say(f"pemlang: error: {exc}; nothing was written")
            return
        if self.tensors is None:
            self.tensors = TensorCache()
        protect = {"the session's history file": self.history} if self.history else None
        try:
            if any(out.into is not None for out in checked.outputs):  # a full model: streamed, as `run` writes it
                result = stream(checked, device=self.device, force=force, protect=protect)
                self.report(result.diagnostics)
            else:
                result = execute(checked, device=self.device, cache=self.tensors)
                self.report(result.diagnostics)
                write_outputs(result, force=force, protect=protect)
        except OutputExists as exc:
            raise PemError([error("E018", "output directory already exists", notes=[str(exc)],
                                  hints=["add --force to replace it"])]) from None
        for index, out in enumerate(result.plan.outputs):  # with the ranks the data chose (svd with energy=)
            self.say(f"wrote {summary_line(out, result.dropped[index] if result.dropped else ())}")


def _shift(expr: Any, offset: int) -> Any:
    """The same AST with every span moved `offset` characters right (an expression cut from a line)."""
    import dataclasses

    if isinstance(expr, Span):
        return expr.shift(offset)
    if isinstance(expr, tuple):
        return tuple(_shift(x, offset) for x in expr)
    if dataclasses.is_dataclass(expr) and not isinstance(expr, type):
        changes = {f.name: _shift(getattr(expr, f.name), offset) for f in dataclasses.fields(expr)}
        return dataclasses.replace(expr, **changes)
    return expr


# -- the terminal ---------------------------------------------------------------------------------


CONTINUING = ("+", "-", "*", "/", "=", ",", "⊕", "⊖", "·", "×")  # a line ending in one of these goes on


def _code_end(line: str) -> int:
    """Where a line's code ends: at a `#` comment outside a string, else at its end."""
    in_string = False
    for i, ch in enumerate(line):
        if ch == '"':
            in_string = not in_string
        elif ch == "#" and not in_string:
            return i
    return len(line)


def needs_more(text: str) -> bool:
    """Whether an entry continues on the next line: open parentheses, or a trailing operator."""
    depth = 0
    for line in text.split("\n"):
        code, in_string = line[:_code_end(line)], False
        for ch in code:
            if ch == '"':
                in_string = not in_string
            elif not in_string:
                depth += (ch == "(") - (ch == ")")
    last = text.rstrip().split("\n")[-1]
    return depth > 0 or (not text.lstrip().startswith(":") and last[:_code_end(last)].rstrip().endswith(CONTINUING))


def joined(text: str) -> str:
    """An entry whose lines end in an operator, as one statement: such a line's comment and its newline
    become spaces (the text keeps its length, so every offset, and every caret, stays where it was)."""
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines):
        end = _code_end(line)
        if i < len(lines) - 1 and line[:end].rstrip().endswith(CONTINUING):
            out.append(line[:end] + " " * (len(line) - end + 1))
        else:
            out.append(line + ("\n" if i < len(lines) - 1 else ""))
    return "".join(out)


_TOKEN = re.compile(r"""(?P<comment>\#.*)|(?P<string>"[^"\n]*"?)|(?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
    |(?P<command>^\s*:\w+)|(?P<name>[^\W\d]\w*)|(?P<op>->|[-+*/=⊕⊖·×(),])|(?P<other>.)""", re.X)


def tokens(line: str, names: dict[str, str]) -> list[tuple[str, str]]:
    """(style class, text) fragments of one line, for highlighting."""
    out = []
    for m in _TOKEN.finditer(line):
        kind = m.lastgroup or "other"
        text = m.group()
        if kind == "name":
            kind = ("keyword" if text in KEYWORDS else "function" if text in FUNCTIONS
                    else f"name.{names[text]}" if text in names else "name")
        out.append((f"class:pem.{kind}", text))
    return out


HISTORY_HINT = "give another file with --history FILE (or $PEMLANG_HISTORY)"


def is_history_file(path: Path) -> bool:
    """Whether the regular file `path` holds what prompt_toolkit's FileHistory writes: UTF-8 lines
    that are blank, `# time` stamps or `+entry` lines. Read line by line, stopping at the first that
    is not (a JSON config or a safetensors file is refused at its first byte)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            at_line_start = True
            while chunk := f.readline(1 << 16):
                if at_line_start and chunk[:1] not in (b"\n", b"#", b"+"):
                    return False
                decoder.decode(chunk)
                at_line_start = chunk.endswith(b"\n")
            decoder.decode(b"", final=True)
    except (OSError, UnicodeDecodeError):
        return False
    return True


def history_problem(path: Path, read: dict[str, Path], *, contents: bool) -> str | None:
    """Why the session must not append to the history file `path` (None when it may): it is, or is
    inside, something the session read (`read`, by description); with `contents`, it exists and is
    not a prompt_toolkit history file."""
    from .writer import file_clash

    clash = file_clash(path, read)
    if clash is not None:
        return f"{display_path(path)} is {clash} or inside it (inputs are never written)"
    if contents and os.path.lexists(path):
        import stat

        try:
            regular = stat.S_ISREG(os.stat(path).st_mode)
        except OSError as exc:
            return f"{display_path(path)} cannot be read: {exc.strerror or exc}"
        if not regular or not is_history_file(path):
            return f"{display_path(path)} is not a history file"
    return None


def _history(session: Session, path: Path):  # type: ignore[no-untyped-def]
    """prompt_toolkit's FileHistory for `path`, guarded: an entry is appended only after it was
    handled (an `input` it declares is then known) and only while `history_problem` finds nothing;
    else the session says so once and keeps its history in memory."""
    from prompt_toolkit.history import FileHistory

    class SessionHistory(FileHistory):
        def __init__(self) -> None:
            super().__init__(str(path))
            self.pending: list[str] = []
            self.refused = False
            self._refuse(history_problem(path, session.read_files(), contents=True))
            if not self.refused:
                session.history = path  # kept by :save and `output` too: never inside what they replace

        def _refuse(self, problem: str | None) -> None:
            if problem is not None and not self.refused:
                self.refused = True
                session.history = None
                session.say(f"pemlang: warning: history is kept in memory for this session: {problem}\n"
                            f"  hint: {HISTORY_HINT}")
            if self.refused:
                self.pending.clear()

        def load_history_strings(self) -> Iterable[str]:
            return [] if self.refused else super().load_history_strings()

        def store_string(self, string: str) -> None:
            if not self.refused:
                self.pending.append(string)

        def flush(self) -> None:
            """Append the entries handled since the last flush, if the file is still safe to append to."""
            if self.pending:
                self._refuse(history_problem(path, session.read_files(), contents=False))
            for string in self.pending:
                try:
                    super().store_string(string)
                except OSError as exc:
                    self._refuse(f"{display_path(path)} cannot be written: {exc.strerror or exc}")
                    break
            self.pending.clear()

    return SessionHistory()


def _prompt_session(session: Session, history: Path | None, **io: Any):  # type: ignore[no-untyped-def]
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.history import InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings
    from prompt_toolkit.lexers import Lexer
    from prompt_toolkit.styles import Style

    class PemCompleter(Completer):
        def get_completions(self, document, complete_event) -> Iterator[Completion]:  # type: ignore[no-untyped-def]
            before = document.text_before_cursor
            match = re.search(r"(:?[^\W\d]?\w*)$", before)
            word = match.group(1) if match else ""
            at_start = before[: len(before) - len(word)].strip() == ""
            if word.startswith(":"):
                candidates: Iterable[str] = COMMANDS if at_start else ()
            elif at_start and not word:
                candidates = ()
            else:
                candidates = [*session.names(), *FUNCTIONS, *KEYWORDS]
            for candidate in candidates:
                if candidate.startswith(word) and candidate != word:
                    yield Completion(candidate, start_position=-len(word))

    class PemLexer(Lexer):
        def lex_document(self, document):  # type: ignore[no-untyped-def]
            names = session.names()
            lines = document.lines
            return lambda i: tokens(lines[i], names) if i < len(lines) else []

    keys = KeyBindings()

    @keys.add("enter")
    def _(event) -> None:  # type: ignore[no-untyped-def]
        buffer = event.current_buffer
        if needs_more(buffer.text):
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    style = Style.from_dict({"pem.comment": "italic #888888", "pem.string": "#5f875f", "pem.number": "#5f87af",
                             "pem.command": "bold #af5f00", "pem.keyword": "bold #875f87",
                             "pem.function": "#0087af", "pem.name.input": "bold", "pem.name.param": "#af8700",
                             "pem.name.binding": "underline", "pem.op": "#808080"})
    return PromptSession(history=_history(session, history) if history else InMemoryHistory(),
                         completer=PemCompleter(), complete_while_typing=False, lexer=PemLexer(), style=style,
                         multiline=True, key_bindings=keys, prompt_continuation=CONTINUATION, **io)


def default_history() -> Path:
    return Path(os.environ.get("PEMLANG_HISTORY", Path.home() / ".pemlang_history"))


def run(file: str | None = None, *, device: str = "auto", allow_pickle: bool = False,
        history: Path | None = None, input: Any = None, output: Any = None) -> int:  # noqa: A002
    """The REPL loop. `input`/`output` are prompt_toolkit Input/Output (tests pass pipe and dummy)."""
    if device not in ("auto", "cpu"):  # a device that is not there is misuse: said before the first entry
        from .backend import resolve_device

        try:
            resolve_device(device)
        except ValueError as exc:
            print(f"pemlang: error: {exc}", file=sys.stderr)
            return 2
    session = Session(device=device, allow_pickle=allow_pickle)
    if file is not None and Path(file).suffix.lower() in CONFIG_SUFFIXES:
        print(f"pemlang: error: the REPL loads .pem programs; {file} is a config (`pemlang run {file}` runs it, "
              f"`pemlang check {file}` checks it)", file=sys.stderr)
        return 2
    if file is not None:  # a file that cannot be loaded ends the session before it starts
        try:
            session.load(Path(file))
        except OSError as exc:
            print(f"pemlang: error: cannot read {file}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        except PemError as exc:
            emit(exc.diagnostics, sys.stderr)
            return 1
    interactive = input is not None or (sys.stdin.isatty() and sys.stdout.isatty())
    if not interactive:
        return _plain(session)
    prompt = _prompt_session(session, history, **({"input": input} if input is not None else {}),
                             **({"output": output} if output is not None else {}))
    if input is None:
        session.say("pemlang repl: `:help` for commands, Ctrl-D to leave")
    while True:
        try:
            text = prompt.prompt(PROMPT)
        except KeyboardInterrupt:
            continue
        except EOFError:
            return 0
        going_on = session.handle(text)
        if hasattr(prompt.history, "flush"):
            prompt.history.flush()  # after the entry: an input it declared is guarded too
        if not going_on:
            return 0


def _plain(session: Session) -> int:
    """Lines from a pipe or file: the same entries, continued while `needs_more`."""
    pending = ""
    for line in sys.stdin:
        pending += line
        if needs_more(pending.rstrip("\n")):
            continue
        text, pending = pending.rstrip("\n"), ""
        if not session.handle(text):
            break
    else:
        if pending.strip():
            session.handle(pending.rstrip("\n"))
    return 1 if session.failed else 0
