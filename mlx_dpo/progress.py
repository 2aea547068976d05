"""Progress of a long phase (tokenization, the reference pass, evaluation, generation, writing).

On a terminal: one bar redrawn in place, with count, rate and ETA. Elsewhere (a log file, CI):
one line every `every_s` seconds, so nothing runs silently for long. Only the main process
should report; pass `enabled=False` on the others.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """`with Progress("reference pass", total=n, unit="pairs") as p: ... p.update(k)`."""

    def __init__(
        self,
        label: str,
        total: int | None,
        *,
        unit: str = "pairs",
        out=None,
        interactive: bool | None = None,
        every_s: float = 5.0,
        enabled: bool = True,
    ):
        self.label, self.total, self.unit = label, total, unit
        self.out = out or sys.stderr
        self.interactive = self.out.isatty() if interactive is None else interactive
        self.every_s, self.enabled = every_s, enabled
        self.done = 0
        self.start = self.last_draw = time.perf_counter()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if not self.enabled:
            return
        if self.interactive:
            if now - self.last_draw >= 0.1 or self.done == self.total:
                self._write("\r\033[K" + self.line(now))
                self.last_draw = now
        elif now - self.last_draw >= self.every_s:
            self._write(self.line(now) + "\n")
            self.last_draw = now

    def line(self, now: float | None = None) -> str:
        """`label: 300/1215 pairs | 412.3 pairs/s | ETA 0:02` (total and ETA when known)."""
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        text = f"{self.label}: {count} {self.unit} | {rate:.1f} {self.unit}/s"
        if self.total and rate > 0:
            text += f" | ETA {_clock((self.total - self.done) / rate)}"
        return text

    def close(self) -> None:
        """Clear the bar on a terminal; the caller prints the phase's result line."""
        if self.enabled and self.interactive:
            self._write("\r\033[K")

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()
