"""Request bodies in, answers or classified failures out. Pure functions: no I/O.

Both HTTP clients feed what they received (status, headers, body bytes, or the exception they
caught) through :func:`classify_response` / :func:`classify_exception`, so every rule about what
an answer means lives here once.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from email.utils import mktime_tz, parsedate_tz
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError, LLMQueryQuotaError
from airflow_provider_llmq.core.request.error_codes import (
    BAD_REQUEST,
    BAD_RESPONSE,
    CONTENT_FILTER,
    CONTEXT_LENGTH,
    INSUFFICIENT_QUOTA,
    INVALID_OUTPUT,
    KEY_NOT_CHECKABLE,
    LENGTH,
    RATE_LIMITED,
    REFUSAL,
    SERVER_ERROR,
    TIMEOUT,
    TOOL_CALLS,
    UNEXPECTED_REDIRECT,
)
from airflow_provider_llmq.core.request.structured import StructuredOutput

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

_RESERVED_PARAMS = frozenset({"messages", "stream", "n"})


@dataclass(frozen=True)
class ChatRequest:
    """Everything about a request that is the same for every row: system prompt, model, params.

    :param system_prompt: the system message; None or "" sends none.
    :param model: the OpenAI model for the body (the Azure deployment is in the URL).
    :param params: extra body fields (temperature, max_tokens, response_format, ...).
    :param output: the JSON schema answers must follow (sent as ``response_format``); None: free text.
    """

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    model: str | None = None
    params: Mapping[str, Any] | None = None
    output: StructuredOutput | None = None
    limit_param: str = "max_tokens"  # the body field of a completion limit llmq sets itself

    def __post_init__(self) -> None:
        bad = _RESERVED_PARAMS.intersection(self.params or {})
        if bad:
            raise LLMQueryConfigError(
                f"request_params may not set {sorted(bad)}: one prompt gets one non-streamed answer"
            )
        if self.output is not None and "response_format" in (self.params or {}):
            raise LLMQueryConfigError(
                "give either output_schema or request_params['response_format'], not both: "
                "output_schema is sent as the response_format"
            )

    def body(self, prompt: str) -> dict[str, Any]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return self._with_params(messages)

    def repair_body(self, prompt: str, failure: Failure) -> dict[str, Any] | None:
        """The repair request after an ``invalid_output`` answer, when the run asks for one: the
        conversation so far, the invalid answer and what is wrong with it. None otherwise."""
        if failure.code != INVALID_OUTPUT or self.output is None or not self.output.repair:
            return None
        messages = self.body(prompt)["messages"]
        messages.append({"role": "assistant", "content": failure.content or ""})
        messages.append(
            {
                "role": "user",
                "content": f"That answer is invalid: {failure.message}. Answer again with JSON that "
                "follows the schema exactly.",
            }
        )
        return self._with_params(messages)

    def _with_params(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body: dict[str, Any] = {"messages": messages, **dict(self.params or {})}
        if self.output is not None:
            body["response_format"] = self.output.response_format()
        if self.model:
            body["model"] = self.model
        return body

    def with_limit(self, body: Mapping[str, Any], limit: int) -> dict[str, Any]:
        """``body`` with the completion limit llmq sets (the user set none)."""
        return {**body, self.limit_param: limit}

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
    cached_tokens: int | None = None  # of prompt_tokens, served from the prompt cache


@dataclass(frozen=True)
class Failure:
    """A request that did not give an answer. ``retryable`` failures are tried again."""

    code: str
    message: str
    retryable: bool
    http_status: int | None = None
    retry_after: float | None = None  # seconds the server asked us to wait; None: our own backoff
    prompt_tokens: int | None = None  # billed even for a 200 that gave no usable answer
    completion_tokens: int | None = None
    finish_reason: str | None = None
    content: str | None = None  # the answer text a 200 carried, kept on the row (invalid_output)
    cached_tokens: int | None = None  # of prompt_tokens, served from the prompt cache


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
    if error.get("type") == INSUFFICIENT_QUOTA:  # OpenAI puts it in type, code or both
        code = INSUFFICIENT_QUOTA
    if error.get("type") == KEY_NOT_CHECKABLE:
        code = KEY_NOT_CHECKABLE
    # the code becomes a column the summary groups by: a gateway's essay must not
    return (str(code)[:100] if code is not None else None), str(error.get("message") or "")[:500]


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms``, else ``Retry-After`` (seconds or an
    HTTP date), as the openai SDK reads them.

    None when there is no usable hint: absent, unparsable, or zero or less (``0``, a negative
    value, a date in the past). Honouring those would retry at once, every attempt within a few
    milliseconds; the caller's own backoff with jitter applies instead.
    """
    lowered = {k.lower(): v for k, v in headers.items()}
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lowered.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / divisor
        except ValueError:
            continue
        if math.isnan(seconds):
            continue
        return seconds if seconds > 0 else None
    value = lowered.get("retry-after")
    if not value:
        return None
    try:
        parsed = parsedate_tz(value)
        seconds = float(mktime_tz(parsed) - time.time()) if parsed else 0.0
    except (TypeError, ValueError, OverflowError):
        return None
    return seconds if seconds > 0 else None


def _should_retry_hint(headers: Mapping[str, str]) -> bool | None:
    """The non-standard ``x-should-retry`` header the OpenAI API sends; None when absent."""
    for name, value in headers.items():
        if name.lower() == "x-should-retry":
            hint = value.strip().lower()
            return True if hint == "true" else False if hint == "false" else None
    return None


def classify_response(
    status: int, headers: Mapping[str, str], body: bytes, output: StructuredOutput | None = None
) -> Answer | Failure:
    """What an HTTP answer means for the row. Raises for answers no retry can fix (auth, 404, quota).

    With ``output``, a 200's text must be JSON following its schema, else it is ``invalid_output``.
    A server's ``x-should-retry`` overrides whether a row failure is retried, either way, as the
    openai SDK does; it cannot turn a refused key, a missing deployment, an exhausted quota or a
    redirect into something worth asking again, nor judge an answer's content (``invalid_output``).
    """
    outcome = _classify(status, headers, body, output)
    if isinstance(outcome, Failure) and outcome.code not in (UNEXPECTED_REDIRECT, INVALID_OUTPUT):
        hint = _should_retry_hint(headers)
        if hint is not None and hint != outcome.retryable:
            outcome = replace(outcome, retryable=hint)
    return outcome


def _classify(
    status: int, headers: Mapping[str, str], body: bytes, output: StructuredOutput | None
) -> Answer | Failure:
    if status == 200:
        return _parse_success(body, output)
    if 300 <= status < 400:
        return _redirect(status, headers)
    code, message = _error_fields(body)
    if code == INSUFFICIENT_QUOTA:
        raise LLMQueryQuotaError(
            f"the endpoint reports insufficient_quota (HTTP {status}): the account or subscription "
            "has no quota or credit left. This is a billing state, not a rate limit: no retry can "
            "help; top up the account or raise its quota, then run again."
        )
    if code == KEY_NOT_CHECKABLE:
        # LiteLLM's proxy without a database answers a key that is not its master key with a 400
        # on every row: an auth failure, said once, not thousands of row errors
        raise LLMQueryAuthError(
            f"the gateway could not check the key (HTTP {status}, {code}: {message}): LiteLLM's "
            "proxy without a database knows only its master key; check the connection's key"
        )
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
    return Failure(code or BAD_REQUEST, message or f"HTTP {status}", False, status, retry_after)


def _redirect(status: int, headers: Mapping[str, str]) -> Failure:
    """Never followed: both HTTP libraries would resend the key header and the prompt to wherever
    the ``Location`` points, and store that host's answer as the model's."""
    location = next((v for k, v in headers.items() if k.lower() == "location"), "")
    target = ""
    if location:
        try:
            host = urlsplit(location).hostname
        except ValueError:
            host = None
        target = f" to {host}" if host else " to a path on the same host"
    return Failure(
        UNEXPECTED_REDIRECT,
        f"the endpoint answered HTTP {status}, a redirect{target}; redirects are not followed "
        "(check the API base URL)",
        False,
        status,
    )


def _content_text(content: object) -> str | None:
    """The answer text: a string, or the text parts of a list of content parts joined."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "".join(texts)
    return None


def _refusal_text(message: Mapping[str, Any]) -> str | None:
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal.strip():
        return refusal
    content = message.get("content")
    if isinstance(content, list):  # a refusal may come as a content part of its own
        parts = [p.get("refusal") for p in content if isinstance(p, dict) and p.get("type") == "refusal"]
        text = "".join(p for p in parts if isinstance(p, str))
        return text or None
    return None


def _tool_names(message: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            names.append(str(name) if name else "?")
    function_call = message.get("function_call")  # the legacy form
    if isinstance(function_call, dict):
        names.append(str(function_call.get("name") or "?"))
    return names


def _parse_success(body: bytes, output: StructuredOutput | None = None) -> Answer | Failure:
    try:
        data = json.loads(body)
        choice = data["choices"][0]
        message = choice.get("message") or {}
        raw_content = message.get("content")
        finish_reason = choice.get("finish_reason")
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError):
        return Failure(BAD_RESPONSE, "malformed or empty answer (no choices[0].message)", True, 200)
    usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
    prompt_tokens = _int_or_none(usage.get("prompt_tokens"))
    completion_tokens = _int_or_none(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached_tokens = _int_or_none(details.get("cached_tokens")) if isinstance(details, dict) else None

    def failed(code: str, text: str, retryable: bool = False) -> Failure:
        usage_ = (prompt_tokens, completion_tokens, finish_reason)
        return Failure(code, text, retryable, 200, None, *usage_, cached_tokens=cached_tokens)

    # each of these is the model's deliberate answer to this prompt: asking again pays again for
    # the same outcome, so none is retried
    if finish_reason == CONTENT_FILTER:
        return failed(
            CONTENT_FILTER, "the answer was filtered by the content policy (finish_reason content_filter)"
        )
    refusal = _refusal_text(message)
    if refusal is not None:
        return failed(REFUSAL, refusal[:500])
    content = _content_text(raw_content)
    tools = _tool_names(message)
    if not content and (tools or finish_reason in ("tool_calls", "function_call")):
        return failed(
            TOOL_CALLS,
            f"the model asked to call tool(s) {', '.join(tools) or '?'} instead of answering "
            "(remove tools / tool_choice from request_params, or handle tool calls yourself)",
        )
    if not content and finish_reason == LENGTH:
        return failed(LENGTH, "the answer was cut by max_tokens before any text (finish_reason length)")
    if content is None:
        return failed(BAD_RESPONSE, "answer has no message content", retryable=True)
    problem = output.problem(content) if output is not None else None
    if problem is not None:
        if finish_reason == LENGTH:
            problem += " (finish_reason length: max_tokens cut the answer)"
        return replace(failed(INVALID_OUTPUT, problem), content=content)
    return Answer(content, finish_reason, prompt_tokens, completion_tokens, cached_tokens)


def _int_or_none(value: object) -> int | None:
    return int(value) if isinstance(value, int | float) else None
