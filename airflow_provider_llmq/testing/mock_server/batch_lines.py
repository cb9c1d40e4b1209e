"""What the mock Batch API answers for one request line: the same answer, the same faults from the
same ``[[...]]`` prompt markers (:func:`faults.plan`, as a first attempt) and the same error bodies
as the chat route, so a row asked through a batch and asked live can be compared.

A line's outcome is a (status, body) pair: 200 lines go to the batch's output file, the others to
its error file. Faults that only exist on a live connection (a reset, a redirect, a trickled body)
become a 500 / the plain answer: a batch has no connection to break. A packed line
(``rows_per_request``) is answered as the chat route answers a pack (:mod:`packing`): each item as if
asked alone, and one faulty item fails the line.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from typing import Any

from . import responses
from .chat_answer import answer_for, assistant_message, completion
from .faults import ANSWER_KINDS, Fault, MockConfig, plan
from .packing import parse_pack


def tokens(body: dict[str, Any]) -> int:
    """The prompt tokens a line enqueues: what the chat route bills for its messages."""
    messages = body.get("messages") or []
    return responses.prompt_tokens(messages)


def check_line(line: Any, url: str) -> str | None:
    """Why a request line is invalid (as the API's validation would say), or None."""
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return "each line must be a JSON object with a string custom_id"
    if line.get("method") != "POST" or line.get("url") != url:
        return f"each line must POST to {url}"
    body = line.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body.get("model"):
        return "each line's body needs 'messages' and 'model'"
    if not any(isinstance(m, dict) and m.get("role") == "user" for m in body["messages"]):
        return "'messages' must contain a user message"
    return None


def answer(body: dict[str, Any], config: MockConfig) -> tuple[int, Any]:
    """(status, body) of one line, decided as the chat route decides a first attempt."""
    messages = body["messages"]
    user = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"][-1]
    system = next((m for m in messages if isinstance(m, dict) and m.get("role") == "system"), None)
    prompt = responses.content_text(user.get("content"))
    pack = parse_pack(body, prompt)  # rows_per_request: each item as if asked alone, first attempt
    if pack is not None:
        pack.count(Counter())
    _, fault = plan(prompt, 1, config) if pack is None else pack.plan(config)
    if fault is not None and fault.kind not in ANSWER_KINDS:
        return _fault(fault)
    model = str(body["model"])
    system_prompt = responses.content_text(system.get("content")) if system else None
    text, cut = answer_for(body, model, system_prompt, prompt, pack)  # as a live request answers
    message, finish_reason = assistant_message(text, cut, fault.kind if fault is not None else None)
    billed = responses.usage(messages, responses.completion_tokens_of(text))
    return 200, completion(model, message, finish_reason, billed)


def _fault(fault: Fault) -> tuple[int, Any]:
    kind = fault.kind
    if kind == "content_filter":
        return 400, {"error": responses.CONTENT_FILTER}
    if kind == "context_length":
        return 400, {"error": responses.CONTEXT_LENGTH}
    if kind == "quota":
        return 429, {"error": responses.INSUFFICIENT_QUOTA}
    if kind == "malformed":
        return 200, '{"choices": ['
    if kind == "empty":
        return 200, {"id": "chatcmpl-empty", "object": "chat.completion", "choices": []}
    status = int(kind) if kind.isdigit() else 500
    code = responses.STATUS_CODES.get(status, "server_error")
    message = f"The server had an error while processing your request ({status})."
    return status, {"error": {"code": code, "message": message, "type": "server_error"}}


def result_line(custom_id: str, status: int, body: Any) -> bytes:
    """An output- or error-file line carrying a response."""
    record = {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": {"status_code": status, "request_id": uuid.uuid4().hex, "body": body},
        "error": None,
    }
    return json.dumps(record).encode() + b"\n"


_NEVER_RAN = {
    "batch_expired": "This request could not be executed before the completion window expired.",
    "batch_cancelled": "This request was not executed because the batch was cancelled.",
}


def never_ran_line(custom_id: str, code: str) -> bytes:
    """An error-file line for a request the batch never ran (``batch_expired``, ``batch_cancelled``)."""
    record = {
        "id": f"batch_req_{uuid.uuid4().hex[:24]}",
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": _NEVER_RAN[code]},
    }
    return json.dumps(record).encode() + b"\n"
