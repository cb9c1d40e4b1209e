"""Where a task's time went: seconds per phase of ``execute``, adding up to its wall time.

The operator times each step of its plan and the placements time what happens inside asking
(the driver's checkpoint flushes); a phase timed inside another is reported apart and taken out of
it, so the phases never count a second twice. Whatever no phase covered is ``other``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# the order of the summary and the log line: the plan's order
# spark_start: the session; materialize: the source read, its prompts rendered and written under the
# checkpoint; plan: the pending requests counted; cache: hits copied in, answers added; ask: the
# placement, without the driver's checkpoint flushes (flush) and, on the Batch API, without writing
# its request files (request_files), uploading them (upload) and reading its answers back (collect),
# so that its ask is the wait for the batches; write: the join with the results and the write (one
# Spark job); summary: the counts read back from the output and the result files
ORDER = (
    "spark_start", "materialize", "plan", "cache", "ask", "flush",
    "request_files", "upload", "collect", "write", "summary",
)  # fmt: skip


class Phases:
    """Seconds per phase since it was made; safe to feed from several threads."""

    def __init__(self) -> None:
        self.started = self._last = time.monotonic()
        self._seconds: dict[str, float] = {}
        self._inner: dict[str, float] = {}  # seconds of nested phases, taken out of their parent
        self._lock = threading.Lock()

    @contextmanager
    def __call__(self, name: str, *, within: str | None = None) -> Iterator[None]:
        """Times the block as ``name``; ``within``: the phase this block runs inside of."""
        begun = time.monotonic()
        try:
            yield
        finally:
            self.add(name, time.monotonic() - begun, within=within)

    def lap(self, name: str) -> None:
        """Counts the time since the previous lap (or the start) as ``name``: one line after each
        step of a plan, without re-indenting it."""
        now = time.monotonic()
        with self._lock:
            begun, self._last = self._last, now
        self.add(name, now - begun)

    def add(self, name: str, seconds: float, *, within: str | None = None) -> None:
        with self._lock:
            self._seconds[name] = self._seconds.get(name, 0.0) + seconds
            if within is not None:
                self._inner[within] = self._inner.get(within, 0.0) + seconds

    def report(self, wall: float | None = None) -> dict[str, float]:
        """Seconds per phase (rounded to ms), nested ones apart, and ``other``: the rest of ``wall``
        (default: the time since this object was made)."""
        if wall is None:
            wall = time.monotonic() - self.started
        with self._lock:
            own = {name: max(0.0, s - self._inner.get(name, 0.0)) for name, s in self._seconds.items()}
        ordered = sorted(own, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
        found = {name: round(own[name], 3) for name in ordered}
        found["other"] = round(max(0.0, wall - sum(own.values())), 3)
        return found


def describe(phases: dict[str, float]) -> str:
    """The phases as one log line: ``spark_start 7.1 s (9 %), ...``."""
    total = sum(phases.values()) or 1.0
    return ", ".join(f"{name} {s:.1f} s ({100 * s / total:.0f} %)" for name, s in phases.items())
