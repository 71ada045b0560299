"""Program and config files read as Sources: at most MAX_SOURCE_BYTES, UTF-8 (with or without a BOM,
any newline convention), a file that is neither an E001 diagnostic."""

from __future__ import annotations

import os

from .diagnostics import PemError, error
from .source import Source, Span, normalise_newlines, source_from_text

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
        size = MAX_SOURCE_BYTES // (1024 * 1024)
        raise PemError([error(
            "E001", f"{name} is larger than {size} MiB: not a pemlang program or config", Source("", name),
            notes=[f"pemlang stopped reading after {MAX_SOURCE_BYTES} bytes"],
            hints=["give a .pem program or a YAML, JSON or TOML config; adapters are given as directories "
                   "inside the program"])])
    return decode_source(data, name)


def decode_source(data: bytes, filename: str) -> Source:
    """A file's bytes as a Source (see read_source)."""
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
