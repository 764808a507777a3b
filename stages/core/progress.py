"""Progress of long work as log lines with a bar and an ETA, one line per update, at most one
every `every` seconds (and always the last): readable in a terminal and in a log file alike,
where a redrawn bar would leave one line per redraw."""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time

BAR_WIDTH = 20


def eta(done: int, total: int, seconds: float) -> str:
    """Remaining time at the pace so far (done of total in seconds), as H:MM:SS; "?" before
    any progress."""
    if done >= total:
        return "0:00:00"
    if done <= 0:
        return "?"
    return str(dt.timedelta(seconds=round(seconds * (total - done) / done)))


class Progress:
    """`update(done, detail)` logs "<label>: [########            ] 40/97 steps (41%) <detail>,
    ETA 0:01:10". The first update sets the pace's starting point and logs nothing (unless the
    work is complete), so a resumed run's ETA counts only the work done since it resumed. Safe
    to call from several threads."""

    def __init__(
        self, label: str, total: int, unit: str, logger: logging.Logger | logging.LoggerAdapter, every: float = 10.0
    ):
        self.label, self.total, self.unit, self.logger, self.every = label, total, unit, logger, every
        self.lock = threading.Lock()
        self.start: tuple[int, float] | None = None  # (done, time) at the first update
        self.logged = 0.0
        self.done = 0

    def advance(self, detail: str = "") -> None:
        """One more unit done."""
        self.update(self.done + 1, detail)

    def update(self, done: int, detail: str = "") -> None:
        with self.lock:
            self.done = done
            now = time.monotonic()
            if self.start is None:
                self.start = (done, now)
                self.logged = now
                if done < self.total:
                    return
            if now - self.logged < self.every and done < self.total:
                return
            self.logged = now
            start_done, start_time = self.start
            fraction = done / self.total if self.total else 1.0
            self.logger.info(
                "%s: [%-*s] %d/%d %s (%.0f%%)%s, ETA %s",
                self.label,
                BAR_WIDTH,
                "#" * round(BAR_WIDTH * fraction),
                done,
                self.total,
                self.unit,
                100 * fraction,
                f" {detail}" if detail else "",
                eta(done - start_done, self.total - start_done, now - start_time),
            )
