"""One worker: the base model (and tokenizer) loaded once, wrapped in a PeftModel whose adapter each
trial overwrites in place, and the objective called on it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import hub
from ..diagnostics import CompileError, Diagnostic, error, first_line
from ..source import Source, Span
from .errors import TuneError
from .guard import ModelGuard
from .objectives import DataObjective, TrialFailed, as_value
from .scoring import DataScorer

ADAPTER_NAME = "pemlang"


def base_error(base: str, message: str, *, hints: Sequence[str] = ()) -> TuneError:
    return TuneError([error("E032", message, Source(base, "--base"), Span(0, max(1, len(base))),
                            hints=hints or ["--base names the model the adapters were trained on: a directory "
                                            "written by save_pretrained, or a Hub id already in the cache"])])


def expanded(base: Any) -> Any:
    """A path written with `~` expanded (a Hub id or model object as it is)."""
    return Path(base).expanduser() if isinstance(base, str | Path) and str(base).startswith("~") else base


def load_base(base: Any, *, classifier: bool, device: Any) -> Any:
    """The base model (a transformers model instance is used as it is)."""
    if not isinstance(base, str | Path):
        return base.to(device).eval()
    base = expanded(base)
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
    _reach(base)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(base))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - any loading failure is the user's --base
        raise base_error(str(base), _load_failure(base, exc)) from None
    return model.to(device).eval()


def absolute(name: Any) -> Any:
    """A local path made absolute (Ray workers run elsewhere); a Hub id or object as it is."""
    name = expanded(name)
    if isinstance(name, str | Path) and Path(name).exists():
        return str(Path(name).resolve())
    return name


def check_base(base: Any, *, load: bool = True) -> None:
    """E032 when `base` (a path or Hub id) is not a model: a local path must be a model directory
    (not an adapter, not a file); with `load`, its config must load (without weights)."""
    if not isinstance(base, str | Path):
        return
    base = expanded(base)
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
    _reach(base)
    try:
        from transformers import AutoConfig

        AutoConfig.from_pretrained(str(base))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        raise base_error(str(base), _load_failure(base, exc)) from None


def _reach(base: str | Path) -> None:
    """For a Hub id not in the cache, one short attempt to reach the Hub (offline, huggingface_hub
    itself would retry for a minute before transformers gives up)."""
    if Path(base).exists() or not hub.is_repo_id(str(base)):
        return
    try:
        hub.reach(str(base), "config.json")
    except hub.Unreachable as exc:
        raise base_error(str(base), f"{base} could not be downloaded ({exc}) and is not in the cache",
                         hints=hub.UNREACHABLE_HINTS) from None
    except Exception as exc:  # noqa: BLE001 - the Hub's answer (not found, gated, …)
        raise base_error(str(base), _load_failure(base, exc)) from None


def _load_failure(base: Any, exc: BaseException) -> str:
    text = str(base)
    parts = Path(text).parts
    local = text.startswith((".", "/", "~")) or not hub.is_repo_id(text) or (len(parts) > 1 and Path(parts[0]).is_dir())
    if not Path(text).exists() and local:
        return f"no such directory: {text}"
    return f"cannot load the base model {text!r}: {first_line(exc)}"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt", "tekken.json")


def load_tokenizer(name: str, *, given: bool = True) -> Any:
    """The tokenizer at `name`: the one --tokenizer gives (`given`), else the base model's own."""
    option = "--tokenizer" if given else "--base"
    located = (Source(name, option), Span(0, max(1, len(name)))) if name else (None, None)
    hints = ["--data needs the base model's tokenizer: save it beside the model (tokenizer.save_pretrained), "
             "or name one with --tokenizer"]
    if Path(name).is_dir() and not any((Path(name) / f).exists() for f in TOKENIZER_FILES):
        what = "the tokenizer directory" if given else "the base model directory"
        raise TuneError([error("E032", f"{what} {name} has no tokenizer (no tokenizer.json or tokenizer_config.json)",
                               *located, hints=hints)])
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001
        text = " ".join(str(exc).split()) or type(exc).__name__  # the whole message, on one line
        raise TuneError([error("E032", f"cannot load a tokenizer from {name!r}: {_clip(text, 400)}", *located,
                               hints=hints)]) from None
    return tokenizer


def _clip(text: str, limit: int) -> str:
    """`text` cut at a word boundary within `limit` characters, marked when cut."""
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(" ", 1)[0] + " …"


def fit_error(base: Any, exc: BaseException, config: Mapping[str, Any]) -> TuneError:
    """E032 for an adapter PEFT could not put into the base model for a reason other than shapes
    (those are E009 before PEFT is asked: `Program._install`), with the base model the inputs record."""
    message = f"the adapter does not fit the base model: {_clip(' '.join(str(exc).split()), 300)}"
    recorded = config.get("base_model_name_or_path")
    notes = [f"the inputs record the base model {recorded!r}" if recorded else "the inputs do not record their base model"]
    hints = ["--base must be the model the inputs were trained on"]
    if isinstance(base, str | Path):
        return TuneError([error("E032", message, Source(str(base), "--base"), Span(0, max(1, len(str(base)))),
                                notes=notes, hints=hints)])
    return TuneError([error("E032", message, notes=notes, hints=["the base model must be the one the inputs were "
                                                                 "trained on"])])


def at_base(diagnostic: Diagnostic, base: Any) -> Diagnostic:
    """A diagnostic about the model, pointed at --base when it names no place of its own."""
    if diagnostic.source is not None or not isinstance(base, str | Path):
        return diagnostic
    text = str(base)
    return replace(diagnostic, source=Source(text, "--base"), span=Span(0, max(1, len(text))))


def is_classifier(config: Mapping[str, Any]) -> bool:
    return config.get("task_type") == "SEQ_CLS"


class Worker:
    """What each worker holds: the compiled program, the base model (loaded once) wrapped in a
    PeftModel whose adapter each trial overwrites in place, and the prepared objective."""

    def __init__(self, program: Any, output: str, base: Any, objective: Any, *, tokenizer: str | None = None,
                 device: str | None = None):
        from ..backend import resolve_device

        self.program = program
        self.output = output
        self.index = program.outputs.index(output)
        config = program.plan().outputs[self.index].config
        self.classifier = is_classifier(config)
        self.device, self.device_note = resolve_device(device or program.device)
        base = expanded(base)
        self.source = base
        self.base = load_base(base, classifier=self.classifier, device=self.device)
        self.model: Any = None
        self.guard: ModelGuard | None = None  # what the objective must leave as it found it
        self.name = ADAPTER_NAME
        self.config: dict[str, Any] | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.objective: Callable[[Any, dict[str, float]], Any]
        if isinstance(objective, DataObjective):
            tokenizer_name = tokenizer or (str(base) if isinstance(base, str | Path) else
                                           getattr(self.base, "name_or_path", ""))
            self.objective = DataScorer(objective, load_tokenizer(str(tokenizer_name), given=tokenizer is not None),
                                         self.base, self.classifier, self.device)
        else:
            self.objective = objective

    def install(self, params: Mapping[str, float]) -> Any:
        """Evaluate the program at `params` and put the result into the model, in place."""
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
            self.model, self.guard = None, None
            self.base = load_base(self.source, classifier=self.classifier, device=self.device)
        if self.model is None:
            try:
                self.model = self.program._install(self.base, evaluation, self.output, self.name)
            except CompileError as exc:  # E009 before loading: the layers that differ, both shapes, the base recorded
                raise TuneError([at_base(d, self.source) for d in exc.diagnostics]) from None
            except (ValueError, RuntimeError, KeyError) as exc:
                raise fit_error(self.source, exc, config) from None
        else:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.model, tensors, adapter_name=self.name)
        self.config, self.shapes = config, shapes
        if self.guard is None:
            self.guard = ModelGuard(self.model, self.name)
        self.model.eval()
        return self.model

    def __call__(self, params: Mapping[str, float]) -> float:
        model = self.install(params)
        import torch

        failure: TrialFailed | None = None
        with torch.no_grad():
            try:
                result = self.objective(model, dict(params))
                value = as_value(result)
            except (TuneError, KeyboardInterrupt):
                raise
            except TrialFailed as exc:  # what it returned is not a number
                failure = exc
            except SystemExit as exc:
                failure = TrialFailed(f"the objective called sys.exit({exc.code!r})")
            except BaseException as exc:  # noqa: BLE001 - the user's objective (any exception class): the trial's
                failure = TrialFailed(f"the objective raised {type(exc).__name__}: {exc}")
        if self.guard is not None:  # also after a failure: a model left merged would freeze every later trial
            self.guard.check(model)
        if failure is not None:
            raise failure
        return value
