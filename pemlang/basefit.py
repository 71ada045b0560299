"""The checker's rules for `output x into "BASE" -> "DIR"`: the base model is read (its
config and weight headers), and the output must fit it — every layer's tensor present in the base
with the module's shape, nothing on a tensor the base ties to another, the base neither quantized
nor pickled (unless --allow-pickle, for a local base), DIR apart from
BASE. A part of `check.Checker`, kept apart so each reads in one sitting."""

from __future__ import annotations

import os
from pathlib import Path

from . import hub
from .basemodel import BaseModel, BaseModelError, Change, Misfit, changes, read_base
from .checked import ModuleValue
from .diagnostics import display_path
from .paths import resolve_written, shorten, unusable
from .source import Source, Span

MISFITS_SHOWN = 3


def _dims(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


def _more(count: int) -> list[str]:
    return [f"{count - MISFITS_SHOWN} more"] if count > MISFITS_SHOWN else []


class IntoChecks:
    """Methods of the Checker (which provides `_error`, `_warn`, `base_dir`, `source` and the
    resolved inputs `input_reals`)."""

    def _read_into(self, written: str, span: Span, source: Source | None) -> BaseModel | None:  # type: ignore[no-untyped-def]
        """The base model `written` names, read once per directory; None (reported) when it cannot
        be used."""
        hub_id = None
        if hub.is_hub(written):  # its config, tokenizer and weights, in the Hub cache as inputs are (check: headers)
            try:
                resolved = hub.locate_model(written, headers_only=not self.writes)
            except hub.HubError as exc:
                self._error("E035", f"base model {exc.message}", span, source=source, hints=exc.hints)
                return None
            path, hub_id = resolved.directory, f"{resolved.ref.repo}@{resolved.commit}"
            written = resolved.pinned  # recorded at the commit that was read
        else:
            path = resolve_written(self.base_dir, written)
        problem = unusable(path)
        if problem is not None:
            self._error("E035", f"the base model's path cannot be used: {problem}", span, source=source,
                        notes=[shorten(display_path(path))])
            return None
        cache: dict[Path, BaseModel | BaseModelError] = self.bases_read
        real = path.resolve()
        if real not in cache:
            try:
                cache[real] = read_base(path, written, hub_id=hub_id,
                                        allow_pickle=self.allow_pickle and hub_id is None)
            except BaseModelError as exc:
                cache[real] = exc
        found = cache[real]
        if isinstance(found, BaseModelError):
            self._error(found.code, found.message, span, source=source, notes=found.notes, hints=found.hints)
            return None
        return found

    def _check_into(self, value: ModuleValue, written: str, into_span: Span, expr_span: Span,
                    into_source: Source | None, out_path: Path | None, path_span: Span,
                    path_source: Source | None) -> tuple[BaseModel, tuple[Change, ...]] | None:  # type: ignore[no-untyped-def]
        """Read the base and check that `value` merges into it; None (reported) when it does not."""
        base = self._read_into(written, into_span, into_source)
        if base is None:
            return None
        real = base.path.resolve()
        for name, input_real in self.input_reals.items():
            if real == input_real or input_real.is_relative_to(real) or real.is_relative_to(input_real):
                self._error("E035", f"the base model and input `{name}` overlap", into_span, source=into_source,
                            notes=[f"{display_path(base.path)} and {display_path(self.input_paths[name])}"],
                            hints=["a base model is a model directory, an input an adapter directory"])
                return None
        failed = False
        if out_path is not None:
            out_real = Path(os.path.abspath(out_path)).resolve()
            if out_real == real or out_real.is_relative_to(real) or real.is_relative_to(out_real):
                where = ("is the base model's directory" if out_real == real else
                         "is inside the base model" if out_real.is_relative_to(real) else "contains the base model")
                self._error("E018", "output would overwrite the base model", path_span, source=path_source,
                            notes=[f"{display_path(out_path)} {where}"],
                            hints=["the base is never written (not even with --force): choose another output "
                                   "directory"])
                failed = True
        fan_in_fan_out = False
        if value.type.kind == "ia3":
            first = next(iter(value.input_betas()))
            fan_in_fan_out = bool(self.inputs[first].config.get("fan_in_fan_out"))
        found, misfits = changes(base, value.type, fan_in_fan_out=fan_in_fan_out)
        if misfits:
            self._misfits(base, misfits, expr_span, into_span, into_source)
            return None
        recorded = value.type.base
        if not recorded.same_as(base.identity):
            self._warn("W008", f"merging into {base.identity.describe()}, but the inputs were trained on "
                       f"{recorded.describe()}", into_span, source=into_source,
                       notes=[f"{base.written}: every layer of the output is in it, with the same shapes"],
                       hints=["nothing to do if it is the same model under another name (a local copy, a renamed "
                              "repository); otherwise merge into the base the inputs were trained on"])
        return None if failed else (base, tuple(found))

    def _misfits(self, base: BaseModel, misfits: list[Misfit], expr_span: Span, into_span: Span,
                 into_source: Source | None) -> None:  # type: ignore[no-untyped-def]
        shown = display_path(base.path)
        tied = [m for m in misfits if m.kind == "tied"]
        if tied:
            first = tied[0]
            self._error("E037", f"the output changes {first.target}, which the base model ties to another tensor",
                        expr_span,
                        notes=[f"{m.layer} changes {m.target}" for m in tied[:MISFITS_SHOWN]] + _more(len(tied))
                        + [f"{shown}/config.json: tie_word_embeddings is on: the input and output embeddings are "
                           "one tensor, and merging into one changes the other"],
                        hints=["pemlang does not untie them silently: merge into a base saved with "
                               "tie_word_embeddings false (both tensors written), or merge an adapter without a "
                               "layer on it"])
        missing = [m for m in misfits if m.kind == "missing"]
        if missing:
            self._error("E008", f"the base model lacks {len(missing)} tensor{'s' if len(missing) != 1 else ''} the "
                        "output changes: a different architecture", expr_span,
                        notes=[f"{m.layer}: no {m.target} in {shown}" for m in missing[:MISFITS_SHOWN]]
                        + _more(len(missing)),
                        hints=["merge into the base model the inputs were trained on"])
        shapes = [m for m in misfits if m.kind == "shape"]
        if shapes:
            self._error("E009", "layer shapes differ from the base model's: a different architecture", expr_span,
                        notes=[f"{m.layer}: the output needs {m.target} {_dims(m.expected)}, the base's is "
                               f"{_dims(m.found)}" for m in shapes[:MISFITS_SHOWN]] + _more(len(shapes)),
                        hints=["merge into the base model the inputs were trained on"])
        dtypes = [m for m in misfits if m.kind == "dtype"]
        if dtypes:
            self._error("E036", f"the base model's {dtypes[0].target} is {dtypes[0].dtype}, not floating point: "
                        "pemlang merges into full-precision weights only", into_span, source=into_source,
                        notes=[f"{m.layer}: {m.target} is {m.dtype}" for m in dtypes[:MISFITS_SHOWN]]
                        + _more(len(dtypes)),
                        hints=["merge into the unquantized base model, then quantize the merged model"])

