"""Source text and spans: where a piece of a program came from, as line and column."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

# Files that carry a program inside a config block (README "Configs"), rather than a .pem program.
CONFIG_SUFFIXES = (".yaml", ".yml", ".json", ".toml")


@dataclass(frozen=True, slots=True)
class Span:
    """A half-open range of character offsets [start, end) into one Source."""

    start: int
    end: int

    def shift(self, offset: int) -> Span:
        """The same range moved `offset` characters to the right."""
        return Span(self.start + offset, self.end + offset)

    def to(self, other: Span) -> Span:
        """The smallest span covering both `self` and `other`."""
        return Span(min(self.start, other.start), max(self.end, other.end))


@dataclass(frozen=True)
class Source:
    """A program text and the name it is shown under (a file path, `<repl>`, `--set`)."""

    text: str
    filename: str = "<input>"
    _line_starts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        starts = [0]
        find, at = self.text.find, self.text.find("\n")
        while at >= 0:
            starts.append(at + 1)
            at = find("\n", at + 1)
        object.__setattr__(self, "_line_starts", tuple(starts))

    def line_col(self, offset: int) -> tuple[int, int]:
        """1-based (line, column) of a character offset; columns count characters."""
        offset = max(0, min(offset, len(self.text)))
        line_index = bisect.bisect_right(self._line_starts, offset) - 1
        return line_index + 1, offset - self._line_starts[line_index] + 1

    def line_text(self, line: int) -> str:
        """The text of a 1-based line, without its newline."""
        start = self._line_starts[line - 1]
        end = self._line_starts[line] - 1 if line < len(self._line_starts) else len(self.text)
        return self.text[start:end].rstrip("\r")

    @property
    def line_count(self) -> int:
        """How many lines the text has (a trailing newline does not start a new one)."""
        return len(self._line_starts) - (1 if self.text.endswith("\n") else 0)

    def snippet(self, span: Span) -> str:
        """The text a span covers."""
        return self.text[span.start : span.end]


_BOM = "\ufeff"


def normalise_newlines(text: str) -> str:
    """`\r\n` and a lone `\r` read as `\n`, as Python's universal newlines do, and a leading
    byte-order mark is dropped: every program text goes through here before it is parsed."""
    text = text.removeprefix(_BOM)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def source_from_text(text: str, filename: str = "<input>") -> Source:
    """A Source for program text from outside (a file's contents, `compile(text=...)`)."""
    return Source(normalise_newlines(text), filename)
