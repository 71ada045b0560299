"""What the long commands show while they run: a progress bar over a run's layers, the trials of a
tuning as they finish (a live table on a terminal, a line each otherwise), and what it found."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any


class LayerProgress:
    """A rich progress bar on stderr when it is a terminal and the run is long enough to watch."""

    def __init__(self, total: int):
        self.total = total
        self.bar = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        if sys.stderr.isatty() and self.total >= 16:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("layers"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                transient=True, console=__import__("rich.console").console.Console(stderr=True))
            self.bar.start()
            task = self.bar.add_task("layers", total=self.total)
            return lambda: self.bar.advance(task)  # type: ignore[union-attr]
        return None

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


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
