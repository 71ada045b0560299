"""Trials in this process, one after another, on one Worker."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..diagnostics import error
from .errors import TuneError
from .model import Worker
from .objectives import TrialFailed
from .results import OnTrial, format_params
from .study import is_done


def run_local(worker: Worker, study: Any, dists: Mapping[str, Any], total: int, *, on_trial: OnTrial | None,
              fail_fast: bool) -> None:
    """Run trials in this process until the study has `total` (a grid stops when it is exhausted)."""
    from optuna.trial import TrialState

    from .. import interrupts

    while sum(is_done(t) for t in study.get_trials(deepcopy=False)) < total:
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
