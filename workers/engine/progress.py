"""A progress bar for model evaluations on stderr: count, percentage, rate and ETA."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Call :meth:`update` with each batch's evaluation count; :meth:`close` prints the final line.

    On a terminal the line is redrawn in place at most ten times a second; elsewhere (logs, pipes)
    only the final line is written, so logs are not flooded.
    """

    def __init__(self, total: int, label: str = "evaluations", stream: TextIO | None = None) -> None:
        self.total = max(0, int(total))
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.note = ""

    def retarget(self, total: int, note: str = "") -> None:
        """A run that stops on precision moves its total to the projected evaluations after each
        round; ``note`` (the achieved precision against the target) is shown after the count."""
        self.total = max(self.done, int(total))
        self.note = note

    def update(self, n: int) -> None:
        self.done += int(n)
        now = time.monotonic()
        if self._interactive and now - self._last_draw >= 0.1:
            self._last_draw = now
            self.stream.write("\r" + self.line(now))
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (now or time.monotonic()) - self.started)
        rate = self.done / elapsed
        percent = 100.0 * self.done / self.total if self.total else 100.0
        width = 24
        filled = int(width * min(1.0, percent / 100))
        eta = (self.total - self.done) / rate if rate > 0 and self.total > self.done else 0.0
        note = f" {self.note}" if self.note else ""
        return (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"({percent:5.1f}%){note} {rate:8.1f}/s ETA {eta:5.1f}s")

    def close(self) -> None:
        self.stream.write(("\r" if self._interactive else "") + self.line() + "\n")
        self.stream.flush()


def precision_note(precision: dict) -> str:
    """How far a target run is after its last round, e.g. ``std 0.012 > 0.005`` (std, target)."""
    kind = "std" if "target_std" in precision else "error"
    target = precision.get("target_std", precision.get("target_error"))
    achieved = precision.get("precision")
    shown = "?" if achieved is None else f"{achieved:.3g}"
    return f"{kind} {shown} {'<=' if achieved is not None and achieved <= target else '>'} {target:g}"
