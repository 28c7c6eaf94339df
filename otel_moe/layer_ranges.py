"""The layer-range syntax every part speaks: '0-2,5' <-> {0, 1, 2, 5}, 'all' <-> None.
The flags, live control, the profiler range names and the report's --layers use it;
it depends on nothing of otel-moe's."""
from __future__ import annotations

import re
from typing import Optional

SYNTAX = "'all', a layer index like 0, a list like 0,12,23, a range like 0-5, or a mix"
# No model has more than a few thousand layers: a selection past this is a typo (or an
# attack on the memory of whatever would expand it), refused before it is built.
MAX_LAYER = 4095
_ASCII_NUMBER = re.compile(r"[0-9]{1,18}")  # int() would take "1_000", "+1" and full-width digits


class RangeError(ValueError):
    """``str(err)`` says what is allowed."""


def parse_ranges(text: str) -> Optional[frozenset[int]]:
    """'0-2,5' -> {0, 1, 2, 5}; '' or 'all' -> None (every layer)."""
    text = text.strip()
    if text == "" or text.lower() == "all":
        return None
    layers: set[int] = set()
    for part in text.split(","):
        lo, sep, hi = (p.strip() for p in part.strip().partition("-"))
        if not _ASCII_NUMBER.fullmatch(lo) or (sep and not _ASCII_NUMBER.fullmatch(hi)):
            raise RangeError(SYNTAX)
        first = int(lo)
        last = int(hi) if sep else first
        if last < first:
            raise RangeError(SYNTAX)
        if last > MAX_LAYER:
            raise RangeError(f"layer indices up to {MAX_LAYER}")
        layers.update(range(first, last + 1))
    return frozenset(layers)


def format_ranges(values: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the inverse of parse_ranges)."""
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)
