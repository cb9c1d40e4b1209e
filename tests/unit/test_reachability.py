"""A server that never answers is told apart from one that had a blip, without a network."""

from __future__ import annotations

import pytest

from airflow_provider_llmq.core.errors import LLMQueryUnreachableError
from airflow_provider_llmq.core.pacing.reachability import Reachability


def test_connection_failures_for_seconds_with_no_answer_end_the_run() -> None:
    reach = Reachability("https://llm.example:8443/v1/chat/completions", give_up_after=5.0, min_failures=3)
    reach.on_connection_failure(0.0, "Connection refused")
    reach.on_connection_failure(4.9, "Connection refused")
    reach.on_connection_failure(4.95, "Connection refused")  # three, but under 5 s: no verdict yet
    with pytest.raises(LLMQueryUnreachableError, match=r"llm.example:8443.*4 requests over 5 s.*refused"):
        reach.on_connection_failure(5.0, "Connection refused")


def test_many_failures_in_an_instant_are_no_verdict() -> None:
    reach = Reachability("https://h/v1", give_up_after=5.0, min_failures=3)
    for _ in range(500):  # 500 rows refused at once: one moment, not a pattern
        reach.on_connection_failure(1.0, "Connection refused")


def test_once_the_endpoint_answered_an_outage_is_row_errors() -> None:
    reach = Reachability("https://h/v1", give_up_after=5.0, min_failures=3)
    reach.on_response()
    for second in range(60):
        reach.on_connection_failure(float(second), "Connection reset by peer")
    assert reach.reached
