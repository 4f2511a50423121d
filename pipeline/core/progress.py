"""Progress of a long operator command (backfill, replay) on stderr, with rate and ETA.

On a terminal one line is rewritten in place, at most a few times a second::

    replay cloudtalk.calls.raw: 41% 20,480/50,000 offsets · 3,912 records/s · ETA 0:07

Anywhere else (a log file, CI, a pipe) it writes a plain line every ``every_s`` seconds and one
at the end, so the output stays readable and small. Results stay on stdout; this never writes
there.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``7s``, ``1:05``, ``2:03:04``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _number(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 or float(value).is_integer() else f"{value:,.1f}"


class Progress:
    """``update(done, total=…, items=…)`` as work goes on, ``close()`` at the end.

    ``done``/``total`` measure how far the work is (offsets, pages, seconds of a window) and give the
    percentage and the ETA; ``items`` is what is counted for the rate (records, calls) — ``done``
    when not given.
    """

    def __init__(
        self,
        what: str,
        *,
        unit: str = "records",
        items_unit: str | None = None,
        rate_unit: str | None = None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        every_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.unit, self.items_unit = what, unit, items_unit or unit
        self.rate_unit = rate_unit or self.items_unit
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty())
        self.tty = tty
        self.every_s = every_s if every_s is not None else (0.2 if tty else 10.0)
        self.clock = clock
        self.started = clock()
        # a terminal shows the first update at once; a log gets its first line after every_s
        self._last_shown: float | None = None if tty else self.started
        self._width = 0
        self.done = 0.0
        self.total: float | None = None
        self.items = 0.0
        self.note = ""

    # -- measuring --------------------------------------------------------------------------------
    def update(self, done: float, *, total: float | None = None, items: float | None = None, note: str = "") -> None:
        self.done = done
        if total is not None:
            self.total = total
        self.items = done if items is None else items
        if note:
            self.note = note
        now = self.clock()
        if self._last_shown is None or now - self._last_shown >= self.every_s:
            self._show(now)

    def rate(self, now: float | None = None) -> float:
        elapsed = (self.clock() if now is None else now) - self.started
        return self.items / elapsed if elapsed > 0 else 0.0

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the pace so far; None without a total or before any progress."""
        if not self.total or self.done <= 0:
            return None
        elapsed = (self.clock() if now is None else now) - self.started
        return max(0.0, elapsed / self.done * (self.total - self.done))

    def line(self, now: float | None = None, final: bool = False) -> str:
        now = self.clock() if now is None else now
        parts = []
        if self.total:
            pct = min(100.0, 100.0 * self.done / self.total)
            parts.append(f"{pct:.0f}% {_number(self.done)}/{_number(self.total)} {self.unit}")
        else:
            parts.append(f"{_number(self.done)} {self.unit}")
        if self.items_unit != self.unit:
            parts.append(f"{_number(self.items)} {self.items_unit}")
        parts.append(f"{_number(self.rate(now))} {self.rate_unit}/s")
        if final:
            parts.append(f"in {format_duration(now - self.started)}")
        else:
            eta = self.eta(now)
            if eta is not None:
                parts.append(f"ETA {format_duration(eta)}")
        if self.note:
            parts.append(self.note)
        return f"{self.what}: " + " · ".join(parts)

    # -- showing ----------------------------------------------------------------------------------
    def _show(self, now: float, final: bool = False) -> None:
        self._last_shown = now
        text = self.line(now, final=final)
        if self.tty:
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, note: str = "") -> None:
        """The last line: totals and the time it took."""
        if note:
            self.note = note
        self._show(self.clock(), final=True)
