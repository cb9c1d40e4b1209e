"""What the methods share around their workers: the bounded read-ahead window, the hand-back queue,
the message that ends a run, and the stream of results they return."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Callable, Generator, Iterable, Iterator
from typing import Any, TypeVar

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.pacing.adaptive import AdaptiveStats
from airflow_provider_llmq.core.packing import PackStats

Item = tuple[Any, Any]
T = TypeVar("T")


class Failed:
    """A worker hit an error that ends the run (auth, config, a bug): the caller re-raises it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReadAhead:
    """Pulls rows from the caller's iterable only while fewer than ``window`` are unanswered, so
    memory is bounded by the window whatever the row count.

    :param rows: the ``(row_id, prompt)`` pairs, or packs of them, pulled lazily.
    :param window: rows handed to the workers and not yet answered, at most.
    """

    def __init__(self, rows: Iterable[Any], window: int) -> None:
        self._source = iter(rows)
        self.window = window
        self.unanswered = 0
        self.exhausted = False

    def take(self) -> list[Any]:
        """The next rows to hand over (possibly none); sets ``exhausted`` when the rows ran out."""
        if self.exhausted or self.unanswered >= self.window:
            return []
        wanted = self.window - self.unanswered
        items = list(itertools.islice(self._source, wanted))
        self.unanswered += len(items)
        self.exhausted = len(items) < wanted
        return items

    @property
    def finished(self) -> bool:
        return self.exhausted and self.unanswered == 0

    def results(self, burst: Iterable[Any]) -> Generator[QueryResult, None, Any]:
        """Yields the results of a burst of messages (a pack's rows one by one), counting each answered.

        Returns the first message that is no result (a :class:`Failed`, a method's own end marker), for
        the caller to act on; the messages after it are not read. None when the burst held only results.
        """
        for message in burst:
            if not isinstance(message, (QueryResult, list)):
                return message
            self.unanswered -= 1
            if isinstance(message, list):  # a pack's rows
                yield from message
            else:
                yield message
        return None


def drain(inbox: queue.SimpleQueue[T]) -> list[T]:
    """Waits for one message, then takes every message already there: the two threads meet once
    per burst of results, not once per row."""
    burst = [inbox.get()]
    while True:
        try:
            burst.append(inbox.get_nowait())
        except queue.Empty:
            return burst


class QueryStream(Iterator[QueryResult]):
    """A method's results as they come, plus :meth:`stats` of the client asking: the admitted rate,
    the 429s so far and the time paused, for a progress line (``Progress.watch(stream.stats)``).

    :param results: the method's lazy iterator; :meth:`close` closes it (stops the workers).
    :param stats: reads the client's adaptive rate.
    """

    def __init__(self, results: Iterator[QueryResult], stats: Callable[[], AdaptiveStats]) -> None:
        self._results = results
        self.stats = stats
        #: what packing did (packs, rows answered from packs, tokens saved); None without packing
        self.packing: PackStats | None = None

    def __iter__(self) -> QueryStream:
        return self

    def __next__(self) -> QueryResult:
        return next(self._results)

    def close(self) -> None:
        close = getattr(self._results, "close", None)
        if close is not None:
            close()
