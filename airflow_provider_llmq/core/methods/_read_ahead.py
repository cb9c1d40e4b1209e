"""What the methods share around their workers: the bounded read-ahead window, the hand-back queue
and the message that ends a run."""

from __future__ import annotations

import itertools
import queue
from collections.abc import Iterable
from typing import Any, TypeVar

Item = tuple[Any, Any]
T = TypeVar("T")


class Failed:
    """A worker hit an error that ends the run (auth, config, a bug): the caller re-raises it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class ReadAhead:
    """Pulls rows from the caller's iterable only while fewer than ``window`` are unanswered, so
    memory is bounded by the window whatever the row count.

    :param rows: the ``(row_id, prompt)`` pairs, pulled lazily.
    :param window: rows handed to the workers and not yet answered, at most.
    """

    def __init__(self, rows: Iterable[Item], window: int) -> None:
        self._source = iter(rows)
        self.window = window
        self.unanswered = 0
        self.exhausted = False

    def take(self) -> list[Item]:
        """The next rows to hand over (possibly none); sets ``exhausted`` when the rows ran out."""
        if self.exhausted or self.unanswered >= self.window:
            return []
        wanted = self.window - self.unanswered
        items = list(itertools.islice(self._source, wanted))
        self.unanswered += len(items)
        self.exhausted = len(items) < wanted
        return items

    def answered(self) -> None:
        self.unanswered -= 1

    @property
    def finished(self) -> bool:
        return self.exhausted and self.unanswered == 0


def drain(inbox: queue.SimpleQueue[T]) -> list[T]:
    """Waits for one message, then takes every message already there: the two threads meet once
    per burst of results, not once per row."""
    burst = [inbox.get()]
    while True:
        try:
            burst.append(inbox.get_nowait())
        except queue.Empty:
            return burst
