"""Source text and spans: where a piece of a program came from, as line and column."""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass, field

# Files that carry a program inside a config block (SPEC §7), rather than a .pem program.
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


# No program or config is this large; a file that is (a binary, /dev/zero given by mistake) is
# refused after reading this many bytes, rather than read whole into memory.
MAX_SOURCE_BYTES = 16 * 1024 * 1024
SHOWN_AFTER_BAD_BYTE = 200  # bytes of the rest of the line shown after an invalid UTF-8 sequence


def read_source(path: str | os.PathLike[str], filename: str | None = None) -> Source:
    """Read a program or config file as UTF-8 (a BOM is accepted; any newline convention).

    At most MAX_SOURCE_BYTES are read, from a regular file or not (a pipe, a device): a larger
    file raises PemError with an E001 diagnostic, as does invalid UTF-8 (at the first bad byte).
    OSErrors (a missing file, a directory) propagate for the caller to word."""
    name = filename if filename is not None else os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(MAX_SOURCE_BYTES + 1)
    if len(data) > MAX_SOURCE_BYTES:
        from .diagnostics import PemError, error

        size = MAX_SOURCE_BYTES // (1024 * 1024)
        raise PemError([error(
            "E001", f"{name} is larger than {size} MiB: not a pemlang program or config", Source("", name),
            notes=[f"pemlang stopped reading after {MAX_SOURCE_BYTES} bytes"],
            hints=["give a .pem program or a YAML, JSON or TOML config; adapters are given as directories "
                   "inside the program"])])
    return decode_source(data, name)


def decode_source(data: bytes, filename: str) -> Source:
    """A file's bytes as a Source (see read_source)."""
    from .diagnostics import PemError, error

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        prefix = data[: exc.start].decode("utf-8")
        # Only the rest of the bad line is shown: the bytes after it are not decoded at all.
        rest = data[exc.start : exc.start + SHOWN_AFTER_BAD_BYTE].split(b"\n", 1)[0]
        shown = source_from_text(prefix + rest.decode("utf-8", errors="replace"), filename)
        offset = len(normalise_newlines(prefix))
        bad = data[exc.start : exc.end]
        raise PemError([error(
            "E001", "this file is not valid UTF-8", shown, Span(offset, offset + 1),
            notes=[f"byte {', '.join(f'0x{b:02x}' for b in bad)} at byte offset {exc.start} ({exc.reason})"],
            hints=["save the file as UTF-8"])]) from None
    return source_from_text(text, filename)
