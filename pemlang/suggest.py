""""Did you mean": the known name closest to an unknown one, with bounded work per question.

Closeness is difflib's ratio (≥ 0.6 is close), which costs O(n·m) per pair of names, so it
ranks only a few candidates: those sharing the most two-character pieces with the name, found
through an index of pieces built once per set of candidates, looking at no more than SCAN index
entries per question. A program with N names and U unknown names costs O(N + U), not O(N·U).
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Iterable
from pathlib import Path

RANKED = 64  # candidates difflib compares per question
SCAN = 2000  # index entries looked at per question
# Work done, for tests that bound it: index entries looked at, and difflib comparisons.
WORK = {"scanned": 0, "compared": 0}


@functools.lru_cache(maxsize=1 << 16)
def _bigrams(name: str) -> frozenset[tuple[str, int]]:
    """The two-character pieces of a name, each numbered by its occurrence (a multiset as a set)."""
    seen: dict[str, int] = {}
    pieces = set()
    for i in range(len(name) - 1):
        piece = name[i : i + 2]
        seen[piece] = seen.get(piece, 0) + 1
        pieces.add((piece, seen[piece]))
    return frozenset(pieces)


def _can_be_close(n: int, m: int) -> bool:
    """Whether names of lengths n and m can reach difflib's ratio 0.6: 2·min(n, m) ≥ 0.6·(n + m)."""
    return 2 * min(n, m) >= 0.6 * (n + m)


class NameIndex:
    """Candidate names, indexed by their two-character pieces; names are added as they appear."""

    def __init__(self, names: Iterable[str] = ()):
        self.names: dict[str, None] = {}  # in the order added
        self.postings: dict[tuple[str, int], list[str]] = {}
        self.short: list[str] = []  # names of one or two characters (a one-character question's candidates)
        for name in names:
            self.add(name)

    def add(self, name: str) -> None:
        if name in self.names:
            return
        self.names[name] = None
        for piece in _bigrams(name):
            self.postings.setdefault(piece, []).append(name)
        if len(name) <= 2:
            self.short.append(name)

    def closest(self, name: str) -> str | None:
        """The candidate closest to `name` (difflib's ratio ≥ 0.6), if any."""
        pool = list(self.names) if len(self.names) <= RANKED else self._likely(name)
        WORK["compared"] += len(pool)
        close = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
        return close[0] if close else None

    def _likely(self, name: str) -> list[str]:
        """Up to RANKED candidates sharing the most pieces with `name`: the pieces' lists are read
        rarest first (the most telling), SCAN entries at most."""
        counts: dict[str, int] = {}
        budget = SCAN
        n = len(name)
        lists = sorted((self.postings.get(piece, []) for piece in _bigrams(name)), key=len)
        if n <= 2:
            lists.insert(0, self.short)  # a name too short to share a piece: the other short names
        for names in lists:
            for candidate in names[:budget]:
                if _can_be_close(n, len(candidate)):
                    counts[candidate] = counts.get(candidate, 0) + 1
            taken = min(budget, len(names))
            WORK["scanned"] += taken
            budget -= taken
            if budget <= 0:
                break
        if len(counts) <= RANKED:
            return list(counts)
        # Many names share as many pieces (a short name has few, and one changed letter breaks two):
        # among equals, the most shared letters first, which bounds difflib's ratio from above.
        letters = _letters(name)
        return sorted(counts, key=lambda c: (-counts[c], -_shared_letters(letters, c) / (n + len(c))))[:RANKED]


@functools.lru_cache(maxsize=1 << 16)
def _letters(name: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in name:
        counts[ch] = counts.get(ch, 0) + 1
    return counts


def _shared_letters(letters: dict[str, int], other: str) -> int:
    """How many letters two names share, counted with multiplicity (difflib's quick_ratio's numerator)."""
    return sum(min(k, letters.get(ch, 0)) for ch, k in _letters(other).items())


@functools.lru_cache(maxsize=8)
def _index(candidates: tuple[str, ...]) -> NameIndex:
    return NameIndex(candidates)


def closest_name(name: str, candidates: Iterable[str] | NameIndex) -> str | None:
    """The candidate closest to `name` (difflib's ratio ≥ 0.6), if any."""
    index = candidates if isinstance(candidates, NameIndex) else _index(tuple(candidates))
    return index.closest(name)


def did_you_mean(name: str, candidates: Iterable[str] | NameIndex) -> list[str]:
    """A hint naming the closest candidate, if one is close."""
    close = closest_name(name, candidates)
    return [f"did you mean `{close}`?"] if close else []


SIBLINGS_LOOKED_AT = 10_000  # entries of a directory compared with a missing name, at most


def near_directory(path: Path) -> Path | None:
    """A directory beside the missing `path` whose name is close to its name (`adapters/thta1` →
    `adapters/theta1`), if its parent exists; the first SIBLINGS_LOOKED_AT entries are looked at."""
    names = []
    try:
        with os.scandir(path.parent) as entries:
            for number, entry in enumerate(entries):
                if number >= SIBLINGS_LOOKED_AT:
                    break
                if not entry.name.startswith(".") and entry.is_dir():
                    names.append(entry.name)
    except (OSError, ValueError):
        return None
    close = closest_name(path.name, names) if names else None
    return path.parent / close if close is not None else None
