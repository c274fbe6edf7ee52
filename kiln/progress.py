"""A progress bar for long work on a terminal; silent in CI, pipes and logs."""
from __future__ import annotations

import os
import sys
import time


def interactive() -> bool:
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("KILN_PROGRESS", "1") != "0"


class Progress:
    """`with Progress("build", total=4) as bar: bar.advance("parse")` draws `build [####....] 2/4 parse`."""

    def __init__(self, title: str, total: int, enabled: bool | None = None):
        self.title, self.total, self.done = title, max(total, 1), 0
        self.enabled = interactive() if enabled is None else enabled
        self.start = time.perf_counter()
        self.label = ""

    def __enter__(self) -> "Progress":
        self._draw()
        return self

    def advance(self, label: str = "", steps: int = 1) -> None:
        self.done = min(self.total, self.done + steps)
        self.label = label
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = 30
        filled = int(width * self.done / self.total)
        elapsed = time.perf_counter() - self.start
        line = f"\r{self.title} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {elapsed:5.1f}s {self.label[:40]:<40}"
        sys.stderr.write(line)
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()
