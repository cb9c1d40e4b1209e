"""The adaptive limiter over real sockets: the mock server enforces a quota the client was not told.

Qualitative only (the figures live in benchmarks/): every row answered with its own answer, the 429
share bounded, the configured ceilings never exceeded, ``adaptive=False`` exactly the configured
rate, a 429 spending no retry. The old behaviour fails each of them: against a 100/s bucket it sent
94 % 429s and lost two thirds of the rows to ``max_retries``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.progress import Progress
from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.methods import QueryStream, query_async_limited, query_thread_pool
from airflow_provider_llmq.core.pacing.adaptive import AdaptiveStats
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.testing.mock_server import MockServer, expected_answer
from tests.conftest import DEPLOYMENT, make_endpoint

pytestmark = pytest.mark.timeout(120)
LATENCY_MS = 15
CONCURRENCY = 64
# what the rate-limited operator runs, and the thread pool
METHODS = {"async_limited": query_async_limited, "thread_pool": query_thread_pool}
# the quotas of issue 11, scaled down to a few seconds each
QUOTAS: dict[str, dict[str, Any]] = {
    "bucket_retry_after_ms": {"kind": "token_bucket", "rate": 150},
    "bucket_no_hint": {"kind": "token_bucket", "rate": 150, "retry_hint": "none"},
    "openai_headers": {"kind": "openai", "requests_per_minute": 9000},
    "azure_windows": {"kind": "azure", "requests_per_minute": 6000, "window": 1.0, "phase": 0.4},
    "cap_drops": {"kind": "schedule", "steps": [[0, 200], [1.5, 80]]},
}
# a short run's slow start overshoots once, into a burst of 429s that is a bigger part of 300 rows
# than of 2,000 (the benchmark's 2 %). Slow start ends on a share of refusals, not on the first one
# (refusal_evidence), so the burst is about one round trip longer: up to 12 % measured here on a
# loaded 2-core machine, 5-8 % with the drop 1.5 s in (16 % once in CI's load, where a slow start
# leaves more of the 300 rows after the drop); without the limiter it was over 90 %
MAX_429_SHARE = 0.2
MAX_429_SHARE_TOKENS = 0.25


def run(
    name: str, endpoint: EndpointConfig, rows: Iterable[tuple[Any, str]], **options: Any
) -> tuple[list[QueryResult], AdaptiveStats]:
    argument = "max_concurrency" if name == "async_limited" else "max_workers"
    stream = METHODS[name](endpoint, rows, **{argument: CONCURRENCY, **options})
    assert isinstance(stream, QueryStream)
    results = list(stream)
    return results, stream.stats()


def answer_for(prompt: str) -> str:
    return expected_answer(DEPLOYMENT, DEFAULT_SYSTEM_PROMPT, prompt, {})


def rows_for(tag: str, n: int) -> list[tuple[int, str]]:
    # mixed lengths: a tokens quota charges each by its size
    return [(i, f"{tag} row {i} " + "lorem ipsum " * (i * 7 % 40)) for i in range(n)]


def assert_every_row_answered(results: list[QueryResult], rows: list[tuple[int, str]]) -> None:
    prompts = dict(rows)
    assert sorted(r.row_id for r in results) == sorted(prompts)
    failed = [r for r in results if not r.ok]
    assert not failed, failed[:3]
    assert all(r.response == answer_for(prompts[r.row_id]) for r in results)


def share_429(server: MockServer) -> tuple[float, dict[str, Any]]:
    stats = server.stats()
    refused = stats["requests_by_status"].get("429", 0)
    return refused / max(1, stats["chat_requests"]), stats


@pytest.mark.parametrize("quota", list(QUOTAS))
@pytest.mark.parametrize("name", list(METHODS))
def test_a_quota_nobody_told_is_met_with_every_row_answered(
    name: str, quota: str, server: MockServer
) -> None:
    server.configure(latency_ms=LATENCY_MS, quota=QUOTAS[quota])
    rows = rows_for(f"{quota}/{name}", 300)
    results, stats = run(name, make_endpoint(server, "azure"), rows)
    assert_every_row_answered(results, rows)
    share, server_stats = share_429(server)
    assert share <= MAX_429_SHARE, (share, stats)
    # the client saw every 429 the server sent, and no request went unaccounted for
    assert stats.throttled == server_stats["requests_by_status"].get("429", 0)
    assert sum(r.attempts for r in results) == server_stats["chat_requests"]
    assert server_stats["max_in_flight"] <= CONCURRENCY


@pytest.mark.parametrize("name", list(METHODS))
def test_ceilings_are_never_exceeded_under_a_bigger_quota(name: str, server: MockServer) -> None:
    """requests_per_minute and max_concurrency stay ceilings: the server allows 300/s, the client
    was told 40/s and 4 in flight, and it never sends faster (one more where a second starts)."""
    server.configure(latency_ms=LATENCY_MS, quota={"kind": "token_bucket", "rate": 300})
    rows = rows_for(f"ceilings/{name}", 120)
    argument = "max_concurrency" if name == "async_limited" else "max_workers"
    stream = METHODS[name](make_endpoint(server, "openai"), rows, requests_per_minute=2400, **{argument: 4})
    results = list(stream)
    assert_every_row_answered(results, rows)
    stats = server.stats()
    assert stats["requests_by_status"].get("429", 0) == 0
    assert stats["max_in_flight"] <= 4
    assert stats["quota"]["max_admitted_per_second"] <= 40 + 1, stats["quota"]
    assert max(stats["per_second_counts"]) <= 40 + 1
    assert stream.stats().rate is not None and stream.stats().rate <= 40.0


def test_told_the_cap_exactly_it_keeps_it_with_no_429(server: MockServer) -> None:
    # a bucket of half a second: a loaded machine stalls the client's loop or the server's now and
    # then, and requests sent on time arrive together (the default tenth of a second refused them)
    server.configure(latency_ms=LATENCY_MS, quota={"kind": "token_bucket", "rate": 100, "burst": 50})
    rows = rows_for("told", 200)
    results, stats = run("async_limited", make_endpoint(server, "azure"), rows, requests_per_minute=6000)
    assert_every_row_answered(results, rows)
    assert server.stats()["requests_by_status"].get("429", 0) == 0
    # never cut below what it was told, nor grown past it
    assert stats.rate == pytest.approx(100.0) and stats.episodes == 0


@pytest.mark.parametrize("name", list(METHODS))
def test_not_adaptive_is_exactly_the_configured_rate(name: str, server: MockServer) -> None:
    """Above the quota, adaptive=False keeps sending at its rate through the 429s (rows wait out
    the hints); below it, the rate is exactly what was configured, not more."""
    server.configure(latency_ms=LATENCY_MS, quota={"kind": "token_bucket", "rate": 60})
    rows = rows_for(f"fixed-above/{name}", 120)
    results, stats = run(name, make_endpoint(server, "azure"), rows, requests_per_minute=6000, adaptive=False)
    assert_every_row_answered(results, rows)
    assert stats.phase == "fixed" and stats.rate == pytest.approx(100.0) and stats.episodes == 0
    assert stats.throttled > 0  # it did not slow down to the quota: the hints paced it
    assert stats.paused_seconds > 0

    server.reset()
    server.configure(quota=None)
    rows = rows_for(f"fixed-below/{name}", 100)
    results, stats = run(name, make_endpoint(server, "azure"), rows, requests_per_minute=3000, adaptive=False)
    assert_every_row_answered(results, rows)
    assert stats.rate == pytest.approx(50.0) and stats.phase == "fixed"
    # answers are counted per second as they come back: a stall on a loaded machine moves a few into
    # the next second (52 seen), where a client above its rate would show 60 and more
    assert server.stats()["max_per_second_after_first"] <= 50 * 1.1, server.stats()["per_second_counts"]


def test_tokens_per_minute_quota_with_mixed_prompt_lengths(server: MockServer) -> None:
    """A server tokens/min cap, prompts from a few to about 130 tokens: every row answered, few
    429s, and what the server admitted stays within its cap (tokens per second, as it refills)."""
    tpm = 360_000  # 6,000 tokens/s: about 150 of these requests a second
    server.configure(latency_ms=LATENCY_MS, quota={"kind": "tokens_per_minute", "tokens_per_minute": tpm})
    rows = rows_for("tpm", 300)
    results, _ = run("async_limited", make_endpoint(server, "azure"), rows)
    assert_every_row_answered(results, rows)
    share, stats = share_429(server)
    # a tokens quota is learned in requests, and 300 rows are mostly the start: 4-11 % measured, over
    # 10 % on a loaded 2-core machine (the figure lives in the benchmark); no limiter: over 90 %
    assert share <= MAX_429_SHARE_TOKENS, share
    per_second = stats["quota"]["admitted_tokens_per_second_counts"]
    assert max(per_second) <= tpm / 60 * 2, per_second  # a second's refill + the one-second bucket


def test_tokens_per_minute_ceiling_is_never_exceeded(server: MockServer) -> None:
    """The client's own tokens_per_minute, spread evenly: in no second does the server see more
    than a second's worth plus one request (the server counts prompt + completion, as the usage the
    client corrects its reservations with). Unpaced, these rows would all go within one second."""
    tpm = 240_000  # 4,000 tokens/s; the 120 rows hold about 9,000
    # a tokens quota far above the ceiling, only so that the server counts tokens per second
    server.configure(latency_ms=LATENCY_MS, quota={"kind": "tokens_per_minute", "tokens_per_minute": 10**9})
    rows = rows_for("tpm-ceiling", 120)
    stream = query_thread_pool(make_endpoint(server, "azure"), rows, max_workers=8, tokens_per_minute=tpm)
    results = list(stream)
    assert_every_row_answered(results, rows)
    costs = [r.prompt_tokens + r.completion_tokens for r in results if r.prompt_tokens is not None]
    stats = server.stats()
    per_second = stats["quota"]["admitted_tokens_per_second_counts"]
    assert sum(per_second) == sum(costs) and len(per_second) >= 2
    assert max(per_second) <= tpm / 60 + max(costs), per_second


def test_a_429_spends_no_retry_and_patience_ends_the_run(server: MockServer) -> None:
    server.configure(latency_ms=1, retry_after_ms=10)
    endpoint = make_endpoint(server, "azure")
    # three 429s in a row for one prompt, max_retries=1: the row still gets its answer
    [result], _ = run("async_limited", endpoint, [(0, "throttled [[429x3]]")], max_retries=1)
    assert result.ok and result.attempts == 4

    # a server that refuses everything: one row keeps asking (past max_retries) for the patience...
    server.configure(fault_rate=1.0, fault_kinds=["429"], fault_attempts=10_000)
    [result], stats = run("thread_pool", endpoint, [(0, "never")], max_retries=1, patience=1.0)
    assert result.error_code == "rate_limited" and result.attempts >= 3, result
    assert "patience is spent" in (result.error_message or "")
    assert stats.successes == 0 and stats.throttled == result.attempts

    # ...then every row still waiting for a slot ends at once, unsent, instead of one 429 each at
    # the slowest rate (halved per episode, it lets far fewer than 40 requests out in 0.5 s)
    server.reset()
    results, _ = run("async_limited", endpoint, [(i, f"never {i}") for i in range(40)], patience=0.5)
    assert {r.error_code for r in results} == {"rate_limited"}
    unsent = [r for r in results if r.attempts == 0]
    assert unsent and all("not sent" in (r.error_message or "") for r in unsent)
    assert server.stats()["chat_requests"] == sum(r.attempts for r in results) < 40


def test_progress_line_shows_the_admitted_rate_429s_and_pauses(server: MockServer) -> None:
    class Log:
        lines: list[str] = []

        def info(self, msg: str, *args: Any) -> None:
            self.lines.append(msg % args)

    server.configure(latency_ms=LATENCY_MS, quota={"kind": "token_bucket", "rate": 100})
    rows = rows_for("progress", 80)
    stream = query_async_limited(make_endpoint(server, "azure"), rows, max_concurrency=16)
    log = Log()
    progress = Progress(log, len(rows), interval=math.inf)
    progress.watch(stream.stats)
    for result in stream:
        progress.settled(result)
    [line] = log.lines  # the last request always logs one
    throttled = server.stats()["requests_by_status"].get("429", 0)
    assert throttled > 0
    assert line.startswith("llmq progress: 80/80 requests (100%), "), line
    assert "; errors 0; 0 retries; " in line, line
    assert f"; {throttled} throttled (429); rate " in line and " requests/s (" in line, line
    assert ", paused " in line, line
