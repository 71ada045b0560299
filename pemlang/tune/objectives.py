"""What a trial is scored by: the records of a `--data` JSONL file (the built-in objective), or a
user's `module:function`, imported; and an objective's return value read as a finite number."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..diagnostics import Diagnostic, error
from ..source import Source, Span
from .errors import TuneError

DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Record:
    input: str
    output: str | int
    line: int


def read_records(path: str | Path, *, limit: int = 1_000_000) -> list[Record]:
    """The records of a JSONL data file, every problem an E030 diagnostic at its line."""
    return _parse_records(Path(path), _read_data(Path(path)), limit=limit)


def _read_data(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TuneError([error("E030", f"cannot read the data file {path}: {exc.strerror or exc}",
                               hints=["--data names a JSONL file of {\"input\": …, \"output\": …} records"])]) from None


def _parse_records(path: Path, raw: bytes, *, limit: int = 1_000_000) -> list[Record]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TuneError([error("E030", f"{path} is not UTF-8 text (byte {exc.start})",
                               hints=["save the data file as UTF-8 JSON lines"])]) from None
    source = Source(text, str(path))  # one for the file: it indexes every line once
    records: list[Record] = []
    problems: list[Diagnostic] = []
    offset = 0
    for number, line in enumerate(text.split("\n"), start=1):
        here = offset
        offset += len(line) + 1
        if not line.strip():
            continue
        if len(records) >= limit:
            problems.append(error("E030", f"{path} has more than {limit:,} records"))
            break

        def bad(message: str, start: int = 0, end: int | None = None, hints: Sequence[str] = (),
                _here: int = here, _line: str = line) -> Diagnostic:
            stop = len(_line) if end is None else end
            return error("E030", message, source, Span(_here + start, _here + max(stop, start + 1)),
                         hints=hints or ['each line is one JSON object: {"input": "…", "output": "…"}'])

        try:
            value = json.loads(line)
        except ValueError as exc:
            if not isinstance(exc, json.JSONDecodeError):  # e.g. an integer of more than 4,300 digits
                problems.append(bad(f"not a record: {str(exc)[:120]}"))
                continue
            if not records and not problems and _one_document(text):
                problems.append(bad("this is one JSON document, not JSON lines (one record per line)",
                                    hints=['write each record on its own line: {"input": "…", "output": "…"}']))
                break
            problems.append(bad(f"not JSON: {exc.msg}", exc.colno - 1, exc.colno))
            if len(problems) >= 10:
                break
            continue
        except RecursionError:
            problems.append(bad("not a record: the JSON is nested too deeply"))
            continue
        if not isinstance(value, dict):
            problems.append(bad(f"a record is a JSON object, not {type(value).__name__}"))
        elif not isinstance(value.get("input"), str):
            problems.append(bad('the record has no "input" text' if "input" not in value else
                                '"input" must be text'))
        elif isinstance(value.get("output"), bool) or not isinstance(value.get("output"), str | int):
            problems.append(bad('the record has no "output"' if "output" not in value else
                                '"output" must be text (or a label index, for a classifier)'))
        elif not _encodable(value["input"]) or (isinstance(value["output"], str) and not _encodable(value["output"])):
            problems.append(bad("the record's text is not valid Unicode (a lone surrogate escape)"))
        elif isinstance(value["output"], int) and not -2**63 <= value["output"] < 2**63:
            problems.append(bad('"output" is a label index far out of range'))
        else:
            records.append(Record(value["input"], value["output"], number))
        if len(problems) >= 10:
            break
    if problems:
        raise TuneError(problems)
    if not records:
        raise TuneError([error("E030", f"{path} has no records",
                               hints=['each line is one JSON object: {"input": "…", "output": "…"}'])])
    return records


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _one_document(text: str) -> bool:
    """Whether `text` is a single JSON document spread over lines (a JSON file, not JSON lines)."""
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return "\n" in text.strip()


@dataclass(frozen=True)
class DataObjective:
    """The built-in objective over a JSONL file: causal-LM loss, or accuracy with a classifier head."""

    path: str
    records: tuple[Record, ...]
    digest: str
    batch_size: int = DEFAULT_BATCH

    @classmethod
    def read(cls, path: str | Path, *, batch_size: int = DEFAULT_BATCH) -> DataObjective:
        raw = _read_data(Path(path))  # read once: parsed and hashed
        return cls(str(path), tuple(_parse_records(Path(path), raw)), hashlib.sha256(raw).hexdigest(), batch_size)

    def describe(self, classifier: bool) -> str:
        what = "accuracy" if classifier else "loss"
        return f"{what} on {self.path} (sha256 {self.digest[:12]}…)"


def describe_objective(objective: Any, classifier: bool) -> str:
    if isinstance(objective, DataObjective):
        return objective.describe(classifier)
    if isinstance(objective, str):
        return objective
    return getattr(objective, "__qualname__", None) or type(objective).__name__


def objective_error(spec: str, message: str, *, hints: Sequence[str] = (), notes: Sequence[str] = ()) -> TuneError:
    return TuneError([error("E031", message, Source(spec, "--objective"), Span(0, max(1, len(spec))),
                            notes=notes, hints=hints)])


def import_objective(spec: str, *, search_path: Sequence[str] = ()) -> Callable[..., Any]:
    """`package.module:function` or `path/to/file.py:function` → the function; E031 otherwise.
    The working directory (and `search_path`) is searched first, as `python -m` would."""
    module_name, sep, function = spec.rpartition(":")
    if not sep or not module_name or not function.isidentifier():
        raise objective_error(spec, f"--objective expects MODULE:FUNCTION, got {spec!r}",
                              hints=["e.g. --objective my_eval:score, where my_eval.py defines "
                                     "score(model, params) -> float"])
    for entry in [*search_path, os.getcwd()]:
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        if module_name.endswith(".py"):
            location = Path(module_name)
            if not location.is_file():
                raise objective_error(spec, f"no such file: {module_name}")
            loaded = importlib.util.spec_from_file_location(f"pemlang_objective_{location.stem}", location)
            assert loaded is not None and loaded.loader is not None
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except TuneError:
        raise
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - the user's module: any failure is their diagnostic
        hints = ["run from the directory that holds the module, or install it"] if isinstance(exc, ImportError) else []
        raise objective_error(spec, f"cannot import {module_name}: {type(exc).__name__}: {exc}",
                              hints=hints) from None
    target = getattr(module, function, None)
    if target is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        raise objective_error(spec, f"{module_name} has no function {function!r}",
                              notes=[f"it defines: {', '.join(names[:8]) or 'no functions'}"])
    if not callable(target):
        raise objective_error(spec, f"{module_name}.{function} is not a function")
    return target


class TrialFailed(Exception):
    """One trial could not be scored: its message names the cause (the study goes on)."""


def as_value(result: Any) -> float:
    """An objective's return value as a finite float, or TrialFailed saying what it was."""
    if isinstance(result, bool):
        raise TrialFailed(f"the objective returned {result!r}, not a number")
    try:
        if hasattr(result, "item") and callable(result.item):  # a 0-d tensor or numpy scalar
            result = result.item()
        value = float(result)
    except Exception:  # noqa: BLE001 - whatever the returned object's conversion raises
        raise TrialFailed(f"the objective returned {type(result).__name__} {str(result)[:60]!r}, "
                          "not a number") from None
    if not math.isfinite(value):
        raise TrialFailed(f"the objective returned {value}, not a finite number")
    return value
