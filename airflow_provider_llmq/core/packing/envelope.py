"""The envelope of a pack: several rows sent as one user message, answered as one JSON object.

The user's system prompt goes first, once per pack; a second system message says that each item is
answered on its own. The rows travel as ``{"items": [{"id": "1", "prompt": ...}, ...]}`` and the
answer is asked for with a strict JSON schema: ``{"items": [{"id", "answer"}]}`` for free text, or
``{"items": [{"id", <output_schema fields>}]}`` with an ``output_schema``. The ids are the pack's
own (``"1"``..``"n"``), never the rows' ids: shorter, and nothing of the table reaches the model.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmq.core.request.payload import ChatRequest, Failure

__all__ = [
    "ITEM_ANSWER_OVERHEAD",
    "PACK_ANSWER_OVERHEAD",
    "PACK_INSTRUCTION",
    "PACK_SCHEMA_NAME",
    "PackedChatRequest",
    "envelope_text",
    "item_id_key",
    "pack_items",
    "pack_max_tokens",
    "row_max_tokens",
]

PACK_SCHEMA_NAME = "llmq_pack"
#: completion tokens an item's id and JSON punctuation add to its answer, and those of the answer's
#: ``{"items": [...]}`` around them: a pack's ``max_tokens`` is each row's plus the first, times the
#: rows, plus the second. Measured by benchmarks/packing_overhead.py: an item takes 17 tokens as the
#: mock counts (each mark one), 7-12 in o200k_base written compact or spaced and 17-18 indented (as
#: some models write strict JSON); the frame 8. 16 and no frame cut packs at ``max_tokens`` where
#: every row asked alone fitted; the 3 over 17 leave room for a few escaped quotes or newlines.
ITEM_ANSWER_OVERHEAD = 20
PACK_ANSWER_OVERHEAD = 8
PACK_INSTRUCTION = (
    'The user message is a JSON object whose "items" each hold an "id" and a "prompt". Answer each '
    "item's prompt on its own, exactly as if it were the only prompt you were given: items must not "
    "influence each other. Return every id exactly once, with the answer to that item's prompt, in "
    "the JSON schema given."
)


def item_id_key(item_schema: Mapping[str, Any] | None) -> str:
    """The field that carries an item's id in the answer: ``id``, unless the user's output schema
    has a field of that name."""
    properties = (item_schema or {}).get("properties") or {}
    return "llmq_item_id" if "id" in properties else "id"


def pack_schema(item_schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """The answer's schema (OpenAI's strict form): an array of items, each the id and the answer."""
    if item_schema is None:
        item: dict[str, Any] = {
            "type": "object",
            "properties": {"id": {"type": "string"}, "answer": {"type": "string"}},
            "required": ["id", "answer"],
            "additionalProperties": False,
        }
    else:
        key = item_id_key(item_schema)
        item = copy.deepcopy(dict(item_schema))
        item["properties"] = {key: {"type": "string"}, **dict(item_schema["properties"])}
        item["required"] = [key, *list(item_schema.get("required") or [])]
    return {
        "type": "object",
        "properties": {"items": {"type": "array", "items": item}},
        "required": ["items"],
        "additionalProperties": False,
    }


def pack_max_tokens(per_row: int, rows: int) -> int:
    """A pack's ``max_tokens``: each row's, plus its item's id and JSON punctuation."""
    return rows * (per_row + ITEM_ANSWER_OVERHEAD) + PACK_ANSWER_OVERHEAD


def row_max_tokens(pack: int, rows: int) -> int:
    """The ``max_tokens`` of each row of a pack asked for ``pack``: :func:`pack_max_tokens` undone."""
    return (pack - PACK_ANSWER_OVERHEAD) // rows - ITEM_ANSWER_OVERHEAD


def envelope_text(prompts: Sequence[str]) -> str:
    """The one user message of a pack: its prompts with the ids ``"1"``..``"n"``."""
    items = [{"id": str(index), "prompt": prompt} for index, prompt in enumerate(prompts, start=1)]
    return json.dumps({"items": items}, ensure_ascii=False)


@dataclass(frozen=True)
class PackedChatRequest(ChatRequest):
    """A pack's body: the row request's system prompt, model and params, the pack instruction, and
    the pack's schema as ``response_format``.

    ``output`` stays None, so the engine does not judge the pack's answer as a whole: every item is
    checked on its own by :mod:`.unpack` (one invalid item must not sink its neighbours).

    :param item_schema: the user's output schema (strict form), None for free text.
    """

    item_schema: Mapping[str, Any] | None = None
    rows: int = 1  # rows in this pack: a row's max_tokens is scaled to the whole pack's answer

    @classmethod
    def of(cls, request: ChatRequest) -> PackedChatRequest:
        schema = request.output.schema if request.output is not None else None
        return cls(
            request.system_prompt,
            request.model,
            request.params,
            None,
            limit_param=request.limit_param,
            item_schema=schema,
        )

    def body(self, prompt: str) -> dict[str, Any]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "system", "content": PACK_INSTRUCTION})
        messages.append({"role": "user", "content": prompt})
        return self._with_params(messages)

    def repair_body(self, prompt: str, failure: Failure) -> dict[str, Any] | None:
        return None  # a pack is never repaired: its bad items are asked again alone

    def for_rows(self, rows: int) -> PackedChatRequest:
        return dataclasses.replace(self, rows=rows)

    def max_completion_tokens(self) -> int | None:
        per_row = super().max_completion_tokens()
        return None if per_row is None else pack_max_tokens(per_row, self.rows)

    def _with_params(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        body = super()._with_params(messages)
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int):
                body[name] = pack_max_tokens(body[name], self.rows)
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": PACK_SCHEMA_NAME,
                "schema": pack_schema(self.item_schema),
                "strict": True,
            },
        }
        return body


def pack_items(body: dict[str, Any]) -> list[str] | None:
    """The prompts of a pack line's body, in item order; None for a line of one row."""
    response_format = body.get("response_format")
    spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
    if not isinstance(spec, dict) or spec.get("name") != PACK_SCHEMA_NAME:
        return None
    user = [m for m in body.get("messages") or [] if isinstance(m, dict) and m.get("role") == "user"]
    items = json.loads(user[-1]["content"])["items"]
    return [str(item["prompt"]) for item in items]
