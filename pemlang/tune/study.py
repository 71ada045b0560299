"""The study: Optuna's samplers, the SQLite file that keeps the trials (checked before it is written,
locked while trials run), and the recovery of trials a killed or interrupted run left behind."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..diagnostics import error
from ..source import Source, Span
from .errors import TuneError
from .space import ParamRange

STUDY_NAME = "pemlang"


SAMPLERS = ("tpe", "grid", "cmaes", "random")


def load_optuna() -> Any:
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
    optuna = load_optuna()
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
        optuna = load_optuna()

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
    optuna = load_optuna()
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
    optuna = load_optuna()
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
            if not create:  # --show reads only
                raise study_error(path, f"{path} is not a study (not an SQLite file)", option=option,
                                  hints=["--show takes a study file a tuning wrote (--study FILE)"])
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
            damage = _damage(db) if STUDY_NAME in names and {"trials", "trial_values", "trial_params"} <= tables \
                else None
    except sqlite3.Error as exc:
        raise study_error(path, f"cannot read {path}: {exc}", option=option) from None
    if damage is not None:
        raise study_error(path, f"{path}: {damage}; the study was changed outside pemlang",
                          hints=["give --study a new file name to start again (or delete the damaged trial "
                                 "from the study)"], option=option)
    if not tables:
        return  # an empty database: a new study
    if "studies" not in tables or "trials" not in tables:
        raise study_error(path, f"{path} is another application's database, not a study; pemlang will not write "
                          "into it", hints=["give --study a new file name"], option=option)
    if STUDY_NAME not in names:
        raise study_error(path, f"{path} holds other Optuna studies ({', '.join(sorted(names))[:80]}), not a "
                          "pemlang one; pemlang will not add to it", hints=["give --study a new file name"],
                          option=option)


TRIAL_STATES = ("RUNNING", "COMPLETE", "PRUNED", "FAIL", "WAITING")


def _damage(db: Any) -> str | None:
    """What is wrong with the first trial of the pemlang study whose state, value or params Optuna
    or pemlang never writes (a value that is NULL, text, not finite; an unknown state), or None.
    Read from the tables as they are, before Optuna parses them."""
    import math

    def shown(value: Any, kind: str) -> str:
        return "NULL" if value is None else repr(value)[:40] if kind in ("text", "blob") else f"{value!r}"

    def number(value: Any, kind: str) -> bool:
        return kind in ("real", "integer") and math.isfinite(float(value))

    study = "(select study_id from studies where study_name = ?)"
    trials = db.execute(f"select trial_id, number, state from trials where study_id = {study} order by number",
                        (STUDY_NAME,)).fetchall()
    values: dict[int, list[tuple[Any, str, Any]]] = {}
    for trial_id, value, kind, value_type in db.execute(
            "select trial_id, value, typeof(value), value_type from trial_values"):
        values.setdefault(trial_id, []).append((value, kind, value_type))
    params: dict[int, list[tuple[str, Any, str, Any]]] = {}
    for trial_id, name, value, kind, distribution in db.execute(
            "select trial_id, param_name, param_value, typeof(param_value), distribution_json from trial_params"):
        params.setdefault(trial_id, []).append((name, value, kind, distribution))
    for trial_id, trial_number, state in trials:
        label = f"trial {trial_number}"
        if state not in TRIAL_STATES:
            return f"{label} has an unknown state {shown(state, 'text')}"
        if state == "COMPLETE" and not values.get(trial_id):
            return f"{label} is complete but has no value"
        for value, kind, value_type in values.get(trial_id, []):
            if value_type != "FINITE" or not number(value, kind):
                return f"{label} has the value {shown(value, kind) if value_type == 'FINITE' else value_type}, " \
                       "not a finite number"
        for name, value, kind, distribution in params.get(trial_id, []):
            if not number(value, kind):
                return f"{label} has the param {name} = {shown(value, kind)}, not a finite number"
            bounds = _bounds(distribution)
            if bounds is None:
                return f"{label} has a param {name} whose range is not one Optuna wrote"
            if not bounds[0] <= float(value) <= bounds[1]:
                return f"{label} has the param {name} = {value!r}, outside its range {bounds[0]:g}:{bounds[1]:g}"
    return None


def _bounds(distribution: Any) -> tuple[float, float] | None:
    """(low, high) of a float distribution as Optuna stores it (JSON), or None when it is not one."""
    import json
    import math

    try:
        parsed = json.loads(distribution)
        low, high = float(parsed["attributes"]["low"]), float(parsed["attributes"]["high"])
    except (TypeError, ValueError, KeyError, RecursionError):
        return None
    return (low, high) if math.isfinite(low) and math.isfinite(high) and low <= high else None


def storage_failure(path: Path | None, exc: BaseException, *, moved: bool = False) -> TuneError:
    """E033 for a study file that could not be read or written while the tuning ran: deleted,
    locked by another process for longer than SQLite waits (5 s), or otherwise unusable."""
    cause = exc.__cause__ or exc.__context__ or exc
    text = " ".join(str(getattr(cause, "orig", None) or cause).split())[:200]
    if path is not None and (moved or not path.exists()):
        return study_error(path, f"the study {path} was deleted or moved while the tuning ran",
                           hints=["leave the study file in place while it is tuned; rerun to start it again"])
    if "locked" in text.lower():
        return study_error(path, f"the study {path} was locked by another process for more than 5 s",
                           hints=["close what holds it (an sqlite3 shell or a program writing to it), then rerun: "
                                  "the tuning resumes where it stopped"])
    return study_error(path, f"cannot read or write the study {path}: {text}",
                       hints=["check the file and its directory (permissions, free space), then rerun: the tuning "
                              "resumes where it stopped"])


@contextlib.contextmanager
def storage_errors(path: Path | None, lock: StudyLock | None = None) -> Iterator[None]:
    """Optuna's storage failures (StorageInternalError, SQLAlchemy's errors) as E033 diagnostics;
    `lock` tells whether the file was deleted or replaced under it."""
    optuna = load_optuna()
    import sqlite3

    from sqlalchemy.exc import SQLAlchemyError

    try:
        yield
    except (optuna.exceptions.StorageInternalError, SQLAlchemyError, sqlite3.Error) as exc:
        raise storage_failure(path, exc, moved=lock is not None and lock.moved()) from None


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

    def moved(self) -> bool:
        """Whether the file at the path is no longer the one locked (deleted, moved or replaced)."""
        if self.handle is None or self.path is None:
            return False
        import os

        try:
            now, held = self.path.stat(), os.fstat(self.handle.fileno())
        except OSError:
            return True
        return (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino)

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()  # closing releases the flock
            self.handle = None


def is_done(trial: Any) -> bool:
    """A trial that counts toward the total: finished, and not cut off by an interruption."""
    return trial.state.is_finished() and not trial.user_attrs.get("interrupted")


def recover(study: Any) -> int:
    """Trials left running by a process that was killed, or cut off by an interruption, are failed
    (if still running) and queued to run again with their params (and grid point). Returns how many."""
    optuna = load_optuna()
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
