"""What a tuning found: every trial, the best point, and how they are labelled and printed."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OnTrial = Callable[[dict[str, Any]], None]


@dataclass
class TuneResult:
    """What a tuning found: every trial (`trials`: dicts of number, params, value, state, seconds,
    error), the best point (the earliest trial of those with the best value; `tied` numbers the
    others), and where the study, plot and best adapter are."""

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
    tied: list[int] = field(default_factory=list)  # other complete trials with exactly the best value


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
    tied = sorted(t.number for t in complete if best is not None and t.number != best.number and t.value == best.value)
    return TuneResult(rows, dict(best.params) if best else None, best.value if best else None, direction,
                      settings.get("objective", "objective"), study_path, best_number=best.number if best else None,
                      tied=tied)


def objective_label(description: str) -> str:
    """The objective's column name: loss, accuracy, or value (a user's function)."""
    word = description.split(" on ")[0]
    return word if word in ("loss", "accuracy") else "value"


def format_tie(result: TuneResult, *, shown: int = 8) -> str | None:
    """The line that says the best value is tied, or None."""
    if not result.tied:
        return None
    numbers = ", ".join(str(n) for n in result.tied[:shown]) + (f" and {len(result.tied) - shown} more"
                                                                if len(result.tied) > shown else "")
    return (f"tied: trial{'s' if len(result.tied) > 1 else ''} {numbers} reach{'es' if len(result.tied) == 1 else ''} "
            f"the same value as trial {result.best_number}; the earliest is the best point")


def format_params(params: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={v:.6g}" for k, v in params.items())
