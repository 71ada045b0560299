"""Numbers and text as people read them in tables and messages: byte sizes, runs of block indices,
control characters made visible."""

from __future__ import annotations

from collections.abc import Iterable


def human_bytes(n: int) -> str:
    """1536 → '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError


def compact_indices(indices: Iterable[int]) -> str:
    """[0, 1, 2, 3, 7] → '0-3,7'."""
    values = sorted(set(indices))
    runs: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(runs)


def visible(text: str, *, keep: str = "") -> str:
    """`text` safe to print on a terminal as it is: control characters (C0, DEL, C1, the line and
    paragraph separators; all but those in `keep`) shown as Python writes them (`\\x1b`, `\\r`,
    `\\u2028`), never sent raw."""
    return "".join(repr(c)[1:-1] if _is_control(c) and c not in keep else c for c in text)


def _is_control(c: str) -> bool:
    code = ord(c)
    return code < 32 or 127 <= code < 160 or c in "\u2028\u2029"


def share_text(share: float) -> str:
    """A share of ‖ΔW‖² as a percentage: 0.1234 → '12.3%', 2e-7 → '2.0e-05%', 0 → '0%'."""
    percent = 100 * share
    if percent == 0:
        return "0%"
    return f"{percent:.1e}%" if percent < 0.01 else f"{percent:.3g}%"


def dropped_text(call: str, layers: int, largest: float, mean: float) -> str:
    """What one svd call dropped, in words: 'svd(a, rank=4) dropped 12.3% of ‖ΔW‖² at most, 8.1% on
    average over 8 layers'."""
    call = " ".join(call.split())
    call = call if len(call) <= 48 else call[:47] + "…"
    over = f"over {layers} layer{'s' if layers != 1 else ''}"
    if largest < 1e-12:  # nothing but rounding (a rank at or above the argument's)
        return f"{call} dropped nothing of ‖ΔW‖² {over}"
    return f"{call} dropped {share_text(largest)} of ‖ΔW‖² at most, {share_text(mean)} on average {over}"


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
MAX_SIZE = 2**63 - 1  # a safetensors offset is a u64; a file system's largest file is below this


def parse_size(text: object) -> int:
    """A size as transformers' `max_shard_size` takes it: a whole number of bytes, or a number with a
    unit (`2GB` = 2·10⁹ bytes, `500MB`, `1.5GiB` = 1.5·2³⁰, `100KB`), case-insensitive. ValueError
    for anything else, for 0 or less, or above 2⁶³ − 1 bytes."""
    import re
    from decimal import Decimal, InvalidOperation

    if isinstance(text, bool) or not isinstance(text, int | str):
        raise ValueError(f"a size is a number of bytes or a text like 2GB or 500MB, not {text!r}")
    match = re.fullmatch(r"\s*(\d{1,30}(?:\.\d{1,30})?)\s*([kmgt]i?b|b)?\s*", str(text), flags=re.I)
    if match is None:
        raise ValueError(f"{str(text)!r} is not a size: give a number of bytes or a number with a unit "
                         "(2GB, 500MB, 1.5GiB, 100KB)")
    try:
        size = int(Decimal(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])
    except InvalidOperation:  # pragma: no cover - the pattern admits only decimal numbers
        raise ValueError(f"{str(text)!r} is not a size") from None
    if size < 1:
        raise ValueError(f"{str(text)!r} is less than one byte: a size must be at least 1 byte")
    if size > MAX_SIZE:
        raise ValueError(f"{str(text)!r} is larger than any file can be (at most {MAX_SIZE} bytes)")
    return size
