"""Issue 10, core rules without sockets: key / header hygiene, secret scrubbing, redirects, retry
hints, quota, 200 answer shapes, proxy choice. The same rules are exercised over real sockets in
tests/integration/test_hardening_*.py."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.endpoint.secrets import Scrubber, url_credentials
from airflow_provider_llmq.core.errors import (
    LLMQueryAuthError,
    LLMQueryConfigError,
    LLMQueryError,
    LLMQueryQuotaError,
)
from airflow_provider_llmq.core.pacing.retry import RetryPolicy
from airflow_provider_llmq.core.request.error_codes import TRANSIENT_ERROR_CODES
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import Answer, Failure, classify_response

KEY = "sk-hardening-0a1b2c3d4e"
HEADER_SECRET = "apim-sub-5f6e7d8c9b"
PROXY_PASSWORD = "pr0xy-pa55-77aa"


@pytest.fixture(autouse=True)
def _no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


# -- 1. keys and header values ------------------------------------------------------------------


@pytest.mark.parametrize("raw", [f"{KEY}\n", f"{KEY}\r\n", f" {KEY}", f"\t{KEY} \n"])
def test_surrounding_whitespace_is_stripped_from_the_key(raw: str) -> None:
    endpoint = EndpointConfig("https://x", raw, "azure", "d", "v")
    assert endpoint.api_key == KEY and endpoint.request_headers()["api-key"] == KEY
    openai = EndpointConfig("https://x", raw, "openai", "m")
    assert openai.request_headers()["Authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize("raw", [f"sk-abc\n{KEY}", f"{KEY}\rx", f"{KEY}\x00", f"sk-\x7f{KEY}"])
def test_a_control_character_inside_the_key_is_a_config_error_without_the_value(raw: str) -> None:
    with pytest.raises(LLMQueryConfigError, match="API key") as info:
        EndpointConfig("https://x", raw)
    assert KEY not in f"{info.value} {info.value!r}" and "sk-abc" not in str(info.value)


def test_header_values_are_stripped_and_control_characters_refused() -> None:
    endpoint = EndpointConfig(
        "https://x", KEY, headers={" Ocp-Apim-Subscription-Key ": f" {HEADER_SECRET}\r\n"}
    )
    assert endpoint.request_headers()["Ocp-Apim-Subscription-Key"] == HEADER_SECRET
    with pytest.raises(LLMQueryConfigError, match="header 'Ocp-Apim-Subscription-Key'") as info:
        EndpointConfig("https://x", KEY, headers={"Ocp-Apim-Subscription-Key": f"a\n{HEADER_SECRET}"})
    assert HEADER_SECRET not in str(info.value)
    with pytest.raises(LLMQueryConfigError, match="Latin-1"):
        EndpointConfig("https://x", KEY, headers={"X-Name": "caf\u20ac"})


def test_a_malformed_header_name_is_refused_without_being_quoted() -> None:
    with pytest.raises(LLMQueryConfigError, match="header name") as info:
        EndpointConfig("https://x", KEY, headers={f"X-Key: {HEADER_SECRET}": "v"})
    assert HEADER_SECRET not in str(info.value)


# -- 2. repr, invalid hosts, the scrubber -------------------------------------------------------


def test_repr_shows_header_names_but_no_secret() -> None:
    endpoint = EndpointConfig(
        "https://x",
        KEY,
        headers={"Ocp-Apim-Subscription-Key": HEADER_SECRET},
        proxy=f"http://user:{PROXY_PASSWORD}@proxy.local:3128",
    )
    text = f"{endpoint!r} {endpoint!s}"
    assert "Ocp-Apim-Subscription-Key" in text and "proxy.local:3128" in text
    assert KEY not in text and HEADER_SECRET not in text and PROXY_PASSWORD not in text


@pytest.mark.parametrize(
    "host",
    [
        "htps://user:s3cr3t-host-pw@host",
        "https://user:s3cr3t-host-pw@host",
        "user:s3cr3t-host-pw@host",
        "ftp://s3cr3t-host-pw.example",
        "https://host:s3cr3t-host-pw",
        "https://host/?key=s3cr3t-host-pw",
    ],
)
def test_an_invalid_host_is_not_echoed(host: str) -> None:
    with pytest.raises(LLMQueryConfigError) as info:
        EndpointConfig(host, KEY)
    assert "s3cr3t-host-pw" not in f"{info.value} {info.value!r}"


def test_scrubber_masks_every_form_of_a_secret() -> None:
    scrub = Scrubber([f"{KEY}\n", HEADER_SECRET, None, "abc"])
    text = f"k={KEY} raw={KEY!r} header={HEADER_SECRET} json={json.dumps(KEY + chr(10))} short=abc"
    clean = scrub.text(text)
    assert KEY not in clean and HEADER_SECRET not in clean and "\\n" not in clean.replace("***", "")
    assert "short=abc" in clean  # values under 4 characters are not secrets worth shredding text for
    result = QueryResult(1, None, "error", "bad_request", f"gateway said {HEADER_SECRET}")
    assert scrub.result(result).error_message == "gateway said ***"
    ok = QueryResult(1, "fine", "ok")
    assert scrub.result(ok) is ok


def test_scrubber_cleans_an_exception_and_its_chain() -> None:
    scrub = Scrubber([KEY])
    try:
        try:
            try:
                raise ValueError(f"inner {KEY}")
            except ValueError as inner:
                raise OSError(5, f"strerror {KEY}") from inner  # str() not rebuilt from args alone
        except OSError:
            raise LLMQueryAuthError(f"outer {KEY}")  # noqa: B904 - an implicit context on purpose
    except LLMQueryAuthError as exc:
        clean = scrub.exception(exc)
    assert isinstance(clean, LLMQueryAuthError) and str(clean) == "outer ***"
    seen = []
    link: BaseException | None = clean
    while link is not None:
        seen.append(f"{link!s} {link!r} {link.args!r}")
        link = link.__cause__ or link.__context__
    assert all(KEY not in text for text in seen)


def test_url_credentials_cover_the_basic_auth_forms() -> None:
    found = url_credentials(f"http://alice:{PROXY_PASSWORD}@proxy:3128")
    import base64

    assert PROXY_PASSWORD in found and f"alice:{PROXY_PASSWORD}" in found
    assert base64.b64encode(f"alice:{PROXY_PASSWORD}".encode()).decode() in found
    assert url_credentials("http://proxy:3128") == [] and url_credentials(None) == []


# -- 3. redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_a_permanent_row_error(status: int) -> None:
    failure = classify_response(
        status, {"Location": f"https://elsewhere.example/steal?k={KEY}", "x-should-retry": "true"}, b""
    )
    assert isinstance(failure, Failure)
    assert (failure.code, failure.retryable, failure.http_status) == ("unexpected_redirect", False, status)
    assert "elsewhere.example" in failure.message and KEY not in failure.message


# -- 4. retry hints and quota -------------------------------------------------------------------


def test_a_missing_server_wait_falls_back_to_spread_backoff() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.6, jitter=0.25, rng=random.Random(3))
    for retry_after in (None, 0.0, -1.0):
        failure = Failure("rate_limited", "", True, 429, retry_after=retry_after)
        delays = [policy.delay(failure, n) for n in range(1, 5)]
        assert all(0.75 * 0.1 * 2 ** (n - 1) <= d <= 0.1 * 2 ** (n - 1) for n, d in enumerate(delays, 1))
    assert len({policy.delay(Failure("x", "", True), 1) for _ in range(20)}) > 1  # jittered


@pytest.mark.parametrize(
    ("status", "headers", "retryable"),
    [
        (500, {"x-should-retry": "false"}, False),
        (429, {"X-Should-Retry": "false", "retry-after-ms": "10"}, False),
        (400, {"x-should-retry": "true"}, True),
        (400, {}, False),
        (500, {"x-should-retry": "maybe"}, True),
    ],
)
def test_x_should_retry_is_honoured_both_ways(status: int, headers: dict[str, str], retryable: bool) -> None:
    failure = classify_response(status, headers, b'{"error": {"code": "whatever", "message": "m"}}')
    assert isinstance(failure, Failure) and failure.retryable is retryable


def test_x_should_retry_true_does_not_soften_terminal_answers() -> None:
    with pytest.raises(LLMQueryAuthError):
        classify_response(401, {"x-should-retry": "true"}, b"{}")
    with pytest.raises(LLMQueryQuotaError):
        classify_response(429, {"x-should-retry": "true"}, b'{"error": {"code": "insufficient_quota"}}')


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (429, {"code": "insufficient_quota", "type": "insufficient_quota", "message": "quota"}),
        (429, {"code": None, "type": "insufficient_quota", "message": "quota"}),
        (403, {"code": "insufficient_quota", "message": "quota"}),
        (400, {"code": "insufficient_quota"}),
    ],
)
def test_insufficient_quota_raises_a_quota_error(status: int, error: dict[str, Any]) -> None:
    with pytest.raises(LLMQueryQuotaError, match="insufficient_quota") as info:
        classify_response(status, {"retry-after": "1"}, json.dumps({"error": error}).encode())
    assert isinstance(info.value, LLMQueryError) and not isinstance(info.value, LLMQueryAuthError)


# -- 5. 200 answer shapes -----------------------------------------------------------------------


def _choice(message: dict[str, Any], finish: str | None = "stop") -> bytes:
    return json.dumps(
        {
            "choices": [{"message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4},
        }
    ).encode()


@pytest.mark.parametrize(
    ("message", "finish", "code"),
    [
        ({"content": ""}, "content_filter", "content_filter"),
        ({"content": "partial text"}, "content_filter", "content_filter"),
        ({"content": None}, "content_filter", "content_filter"),
        (
            {
                "content": None,
                "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "tool_calls",
            "tool_calls",
        ),
        ({"content": None, "function_call": {"name": "f", "arguments": "{}"}}, "function_call", "tool_calls"),
        ({"content": None, "refusal": "I cannot help with that."}, "stop", "refusal"),
        ({"content": [{"type": "refusal", "refusal": "No."}]}, "stop", "refusal"),
        ({"content": ""}, "length", "length"),
        ({"content": None}, "length", "length"),
    ],
)
def test_unusable_200_answers_are_permanent_errors(message: dict[str, Any], finish: str, code: str) -> None:
    failure = classify_response(200, {}, _choice(message, finish))
    assert isinstance(failure, Failure) and failure.code == code and not failure.retryable
    assert failure.http_status == 200 and failure.prompt_tokens == 9 and failure.completion_tokens == 4
    assert code not in TRANSIENT_ERROR_CODES


def test_refusal_text_is_the_message() -> None:
    failure = classify_response(200, {}, _choice({"content": None, "refusal": "I cannot help with that."}))
    assert isinstance(failure, Failure) and failure.message == "I cannot help with that."


def test_text_cut_by_length_stays_ok_and_text_parts_are_joined() -> None:
    assert classify_response(200, {}, _choice({"content": "half an ans"}, "length")) == Answer(
        "half an ans", "length", 9, 4
    )
    parts = [{"type": "text", "text": "Hello, "}, {"type": "image_url", "image_url": {}}, {"text": "world"}]
    answer = classify_response(200, {}, _choice({"content": parts}))
    assert isinstance(answer, Answer) and answer.content == "Hello, world"


def test_content_null_without_a_reason_is_still_a_retryable_bad_response() -> None:
    failure = classify_response(200, {}, _choice({"content": None}))
    assert isinstance(failure, Failure) and failure.code == "bad_response" and failure.retryable


def test_transient_codes_are_exactly_the_retried_ones() -> None:
    retried = {"rate_limited", "server_error", "timeout", "connection_error", "bad_response"}
    # budget_exceeded was never sent, cut_by_budget cut by the limit llmq set for the budget: not
    # retried in the run, but asked again by a later one
    assert frozenset({*retried, "budget_exceeded", "cut_by_budget"}) == TRANSIENT_ERROR_CODES


# -- 7. proxy choice ----------------------------------------------------------------------------


def test_environment_proxy_is_chosen_like_requests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://u:{PROXY_PASSWORD}@corp-proxy:3128")
    monkeypatch.setenv("HTTP_PROXY", "http://plain-proxy:8080")
    endpoint = EndpointConfig("https://api.example.com/v1", KEY)
    assert endpoint.proxy_url() == f"http://u:{PROXY_PASSWORD}@corp-proxy:3128"
    assert EndpointConfig("http://api.example.com", KEY).proxy_url() == "http://plain-proxy:8080"
    assert PROXY_PASSWORD in endpoint.secrets()
    monkeypatch.setenv("NO_PROXY", "example.com,10.0.0.0/8")
    assert endpoint.proxy_url() is None
    assert EndpointConfig("https://10.1.2.3", KEY).proxy_url() is None
    # the connection's proxy wins over the environment, NO_PROXY included
    explicit = EndpointConfig("https://api.example.com", KEY, proxy="explicit-proxy:3128")
    assert explicit.proxy_url() == "http://explicit-proxy:3128"


@pytest.mark.parametrize("proxy", ["socks5://u:pw-zz99@h:1080", "http://", "http://h:notaport"])
def test_a_bad_proxy_is_a_config_error_without_its_credentials(proxy: str) -> None:
    with pytest.raises(LLMQueryConfigError, match="proxy") as info:
        EndpointConfig("https://x", KEY, proxy=proxy)
    assert "pw-zz99" not in str(info.value)


def test_a_bad_environment_proxy_fails_when_the_client_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://u:pw-zz99@h:1080")
    endpoint = EndpointConfig("https://x", KEY)
    with pytest.raises(LLMQueryConfigError, match="HTTPS_PROXY") as info:
        endpoint.proxy_url()
    assert "pw-zz99" not in str(info.value)


# -- 12. configuration errors are LLMQueryConfigError, not TypeError ---------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"max_retries": "3"},
        {"max_retries": 2.5},
        {"request_timeout": "60"},
        {"requests_per_minute": True},
        {"request_params": ["temperature", 0]},
    ],
)
def test_options_of_the_wrong_type_are_config_errors(options: dict[str, Any]) -> None:
    with pytest.raises(LLMQueryConfigError):
        QueryOptions(**options)


@pytest.mark.parametrize("timeout", ["abc", 0, -1, float("inf"), float("nan")])
def test_a_bad_timeout_is_a_config_error(timeout: Any) -> None:
    with pytest.raises(LLMQueryConfigError, match="timeout"):
        EndpointConfig("https://x", KEY, timeout=timeout)
