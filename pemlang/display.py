"""What the long commands show while they run: a progress bar over a run's layers, the trials of a
tuning as they finish (a live table on a terminal, a line each otherwise), and what it found."""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

PROGRESS_SECONDS = 5.0  # between plain progress lines when stderr is not a terminal (CI, logs)


def progress_seconds() -> float:
    """PEMLANG_PROGRESS_SECONDS, the interval between plain progress lines (0: a line per step);
    the default when unset or not a finite number of seconds >= 0."""
    text = os.environ.get("PEMLANG_PROGRESS_SECONDS", "")
    try:
        value = float(text)
    except ValueError:
        return PROGRESS_SECONDS
    return value if math.isfinite(value) and value >= 0 else PROGRESS_SECONDS


class LayerProgress:
    """Progress of a long run on stderr: a rich bar on a terminal (for runs long enough to watch);
    otherwise, piped to a log, a plain line every few seconds (`layers 40/154 (26%), 10 s`) and one at
    the end, so that a log shows a run is alive. The callable it yields advances it by one `unit`."""

    def __init__(self, total: int, unit: str = "layers", *, stream: TextIO | None = None,
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.unit = unit
        self.stream = stream
        self.interval = progress_seconds() if interval is None else interval
        self.clock = clock
        self.bar: Any = None
        self.done = 0
        self.shown = 0  # steps done at the last plain line
        self.start = 0.0
        self.last = 0.0

    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr

    def __enter__(self) -> Callable[[], None] | None:
        if self._out().isatty():
            if self.total < 16:
                return None
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn(self.unit), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                transient=True, console=Console(file=self._out()))
            self.bar.start()
            task = self.bar.add_task(self.unit, total=self.total)
            return lambda: self.bar.advance(task)
        self.start = self.last = self.clock()
        return self._step

    def _step(self) -> None:
        self.done += 1
        now = self.clock()
        if now - self.last >= self.interval and self.done < self.total:
            self.last = now
            self._line(now)

    def _line(self, now: float) -> None:
        self.shown = self.done
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        print(f"{self.unit} {self.done}/{self.total}{share}, {now - self.start:.0f} s", file=self._out(), flush=True)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.shown and self.done > self.shown:  # a log that showed progress shows where it ended
            self._line(self.clock())


class TrialTable:
    """Trials as they finish: a live rich table on a terminal, else one line per trial."""

    def __init__(self, names: Sequence[str], objective: str, *, live: bool = True, quiet_errors: bool = False):
        self.names = list(names)
        self.quiet_errors = quiet_errors  # --fail-fast: the error diagnostic says it once
        from .tune import objective_label  # the tuner is imported only by the commands that tune

        self.label = objective_label(objective)
        self.rows: list[dict[str, Any]] = []
        self.live: Any = None
        if not live:
            return
        if sys.stdout.isatty():
            from rich.live import Live

            self.live = Live(self._table(), refresh_per_second=4, transient=False)
            self.live.start()
        else:
            print(self._line(["trial", *self.names, self.label, "seconds"]), flush=True)

    def _table(self, rows: Sequence[dict[str, Any]] | None = None, best: int | None = None) -> Any:
        from rich.table import Table

        table = Table(box=None, header_style="bold")
        for column in ["trial", *self.names, self.label, "seconds"]:
            table.add_column(column, justify="right")
        for row in (self.rows[-30:] if rows is None else rows):
            table.add_row(*self._cells(row), style="bold green" if row["number"] == best else None)
        return table

    def _cells(self, row: dict[str, Any]) -> list[str]:
        value = f"{row['value']:.6g}" if row["value"] is not None else row["state"]
        seconds = f"{row['seconds']:.2f}" if row.get("seconds") is not None else "-"
        return [str(row["number"]), *(f"{row['params'].get(n, float('nan')):.6g}" for n in self.names), value, seconds]

    @staticmethod
    def _line(cells: Sequence[str]) -> str:
        return "".join(cell.rjust(6 if i == 0 else 12) for i, cell in enumerate(cells))

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.live is not None:
            self.live.update(self._table())
        else:
            print(self._line(self._cells(row)), flush=True)
        if row.get("error") and not self.quiet_errors:
            from .tune import format_params

            print(f"  trial {row['number']} failed at {format_params(row['params'])}: {row['error']}", file=sys.stderr,
                  flush=True)

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def show(self, rows: Sequence[dict[str, Any]], best: int | None) -> None:
        """Every trial at once (`--show`)."""
        from rich.console import Console

        Console(highlight=False).print(self._table(rows, best))


def print_tune_result(result: Any, names: Sequence[str]) -> None:
    from .tune import format_params, format_tie, objective_label

    complete = sum(t["state"] == "complete" for t in result.trials)
    failed = sum(t["state"] == "fail" for t in result.trials)
    line = f"{complete} trial{'s' if complete != 1 else ''} complete" + (f", {failed} failed" if failed else "")
    print(line)
    if result.best_params is None:
        return
    label = objective_label(result.objective)
    print(f"best: {format_params(result.best_params)}  {label} = {result.best_value:.6g}  (trial {result.best_number}, "
          f"{result.direction}d)")
    tie = format_tie(result)
    if tie is not None:
        print(tie)
    if result.plot is not None:
        print(f"plot: {result.plot}")
    elif getattr(result, "plot_note", None):
        print(result.plot_note, file=sys.stderr)
    if result.study is not None:
        print(f"study: {result.study}  (`pemlang tune --show {result.study}` prints it again; the same command "
              "resumes it)")
