"""Progress for long steps: a small bar on stderr (a line per 10% when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time
from typing import Callable

ProgressFn = Callable[[int, int], None]


class Bar:
    def __init__(self, label: str, enabled: bool = True, stream=None):
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()
        self._last_decile = -1

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or total <= 0:
            return
        frac = min(done / total, 1.0)
        elapsed = time.monotonic() - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        if self.tty:
            n = int(frac * 30)
            self.stream.write(f"\r{self.label} [{'#' * n}{'.' * (30 - n)}] {done}/{total} "
                              f"{elapsed:5.1f}s, ~{eta:4.0f}s left ")
            if done >= total:
                self.stream.write("\n")
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(f"{self.label}: {int(frac * 100)}% ({done}/{total}, {elapsed:.1f}s)\n")
                self.stream.flush()


def bar(label: str, enabled: bool = True) -> ProgressFn | None:
    return Bar(label) if enabled else None
