"""The progress line's wording: the same counts as the XCom summary (errors by code, retries, 429s)."""

from __future__ import annotations

from typing import Any

from airflow_provider_llmq.core.accounting.progress import Progress, Tally
from airflow_provider_llmq.core.accounting.result import STATUS_ERROR, STATUS_OK, QueryResult


class Log:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def info(self, msg: str, *args: Any) -> None:
        self.lines.append(msg % args)


def results() -> list[QueryResult]:
    return [
        QueryResult(1, "a", STATUS_OK, attempts=1),
        QueryResult(2, "b", STATUS_OK, attempts=4, throttled=2),  # 2 x 429 and one retry
        QueryResult(3, None, STATUS_ERROR, "server_error", "500", attempts=3),
        QueryResult(4, None, STATUS_ERROR, "timeout", "t", attempts=2, throttled=1),
        QueryResult(5, None, STATUS_ERROR, "server_error", "500", attempts=3),
    ]


def test_a_tally_counts_errors_by_code_retries_and_429s_apart() -> None:
    tally = Tally.of(results())
    assert dict(tally.errors_by_code) == {"server_error": 2, "timeout": 1}
    assert tally.throttled == 3
    assert tally.retries == 0 + 1 + 2 + 0 + 2  # attempts - 1 - 429s


def test_outcomes_add_up_to_what_was_settled() -> None:
    """Answered, failed (asked, in error), skipped (nothing to ask), not sent (held back)."""
    tally = Tally.of(
        [
            *results(),
            QueryResult(7, None, STATUS_ERROR, "empty_prompt", "null", attempts=0),
            QueryResult(8, None, STATUS_ERROR, "budget_exceeded", "not sent", attempts=0),
            QueryResult(9, "c", STATUS_OK, attempts=0, cached=True),  # a cache hit is answered
        ]
    )
    assert dict(tally.outcomes) == {"answered": 3, "failed": 3, "skipped": 1, "not_sent": 1}


def test_the_line_reads_done_total_rate_eta_errors_retries_and_429s() -> None:
    log = Log()
    progress = Progress(log, total=10, interval=3600)
    for result in results():
        progress.settled(result)
    assert log.lines == []  # not yet due, not the last request
    elsewhere = Tally.of([QueryResult(6, None, STATUS_ERROR, "timeout", "t", attempts=1, throttled=0)])
    progress.add(5, elsewhere)  # a Spark job's settled requests
    [line] = log.lines
    assert line.startswith("llmq progress: 10/10 requests (100%), "), line
    assert (
        " requests/s, ETA 0 s; answered 2, failed 4, skipped 0, not sent 0; errors 4 (server_error 2, "
        "timeout 2); 5 retries; 3 throttled (429)"
    ) in line
    assert "rate " not in line  # no client watched in this process


def test_a_stalled_start_has_no_eta() -> None:
    progress = Progress(Log(), total=5, interval=3600)
    assert "ETA unknown" in progress.line()


def test_the_clock_starts_at_the_first_settled_request(monkeypatch: Any) -> None:
    now = [100.0]
    monkeypatch.setattr("airflow_provider_llmq.core.accounting.progress.time.monotonic", lambda: now[0])
    log = Log()
    progress = Progress(log, total=100, interval=10)
    now[0] = 160.0  # a minute of Spark start-up before the first answer
    progress.add(1)
    assert log.lines == []  # the first line comes an interval after the first answer, not at once
    now[0] = 170.0
    progress.add(49)
    [line] = log.lines
    assert "50/100 requests (50%), 5.0 requests/s, ETA 10 s" in line, line
