"""The `pemlang` command line (SPEC §6). Exit status: 0 success; 1 the input had errors
(diagnostics on stderr); 2 command-line misuse.

Heavy imports (torch, rich) happen inside the commands that need them, so `pemlang check`
starts fast and never imports torch.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .diagnostics import Diagnostic, emit, error, summary
from .source import Source, Span

EXIT_OK, EXIT_ERRORS, EXIT_USAGE = 0, 1, 2
ISSUES_URL = "https://github.com/pemlang/pemlang/issues"


class UsageError(Exception):
    """Command-line misuse (exit 2)."""


def parse_set(text: str):  # type: ignore[no-untyped-def]
    """`NAME=VALUE` from `--set` → an Override, or a diagnostic pointing into the argument."""
    from .check import Override

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
        return Source(Path(path).read_text(encoding="utf-8"), path)
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory; give a .pem file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None


def _report(diagnostics: Sequence[Diagnostic]) -> None:
    if diagnostics:
        emit(diagnostics)
        line = summary(diagnostics)
        if line:
            print(f"{line} found", file=sys.stderr)


# -- commands -----------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .check import check_source

    source = _read_program_file(args.file)
    overrides, bad_sets = _overrides(args.set)
    checked = check_source(source, overrides=overrides, force=args.force, allow_pickle=args.allow_pickle)
    diagnostics = list(checked.diagnostics) + bad_sets
    _report(diagnostics)
    if any(d.is_error for d in diagnostics):
        return EXIT_ERRORS
    outputs = ", ".join(o.name or o.expression for o in checked.outputs) or "none"
    print(f"ok: {args.file}: mode {checked.mode}, {len(checked.inputs)} input"
          f"{'s' if len(checked.inputs) != 1 else ''}, outputs: {outputs}")
    return EXIT_OK


def cmd_inspect(args: argparse.Namespace) -> int:
    from .adapters import AdapterError, read_adapter
    from .inspection import render_adapter

    try:
        adapter = read_adapter(args.adapter, allow_pickle=args.allow_pickle)
    except AdapterError as exc:
        _report([error(exc.code, exc.message, notes=exc.notes, hints=exc.hints)])
        return EXIT_ERRORS
    render_adapter(adapter)
    return EXIT_OK


# -- the parser ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[no-untyped-def,override]
        self.print_usage(sys.stderr)
        print(f"pemlang: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pemlang", description="Compose PEFT adapters (LoRA, (IA)3) by arithmetic.")
    parser.add_argument("--version", action="version", version=f"pemlang {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    def program_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("file", metavar="FILE.pem", help="the program")
        p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                       help="override a `param` (repeatable)")
        p.add_argument("--force", action="store_true", help="replace existing output directories")
        p.add_argument("--allow-pickle", action="store_true",
                       help="accept adapter_model.bin inputs (loaded with weights_only=True)")

    check = commands.add_parser("check", help="parse and type-check a program; reads headers only")
    program_options(check)
    check.set_defaults(handler=cmd_check)

    inspect = commands.add_parser("inspect", help="print an adapter's type signature")
    inspect.add_argument("adapter", metavar="ADAPTER_DIR")
    inspect.add_argument("--allow-pickle", action="store_true")
    inspect.set_defaults(handler=cmd_inspect)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `pemlang` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"pemlang: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("pemlang: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal bug: never a bare traceback for the user
        print(f"internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"This is a bug in pemlang {__version__}, not in your input. Please report it at {ISSUES_URL} "
              "with the command you ran; set PEMLANG_TRACEBACK=1 to print the traceback.", file=sys.stderr)
        if os.environ.get("PEMLANG_TRACEBACK"):
            traceback.print_exc()
        return 70


if __name__ == "__main__":
    sys.exit(main())
