"""How the learned rate reaches the pacer: its rate, its pauses, and when not to pace at all.

The controller (:mod:`.adaptive`) decides the rate; :class:`PacerLink` hands it to the client's
:class:`~.limits.Pacer` and keeps the account of pauses:

- **Small steps up are batched**: every rate given to the pacer re-anchors its schedule, so a rise
  under 1 % waits for the next; every cut (and any push the controller forces) goes at once.
- **Paced wherever a quota may be near; unpaced at the start while nothing refused.** Pacing
  evenly at the workers' own rate (``max_concurrency / latency``) costs the event loop a wake-up per
  request and the clean run 0.02-0.03 of the limit (a no-burst pacer loses every slot a late answer
  leaves idle). So a slow start that reaches that rate before anything refused hands the pacer
  ``None`` (unlimited) and the concurrency alone bounds the client, as a bare client's semaphore does
  (:class:`~.adaptive.AdaptiveRate`, simulated clean run at 200 ms 0.861 -> 0.888 of the limit). The
  first refusal or rate header paces it again, for good: once a quota may be near, the old finding
  holds (over real sockets on a loaded machine a latency measured high made a 200/s quota look
  concurrency-bound, and unpaced bursts drew 18-22 % 429s around its drop).
- **Pauses** (retry hints with quota evidence, an exhausted Azure window) extend, never shorten, and
  are counted once however they overlap.

Not thread-safe: the controller holds its lock around every call (the pacer's own lock is taken
inside it).
"""

from __future__ import annotations

import math

from airflow_provider_llmq.core.pacing.limits import Pacer

__all__ = ["PacerLink"]


class PacerLink:
    """The pacer one controller drives (none until :meth:`bind`), and the pauses it was given."""

    def __init__(self) -> None:
        self._pacer: Pacer | None = None
        self.pushed: float | None = None  # requests/s last given to the pacer (None: unlimited)
        self.pause_end = -math.inf
        self._paused_total = 0.0

    def bind(self, pacer: Pacer, rate: float | None, fixed: bool) -> None:
        """Drive ``pacer`` from now on, starting at ``rate``; ``fixed``: the rate never changes."""
        self._pacer = pacer
        if fixed and pacer.requests_per_minute == (None if rate is None else rate * 60):
            self.pushed = rate  # already right, and it will never change
            return
        self.pushed = math.nan  # forces the first push
        self.push(rate, force=True)

    def push(self, rate: float | None, force: bool = False) -> None:
        """Give the pacer ``rate`` requests/s (None: unlimited)."""
        pacer, pushed = self._pacer, self.pushed
        if pacer is None:
            return
        if rate is None:
            if pushed is not None:
                pacer.set_requests_per_minute(None)
                self.pushed = None
            return
        if force or pushed is None or math.isnan(pushed) or rate < pushed or rate > pushed * 1.01:
            pacer.set_requests_per_minute(rate * 60.0)
            self.pushed = rate

    def pause(self, now: float, deadline: float) -> None:
        """Admit nothing before ``deadline``; a pause that ends sooner than the current one is void."""
        start = max(now, self.pause_end)
        if deadline <= start:
            return
        self._paused_total += deadline - start
        self.pause_end = deadline
        if self._pacer is not None:
            self._pacer.pause_until(deadline)

    def paused_seconds(self, now: float) -> float:
        """Seconds paused so far (the pause under way up to ``now``)."""
        return self._paused_total - max(0.0, self.pause_end - now)
