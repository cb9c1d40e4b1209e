"""The mock server's quota policies on a fake clock: who is refused, and which headers go out."""

from __future__ import annotations

import math
from typing import Any

import pytest

from airflow_provider_llmq.core.pacing.rate_headers import parse_duration
from airflow_provider_llmq.core.request.payload import parse_retry_after
from airflow_provider_llmq.testing.mock_server.quota_policy import Decision, QuotaPolicy, format_duration
from airflow_provider_llmq.testing.mock_server.quotas import (
    AllOf,
    AzureWindows,
    OpenAIBuckets,
    ScheduledBucket,
    TokenBucket,
    TokensPerMinute,
    build_policy,
)


def admitted_between(policy: QuotaPolicy, start: float, end: float, every: float, tokens: int = 0) -> int:
    """Requests admitted when one arrives every ``every`` seconds in [start, end)."""
    count, n = 0, 0
    while (t := start + n * every) < end:
        count += policy.admit(t, tokens).allowed
        n += 1
    return count


# -- token bucket ----------------------------------------------------------------------------------


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(100)  # burst: a tenth of a second's worth
    assert [bucket.admit(0.0).allowed for _ in range(11)] == [True] * 10 + [False]
    assert admitted_between(bucket, 0.001, 10.0, 0.001) == pytest.approx(1000, abs=2)


def test_token_bucket_429_carries_a_short_retry_after_ms() -> None:
    bucket = TokenBucket(100, burst=1)
    assert bucket.admit(0.0) == Decision(True, {}, 0.0)
    refused = bucket.admit(0.0025)
    assert not refused.allowed
    assert refused.wait == pytest.approx(0.0075)
    assert refused.headers == {"retry-after-ms": "8"}
    assert parse_retry_after(refused.headers) == pytest.approx(0.008)
    assert bucket.admit(0.01).allowed  # exactly when the hint said


@pytest.mark.parametrize(
    ("hint", "headers"),
    [
        ("none", {}),
        ("seconds", {"Retry-After": "1"}),
        ("both", {"retry-after-ms": "500", "Retry-After": "1"}),
    ],
)
def test_token_bucket_retry_hints(hint: str, headers: dict[str, str]) -> None:
    bucket = TokenBucket(2, burst=1, retry_hint=hint)
    bucket.admit(0.0)
    refused = bucket.admit(0.0)
    assert not refused.allowed
    assert refused.headers == headers
    assert refused.wait == pytest.approx(0.5)


def test_token_bucket_set_rate_keeps_what_was_earned() -> None:
    bucket = TokenBucket(10, burst=5)
    for _ in range(5):
        bucket.admit(0.0)
    bucket.set_rate(0.2, 100)  # 2 requests earned at 10/s, then 100/s
    assert bucket.rate == 100
    assert admitted_between(bucket, 0.2, 0.2 + 1e-9, 1.0) == 1
    assert bucket.bucket.level == pytest.approx(1.0)


def test_refused_requests_use_nothing() -> None:
    bucket = TokenBucket(10, burst=1)
    bucket.admit(0.0)
    for i in range(1, 10):
        assert not bucket.admit(i * 0.01).allowed
    assert bucket.admit(0.1).allowed  # the refusals did not push the next token back


# -- a cap that changes mid-run -------------------------------------------------------------------


def test_schedule_changes_rate_at_offsets_from_the_first_request() -> None:
    policy = ScheduledBucket([(0, 200), (10, 80)])  # burst: 20 (a tenth of the first rate)
    start = 1000.0  # a monotonic clock: offsets count from the first request
    assert admitted_between(policy, start, start + 10, 0.001) == pytest.approx(2000 + 20, abs=2)
    assert admitted_between(policy, start + 10, start + 20, 0.001) == pytest.approx(800, abs=2)
    assert policy.rate_at(5) == 200 and policy.rate_at(15) == 80


def test_schedule_applies_a_step_from_its_own_time() -> None:
    policy = ScheduledBucket([(0, 1), (1, 1000)], burst=1000)
    for _ in range(1000):
        policy.admit(0.0)  # empty the bucket
    # nothing arrives until 1.5 s: 1 s at 1/s, then 0.5 s at 1000/s
    policy.admit(1.5)
    assert policy.bucket.level == pytest.approx(1 + 500 - 1)


def test_schedule_starts_with_the_last_step_at_or_before_0() -> None:
    policy = ScheduledBucket([(-5, 10), (0, 50), (3, 20)])
    assert policy.rate == 50


def test_schedule_rejects_a_late_start() -> None:
    with pytest.raises(ValueError):
        ScheduledBucket([(5, 100)])
    with pytest.raises(ValueError):
        ScheduledBucket([])


# -- tokens per minute -----------------------------------------------------------------------------


def test_tokens_per_minute_counts_tokens() -> None:
    policy = TokensPerMinute(60_000)  # 1000 tokens/s, bucket of 1000
    assert policy.admit(0.0, 600).allowed
    refused = policy.admit(0.0, 600)
    assert not refused.allowed and refused.wait == pytest.approx(0.2)
    assert policy.admit(0.0, 400).allowed
    # over a minute, at most the cap (plus the first bucket)
    total = 0
    for i in range(1, 6001):
        if policy.admit(i * 0.01, 200).allowed:
            total += 200
    assert total == pytest.approx(60_000, abs=400)


def test_tokens_per_minute_admits_an_oversized_request_when_full() -> None:
    policy = TokensPerMinute(6000, burst_seconds=1.0)  # bucket of 100 tokens
    assert policy.admit(0.0, 250).allowed  # bigger than the bucket: once it is full, it goes
    refused = policy.admit(0.0, 10)
    assert not refused.allowed
    assert refused.wait == pytest.approx(1.6)  # the debt of 150 first, then 10


# -- Azure windows -----------------------------------------------------------------------------------


def test_azure_windows_enforce_rpm_over_10_s() -> None:
    policy = AzureWindows(requests_per_minute=3000, window=10)
    assert policy.request_limit == 500
    answers = [policy.admit(0.001 * i) for i in range(600)]
    assert sum(d.allowed for d in answers) == 500
    assert answers[0].headers == {"x-ratelimit-remaining-requests": "499"}
    assert answers[499].headers == {"x-ratelimit-remaining-requests": "0"}
    refused = answers[500]
    assert not refused.allowed
    assert refused.wait == pytest.approx(10.0 - 0.5)
    assert refused.headers == {
        "x-ratelimit-remaining-requests": "0",
        "retry-after-ms": "9500",
        "Retry-After": "10",
    }
    fresh = policy.admit(10.0)
    assert fresh.allowed and fresh.headers["x-ratelimit-remaining-requests"] == "499"


def test_azure_windows_phase_and_tokens() -> None:
    policy = AzureWindows(requests_per_minute=600, tokens_per_minute=6000, window=10, phase=7.5)
    first = policy.admit(100.0, 400)  # 7.5 s into a window: 2.5 s left
    assert first.headers == {
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-remaining-tokens": "600",
    }
    refused = policy.admit(101.0, 700)  # tokens run out first
    assert not refused.allowed
    assert refused.wait == pytest.approx(1.5)
    assert refused.headers["Retry-After"] == "2"
    assert policy.admit(102.5, 700).allowed  # a new window
    assert policy.window_start(103.0) == pytest.approx(102.5)


def test_azure_windows_1_s() -> None:
    policy = AzureWindows(requests_per_minute=600, window=1)  # 10 per second
    assert admitted_between(policy, 0.0, 5.0, 0.01) == 50


# -- OpenAI buckets ----------------------------------------------------------------------------------


def test_openai_headers() -> None:
    policy = OpenAIBuckets(requests_per_minute=9000, tokens_per_minute=600_000)  # 150/s, 10k tokens/s
    answer = policy.admit(0.0, 1000)
    assert answer.allowed
    assert answer.headers == {
        "x-ratelimit-limit-requests": "9000",
        "x-ratelimit-remaining-requests": "149",
        "x-ratelimit-reset-requests": "7ms",
        "x-ratelimit-limit-tokens": "600000",
        "x-ratelimit-remaining-tokens": "9000",
        "x-ratelimit-reset-tokens": "100ms",
    }
    for _ in range(149):  # the bucket holds a second's worth: 150
        assert policy.admit(0.0, 10).allowed
    refused = policy.admit(0.0, 10)
    assert not refused.allowed
    assert "retry-after-ms" not in refused.headers and "Retry-After" not in refused.headers
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert parse_duration(refused.headers["x-ratelimit-reset-requests"]) == pytest.approx(1.0)


def test_openai_sustains_its_limit() -> None:
    policy = OpenAIBuckets(requests_per_minute=9000)
    assert admitted_between(policy, 0.0, 10.0, 0.001) == pytest.approx(150 * 10 + 150, abs=2)


# -- combined --------------------------------------------------------------------------------------


def test_all_of_charges_only_what_fits_everywhere() -> None:
    policy = AllOf([TokenBucket(100, burst=10), TokensPerMinute(60_000)])  # and 1000 tokens/s
    assert policy.admit(0.0, 900).allowed
    refused = policy.admit(0.0, 900)  # fits the requests bucket, not the tokens one
    assert not refused.allowed
    assert refused.wait == pytest.approx(0.8)
    requests_bucket = policy.policies[0]
    assert isinstance(requests_bucket, TokenBucket)
    assert requests_bucket.bucket.level == pytest.approx(9.0)  # not charged for the refusal


def test_all_of_merges_headers() -> None:
    policy = AllOf([AzureWindows(600), OpenAIBuckets(None, 60_000)])
    headers = policy.admit(0.0, 10).headers
    assert headers["x-ratelimit-remaining-requests"] == "99"
    assert headers["x-ratelimit-remaining-tokens"] == "990"


# -- config and formats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        ({"kind": "token_bucket", "rate": 100}, TokenBucket),
        ({"kind": "token_bucket", "rate": 100, "retry_hint": "none", "burst": 5}, TokenBucket),
        ({"kind": "schedule", "steps": [[0, 200], [10, 80]]}, ScheduledBucket),
        ({"kind": "tokens_per_minute", "tokens_per_minute": 60000}, TokensPerMinute),
        ({"kind": "azure", "requests_per_minute": 3000, "window": 10}, AzureWindows),
        ({"kind": "openai", "requests_per_minute": 9000, "tokens_per_minute": 2e6}, OpenAIBuckets),
        (
            {
                "kind": "all",
                "policies": [
                    {"kind": "token_bucket", "rate": 100},
                    {"kind": "tokens_per_minute", "tokens_per_minute": 60000},
                ],
            },
            AllOf,
        ),
    ],
)
def test_build_policy(config: dict[str, Any], kind: type[QuotaPolicy]) -> None:
    policy = build_policy(config)
    assert isinstance(policy, kind)
    assert policy.admit(0.0, 10).allowed


def test_build_policy_schedule_from_json_lists() -> None:
    policy = build_policy({"kind": "schedule", "steps": [[10, 80], [0, 200]]})
    assert isinstance(policy, ScheduledBucket)
    assert policy.steps == [(0.0, 200.0), (10.0, 80.0)]


@pytest.mark.parametrize("config", [None, {}])
def test_build_policy_none(config: dict[str, Any] | None) -> None:
    assert build_policy(config) is None


@pytest.mark.parametrize(
    "config",
    [
        {"kind": "bucket", "rate": 100},
        {"rate": 100},
        {"kind": "token_bucket", "rate": 100, "burts": 5},
        {"kind": "token_bucket"},
        {"kind": "token_bucket", "rate": -1},
        {"kind": "token_bucket", "rate": 100, "retry_hint": "later"},
        {"kind": "azure", "window": 10},
        {"kind": "azure", "requests_per_minute": 600, "phase": 10},
        {"kind": "openai"},
        {"kind": "all", "policies": []},
        {"kind": "all", "policy": []},
        {"kind": "schedule", "steps": [[3, 100]]},
    ],
)
def test_build_policy_refuses_what_it_would_misread(config: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        build_policy(config)


def test_negative_tokens_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(10).admit(0.0, -1)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.0, "0ms"),
        (0.0066, "7ms"),
        (0.5, "500ms"),
        (1.0, "1s"),
        (1.5, "1.5s"),
        (17.326, "17.326s"),
        (360.0, "6m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_format_duration_reads_back(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    parsed = parse_duration(text)
    assert parsed is not None
    assert parsed == pytest.approx(seconds, abs=1e-3) or math.ceil(seconds * 1000) / 1000 == parsed
