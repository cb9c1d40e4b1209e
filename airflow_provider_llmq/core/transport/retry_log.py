"""A retry in the log, traceable to its row: the row id, the attempt that failed, why (its code and
HTTP status, the server's message scrubbed) and how long the row waits.

The first retries of a client are logged at INFO, the rest at DEBUG: a quota episode retries
thousands of rows, and the progress lines already count them; one line says when the switch happens.
A 429 that the rate controller reads as a quota is logged like any other: its row still waits.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow_provider_llmq.core.endpoint.secrets import Scrubber

_log = logging.getLogger("airflow_provider_llmq.retries")

FIRST_AT_INFO = 20  # per client: enough to see a pattern, few enough not to bury the log
_MESSAGE_CHARS = 160
_ID_CHARS = 80


class RetryLog:
    """One line per retry, from any thread (a race on the counter only moves a line between INFO
    and DEBUG, so the hot path takes no lock).

    :param scrubber: the client's; the server's message may echo a header or a key.
    :param first_at_info: retries logged at INFO before the rest go to DEBUG.
    """

    def __init__(self, scrubber: Scrubber, first_at_info: int = FIRST_AT_INFO) -> None:
        self._scrubber = scrubber
        self._first_at_info = first_at_info
        self._count = 0

    def note(
        self, row_id: Any, attempt: int, code: str, http_status: int | None, message: str, wait: float | None
    ) -> None:
        """Row ``row_id``'s attempt ``attempt`` failed with ``code`` and is asked again after ``wait``
        seconds (None: when the pacer gives it a slot)."""
        self._count += 1
        n = self._count
        level = logging.INFO if n <= self._first_at_info else logging.DEBUG
        if not _log.isEnabledFor(level):
            return
        status = f", HTTP {http_status}" if http_status is not None else ""
        when = "when the pacer gives it a slot" if wait is None else f"in {wait:.2f} s"
        text = self._scrubber.text(" ".join(str(message).split()))
        if len(text) > _MESSAGE_CHARS:
            text = text[: _MESSAGE_CHARS - 1] + "…"
        _log.log(
            level,
            "llmq: row %s attempt %d failed (%s%s: %s); asking again %s",
            _short(row_id),
            attempt,
            code,
            status,
            text,
            when,
        )
        if n == self._first_at_info:
            _log.info("llmq: further retries are logged at DEBUG (the progress lines count them)")


def _short(row_id: Any) -> str:
    shown = repr(row_id) if not isinstance(row_id, str) else row_id
    return shown if len(shown) <= _ID_CHARS else shown[: _ID_CHARS - 1] + "…"
