"""Progress of a long read or of drawing: one line on stderr, rewritten in
place, only when asked for (a terminal, and no --no-progress)."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, what: str, enabled: bool) -> None:
        self.what = what
        self.enabled = enabled
        self._total = 0
        self._done = 0
        self._shown = -1

    def total(self, n: int) -> None:
        self._total = n

    def add(self, n: int) -> None:
        self._done += n
        if not self.enabled or not self._total:
            return
        percent = min(100, self._done * 100 // self._total)
        if percent != self._shown:
            self._shown = percent
            sys.stderr.write(f"\rotel-moe report: {self.what} {percent}%")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled and self._shown >= 0:
            sys.stderr.write("\n")
            sys.stderr.flush()
