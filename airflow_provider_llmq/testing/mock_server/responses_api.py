"""The Responses API (``POST /v1/responses``, Azure's ``/openai/v1/responses``) of the mock server.

It serves what a client of that API sends: ``instructions`` and ``input`` (a string, or messages
whose content is a string or ``input_text`` parts), ``text.format`` of type ``json_schema`` (answered
as the chat route answers a ``response_format``) and ``max_output_tokens``; it answers a
``response`` object whose ``output`` is one assistant message of ``output_text``, with ``usage`` in
input / output tokens. The same prompt gets the same answer as on the chat route
(:func:`~.faults.expected_answer` with the same system prompt and params), meets the same fault
plan (markers and rates, its attempts counted in ``requests_per_prompt``), the ``rps`` cap, the
``max_concurrency`` limit and the latency. Requests are counted with the chat ones
(``chat_requests``, ``chat_routes`` by route); the ``quota`` policy and ``auth_fail`` plan are
not applied here.

openaivec packs rows as one JSON input ``{"user_messages": [{"id", "body"}]}`` under instructions
that quote the row's system message in ``<ElementInstructions><Instruction>``, and asks for
``{"assistant_messages": [{"id", "body"}]}``: such a request is answered item by item as
:mod:`.packing` answers an llmq pack (each item as if asked alone, one faulty item failing the
pack), so the two packings can be compared on one server.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

from aiohttp import web

from .access import check_access
from .fault_answers import counted_route, fault_response, over_rps
from .faults import ANSWER_KINDS, jitter_ms, plan, prompt_hash
from .packing import Pack
from .responses import REFUSAL, completion_tokens_of, content_text, error, rate_limited, usage
from .state import AZURE_V1_PREFIX, MockState
from .structured import answer_text
from .tokens import within_max_tokens

__all__ = ["add_responses_routes"]

_SYSTEM_ROLES = ("system", "developer")
_ELEMENT_INSTRUCTION = re.compile(r"<ElementInstructions>\s*<Instruction>(.*?)</Instruction>", re.DOTALL)


class _BadRequest(Exception):
    pass


def add_responses_routes(app: web.Application) -> None:
    for path in ("/v1/responses", f"{AZURE_V1_PREFIX}/responses", "/responses"):
        app.router.add_post(path, counted_route(_serve))


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The request as chat messages: ``instructions`` as the system message, then ``input``."""
    messages: list[dict[str, Any]] = []
    if isinstance(body.get("instructions"), str):
        messages.append({"role": "system", "content": body["instructions"]})
    given = body.get("input")
    if isinstance(given, str):
        return [*messages, {"role": "user", "content": given}]
    if not isinstance(given, list):
        raise _BadRequest("'input' must be a string or a list of messages.")
    for item in given:
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            raise _BadRequest("each item of 'input' must be a message.")
        messages.append({"role": item.get("role", "user"), "content": content_text(item.get("content"))})
    return messages


def _params(body: dict[str, Any]) -> dict[str, Any]:
    """The request's params in the chat route's form, so an answer matches that route's."""
    params: dict[str, Any] = {}
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        params["response_format"] = {"type": "json_schema", "json_schema": spec}
    if isinstance(body.get("max_output_tokens"), int):
        params["max_tokens"] = body["max_output_tokens"]
    return params


def _openaivec_pack(prompt: str, system: str | None, params: dict[str, Any]) -> tuple[Pack, str] | None:
    """openaivec's pack of string bodies and the system message each row would be asked with."""
    spec = (params.get("response_format") or {}).get("json_schema") or {}
    schema = spec.get("schema") if isinstance(spec, dict) else None
    if not isinstance(schema, dict) or "assistant_messages" not in (schema.get("properties") or {}):
        return None
    try:
        items = json.loads(prompt)["user_messages"]
        ids = [str(item["id"]) for item in items]
        prompts = [str(item["body"]) for item in items]
    except (ValueError, KeyError, TypeError):
        return None
    found = _ELEMENT_INSTRUCTION.search(system or "")
    return Pack(ids, prompts, None, prompt), found.group(1) if found else ""


def _pack_answer(pack: Pack, model: str, system: str, params: dict[str, Any]) -> str:
    """The llmq pack's answer in openaivec's shape (its ids are integers)."""
    rows = {k: v for k, v in params.items() if k != "response_format"}
    items = json.loads(pack.answer(model, [{"role": "system", "content": system}], rows))["items"]
    messages = [{"id": int(i["id"]) if i["id"].isdigit() else i["id"], "body": i["answer"]} for i in items]
    return json.dumps({"assistant_messages": messages}, ensure_ascii=False)


async def _serve(request: web.Request, st: MockState) -> web.StreamResponse:
    cfg = st.config
    denied = check_access(request, st, False)  # OpenAI's paths: Bearer, or api-key on Azure's v1
    if denied is not None:
        return denied
    try:
        body = await request.json()
        if not isinstance(body, dict):
            raise _BadRequest("The request body must be a JSON object.")
        messages = _messages(body)
        params = _params(body)
    except (ValueError, _BadRequest) as exc:
        why = str(exc) if isinstance(exc, _BadRequest) else "The request body must be JSON."
        return error(400, "invalid_request_error", why, type="invalid_request_error")
    user = [m for m in messages if m["role"] == "user"]
    model = body.get("model")
    if not user or not model:
        why = "'input' must hold a user message." if model else "you must provide a model parameter"
        return error(400, "invalid_request_error", why, type="invalid_request_error")
    prompt = user[-1]["content"]
    system = "\n".join(m["content"] for m in messages if m["role"] in _SYSTEM_ROLES) or None
    packed = _openaivec_pack(prompt, system, params)
    if packed is None:
        key = prompt_hash(prompt)
        st.per_prompt[key] += 1
        attempt = st.per_prompt[key]
    else:
        packed[0].count(st.per_prompt)

    if cfg.max_concurrency is not None and st.in_flight >= cfg.max_concurrency:
        return rate_limited(50, why="Too many concurrent requests")
    st.in_flight += 1
    st.max_in_flight = max(st.max_in_flight, st.in_flight)
    try:
        capped = over_rps(st)
        if capped is not None:
            return capped
        extra_ms, fault = plan(prompt, attempt, cfg) if packed is None else packed[0].plan(cfg)
        delay = cfg.latency_ms + jitter_ms(prompt, cfg) + extra_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        if fault is not None and fault.kind not in ANSWER_KINDS:
            return fault_response(fault, cfg, request)
        if packed is None:
            text = answer_text(model, system, prompt, params)
        else:
            text = _pack_answer(packed[0], model, packed[1], params)
        text, cut = within_max_tokens(text, params)
        billed = usage(messages, completion_tokens_of(text))
        st.prompt_tokens_total += billed["prompt_tokens"]
        st.completion_tokens_total += billed["completion_tokens"]
        st.cached_tokens_total += billed["prompt_tokens_details"]["cached_tokens"]
        st.ok_per_window[int(time.monotonic())] += 1
        kind = fault.kind if fault is not None else None
        return web.json_response(_response(model, body, text, cut, kind, billed))
    finally:
        st.in_flight -= 1


def _response(
    model: str, body: dict[str, Any], text: str, cut: bool, kind: str | None, billed: dict[str, Any]
) -> dict[str, Any]:
    """A ``response`` object; a fault kind that shapes a chat answer shapes this one alike."""
    content: list[dict[str, Any]] = [{"type": "output_text", "text": text, "annotations": []}]
    status, incomplete = "completed", None
    if kind == "refusal":
        content = [{"type": "refusal", "refusal": REFUSAL}]
    elif kind == "filtered":
        content, status, incomplete = [], "incomplete", {"reason": "content_filter"}
    elif cut or kind in ("length", "length_text"):
        if kind == "length":
            content = []
        status, incomplete = "incomplete", {"reason": "max_output_tokens"}
    message = {
        "type": "message",
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "status": "completed" if status == "completed" else "incomplete",
        "role": "assistant",
        "content": content,
    }
    return {
        "id": f"resp_{uuid.uuid4().hex[:24]}",
        "object": "response",
        "created_at": int(time.time()),
        "status": status,
        "incomplete_details": incomplete,
        "error": None,
        "model": model,
        "instructions": body.get("instructions"),
        "output": [message],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "text": body.get("text") or {"format": {"type": "text"}},
        "max_output_tokens": body.get("max_output_tokens"),
        "usage": {
            "input_tokens": billed["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": billed["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": billed["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": billed["total_tokens"],
        },
    }
