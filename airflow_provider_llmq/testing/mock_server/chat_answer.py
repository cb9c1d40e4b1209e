"""The mock's chat answer, built once for the live chat route (:mod:`app`) and the Batch API's lines
(:mod:`batch_lines`): the text a request gets (its own, or each item of a pack as if asked alone),
cut at ``max_tokens``, shaped by the fault kinds that change an answer rather than refuse it, and
the ``chat.completion`` body around it. So a row asked live and asked through a batch can be
compared."""

from __future__ import annotations

import time
import uuid
from typing import Any

from .packing import Pack
from .responses import REFUSAL
from .structured import answer_text
from .tokens import within_max_tokens


def answer_for(
    body: dict[str, Any], model: str, system_prompt: str | None, prompt: str, pack: Pack | None
) -> tuple[str, bool]:
    """The answer's text and whether ``max_tokens`` cut it (a model writes no more than that)."""
    params = {k: v for k, v in body.items() if k not in ("messages", "model", "stream")}
    if pack is None:
        text = answer_text(model, system_prompt, prompt, params)
    else:
        text = pack.answer(model, body.get("messages") or [], params)
    return within_max_tokens(text, body)


def assistant_message(text: str, cut: bool, kind: str | None) -> tuple[dict[str, Any], str]:
    """The assistant message and its ``finish_reason``; ``kind`` is an answer-shaping fault."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    finish_reason = "length" if cut else "stop"
    if kind == "filtered":
        message["content"], finish_reason = "", "content_filter"
    elif kind == "tool_calls":
        message["content"], finish_reason = None, "tool_calls"
        call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        message["tool_calls"] = [{"id": "call_mock", "type": "function", "function": call}]
    elif kind == "refusal":
        message["content"], message["refusal"] = None, REFUSAL
    elif kind == "length":
        message["content"], finish_reason = "", "length"
    elif kind == "length_text":
        finish_reason = "length"
    elif kind == "parts":
        half = len(text) // 2
        message["content"] = [{"type": "text", "text": text[:half]}, {"type": "text", "text": text[half:]}]
    return message, finish_reason


def completion(
    model: str, message: dict[str, Any], finish_reason: str, billed: dict[str, Any]
) -> dict[str, Any]:
    """A ``chat.completion`` body."""
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": billed,
    }
