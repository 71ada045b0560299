"""The tuner's error: diagnostics, as on the command line (every stage raises it)."""

from __future__ import annotations

from ..diagnostics import PemError


class TuneError(PemError):
    """A tuning that cannot start or go on: diagnostics, as on the command line."""

    def with_note(self, note: str) -> TuneError:
        from dataclasses import replace

        return TuneError([replace(d, notes=(*d.notes, note)) for d in self.diagnostics])
