"""Request bodies in, answers or classified failures out. Pure functions: no I/O.

Both HTTP clients feed what they received (status, headers, body bytes, or the exception they
caught) through :func:`classify_response` / :func:`classify_exception`, so every rule about what
an answer means lives here once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# error codes recorded on rows (QueryResult.error_code)
CONTENT_FILTER = "content_filter"
CONTEXT_LENGTH = "context_length_exceeded"
BAD_REQUEST = "bad_request"
RATE_LIMITED = "rate_limited"
SERVER_ERROR = "server_error"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"
EMPTY_PROMPT = "empty_prompt"

# recorded errors that a later try asks again: the row may well succeed then
TRANSIENT_ERROR_CODES = frozenset({RATE_LIMITED, SERVER_ERROR, TIMEOUT, CONNECTION_ERROR, BAD_RESPONSE})

_RESERVED_PARAMS = frozenset({"messages", "stream", "n"})


@dataclass(frozen=True)
class ChatRequest:
    """Everything about a request that is the same for every row: system prompt, model, params.

    :param system_prompt: the system message; None or "" sends none.
    :param model: the OpenAI model for the body (the Azure deployment is in the URL).
    :param params: extra body fields (temperature, max_tokens, response_format, ...).
    """

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    model: str | None = None
    params: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        bad = _RESERVED_PARAMS.intersection(self.params or {})
        if bad:
            raise LLMQueryConfigError(
                f"request_params may not set {sorted(bad)}: one prompt gets one non-streamed answer"
            )

    def body(self, prompt: str) -> dict[str, Any]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        body: dict[str, Any] = {"messages": messages, **dict(self.params or {})}
        if self.model:
            body["model"] = self.model
        return body

    def max_completion_tokens(self) -> int | None:
        params = self.params or {}
        value = params.get("max_completion_tokens", params.get("max_tokens"))
        return int(value) if value is not None else None

    def prompt_chars(self, prompt: str) -> int:
        return len(prompt) + len(self.system_prompt or "")


@dataclass(frozen=True)
class Answer:
    content: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None


@dataclass(frozen=True)
class Failure:
    """A request that did not give an answer. ``retryable`` failures are tried again."""

    code: str
    message: str
    retryable: bool
    http_status: int | None = None
    retry_after: float | None = None  # seconds the server asked us to wait


def _error_fields(body: bytes) -> tuple[str | None, str]:
    """(code, message) from an OpenAI / Azure error body, tolerating anything."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, body[:200].decode("utf-8", "replace").strip()
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None, str(data)[:200]
    code = error.get("code")
    inner = error.get("innererror")
    if isinstance(inner, dict) and inner.get("code") == "ResponsibleAIPolicyViolation":
        code = CONTENT_FILTER
    return (str(code) if code is not None else None), str(error.get("message") or "")[:500]


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` then ``Retry-After`` (seconds or an HTTP date)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    millis = lowered.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = lowered.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    import time

    return max(0.0, when.timestamp() - time.time())


def classify_response(status: int, headers: Mapping[str, str], body: bytes) -> Answer | Failure:
    """What an HTTP answer means for the row. Raises for answers no retry can fix (auth, 404)."""
    if status == 200:
        return _parse_success(body)
    code, message = _error_fields(body)
    if status in (401, 403):
        raise LLMQueryAuthError(
            f"the endpoint refused the credentials (HTTP {status}, {code or 'no code'}): "
            "check the connection's key and api_type"
        )
    if status == 404:
        raise LLMQueryConfigError(
            f"the endpoint answered 404 ({code or 'not found'}): check the API base URL, "
            "the deployment / model name and the api-version"
        )
    retry_after = parse_retry_after(headers)
    if status == 429:
        return Failure(RATE_LIMITED, message or "rate limited", True, status, retry_after)
    if status == 408:
        return Failure(TIMEOUT, message or "request timeout", True, status, retry_after)
    if status == 409 or status >= 500:
        return Failure(SERVER_ERROR, message or f"HTTP {status}", True, status, retry_after)
    if code in (CONTENT_FILTER, CONTEXT_LENGTH):
        return Failure(code, message, False, status)
    return Failure(code or BAD_REQUEST, message or f"HTTP {status}", False, status)


def _parse_success(body: bytes) -> Answer | Failure:
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice.get("message") or {}
        content = message.get("content")
        finish_reason = choice.get("finish_reason")
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return Failure(BAD_RESPONSE, "malformed or empty answer (no choices[0].message)", True, 200)
    if content is None:
        if finish_reason == CONTENT_FILTER:
            return Failure(CONTENT_FILTER, "the answer was filtered by the content policy", False, 200)
        if message.get("refusal"):
            return Failure("refusal", str(message["refusal"])[:500], False, 200)
        return Failure(BAD_RESPONSE, "answer has no message content", True, 200)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    return Answer(
        content=str(content),
        finish_reason=finish_reason,
        prompt_tokens=_int_or_none(usage.get("prompt_tokens")),
        completion_tokens=_int_or_none(usage.get("completion_tokens")),
    )


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None


def classify_exception(exc: BaseException) -> Failure:
    """A transport error: TLS problems end the task, the rest are retried."""
    if isinstance(exc, LLMQueryAuthError | LLMQueryConfigError):
        raise exc
    text = f"{type(exc).__name__}: {exc}"
    if _is_certificate_error(exc):
        raise LLMQueryConfigError(
            "TLS failure: the server certificate could not be verified "
            "(set the connection's ca_cert to the CA that signed it)"
        ) from None
    if _is_timeout(exc):
        return Failure(TIMEOUT, "request timed out", True)
    return Failure(CONNECTION_ERROR, text[:300], True)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = current.__cause__ or current.__context__ or nested
    return seen


def _is_certificate_error(exc: BaseException) -> bool:
    import ssl

    for item in _chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(item) or "certificate verify failed" in str(item):
            return True
    return False


def _is_timeout(exc: BaseException) -> bool:
    return any(isinstance(item, TimeoutError) or "Timeout" in type(item).__name__ for item in _chain(exc))
