"""SIGINT and SIGTERM as one orderly interruption (exit 130, nothing partial written).

`install` (first thing in the CLI's `main`) makes both signals raise KeyboardInterrupt, once.
Inside `deferred()` blocks (importing torch, swapping a directory into place, removing staging)
a signal is only recorded and raised when the block ends, so it never lands inside a C
extension's import or between two renames. `raise_if_interrupted` stops a write even when some
library swallowed the KeyboardInterrupt. Without `install` (the Python API), nothing changes.
"""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Iterator
from types import FrameType
from typing import Any

_state = {"installed": False, "pending": 0, "raised": False, "depth": 0, "held": False}
_previous: dict[int, object] = {}
_previous_hook: list[Any] = [None]  # sys.unraisablehook before `install`


def _handler(signum: int, frame: FrameType | None) -> None:
    _state["pending"] = signum
    if _state["depth"] == 0 and not _state["raised"]:
        _state["raised"] = True
        raise KeyboardInterrupt


def _unraisable(unraisable: sys.UnraisableHookArgs) -> None:
    """Our KeyboardInterrupt, raised where Python cannot propagate it (a weakref callback, a
    `__del__`), would be printed as "Exception ignored in … Traceback": it is not an error, and
    `raise_if_interrupted` still stops the command, so say nothing. Anything else as before."""
    if issubclass(unraisable.exc_type, KeyboardInterrupt) and _state["pending"]:
        return
    (_previous_hook[0] or sys.__unraisablehook__)(unraisable)


def install() -> None:
    """Route SIGINT and SIGTERM through one handler that raises KeyboardInterrupt (once).
    A second call keeps the first's state (a signal that already arrived stays pending)."""
    if _state["installed"]:
        return
    _state.update(pending=0, raised=False, depth=0, held=False)
    _previous_hook[0] = sys.unraisablehook
    sys.unraisablehook = _unraisable
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread: leave signals alone
            _previous[sig] = signal.signal(sig, _handler)
            _state["installed"] = True


def hold() -> None:
    """Defer signals until `release` (module start-up, before the command's try block)."""
    if not _state["held"]:
        _state["held"] = True
        _state["depth"] = int(_state["depth"]) + 1


def release() -> None:
    """End `hold`: a signal that arrived meanwhile is raised now."""
    if _state["held"]:
        _state["held"] = False
        _state["depth"] = int(_state["depth"]) - 1
        if _state["depth"] == 0 and _state["pending"] and not _state["raised"]:
            _state["raised"] = True
            raise KeyboardInterrupt


def restore() -> None:
    """Put back the handlers `install` replaced (a command run in-process, as tests do, ends)."""
    for sig, handler in _previous.items():
        with contextlib.suppress(ValueError, OSError, TypeError):
            signal.signal(sig, handler)  # type: ignore[arg-type]
    _previous.clear()
    if _previous_hook[0] is not None:
        sys.unraisablehook = _previous_hook[0]
        _previous_hook[0] = None
    _state.update(installed=False, pending=0, raised=False, depth=0, held=False)


def quiet() -> None:
    """From now on record signals without raising (the command is finishing)."""
    _state["depth"] = int(_state["depth"]) + 1_000_000


def interrupted() -> bool:
    """Whether SIGINT or SIGTERM arrived since `install`."""
    return bool(_state["pending"])


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt if a signal arrived, even one whose exception was swallowed."""
    if _state["pending"]:
        _state["raised"] = True
        raise KeyboardInterrupt


@contextlib.contextmanager
def deferred(*, raise_after: bool = True) -> Iterator[None]:
    """Hold signals while the block runs; with `raise_after`, raise one that arrived when it ends."""
    _state["depth"] = int(_state["depth"]) + 1
    try:
        yield
    finally:
        _state["depth"] = int(_state["depth"]) - 1
    if raise_after and _state["depth"] == 0 and _state["pending"] and not _state["raised"]:
        _state["raised"] = True
        raise KeyboardInterrupt
