"""Progress lines at a steady interval, not once per row."""

from __future__ import annotations

import time
from typing import Any, Protocol


class _Log(Protocol):
    def info(self, msg: Any, /, *args: Any) -> Any: ...


class Progress:
    """Counts settled requests and logs done/total, rate and ETA every ``interval`` seconds.

    :param log: where the lines go (the operator's task logger).
    :param total: requests this try has to settle.
    :param interval: seconds between lines; the last request always logs one.
    """

    def __init__(self, log: _Log, total: int, interval: float) -> None:
        self.log, self.total, self.interval = log, total, interval
        self.done = 0
        self.started = self.last = time.monotonic()

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            elapsed = max(now - self.started, 1e-9)
            rate = self.done / elapsed
            eta = (self.total - self.done) / rate if rate else float("inf")
            self.log.info(
                "llmq progress: %d/%d requests (%.0f%%), %.1f rows/s, ETA %.0f s",
                self.done,
                self.total,
                100.0 * self.done / max(self.total, 1),
                rate,
                eta,
            )
