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

The package's modules are the tuner's stages, each importing only from those listed after it:

    session.py     tune(): options settled, paths protected, the study locked, trials run, best saved
    raytune.py     trials on Ray Tune (one Worker per Ray worker process)
    local.py       trials in this process
    model.py       the Worker: base model and tokenizer loaded once, each trial's adapter in place
    plot.py        the objective against the params, beside the study
    study.py       Optuna's samplers; the SQLite study, its lock and the recovery of cut-off trials
    scoring.py     the built-in objective's loss or accuracy
    guard.py       what an objective must leave as it found it (the adapter in place, the base unchanged)
    results.py     every trial and the best point, labelled and formatted
    objectives.py  the --data records and the user's module:function
    space.py       NAME=LO:HI[:STEP]
    errors.py      TuneError

Only the names below are for use outside the package (the CLI, the API, tests).
"""

from .errors import TuneError
from .objectives import DataObjective, Record, read_records
from .plot import plot_beside
from .results import TuneResult, format_params, format_tie, objective_label, summarise
from .session import TuneOptions, tune
from .space import ParamRange, parse_range
from .study import SAMPLERS, open_study

__all__ = [
    "SAMPLERS",
    "DataObjective",
    "ParamRange",
    "Record",
    "TuneError",
    "TuneOptions",
    "TuneResult",
    "format_params",
    "format_tie",
    "objective_label",
    "open_study",
    "parse_range",
    "plot_beside",
    "read_records",
    "summarise",
    "tune",
]
