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
