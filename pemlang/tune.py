"""`pemlang tune` and `Program.tune`: choose a program's params on the user's own metric.

The paper picks λ on a validation set for every composition; LoraHub searches module weights with a
gradient-free optimiser. Here the base model is loaded once per worker and the program compiled
once; each trial evaluates the program in memory and writes the merged tensors into the loaded
PeftModel in place (no files, no reload). Only the best point is written as an adapter, with how it
was chosen (objective, value, trials) in its provenance.

The search is Optuna's (TPE, grid, CMA-ES or random), its study optionally kept in a SQLite file:
an interrupted tuning resumes where it stopped (a trial cut off by the interruption runs again,
none that finished is repeated), and `optuna-dashboard` can show it. With Ray, trials run on Ray
Tune with the same Optuna sampler and study inside it, one worker per GPU or per
`cpus_per_trial` CPUs, each loading the base model once.

The objective is one of:
- `--data FILE.jsonl` of `{"input": …, "output": …}` records: the mean causal-LM loss of the output
  tokens given the input (minimised), or, when the adapter has a classification head, the accuracy
  of predicting `output` (a label index or name; maximised);
- a callable `function(model, params) -> float` (`--objective module:function`), given the
  PeftModel holding the trial's merged adapter and the trial's params.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from .diagnostics import Diagnostic, PemError, error, first_line
from .source import Source, Span

ADAPTER_NAME = "pemlang"
STUDY_NAME = "pemlang"
SAMPLERS = ("tpe", "grid", "cmaes", "random")
DEFAULT_TRIALS = 30  # for the samplers that are not a grid
DEFAULT_BATCH = 8


class TuneError(PemError):
    """A tuning that cannot start or go on: diagnostics, as on the command line."""

    def with_note(self, note: str) -> TuneError:
        from dataclasses import replace

        return TuneError([replace(d, notes=(*d.notes, note)) for d in self.diagnostics])


# -- the search space ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamRange:
    """`NAME=LO:HI` (a continuous range) or `NAME=LO:HI:STEP` (a grid, both ends included)."""

    name: str
    low: float
    high: float
    step: float | None = None
    text: str = ""  # as the user wrote it, for diagnostics

    @property
    def grid(self) -> list[float]:
        """The grid's values, computed in decimal from the numbers as written (0:1:0.1 gives 0.3,
        not 0.30000000000000004)."""
        if self.step is None:
            raise ValueError(f"{self.name} has no step")
        low, step = Decimal(repr(self.low)), Decimal(repr(self.step))
        count = int(round((Decimal(repr(self.high)) - low) / step)) + 1
        return [float(low + i * step) for i in range(count)]

    def describe(self) -> str:
        return f"{self.name}={self.low:g}:{self.high:g}" + (f":{self.step:g}" if self.step is not None else "")


def _range_error(text: str, message: str, start: int = 0, end: int | None = None,
                 hints: Sequence[str] = ()) -> TuneError:
    end = len(text) if end is None else end
    return TuneError([error("E029", message, Source(text, "--param"), Span(start, max(end, start + 1)),
                            hints=hints or ["write NAME=LO:HI for a range, NAME=LO:HI:STEP for a grid, e.g. λ=0:1:0.1"])])


def parse_range(text: str, *, max_points: int = 1000) -> ParamRange:
    """`λ=0:1` or `λ=0:1:0.1` → a ParamRange; TuneError (E029, pointing into the text) otherwise."""
    if not isinstance(text, str):
        raise _range_error(str(text), "a param range is text: NAME=LO:HI[:STEP]")
    name, sep, spec = text.partition("=")
    stripped = name.strip()
    if not sep or not stripped:
        raise _range_error(text, f"expected NAME=LO:HI[:STEP], got {text!r}")
    if not stripped.isidentifier():
        raise _range_error(text, f"{stripped!r} is not a param name", 0, len(name))
    fields: list[tuple[int, int]] = []
    position = len(name) + 1
    for part in spec.split(":"):
        fields.append((position, position + len(part)))
        position += len(part) + 1
    if len(fields) not in (2, 3):
        raise _range_error(text, f"{stripped}: expected LO:HI or LO:HI:STEP, got {spec!r}", len(name) + 1)
    numbers: list[Decimal] = []
    for start, end in fields:
        piece = text[start:end].strip()
        try:
            number = Decimal(piece)
        except InvalidOperation:
            raise _range_error(text, f"{stripped}: {piece!r} is not a number", start, end) from None
        if not number.is_finite() or not math.isfinite(float(number)):
            raise _range_error(text, f"{stripped}: {piece!r} is not a finite number", start, end,
                               hints=["the bounds of a param are finite numbers"])
        numbers.append(number)
    low, high = numbers[0], numbers[1]
    if not math.isfinite(float(high) - float(low)):
        raise _range_error(text, f"{stripped}: the range is wider than a float can hold", fields[0][0], fields[1][1],
                           hints=["give bounds whose difference is a finite number"])
    if not low < high:
        raise _range_error(text, f"{stripped}: the range {text[fields[0][0]:fields[1][1]].strip()} is empty "
                           "(LO must be below HI)", fields[0][0], fields[1][1])
    step = None
    if len(numbers) == 3:
        step = numbers[2]
        if not step > 0:
            raise _range_error(text, f"{stripped}: the step must be above 0", *fields[2])
        try:
            count = (high - low) / step
            whole = count == count.to_integral_value()
        except ArithmeticError:  # decimal's overflow or underflow: a step far too small for the range
            raise _range_error(text, f"{stripped}: the step is far too small for the range", *fields[2],
                               hints=["use a larger step"]) from None
        if count + 1 > max_points:
            shown = f"{int(count) + 1:,}" if count < 10**15 else f"about {float(count):.3g}"
            raise _range_error(text, f"{stripped}: {shown} grid points is more than the limit of {max_points:,}",
                               *fields[2], hints=["use a larger step, or --max-points N"])
        if not whole:
            raise _range_error(text, f"{stripped}: the step {step} does not divide {low}:{high} into whole steps",
                               *fields[2], hints=[f"e.g. {stripped}={low}:{low + step * int(count)}:{step}"])
    return ParamRange(stripped, float(low), float(high), float(step) if step is not None else None, text)


# -- objectives ---------------------------------------------------------------------------------


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


# -- one worker: the base model loaded once, each trial in place --------------------------------


def base_error(base: str, message: str, *, hints: Sequence[str] = ()) -> TuneError:
    return TuneError([error("E032", message, Source(base, "--base"), Span(0, max(1, len(base))),
                            hints=hints or ["--base names the model the adapters were trained on: a directory "
                                            "written by save_pretrained, or a Hub id already in the cache"])])


def load_base(base: Any, *, classifier: bool, device: Any) -> Any:
    """The base model (a transformers model instance is used as it is)."""
    if not isinstance(base, str | Path):
        return base.to(device).eval()
    import warnings

    try:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise base_error(str(base), "tuning needs transformers to load the base model",
                         hints=["pip install 'pemlang[tune]'"]) from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(base))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's --base
        raise base_error(str(base), _load_failure(base, exc)) from None
    return model.to(device).eval()


def _absolute(name: Any) -> Any:
    """A local path made absolute (Ray workers run elsewhere); a Hub id or object as it is."""
    if isinstance(name, str | Path) and Path(name).exists():
        return str(Path(name).resolve())
    return name


def check_base(base: Any, *, load: bool = True) -> None:
    """E032 when `base` (a path or Hub id) is not a model: a local path must be a model directory
    (not an adapter, not a file); with `load`, its config must load (without weights)."""
    if not isinstance(base, str | Path):
        return
    local = Path(base)
    if local.exists():
        if not local.is_dir():
            raise base_error(str(base), f"{base} is a file; --base is a model directory or Hub id")
        if (local / "adapter_config.json").exists() and not (local / "config.json").exists():
            raise base_error(str(base), f"{base} is a PEFT adapter, not a base model",
                             hints=["--base is the model the adapters were trained on (its config.json and weights)"])
        if not (local / "config.json").exists():
            raise base_error(str(base), f"{base} has no config.json: it is not a saved model")
    elif (message := _load_failure(base, FileNotFoundError())).startswith("no such directory"):
        raise base_error(str(base), message)
    if not load:
        return
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(base))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        raise base_error(str(base), _load_failure(base, exc)) from None


def _load_failure(base: Any, exc: BaseException) -> str:
    text = str(base)
    parts = Path(text).parts
    local = text.startswith((".", "/", "~")) or text.count("/") > 1 or (len(parts) > 1 and Path(parts[0]).is_dir())
    if not Path(text).exists() and local:
        return f"no such directory: {text}"
    return f"cannot load the base model {text!r}: {first_line(exc)}"


def load_tokenizer(name: str) -> Any:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        raise TuneError([error("E032", f"cannot load a tokenizer from {name!r}: {first_line(exc)}",
                               Source(name, "--tokenizer"), Span(0, max(1, len(name))),
                               hints=["--data needs the base model's tokenizer: save it beside the model, "
                                      "or name one with --tokenizer"])]) from None
    return tokenizer


def _is_classifier(config: Mapping[str, Any]) -> bool:
    return config.get("task_type") == "SEQ_CLS"


class Worker:
    """What each worker holds: the compiled program, the base model (loaded once) wrapped in a
    PeftModel whose adapter each trial overwrites in place, and the prepared objective."""

    def __init__(self, program: Any, output: str, base: Any, objective: Any, *, tokenizer: str | None = None,
                 device: str | None = None):
        from .backend import resolve_device

        self.program = program
        self.output = output
        self.index = program.outputs.index(output)
        config = program.plan().outputs[self.index].config
        self.classifier = _is_classifier(config)
        self.device, self.device_note = resolve_device(device or program.device)
        self.source = base
        self.base = load_base(base, classifier=self.classifier, device=self.device)
        self.model: Any = None
        self.anchor: tuple[Any, str, Any] | None = None
        self.name = ADAPTER_NAME
        self.config: dict[str, Any] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.objective: Callable[[Any, dict[str, float]], Any]
        if isinstance(objective, DataObjective):
            tokenizer_name = tokenizer or (str(base) if isinstance(base, str | Path) else
                                           getattr(self.base, "name_or_path", ""))
            self.objective = _DataScorer(objective, load_tokenizer(str(tokenizer_name)), self.base,
                                         self.classifier, self.device)
        else:
            self.objective = objective

    def install(self, params: Mapping[str, float]) -> Any:
        """Evaluate the program at `params` and put the result into the model, in place."""
        from .api import CompileError

        try:
            evaluation = self.program._evaluate(dict(params), None)
        except CompileError as exc:
            raise TrialFailed("; ".join(d.message for d in exc.diagnostics)) from None
        tensors = evaluation.tensors[self.output]
        config = evaluation.plan.outputs[self.index].config
        shapes = {k: tuple(v.shape) for k, v in tensors.items()}
        if self.model is not None and (config != self.config or shapes != self.shapes):
            # A different rank or layout at this point (a head kept at some params and not at
            # others): PEFT cannot swap that in place, so the base is loaded afresh (rare).
            if not isinstance(self.source, str | Path):
                raise TrialFailed("the adapter's layout (rank or heads) differs at this point from the trial "
                                  "before; pass the base model as a path so that it can be reloaded")
            self.model, self.anchor = None, None
            self.base = load_base(self.source, classifier=self.classifier, device=self.device)
        if self.model is None:
            try:
                self.model = self.program._install(self.base, evaluation, self.output, self.name)
            except (ValueError, RuntimeError, KeyError) as exc:
                raise TuneError([error("E032", f"the adapter does not fit the base model: {str(exc)[:300]}",
                                       hints=["--base must be the model the inputs were trained on"])]) from None
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, tensors, adapter_name=self.name)
        self.config, self.shapes = config, shapes
        if self.anchor is None:
            self.anchor = _tuner_layer(self.model)
        self.model.eval()
        return self.model

    def _layer_in_place(self) -> bool:
        """Whether the first adapter layer is still where it was put (an objective that unloads the
        adapter takes it out)."""
        if self.anchor is None:
            return True
        parent, name, layer = self.anchor
        return getattr(parent, name, None) is layer

    def __call__(self, params: Mapping[str, float]) -> float:
        model = self.install(params)
        import torch

        with torch.no_grad():
            try:
                result = self.objective(model, dict(params))
                value = as_value(result)
            except (TrialFailed, TuneError, KeyboardInterrupt):
                raise
            except SystemExit as exc:
                raise TrialFailed(f"the objective called sys.exit({exc.code!r})") from None
            except Exception as exc:  # noqa: BLE001 - the user's objective: reported with the trial
                raise TrialFailed(f"the objective raised {type(exc).__name__}: {exc}") from None
        if self.name not in (getattr(model, "peft_config", None) or {}) or \
                getattr(model, "active_adapter", self.name) != self.name or not self._layer_in_place():
            raise TuneError([error("E031", "the objective removed or switched the adapter being tuned",
                                   hints=["an objective scores the model it is given; it must not change it "
                                          "(no unload, delete_adapter or set_adapter)"])])
        return value


def _tuner_layer(model: Any) -> tuple[Any, str, Any] | None:
    """(parent, attribute, layer) of the model's first PEFT adapter layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, BaseTunerLayer):
                return parent, name, child
    return None


class _DataScorer:
    """The built-in objective, its records tokenised once per worker."""

    def __init__(self, data: DataObjective, tokenizer: Any, model: Any, classifier: bool, device: Any):
        self.classifier = classifier
        self.device = device
        self.batch_size = data.batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        problems: list[Diagnostic] = []
        self.examples: list[tuple[list[int], int | None]] = []  # (ids, label) or (ids, first scored position)
        for record in data.records:
            where = f"{data.path}:{record.line}"
            ids = list(tokenizer(record.input, add_special_tokens=True)["input_ids"])
            if classifier:
                label = _label(record.output, model.config)
                if label is None:
                    problems.append(error("E030", f"{where}: {record.output!r} is not a label of the classifier",
                                          notes=[f"labels: {', '.join(map(str, _labels(model.config)))}"]))
                    continue
                self.examples.append((ids, label))
            else:
                if not isinstance(record.output, str):
                    problems.append(error("E030", f"{where}: \"output\" must be text for a language model"))
                    continue
                out = list(tokenizer(record.output, add_special_tokens=False)["input_ids"])
                if tokenizer.eos_token_id is not None:
                    out.append(tokenizer.eos_token_id)
                start = max(len(ids), 1)  # the first token has nothing to be predicted from
                ids = ids + out
                if len(ids) <= start:
                    problems.append(error("E030", f"{where}: the output has no tokens to score"))
                    continue
                self.examples.append((ids, start))
            if len(ids) > limit:
                problems.append(error("E030", f"{where}: the record is {len(ids)} tokens, more than the model's "
                                      f"{limit}", hints=["shorten the record"]))
        if problems:
            raise TuneError(problems[:20])
        self.examples.sort(key=lambda e: len(e[0]))  # similar lengths share a batch: less padding

    def __call__(self, model: Any, params: dict[str, float]) -> float:
        import torch

        total = torch.zeros((), dtype=torch.float64)
        count = 0
        correct = 0
        for first in range(0, len(self.examples), self.batch_size):
            batch = self.examples[first:first + self.batch_size]
            width = max(len(ids) for ids, _ in batch)
            input_ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, (ids, _) in enumerate(batch):
                input_ids[row, :len(ids)] = torch.tensor(ids)
                mask[row, :len(ids)] = 1
            logits = model(input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)).logits
            if self.classifier:
                labels = torch.tensor([label for _, label in batch])
                correct += int((logits.argmax(-1).cpu() == labels).sum())
                count += len(batch)
                continue
            labels = torch.full((len(batch), width), -100, dtype=torch.long)
            for row, (ids, start) in enumerate(batch):
                labels[row, start:len(ids)] = torch.tensor(ids[start:])  # type: ignore[misc]
            shifted = labels[:, 1:].to(self.device)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     shifted.reshape(-1), ignore_index=-100, reduction="sum")
            total += loss.double().cpu()
            count += int((shifted != -100).sum())
        return correct / count if self.classifier else float(total) / count


def _labels(config: Any) -> list[Any]:
    id2label = getattr(config, "id2label", None) or {}
    return [id2label.get(i, i) for i in range(getattr(config, "num_labels", len(id2label)))]


def _label(output: str | int, config: Any) -> int | None:
    labels = _labels(config)
    if isinstance(output, int):
        return output if 0 <= output < len(labels) else None
    label2id = getattr(config, "label2id", None) or {}
    if output in label2id:
        return int(label2id[output])
    if output.isascii() and output.isdigit() and len(output) < 19:
        return int(output) if int(output) < len(labels) else None
    return None


# -- the study ----------------------------------------------------------------------------------


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise TuneError([error("E031", "tuning needs Optuna, which is not installed",
                               hints=["pip install 'pemlang[tune]'"])]) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def make_sampler(name: str, space: Sequence[ParamRange], *, seed: int, offset: int = 0) -> Any:
    """The Optuna sampler. A grid keeps `seed` (its order must be the same when a study resumes);
    the others are seeded from (seed, trials already in the study), so a resumed study does not
    draw its first points again."""
    optuna = _optuna()
    drawn = (seed * 1_000_003 + offset) % (2**32)
    if name == "grid":
        return _grid_sampler()({r.name: r.grid for r in space}, seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=drawn)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=drawn, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=drawn)


def _grid_sampler() -> Any:
    """Optuna's grid without its stop call after each trial (which works only inside
    `study.optimize`; the loops here stop when the grid is done). A module attribute, made on first
    use (Optuna is optional), so that Ray can pickle it by name."""
    made = globals().get("_Grid")
    if made is None:
        optuna = _optuna()

        class _Grid(optuna.samplers.GridSampler):  # type: ignore[misc,name-defined]
            def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
                return None

        _Grid.__qualname__ = "_Grid"
        globals()["_Grid"] = made = _Grid
    return made


def __getattr__(name: str) -> Any:  # `pemlang.tune._Grid` when a pickle names it
    if name == "_Grid":
        return _grid_sampler()
    raise AttributeError(name)


def distributions(space: Sequence[ParamRange], sampler: str) -> dict[str, Any]:
    optuna = _optuna()
    return {r.name: optuna.distributions.FloatDistribution(r.low, r.high, step=None if sampler == "grid" else r.step)
            for r in space}


def _storage_url(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


def study_error(path: Path | str | None, message: str, hints: Sequence[str] = (), option: str = "--study") -> TuneError:
    text = str(path) if path is not None else "study"
    return TuneError([error("E033", message, Source(text, option), Span(0, max(1, len(text))), hints=hints)])


def open_study(path: Path | None, *, direction: str, sampler: Any, settings: Mapping[str, Any] | None,
               create: bool = True) -> Any:
    """The study in `path` (SQLite), created with `settings` or checked against them; in memory
    when `path` is None."""
    optuna = _optuna()
    if path is None:
        study = optuna.create_study(study_name=STUDY_NAME, direction=direction, sampler=sampler)
        study.set_user_attr("pemlang", dict(settings or {}))
        return study
    option = "--study" if create else "--show"
    existing = path.exists() or path.is_symlink()
    if existing:
        if not path.is_file():
            raise study_error(path, f"{path} is not a file", option=option)
        with path.open("rb") as f:
            head = f.read(16)
        if head not in (b"SQLite format 3\x00", b"") or (head == b"" and not create):
            raise study_error(path, f"{path} is not a study (not an SQLite file); pemlang will not overwrite it",
                              hints=["give --study a new file name"], option=option)
        if head:
            _check_foreign(path, option)
    elif not create:
        raise study_error(path, f"no such study: {path}", option=option)
    if path.parent and not path.parent.is_dir():
        raise study_error(path, f"the directory {path.parent} does not exist", option=option)
    try:
        storage = optuna.storages.RDBStorage(_storage_url(path), skip_table_creation=not create)
        if not create:
            study = optuna.load_study(study_name=STUDY_NAME, storage=storage, sampler=sampler)
        else:
            study = optuna.create_study(study_name=STUDY_NAME, storage=storage, direction=direction,
                                        sampler=sampler, load_if_exists=True)
        recorded = study.user_attrs.get("pemlang")
        multi = len(study.directions) != 1
    except TuneError:
        raise
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign database
        raise study_error(path, f"cannot use {path} as a study: {type(exc).__name__}: {str(exc)[:200]}",
                          hints=["give --study a new file name"], option=option) from None
    if multi or (recorded is not None and not isinstance(recorded, dict)):
        raise study_error(path, f"{path} holds a study pemlang did not make", hints=["give --study a new file name"],
                          option=option)
    if settings is not None:
        finished = [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
        if recorded is None or not finished:  # a new study, or one whose start failed: these settings now
            if recorded is None and study.trials:
                raise study_error(path, f"{path} holds a study pemlang did not make",
                                  hints=["give --study a new file name"])
            study.set_user_attr("pemlang", dict(settings))
        else:
            differ = [k for k in settings if recorded.get(k) != settings[k]]
            if differ:
                shown = "; ".join(f"{k}: {recorded.get(k)!r} there, {settings[k]!r} now" for k in differ[:4])
                verb = "differs" if len(differ) == 1 else "differ"
                raise study_error(path, f"{path} is a study of a different tuning ({', '.join(differ)} {verb})",
                                  hints=["give --study a new file name to start another tuning, or delete it"]
                                  ).with_note(shown)
        if study.direction.name.lower() != direction:
            raise study_error(path, f"{path} was made to {study.direction.name.lower()}, not to {direction}")
    return study


def _check_foreign(path: Path, option: str) -> None:
    """E033 for an SQLite file that is not a study pemlang made: another application's database,
    or an Optuna database without a pemlang study. Read only."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'")}
            names = {row[0] for row in db.execute("select study_name from studies")} if "studies" in tables else set()
    except sqlite3.Error as exc:
        raise study_error(path, f"cannot read {path}: {exc}", option=option) from None
    if not tables:
        return  # an empty database: a new study
    if "studies" not in tables or "trials" not in tables:
        raise study_error(path, f"{path} is another application's database, not a study; pemlang will not write "
                          "into it", hints=["give --study a new file name"], option=option)
    if STUDY_NAME not in names:
        raise study_error(path, f"{path} holds other Optuna studies ({', '.join(sorted(names))[:80]}), not a "
                          "pemlang one; pemlang will not add to it", hints=["give --study a new file name"],
                          option=option)


class StudyLock:
    """One tuning per study file at a time: an exclusive flock on the study file itself (SQLite's
    own locks are POSIX record locks, independent of flock), held while trials run, so that a trial
    left running in the study is known to be stale. Creates the file (empty) when it is new."""

    def __init__(self, path: Path | None):
        self.path = path
        self.handle: Any = None

    def __enter__(self) -> StudyLock:
        if self.path is None:
            return self
        import fcntl

        try:
            self.handle = self.path.open("ab")
        except OSError as exc:
            raise study_error(self.path, f"cannot open {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            self.handle = None
            raise study_error(self.path, f"{self.path} is being tuned by another pemlang process",
                              hints=["wait for it to finish (or stop it), then rerun to resume"]) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the flock
            self.handle = None


def _done(trial: Any) -> bool:
    """A trial that counts toward the total: finished, and not cut off by an interruption."""
    return trial.state.is_finished() and not trial.user_attrs.get("interrupted")


def recover(study: Any) -> int:
    """Trials left running by a process that was killed, or cut off by an interruption, are failed
    (if still running) and queued to run again with their params (and grid point). Returns how many."""
    optuna = _optuna()
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    count = 0
    for trial in trials:
        cut = trial.state == TrialState.RUNNING or (trial.state == TrialState.FAIL and trial.user_attrs.get("interrupted"))
        if not cut or trial.number in retried or not trial.params:
            continue
        if trial.state == TrialState.RUNNING:
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        system = {"fixed_params": dict(trial.params)}
        for key in ("grid_id", "search_space"):
            if key in trial.system_attrs:
                system[key] = trial.system_attrs[key]
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, system_attrs=system,
                                                  user_attrs={"retry_of": trial.number}))
        count += 1
    return count


# -- results --------------------------------------------------------------------------------------


@dataclass
class TuneResult:
    """What a tuning found: every trial (`trials`: dicts of number, params, value, state, seconds,
    error), the best point, and where the study, plot and best adapter are."""

    trials: list[dict[str, Any]]
    best_params: dict[str, float] | None
    best_value: float | None
    direction: str
    objective: str
    study: Path | None = None
    plot: Path | None = None
    saved: list[Path] = field(default_factory=list)
    best_number: int | None = None
    plot_note: str | None = None  # why no plot was written, when one was due


def summarise(study: Any, *, study_path: Path | None) -> TuneResult:
    from optuna.trial import TrialState

    settings = study.user_attrs.get("pemlang", {})
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING:
            continue
        seconds = t.user_attrs.get("seconds")
        rows.append({"number": t.number, "params": dict(t.params), "value": t.value if t.values else None,
                     "state": t.state.name.lower() if not t.user_attrs.get("interrupted") else "interrupted",
                     "seconds": seconds, "error": t.user_attrs.get("error")})
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    direction = study.direction.name.lower()
    best = None
    if complete:
        best = (min if direction == "minimize" else max)(complete, key=lambda t: (t.value, t.number)
                                                           if direction == "minimize" else (t.value, -t.number))
    return TuneResult(rows, dict(best.params) if best else None, best.value if best else None, direction,
                      settings.get("objective", "objective"), study_path, best_number=best.number if best else None)


def plot(result: TuneResult, path: Path, space_names: Sequence[str]) -> Path | None:
    """Objective against the param (one), a heat map (two), or against the trial (more). Written
    atomically; None when no trial completed."""
    points = [t for t in result.trials if t["state"] == "complete"]
    if not points:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    label = objective_label(result.objective)
    figure, axes = plt.subplots(figsize=(6, 4), dpi=110)
    names = [n for n in space_names if all(n in t["params"] for t in points)]
    best = result.best_params or {}
    if len(names) == 1:
        name = names[0]
        ordered = sorted(points, key=lambda t: t["params"][name])
        axes.plot([t["params"][name] for t in ordered], [float(t["value"]) for t in ordered], marker="o")
        if best:
            axes.plot([best[name]], [float(result.best_value or 0.0)], marker="*", markersize=16, color="tab:red",
                      label=f"best {name}={best[name]:g}")
            axes.legend()
        axes.set_xlabel(name)
        axes.set_ylabel(label)
    elif len(names) == 2:
        x, y = names
        shown = axes.scatter([t["params"][x] for t in points], [t["params"][y] for t in points],
                             c=[t["value"] for t in points], cmap="viridis", s=120, marker="s")
        figure.colorbar(shown, ax=axes, label=label)
        if best:
            axes.plot([best[x]], [best[y]], marker="*", markersize=16, color="tab:red", linestyle="none")
        axes.set_xlabel(x)
        axes.set_ylabel(y)
    else:
        axes.plot([t["number"] for t in points], [float(t["value"]) for t in points], marker="o", linestyle="none")
        axes.set_xlabel("trial")
        axes.set_ylabel(label)
    axes.set_title(f"pemlang tune: {result.direction} {label}")
    figure.tight_layout()
    staging = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    try:
        figure.savefig(staging)
        os.replace(staging, path)
    finally:
        plt.close(figure)
        staging.unlink(missing_ok=True)
    return path


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def plot_beside(result: TuneResult, study: Path, names: Sequence[str],
                protected: Mapping[str, Path] | None = None) -> tuple[Path | None, str | None]:
    """The plot beside the study (`F.db` → `F.png`): (path, None), or (None, why not). Never
    written over the study, an input, or a file that is not a PNG already."""
    target = study.with_suffix(".png")
    if _same_file(target, study) or any(_same_file(target, p) for p in (protected or {}).values()):
        return None, f"plot not written: {target} is the study or an input"
    if target.exists() or target.is_symlink():
        if not target.is_file():
            return None, f"plot not written: {target} is not a file"
        try:
            with target.open("rb") as f:
                if f.read(8) != PNG_MAGIC:
                    return None, f"plot not written: {target} exists and is not a plot pemlang would replace"
        except OSError as exc:
            return None, f"plot not written: {target}: {exc.strerror or exc}"
    try:
        return plot(result, target, names), None
    except OSError as exc:
        return None, f"plot not written: {target}: {exc.strerror or exc}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return a.samefile(b)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def input_digests(program: Any) -> dict[str, str]:
    """Per input, the sha256 of its config and weights (as provenance records them), so that a study
    is not resumed over inputs that changed at the same path."""
    from .writer import sha256_file

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


def objective_label(description: str) -> str:
    """The objective's column name: loss, accuracy, or value (a user's function)."""
    word = description.split(" on ")[0]
    return word if word in ("loss", "accuracy") else "value"


def format_params(params: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in params.items())


# -- running trials -------------------------------------------------------------------------------


OnTrial = Callable[[dict[str, Any]], None]


def run_local(worker: Worker, study: Any, dists: Mapping[str, Any], total: int, *, on_trial: OnTrial | None,
              fail_fast: bool) -> None:
    """Run trials in this process until the study has `total` (a grid stops when it is exhausted)."""
    from optuna.trial import TrialState

    from . import interrupts

    while sum(_done(t) for t in study.get_trials(deepcopy=False)) < total:
        interrupts.raise_if_interrupted()  # also a signal whose KeyboardInterrupt a library swallowed
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        sampler = study.sampler
        if not waiting and hasattr(sampler, "is_exhausted") and sampler.is_exhausted(study):
            break
        trial = study.ask()
        try:
            params = {name: trial.suggest_float(name, d.low, d.high, step=d.step) for name, d in dists.items()}
        except Exception as exc:  # noqa: BLE001 - the sampler cannot draw from this space
            study.tell(trial, state=TrialState.FAIL)
            raise TuneError([error("E029", f"the sampler cannot search this space: {str(exc)[:200]}",
                                   hints=["narrow the ranges"])]) from None
        start = time.perf_counter()
        try:
            value = worker(params)
        except TrialFailed as exc:
            seconds = time.perf_counter() - start
            trial.set_user_attr("error", str(exc))
            trial.set_user_attr("seconds", seconds)
            study.tell(trial, state=TrialState.FAIL)
            row = {"number": trial.number, "params": params, "value": None, "state": "fail", "seconds": seconds,
                   "error": str(exc)}
            if on_trial:
                on_trial(row)
            if fail_fast:
                raise TuneError([error("E031", f"trial {trial.number} failed at {format_params(params)}: {exc}",
                                       hints=["without --fail-fast the study goes on past failed trials"])]) from None
            continue
        except BaseException:
            trial.set_user_attr("interrupted", True)
            study.tell(trial, state=TrialState.FAIL)
            raise
        seconds = time.perf_counter() - start
        trial.set_user_attr("seconds", seconds)
        study.tell(trial, value)
        if on_trial:
            on_trial({"number": trial.number, "params": params, "value": value, "state": "complete",
                      "seconds": seconds, "error": None})


@dataclass
class WorkerJob:
    """What a Ray worker needs to build its Worker (picklable): how to compile the program, the
    output, the base, the objective and where to import it from."""

    recipe: tuple[Callable[..., Any], dict[str, Any]]
    output: str
    base: Any
    objective: Any  # a DataObjective, an import spec string, or a callable
    tokenizer: str | None
    device: str | None
    search_path: tuple[str, ...]
    key: str = field(default_factory=lambda: uuid.uuid4().hex)


_WORKERS: dict[str, Worker] = {}


def _job_worker(job: WorkerJob) -> Worker:
    """The worker process's Worker for `job`: built at its first trial, then reused."""
    worker = _WORKERS.get(job.key)
    if worker is None:
        for entry in job.search_path:
            if entry not in sys.path:
                sys.path.insert(0, entry)
        build, kwargs = job.recipe
        program = build(**kwargs)
        objective = import_objective(job.objective, search_path=job.search_path) if isinstance(job.objective, str) \
            else job.objective
        worker = Worker(program, job.output, job.base, objective, tokenizer=job.tokenizer, device=job.device)
        _WORKERS.clear()
        _WORKERS[job.key] = worker
    return worker


def _ray_trial(config: dict[str, Any], job: WorkerJob) -> None:
    from ray import tune

    start = time.perf_counter()
    params = {name: float(value) for name, value in config.items()}
    fatal = ""
    try:
        value = _job_worker(job)(params)
        problem = ""
    except TrialFailed as exc:
        value, problem = float("nan"), str(exc)
    except TuneError as exc:  # the worker cannot start (base model, data, objective): every trial would fail
        value, problem = float("nan"), "; ".join(d.message for d in exc.diagnostics)
        fatal = problem
    tune.report({"value": value, "seconds": time.perf_counter() - start, "error": problem, "fatal": fatal})


def _reachable(address: str, timeout: float = 10.0) -> None:
    """E031 unless a TCP connection to HOST:PORT opens within `timeout` seconds."""
    import socket

    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            return
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
    raise TuneError([error("E031", f"cannot reach a Ray cluster at {address}: {reason}",
                           Source(address, "--ray"), Span(0, max(1, len(address))),
                           hints=["give the head node's HOST:PORT (`ray start --head` prints it), or --ray alone "
                                  "for a local instance"])])


def ray_missing() -> TuneError:
    return TuneError([error("E031", "--ray needs Ray, which is not installed",
                            hints=["pip install 'pemlang[ray]'  (or run without --ray: trials run in this process)"])])


def run_ray(job: WorkerJob, study: Any, dists: Mapping[str, Any], total: int, *, address: str | None,
            cpus_per_trial: float, gpus_per_trial: float | None, on_trial: OnTrial | None, fail_fast: bool) -> None:
    """Run the remaining trials on Ray Tune, Optuna's sampler and this study inside its searcher."""
    try:
        import ray
        from ray import tune
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ray_missing() from None
    import tempfile

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if not ray.is_initialized() and address and address not in ("auto", "local") and "://" not in address:
        _reachable(address)  # ray.init retries an unreachable address for minutes
    if not ray.is_initialized():
        try:
            ray.init(address=address or None, log_to_driver=False, include_dashboard=False,
                     configure_logging=False)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - a cluster that cannot be reached
            raise TuneError([error("E031", f"cannot connect to Ray at {address or 'a new local instance'}: "
                                   f"{str(exc)[:300]}", hints=["check --ray ADDRESS (or RAY_ADDRESS)"])]) from None
    done = sum(_done(t) for t in study.get_trials(deepcopy=False))
    remaining = total - done
    if remaining <= 0:
        return
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if ray.cluster_resources().get("GPU") else 0.0)
    searcher = OptunaSearch(space=dict(dists), metric="value", mode="min" if study.direction.name == "MINIMIZE"
                            else "max", sampler=study.sampler, study_name=study.study_name, storage=study._storage)
    slots = max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1) // max(gpus or cpus_per_trial, 1e-9)))
    failed: list[str] = []
    fatal: list[str] = []
    import logging

    logging.getLogger("ray.tune.search.optuna.optuna_search").setLevel(logging.ERROR)  # "nan is not acceptable"

    class Rows(tune.Callback):  # type: ignore[misc]
        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any],
                            **info: Any) -> None:
            ot = searcher._ot_trials.get(trial.trial_id)
            if ot is None:
                return
            value = result.get("value")
            ok = isinstance(value, float) and math.isfinite(value)
            ot.set_user_attr("seconds", float(result.get("seconds", 0.0)))
            if not ok:
                ot.set_user_attr("error", result.get("error") or "no value")
                failed.append(result.get("error") or "no value")
            if result.get("fatal"):
                fatal.append(result["fatal"])
            if on_trial:
                on_trial({"number": ot.number, "params": {k: float(v) for k, v in trial.config.items()},
                          "value": value if ok else None, "state": "complete" if ok else "fail",
                          "seconds": result.get("seconds"), "error": None if ok else result.get("error")})

    class Stop(tune.Stopper):  # type: ignore[misc]
        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            return bool(fatal) or (fail_fast and bool(failed))

    trainable = tune.with_resources(tune.with_parameters(_ray_trial, job=job), {"cpu": cpus_per_trial, "gpu": gpus})
    with tempfile.TemporaryDirectory(prefix="pemlang-ray-") as scratch:
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, max_concurrent=slots),
                                        num_samples=remaining, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=scratch, name="pemlang-tune", verbose=0, callbacks=[Rows()],
                                      stop=Stop()),
        )
        try:
            tuner.fit()
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray's own failures (workers lost, out of memory…)
            raise TuneError([error("E031", f"Ray could not run the trials: {first_line(exc, 400)}",
                                   hints=["the trials finished so far are in the study; rerunning resumes it"])]) from None
    if fatal:
        raise TuneError([error("E032", f"a Ray worker could not start: {fatal[0]}")])
    if fail_fast and failed:
        raise TuneError([error("E031", f"a trial failed: {failed[0]}",
                               hints=["without --fail-fast the study goes on past failed trials"])])


# -- the whole tuning -------------------------------------------------------------------------------


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
    from .check import did_you_mean

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
    stepped = all(r.step is not None for r in options.space)
    sampler = options.sampler or ("grid" if stepped else "tpe")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (expected {', '.join(SAMPLERS)})")
    if sampler == "grid" and not stepped:
        missing = next(r for r in options.space if r.step is None)
        raise _range_error(missing.text or missing.describe(), f"{missing.name}: a grid needs a step",
                           hints=[f"e.g. {missing.name}={missing.low:g}:{missing.high:g}:0.1, or --sampler tpe"])
    if sampler == "cmaes" and len(options.space) < 2:
        raise TuneError([error("E029", "CMA-ES searches two or more params; this tuning has one",
                               hints=["use --sampler tpe, or grid with a step"])])
    classifier = _is_classifier(program.plan().outputs[program.outputs.index(output)].config)
    direction = options.direction or ("maximize" if classifier and isinstance(options.objective, DataObjective)
                                      else "minimize")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"direction must be 'minimize' or 'maximize', not {direction!r}")
    grid_size = math.prod(len(r.grid) for r in options.space) if sampler == "grid" else None
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


def _tuned_by(directory: Path, study_file: str) -> bool:
    """Whether `directory` holds the best point a tuning with study `study_file` wrote (a resumed
    tuning rewrites it; anything else needs --force)."""
    from .adapters import read_safetensors_header
    from .writer import provenance_field

    try:
        _, metadata, _, _ = read_safetensors_header(directory / "adapter_model.safetensors")
    except Exception:  # noqa: BLE001 - missing, unreadable or foreign: not ours
        return False
    tuned = provenance_field(metadata, "pemlang.tune")
    return isinstance(tuned, dict) and tuned.get("study") == study_file


def describe_objective(objective: Any, classifier: bool) -> str:
    if isinstance(objective, DataObjective):
        return objective.describe(classifier)
    if isinstance(objective, str):
        return objective
    return getattr(objective, "__qualname__", None) or type(objective).__name__


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
        "base": str(_absolute(options.base)) if isinstance(options.base, str | Path) else type(options.base).__name__,
        "tokenizer": str(_absolute(options.tokenizer)) if options.tokenizer else None,
    }
    study_path = Path(options.study) if options.study is not None else None
    study_file = str(study_path.resolve()) if study_path is not None else None  # as the best point records it
    protected = protected_paths(program, options, objective_fn)
    destinations = ([options.save_dir.resolve()] if options.save_dir is not None else
                    [o.path for o in program.checked.outputs if o.path is not None])
    if options.save:  # refuse an output that cannot be written before any trial runs
        from .writer import destination_problems

        ours = [d for d in destinations if study_file is not None and _tuned_by(d, study_file)]
        kept = {**protected, **({"the study": Path(study_file)} if study_file is not None else {})}
        problems = destination_problems([d for d in destinations if d not in ours], kept, force=options.force)
        problems += destination_problems(ours, kept, force=True)  # this study's own best: rewritten
        if problems:
            from dataclasses import replace

            raise TuneError([replace(d, hints=(*d.hints, "or write the best point elsewhere (--save-best DIR, "
                                               "save= in the API), or nowhere (--no-save)")) for d in problems])
    if study_path is not None:
        clash = next((name for name, path in protected.items() if _same_file(path, study_path)), None)
        if clash is not None:
            raise study_error(study_path, f"the study would be written over {clash}",
                              hints=["give --study a new file name"])
    optuna = _optuna()
    with StudyLock(study_path):
        probe = open_study(study_path, direction=direction, sampler=None, settings=settings) if study_path else None
        existing = len(probe.trials) if probe is not None else 0
        sampler = make_sampler(sampler_name, options.space, seed=options.seed, offset=existing)
        if probe is not None:
            study = optuna.load_study(study_name=STUDY_NAME, storage=probe._storage, sampler=sampler)
        else:
            study = open_study(None, direction=direction, sampler=sampler, settings=settings)
        check_base(options.base, load=False)
        recovered = recover(study)
        done = sum(_done(t) for t in study.get_trials(deepcopy=False))
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
                job = WorkerJob(program._recipe, output, _absolute(options.base), objective,
                                _absolute(options.tokenizer), options.device, search_path)
                run_ray(job, study, dists, total, address=options.ray_address,
                        cpus_per_trial=options.cpus_per_trial, gpus_per_trial=options.gpus_per_trial,
                        on_trial=on_trial, fail_fast=options.fail_fast)
            else:
                worker = Worker(program, output, options.base, objective_fn, tokenizer=options.tokenizer,
                                device=options.device)
                run_local(worker, study, dists, total, on_trial=on_trial, fail_fast=options.fail_fast)
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
