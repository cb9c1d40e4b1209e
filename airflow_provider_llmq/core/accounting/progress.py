"""Progress lines at a steady interval, not once per row.

One wording, shared by the log lines, the XCom summary's keys and the README::

    llmq progress: 1200/2000 requests (60%), 96.3 requests/s, ETA 8 s; answered 1195, failed 3,
    skipped 2, not sent 0; errors 5 (server_error 2, empty_prompt 2, timeout 1); 5 retries;
    14 throttled (429); rate 98.0 requests/s (learned), paused 0.4 s
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.pacing.adaptive import AdaptiveStats
from airflow_provider_llmq.core.pacing.rate_model import SLOW_START
from airflow_provider_llmq.core.request.error_codes import EMPTY_PROMPT


class _Log(Protocol):
    def info(self, msg: Any, /, *args: Any) -> Any: ...


StatsSource = Callable[[], AdaptiveStats]
# how a progress line names the adaptive phase
_PHASES = {SLOW_START: "probing", "avoidance": "learned", "fixed": "fixed"}


#: what became of a row; the four add up to the rows (``answered + failed + skipped + not_sent``)
OUTCOMES = ("answered", "failed", "skipped", "not_sent")


def row_outcome(ok: bool, error_code: str | None, attempts: int | None) -> str:
    """One of :data:`OUTCOMES`: answered (a cache hit too), failed (asked, ended in error), skipped
    (a null or empty prompt: nothing to ask), not sent (the budget or the run's patience held it
    back, or no result: asked again by a later run)."""
    if ok:
        return "answered"
    if error_code == EMPTY_PROMPT:
        return "skipped"
    return "failed" if attempts else "not_sent"


@dataclass
class Tally:
    """What settled requests came to: the outcomes, errors by code, retries and 429s (the summary's
    keys ``errors_by_code``, ``retries`` and ``throttled``)."""

    errors_by_code: Counter[str] = field(default_factory=Counter)
    retries: int = 0
    throttled: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, results: Iterable[QueryResult]) -> Tally:
        tally = cls()
        for result in results:
            tally.count(result)
        return tally

    def count(self, result: QueryResult) -> None:
        self.count_row(result.ok, result.error_code, result.attempts, result.throttled)

    def count_row(
        self, ok: bool, error_code: str | None, attempts: int | None, throttled: int | None
    ) -> None:
        """One result given by its columns (a result file read back); nulls count as zero."""
        if not ok:
            self.errors_by_code[str(error_code)] += 1
        self.outcomes[row_outcome(ok, error_code, attempts)] += 1
        self.throttled += throttled or 0
        self.retries += max((attempts or 0) - 1 - (throttled or 0), 0)  # a 429 is no retry

    def add(self, other: Tally) -> None:
        self.errors_by_code.update(other.errors_by_code)
        self.outcomes.update(other.outcomes)
        self.retries += other.retries
        self.throttled += other.throttled


class Progress:
    """Counts settled requests and logs, every ``interval`` seconds: done/total, rate, ETA, errors by
    code, retries and 429s; with a :meth:`watch`-ed client, also the rate it admits and the time it
    spent paused.

    :param log: where the lines go (the operator's task logger).
    :param total: requests this try has to settle.
    :param interval: seconds between lines; the last request always logs one.
    """

    def __init__(self, log: _Log, total: int, interval: float) -> None:
        self.log, self.total, self.interval = log, total, interval
        self.done = 0
        self.tally = Tally()
        # the clock starts at the first settled request, not at creation: reading the pending rows
        # (a Spark job, a worker's start-up) would otherwise read as a slow rate and a huge ETA
        self.started: float | None = None
        self.last = 0.0
        self._stats: StatsSource | None = None

    def watch(self, stats: StatsSource | None) -> None:
        """Show what ``stats`` reads (a method's ``QueryStream.stats``) on every line from now on."""
        self._stats = stats

    def rate_stats(self) -> AdaptiveStats | None:
        """The watched client's adaptive rate now (None when nothing is watched: a placement whose
        clients live in other processes)."""
        return None if self._stats is None else self._stats()

    def settled(self, result: QueryResult) -> None:
        """One request settled in this process."""
        self.tally.count(result)
        self.add(1)

    def add(self, count: int, tally: Tally | None = None) -> None:
        """``count`` requests settled elsewhere (a Spark job), with what they came to if known."""
        if tally is not None:
            self.tally.add(tally)
        now = time.monotonic()
        if self.started is None:
            self.started = self.last = now
        self.done += count
        if now - self.last >= self.interval or self.done >= self.total:
            self.last = now
            self.log.info("llmq progress: %s", self.line(now))

    def line(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        elapsed = 0.0 if self.started is None else now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate else "unknown"
        percent = 100.0 * self.done / max(self.total, 1)
        parts = [f"{self.done}/{self.total} requests ({percent:.0f}%), {rate:.1f} requests/s, ETA {eta}"]
        if self.tally.outcomes:
            parts.append(
                ", ".join(f"{name.replace('_', ' ')} {self.tally.outcomes[name]}" for name in OUTCOMES)
            )
        parts.append(_errors(self.tally.errors_by_code))
        parts.append(f"{self.tally.retries} retries")
        parts.append(f"{self.tally.throttled} throttled (429)")
        if self._stats is not None:
            stats = self._stats()
            admitted = "unlimited" if stats.rate is None else f"{stats.rate:.1f} requests/s"
            phase = _PHASES.get(stats.phase, stats.phase)
            parts.append(f"rate {admitted} ({phase}), paused {stats.paused_seconds:.1f} s")
        return "; ".join(parts)


def _errors(by_code: Mapping[str, int]) -> str:
    total = sum(by_code.values())
    if not total:
        return "errors 0"
    codes = ", ".join(f"{code} {n}" for code, n in sorted(by_code.items(), key=lambda item: -item[1]))
    return f"errors {total} ({codes})"
