"""Diagnostics: every user error and warning, and the one renderer that prints them (README "Diagnostics").

A diagnostic carries a code, a message, the source span it is about, and notes and hints. The
renderer prints them as rustc does:

    error[E006]: cannot add modules trained on different base models
     --> transfer.pem:7:12
      |
    7 | yelp_cls = amazon_cls + llama_lm
      |            ^^^^^^^^^^^^^^^^^^^^^
      = note: amazon_cls: base "t5-base"; llama_lm: base "huggyllama/llama-7b"

Colour is used only when the stream is a terminal (and then through rich, imported lazily).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, Literal

from .formatting import visible
from .source import Source, Span

Severity = Literal["error", "warning"]

# Every code a user can see, with a one-line title (the README lists them).
CODES: dict[str, str] = {
    "E001": "syntax error",
    "E002": "unknown name",
    "E003": "product of two modules (not linear)",
    "E004": "division by a module (not linear)",
    "E005": "scalar added to a module",
    "E006": "modules trained on different base models",
    "E007": "modules of different kinds (lora with ia3)",
    "E008": "modules adapt different layers (different architecture)",
    "E009": "a layer has different shapes (different architecture)",
    "E010": "rank mismatch in paper mode",
    "E011": "unsupported adapter feature",
    "E012": "adapter missing or unreadable",
    "E013": "corrupt adapter file",
    "E014": "non-finite values in an input",
    "E015": "division by zero",
    "E016": "redefinition",
    "E017": "unknown --set name",
    "E018": "output would overwrite an input or an existing directory",
    "E019": "wrong kind of value (a module where a number is needed, or the reverse)",
    "E020": "unknown function or bad arguments",
    "E021": "bad mode statement",
    "E022": "heads (modules_to_save) cannot be combined",
    "E023": "pickled adapter refused",
    "E024": "a statement that is not allowed here",
    "E025": "invalid config (YAML/JSON/TOML block)",
    "E026": "a number that is not finite, or a coefficient beyond float32's range",
    "E027": "a result is not finite in the output dtype",
    "E028": "a dense merge (prune, dare, ties) is written only through svd (or inside core/knots)",
    "E029": "a range or grid (tune --param, run --sweep) that is not valid, or a tuned param not the program's",
    "E030": "tune: invalid --data file (JSONL records)",
    "E031": "tune: the objective cannot be loaded, failed or changed the model it scores, or Optuna/Ray is missing",
    "E032": "tune, load_into: the base model (or its tokenizer) cannot be loaded or does not fit",
    "E033": "tune: the study file belongs to another tuning, is not a study, was changed by hand, or was "
            "deleted or locked while the tuning ran",
    "E034": "an output's rank is above the limit given (--max-rank, max_rank in a config, the API's max_rank=)",
    "E035": "the base model of `into` is missing, unreadable or damaged, or overlaps an input",
    "E036": "the base model of `into` is quantized (or a tensor to change is not floating point)",
    "E037": "a layer on a tensor the base model ties to another (lm_head and the embeddings)",
    "W001": "base model not recorded in an input",
    "W002": "paper mode over LoRA inputs whose A matrices differ",
    "W003": "unused input or binding",
    "W004": "inputs differ in task type or architecture",
    "W005": "output already exists (`run` will need --force)",
    "W006": "an input taken as trained on the base the program states",
    "W007": "svd(x, rank=R) with R above x's rank at every layer: nothing is dropped",
    "W008": "the base model of `into` is not the one the inputs record (its layers match)",
}


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """One error or warning about a program, pointing into its source."""

    code: str
    message: str
    source: Source | None = None
    span: Span | None = None
    notes: tuple[str, ...] = ()
    hints: tuple[str, ...] = ()
    severity: Severity = field(default="error")

    @property
    def is_error(self) -> bool:
        """Whether this diagnostic makes the program invalid."""
        return self.severity == "error"

    def location(self) -> str | None:
        """`file:line:col` of the span's start, or None when the diagnostic has no location."""
        if self.source is None:
            return None
        if self.span is None:
            return self.source.filename
        line, col = self.source.line_col(self.span.start)
        return f"{self.source.filename}:{line}:{col}"


def first_line(exc: BaseException, limit: int = 300) -> str:
    """A library exception's first line for a diagnostic message (its type when it says nothing)."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


def error(code: str, message: str, source: Source | None = None, span: Span | None = None, *,
          notes: Iterable[str] = (), hints: Iterable[str] = ()) -> Diagnostic:
    """An error diagnostic."""
    return Diagnostic(code, message, source, span, tuple(notes), tuple(hints), "error")


def warning(code: str, message: str, source: Source | None = None, span: Span | None = None, *,
            notes: Iterable[str] = (), hints: Iterable[str] = ()) -> Diagnostic:
    """A warning diagnostic (never fatal)."""
    return Diagnostic(code, message, source, span, tuple(notes), tuple(hints), "warning")


class PemError(Exception):
    """A user error that stops a stage: carries the diagnostics to print (never a traceback)."""

    def __init__(self, diagnostics: Iterable[Diagnostic]):
        self.diagnostics = tuple(diagnostics)
        super().__init__("\n".join(d.message for d in self.diagnostics))


def display_path(path: object) -> str:
    """A path as users want to read it: relative to the working directory when inside it."""
    text = os.fspath(path)  # type: ignore[call-overload]
    try:
        relative = os.path.relpath(text)
    except ValueError:  # another drive (Windows)
        return text
    return text if relative.startswith("..") else relative


# -- rendering --------------------------------------------------------------------------------

_Segment = tuple[str, str]  # (text, rich style); the style is dropped in plain output


SHOWN_LINE = 160  # longer source lines are shown as a window around the span
SHOWN_CONTEXT = 40


def _shown(text: str) -> str:
    """A message, note or hint as printed: what it quotes (a path, a name) may hold control
    characters, which are shown as escapes, never sent to the terminal raw."""
    return visible(text, keep="\n\t")


def _segments(diag: Diagnostic) -> Iterator[list[_Segment]]:
    head_style = "bold red" if diag.is_error else "bold yellow"
    yield [(f"{diag.severity}[{diag.code}]", head_style), (f": {_shown(diag.message)}", "bold")]
    gutter = 1
    line = col = end_col = 0
    text = ""
    if diag.source is not None and diag.span is not None:
        line, col = diag.source.line_col(diag.span.start)
        end_line, end_col = diag.source.line_col(diag.span.end)
        text = diag.source.line_text(line)
        if end_line != line:
            end_col = len(text) + 1
        gutter = len(str(line))
    pad = " " * gutter
    location = diag.location()
    if location is not None:
        yield [(f"{pad}--> ", "bold blue"), (_shown(location), "")]
    if diag.source is not None and diag.span is not None:
        width = max(1, end_col - col)
        if len(text) > SHOWN_LINE:  # a very long line: a window around the span, marked with …
            first = max(0, col - 1 - SHOWN_CONTEXT)
            last = min(len(text), max(col - 1 + min(width, SHOWN_LINE - 2 * SHOWN_CONTEXT), first + SHOWN_LINE))
            width = min(width, last - (col - 1))
            shown = ("…" if first else "") + text[first:last] + ("…" if last < len(text) else "")
            col, text = col - first + (1 if first else 0), shown
        # Carets start under the span: copy tabs from the source line so they line up.
        lead = "".join("\t" if ch == "\t" else " " for ch in text[: col - 1])
        yield [(f"{pad} |", "bold blue")]
        yield [(f"{line} | ", "bold blue"), (text, "")]
        yield [(f"{pad} | ", "bold blue"), (lead, ""), ("^" * width, head_style)]
    for note in diag.notes:
        yield [(f"{pad} = ", "bold blue"), ("note", "bold"), (f": {_shown(note)}", "")]
    for hint in diag.hints:
        yield [(f"{pad} = ", "bold blue"), ("hint", "bold cyan"), (f": {_shown(hint)}", "")]


def render(diag: Diagnostic) -> str:
    """The plain-text rendering of one diagnostic (what golden files hold)."""
    return "\n".join("".join(text for text, _ in line).rstrip() for line in _segments(diag))


def format_diagnostics(diagnostics: Iterable[Diagnostic]) -> str:
    """Diagnostics rendered as on the command line, a blank line between them."""
    return "\n\n".join(render(d) for d in diagnostics)


class CompileError(PemError):
    """A program with errors (raised by the API, caught by the tuner and the CLI): `str(error)` is
    the rendered diagnostics."""

    def __str__(self) -> str:
        return format_diagnostics(self.diagnostics)


def summary(diagnostics: Iterable[Diagnostic]) -> str | None:
    """`2 errors, 1 warning` — or None when there is nothing to report."""
    diags = list(diagnostics)
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    parts = []
    if errors:
        parts.append(f"{errors} error{'s' if errors != 1 else ''}")
    if warnings:
        parts.append(f"{warnings} warning{'s' if warnings != 1 else ''}")
    return ", ".join(parts) or None


def emit(diagnostics: Iterable[Diagnostic], stream: IO[str] | None = None, *,
         color: bool | None = None) -> None:
    """Print diagnostics to `stream` (stderr by default), in colour only on a terminal."""
    stream = stream if stream is not None else sys.stderr
    if color is None:
        color = stream.isatty()
    if not color:
        for diag in diagnostics:
            stream.write(render(diag) + "\n\n")
        return
    from rich.console import Console
    from rich.text import Text

    console = Console(file=stream, force_terminal=True, highlight=False, soft_wrap=True)
    for diag in diagnostics:
        for line in _segments(diag):
            console.print(Text.assemble(*line))
        console.print()
