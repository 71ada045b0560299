"""Trials on Ray Tune: Optuna's sampler and the study inside Ray's searcher, one Worker per Ray worker
process (built at its first trial from a picklable WorkerJob, then reused)."""

from __future__ import annotations

import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..diagnostics import error, first_line
from ..source import Source, Span
from .errors import TuneError
from .model import Worker
from .objectives import TrialFailed, import_objective
from .results import OnTrial
from .study import is_done


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
    fatal, code = "", ""
    try:
        value = _job_worker(job)(params)
        problem = ""
    except TrialFailed as exc:
        value, problem = float("nan"), str(exc)
    except TuneError as exc:  # the worker cannot start (base model, data, objective), or the objective
        # changed the model (E031): every later trial would fail or score the wrong model
        value, problem = float("nan"), "; ".join(d.message for d in exc.diagnostics)
        fatal, code = problem, exc.diagnostics[0].code
    tune.report({"value": value, "seconds": time.perf_counter() - start, "error": problem, "fatal": fatal,
                 "fatal_code": code})


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
    done = sum(is_done(t) for t in study.get_trials(deepcopy=False))
    remaining = total - done
    if remaining <= 0:
        return
    gpus = gpus_per_trial if gpus_per_trial is not None else (1.0 if ray.cluster_resources().get("GPU") else 0.0)
    searcher = OptunaSearch(space=dict(dists), metric="value", mode="min" if study.direction.name == "MINIMIZE"
                            else "max", sampler=study.sampler, study_name=study.study_name, storage=study._storage)
    slots = max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1) // max(gpus or cpus_per_trial, 1e-9)))
    failed: list[str] = []
    fatal: list[tuple[str, str]] = []  # (code, message)
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
                fatal.append((result.get("fatal_code") or "E032", result["fatal"]))
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
        code, message = fatal[0]
        raise TuneError([error(code, f"a Ray worker could not start: {message}" if code == "E032" else message)])
    if fail_fast and failed:
        raise TuneError([error("E031", f"a trial failed: {failed[0]}",
                               hints=["without --fail-fast the study goes on past failed trials"])])
