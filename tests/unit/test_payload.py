from __future__ import annotations

import json
import random

import pytest

from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError
from airflow_provider_llmq.core.pacing.retry import RetryPolicy
from airflow_provider_llmq.core.request.payload import (
    Answer,
    ChatRequest,
    Failure,
    classify_response,
    parse_retry_after,
)
from airflow_provider_llmq.core.transport.transport_errors import classify_exception


def _ok(content: object = "hi", finish: str = "stop") -> bytes:
    return json.dumps(
        {
            "choices": [{"message": {"role": "assistant", "content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 2},
        }
    ).encode()


def test_body_has_system_user_and_params_and_model() -> None:
    body = ChatRequest("be brief", "gpt-x", {"temperature": 0, "max_tokens": 5}).body("q?")
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "q?"},
    ]
    assert body["temperature"] == 0 and body["max_tokens"] == 5 and body["model"] == "gpt-x"


def test_no_system_message_when_none() -> None:
    assert ChatRequest(None).body("q")["messages"] == [{"role": "user", "content": "q"}]


def test_streaming_params_are_refused() -> None:
    with pytest.raises(LLMQueryConfigError, match="stream"):
        ChatRequest(params={"stream": True})


def test_success_is_parsed_with_usage() -> None:
    answer = classify_response(200, {}, _ok("hello"))
    assert answer == Answer("hello", "stop", 7, 2)


@pytest.mark.parametrize(
    "body", [b'{"choices": [', b'{"choices": []}', b"", b'{"choices": [{"message": {}}]}']
)
def test_malformed_or_empty_200_is_retryable_bad_response(body: bytes) -> None:
    failure = classify_response(200, {}, body)
    assert isinstance(failure, Failure) and failure.code == "bad_response" and failure.retryable


def test_filtered_completion_is_not_retried() -> None:
    failure = classify_response(200, {}, _ok(None, "content_filter"))
    assert isinstance(failure, Failure) and failure.code == "content_filter" and not failure.retryable


@pytest.mark.parametrize(
    ("status", "error", "code", "retryable"),
    [
        (400, {"code": "content_filter", "message": "filtered"}, "content_filter", False),
        (
            400,
            {"code": None, "innererror": {"code": "ResponsibleAIPolicyViolation"}},
            "content_filter",
            False,
        ),
        (400, {"code": "context_length_exceeded", "message": "too long"}, "context_length_exceeded", False),
        (400, {"code": "invalid_value", "message": "bad temperature"}, "invalid_value", False),
        (422, {"message": "?"}, "bad_request", False),
        (429, {"code": "429", "message": "slow down"}, "rate_limited", True),
        (408, {}, "timeout", True),
        (409, {}, "server_error", True),
        (500, {}, "server_error", True),
        (503, {}, "server_error", True),
    ],
)
def test_error_statuses_are_classified(status: int, error: dict, code: str, retryable: bool) -> None:
    failure = classify_response(status, {}, json.dumps({"error": error}).encode())
    assert isinstance(failure, Failure)
    assert (failure.code, failure.retryable, failure.http_status) == (code, retryable, status)


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_raise(status: int) -> None:
    with pytest.raises(LLMQueryAuthError, match=str(status)):
        classify_response(status, {}, b'{"error": {"code": "invalid_api_key"}}')


def test_a_gateway_that_cannot_check_the_key_is_an_auth_failure() -> None:
    # LiteLLM's proxy without a database, for any key but its master key (measured, 1.106.12)
    body = b'{"error":{"message":"No connected db.","type":"no_db_connection","param":null,"code":"400"}}'
    with pytest.raises(LLMQueryAuthError, match=r"could not check the key .*No connected db"):
        classify_response(400, {}, body)
    other = classify_response(400, {}, b'{"error":{"message":"bad","type":"invalid_request_error"}}')
    assert isinstance(other, Failure) and not other.retryable  # other 400s stay row errors


def test_not_found_raises_config_error() -> None:
    with pytest.raises(LLMQueryConfigError, match="deployment"):
        classify_response(404, {}, b'{"error": {"code": "DeploymentNotFound"}}')


def test_retry_after_ms_wins_over_retry_after() -> None:
    assert parse_retry_after({"Retry-After": "7", "retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({}) is None


@pytest.mark.parametrize(
    "headers",
    [
        {"Retry-After": "0"},
        {"retry-after-ms": "0"},
        {"retry-after-ms": "0", "Retry-After": "5"},  # the first header given decides, as in the SDK
        {"Retry-After": "-3"},
        {"retry-after-ms": "-250"},
        {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
        {"Retry-After": "soon"},
        {"Retry-After": "nan"},
    ],
)
def test_unusable_server_waits_mean_no_hint(headers: dict[str, str]) -> None:
    assert parse_retry_after(headers) is None


def test_certificate_errors_raise_a_clear_config_error() -> None:
    import ssl

    cause = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    wrapper = ConnectionError("while connecting")
    wrapper.__cause__ = cause
    with pytest.raises(LLMQueryConfigError, match="certificate could not be verified"):
        classify_exception(wrapper)


def test_timeouts_and_resets_are_retryable() -> None:
    assert classify_exception(TimeoutError()).code == "timeout"
    reset = classify_exception(ConnectionResetError(104, "Connection reset by peer"))
    assert reset.code == "connection_error" and reset.retryable


def test_backoff_doubles_with_jitter_and_caps() -> None:
    policy = RetryPolicy(initial_backoff=1, max_backoff=8, jitter=0.25, rng=random.Random(1))
    retryable = Failure("server_error", "x", True, 500)
    delays = [policy.delay(retryable, n) for n in range(1, 7)]
    for n, delay in enumerate(delays, start=1):
        nominal = min(2 ** (n - 1), 8)
        assert 0.75 * nominal <= delay <= nominal
    assert max(delays) <= 8


def test_server_requested_wait_is_honored_up_to_the_cap() -> None:
    policy = RetryPolicy(max_retry_wait=1.0)
    assert policy.delay(Failure("rate_limited", "", True, 429, retry_after=0.3), 1) == 0.3
    assert policy.delay(Failure("rate_limited", "", True, 429, retry_after=86400), 1) == 1.0


def test_should_retry_counts_attempts() -> None:
    policy = RetryPolicy(max_retries=2)
    retryable = Failure("server_error", "", True)
    assert policy.should_retry(retryable, 1) and policy.should_retry(retryable, 2)
    assert not policy.should_retry(retryable, 3)
    assert not policy.should_retry(Failure("content_filter", "", False), 1)
