"""OpenAI-shaped answers of the mock server: errors, 429s, the texts of refusals and filters, and a
chat answer's usage; one place that the chat route, batch lines and packed items all answer from."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from .tokens import cached_prefix_tokens, count_messages, count_text

JSON = "application/json"
STATUS_CODES = {400: "invalid_request_error", 408: "timeout", 409: "conflict", 429: "rate_limit_exceeded"}
WAIT_HEADERS = ("retry-after", "retry-after-ms")
STANDARD_HEADERS = frozenset(
    {"host", "user-agent", "accept", "accept-encoding", "content-type", "content-length", "connection"}
)
INSUFFICIENT_QUOTA = {
    "code": "insufficient_quota",
    "message": "You exceeded your current quota, please check your plan and billing details.",
    "type": "insufficient_quota",
    "param": None,
}
REFUSAL = "I'm sorry, but I can't help with that request."
CONTENT_FILTER = {
    "code": "content_filter",
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content management "
    "policy.",
    "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation"},
}
CONTEXT_LENGTH = {
    "code": "context_length_exceeded",
    "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in "
    "more tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error",
}


def error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> web.Response:
    """An OpenAI-shaped error answer, so clients exercise their real error parsing."""
    body = {"error": {"code": code, "message": message, **extra}}
    return web.Response(status=status, body=json.dumps(body), content_type=JSON, headers=headers)


def rate_limited(
    retry_after_ms: int | None, retry_after_s: int | None = None, why: str = "Rate limit reached"
) -> web.Response:
    headers = {}
    if retry_after_s is None and retry_after_ms is not None:
        retry_after_s = max(1, math.ceil(retry_after_ms / 1000))
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    if retry_after_ms is not None:
        headers["retry-after-ms"] = str(retry_after_ms)
    return error(
        429,
        "rate_limit_exceeded",
        f"{why}. Please retry after the delay given in Retry-After.",
        headers,
        type="requests",
    )


def completion_tokens_of(text: str) -> int:
    """The completion's tokens: the word/punctuation count of :mod:`.tokens`."""
    return count_text(text)


def prompt_tokens(messages: list[Any]) -> int:
    """The prompt's tokens: each message's text and its chat framing (see :mod:`.tokens`)."""
    return count_messages(content_text(m.get("content")) for m in messages if isinstance(m, dict))


def usage(messages: list[Any], completion_tokens: int) -> dict[str, Any]:
    """A chat answer's ``usage``, with the prompt tokens served from the prompt cache."""
    texts = [content_text(m.get("content")) for m in messages if isinstance(m, dict)]
    prompt_tokens = count_messages(texts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_prefix_tokens(texts)},
    }


def content_text(content: Any) -> str:
    """Message content as text: a string, or the text parts of a multimodal list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)
