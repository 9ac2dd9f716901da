"""The one progress display of the command line (``calibrate`` and ``run``).

On a terminal it rewrites one line (``\\r``) at most every 0.1 s; on a pipe or a file it logs
a line at most every ``log_every_s`` seconds and at the end. ``quiet`` silences it.
"""

import sys
import time
from typing import Any, Optional

__all__ = ["Progress"]


class Progress:
    """A one-line counter: ``label: done/total (pct%) seconds note``.

    Args:
        label: what is counted (``"calibrate"``, ``"torchdefects run"``).
        total: how many items.
        quiet: print nothing.
        stream: where to write (default ``sys.stderr``).
        log_every_s: seconds between log lines when ``stream`` is not a terminal.
        tty: force terminal (``True``) or log (``False``) style; ``None`` asks the stream.
    """

    def __init__(
        self,
        label: str,
        total: int,
        quiet: bool = False,
        stream: Any = None,
        log_every_s: float = 10.0,
        tty: Optional[bool] = None,
    ) -> None:
        self.label = label
        self.total = total
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.log_every_s = log_every_s
        self.start = time.monotonic()
        self._last = self.start
        self.done = 0

    def update(self, done: int, note: str = "") -> None:
        """Set the count to ``done`` (absolute) and maybe print."""
        self.done = done
        if self.quiet:
            return
        now = time.monotonic()
        final = done >= self.total
        if self.tty:
            if final or now - self._last >= 0.1:
                self._last = now
                self.stream.write(f"\r{self._line(now, note)}\x1b[K")
                self.stream.flush()
        elif final or now - self._last >= self.log_every_s:
            self._last = now
            self.stream.write(self._line(now, note) + "\n")
            self.stream.flush()

    def close(self) -> None:
        """End the terminal line."""
        if not self.quiet and self.tty:
            self.stream.write("\n")
            self.stream.flush()

    def _line(self, now: float, note: str) -> str:
        pct = 100.0 * self.done / self.total if self.total else 100.0
        line = f"{self.label}: {self.done}/{self.total} ({pct:.0f}%) {now - self.start:.1f}s"
        return line + (f" {note}" if note else "")
