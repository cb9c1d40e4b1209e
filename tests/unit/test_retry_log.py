"""The retry log names the row, the attempt, the reason and the wait; it hides secrets; after the
first retries it goes to DEBUG so a quota episode does not bury the task's log."""

from __future__ import annotations

import logging

import pytest

from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.transport.retry_log import RetryLog

LOGGER = "airflow_provider_llmq.retries"


def test_a_retry_names_its_row_attempt_reason_and_wait(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    RetryLog(Scrubber()).note("review-17", 2, "server_error", 503, "The server is\n busy", 0.4)
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    assert record.getMessage() == (
        "llmq: row review-17 attempt 2 failed (server_error, HTTP 503: The server is busy); "
        "asking again in 0.40 s"
    )


def test_a_wait_for_the_pacer_and_no_status_are_said_plainly(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    RetryLog(Scrubber()).note(42, 1, "connection_error", None, "reset by peer", None)
    expected = "row 42 attempt 1 failed (connection_error: reset by peer); asking again when the pacer"
    assert caplog.records[0].getMessage().endswith(expected + " gives it a slot")


def test_the_servers_message_is_scrubbed_and_cut(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    key = "sk-very-secret-key-1234"
    RetryLog(Scrubber([key])).note("r", 1, "unauthorized", 401, f"bad key {key} " + "x" * 500, 1.0)
    message = caplog.records[0].getMessage()
    assert key not in message and "***" in message
    assert len(message) < 300


def test_after_the_first_retries_the_rest_go_to_debug(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    log = RetryLog(Scrubber(), first_at_info=3)
    for attempt in range(1, 6):
        log.note("row", attempt, "rate_limited", 429, "slow down", 0.1)
    levels = [(r.levelno, r.getMessage().split(" ")[1]) for r in caplog.records]
    assert [lvl for lvl, _ in levels] == [logging.INFO] * 4 + [logging.DEBUG] * 2
    assert "further retries are logged at DEBUG" in caplog.records[3].getMessage()


def test_a_long_row_id_is_shortened(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    RetryLog(Scrubber()).note(["k" * 30, "m" * 30, "n" * 30], 1, "timeout", None, "read timed out", 0.2)
    shown = caplog.records[0].getMessage().split(" attempt ")[0]
    assert shown.endswith("…") and len(shown) < 100
