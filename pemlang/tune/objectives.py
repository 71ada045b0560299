"""What a trial is scored by: the records of a `--data` JSONL file (the built-in objective), or a
user's `module:function`, imported; and an objective's return value read as a finite number."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import math
import os
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from ..diagnostics import Diagnostic, error
from ..source import Source, Span
from .errors import TuneError

DEFAULT_BATCH = 8


@dataclass(frozen=True)
class Record:
    input: str
    output: str | int
    line: int


# Every trial scores every record: no validation set comes near this. A larger file (or a stream
# given by mistake) is refused after reading this much, never read whole into memory.
MAX_DATA_BYTES = 256 * 1024 * 1024
DATA_HINT = '--data names a JSONL file of {"input": …, "output": …} records'


def read_records(path: str | Path, *, limit: int = 1_000_000) -> list[Record]:
    """The records of a JSONL data file, every problem an E030 diagnostic at its line."""
    return _read(Path(path), limit=limit)[0]


def _open_data(path: Path) -> BinaryIO:
    """The data file, opened for reading: E030 for one that cannot be read or is not a regular file
    (a FIFO, a device, a socket, a directory: opened without waiting for a writer, and refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise TuneError([error("E030", f"cannot read the data file {path}: {exc.strerror or exc}",
                               hints=[DATA_HINT])]) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = ("a directory" if stat.S_ISDIR(mode) else "a pipe (FIFO)" if stat.S_ISFIFO(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device")
        raise TuneError([error("E030", f"the data file {path} is not a regular file: it is {kind}",
                               hints=[f"{DATA_HINT}: save the records to a file and give its path"])])
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class _LineOfFile(Source):
    """One line of a file as a Source, numbered as in the file (diagnostics say `data.jsonl:7:3`)."""

    number: int

    def __init__(self, text: str, filename: str, number: int):
        super().__init__(text, filename)
        object.__setattr__(self, "number", number)

    def line_col(self, offset: int) -> tuple[int, int]:
        return self.number, super().line_col(offset)[1]

    def line_text(self, line: int) -> str:
        return super().line_text(1)


def _read(path: Path, *, limit: int = 1_000_000) -> tuple[list[Record], str]:
    """The records of a data file and the sha256 of its bytes, read as a stream: each line is parsed
    as it arrives, and at most MAX_DATA_BYTES are read."""
    digest = hashlib.sha256()
    try:
        with _open_data(path) as stream:
            records = _parse_records(path, stream, digest, limit=limit)
    except MemoryError:
        raise TuneError([error("E030", f"the records of {path} do not fit in memory",
                               hints=["tune on a smaller validation set"])]) from None
    except OSError as exc:  # e.g. an I/O error part-way
        raise TuneError([error("E030", f"cannot read the data file {path}: {exc.strerror or exc}",
                               hints=[DATA_HINT])]) from None
    return records, digest.hexdigest()


def _too_large(path: Path) -> Diagnostic:
    return error("E030", f"{path} is larger than {MAX_DATA_BYTES // (1024 * 1024)} MiB: not a data file pemlang "
                 "can tune on", notes=[f"pemlang stopped reading after {MAX_DATA_BYTES:,} bytes"],
                 hints=["every trial scores every record: a validation set of a few thousand records is plenty"])


def _parse_records(path: Path, stream: BinaryIO, digest: Any, *, limit: int = 1_000_000) -> list[Record]:
    records: list[Record] = []
    problems: list[Diagnostic] = []
    consumed = number = 0
    while True:
        raw = stream.readline(MAX_DATA_BYTES - consumed + 1)
        if not raw:
            break
        consumed += len(raw)
        if consumed > MAX_DATA_BYTES:
            problems.append(_too_large(path))
            break
        digest.update(raw)
        number += 1
        try:
            line = raw.decode("utf-8").removesuffix("\n")
            if number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as Windows tools write (not hashed away)
        except UnicodeDecodeError as exc:
            problems.append(error("E030", f"{path} is not UTF-8 text (byte {consumed - len(raw) + exc.start})",
                                  hints=["save the data file as UTF-8 JSON lines"]))
            break
        if not line.strip():
            continue
        if len(records) >= limit:
            problems.append(error("E030", f"{path} has more than {limit:,} records"))
            break
        source = _LineOfFile(line, str(path), number)

        def bad(message: str, start: int = 0, end: int | None = None, hints: Sequence[str] = (),
                _source: Source = source) -> Diagnostic:
            stop = len(_source.text) if end is None else end
            return error("E030", message, _source, Span(start, max(stop, start + 1)),
                         hints=hints or ['each line is one JSON object: {"input": "…", "output": "…"}'])

        try:
            value = json.loads(line)
        except ValueError as exc:
            if not isinstance(exc, json.JSONDecodeError):  # an integer of more than 4,300 digits
                problems.append(bad("not a record: a number has more than 4,300 digits",
                                    hints=['"output" is text, or a label index of a few digits']))
                continue
            if not records and not problems and _one_document(line, stream, MAX_DATA_BYTES - consumed):
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


def _one_document(first: str, stream: BinaryIO, budget: int) -> bool:
    """Whether the file, from its first non-blank line `first` (the rest still in `stream`, at most
    `budget` bytes of it read), is a single JSON document spread over lines (not JSON lines)."""
    rest = stream.read(budget + 1)
    if len(rest) > budget:
        return False
    try:
        text = first + "\n" + rest.decode("utf-8")
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
        records, digest = _read(Path(path))  # read once, as a stream: parsed and hashed
        return cls(str(path), tuple(records), digest, batch_size)

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
