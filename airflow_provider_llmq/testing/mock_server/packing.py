"""Mock answers to packed requests (``rows_per_request``): each item answered as if asked alone.

A request is a pack when its ``response_format`` is the ``llmq_pack`` schema. Each item's prompt
counts its own attempt (``requests_per_prompt``) and meets its own fault plan, markers and rates
alike: the first item's fault is the pack's, so one faulty item fails the pack it is in, as a real
API fails a request. The noise (``MockConfig.noise``) is drawn once per request. Every item's
answer is what the same prompt asked alone would get (same system prompt, same params, its output
schema as the ``response_format``), so a test compares each row with ``expected_answer``.

Markers that act only inside a pack (asked alone, the prompt is answered normally):

- ``[[pack_drop]]``: the item is left out of the answer;
- ``[[pack_dup]]``: the item is answered twice, the second time with another answer;
- ``[[pack_unknown]]``: the item is answered under an id that was not asked.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_llmq.core.packing.envelope import (
    PACK_INSTRUCTION,
    PACK_SCHEMA_NAME,
    item_id_key,
    row_max_tokens,
)
from airflow_provider_llmq.core.request.structured import DEFAULT_SCHEMA_NAME

from .faults import Fault, MockConfig, _noise, plan, prompt_hash
from .structured import answer_text
from .tokens import within_max_tokens

__all__ = ["Pack", "parse_pack"]


@dataclass
class Pack:
    """The items of one packed request and what the server counted for them."""

    ids: list[str]
    prompts: list[str]
    item_schema: dict[str, Any] | None
    envelope: str
    attempts: list[int] = field(default_factory=list)
    envelope_attempt: int = 0

    def count(self, per_prompt: Counter[str]) -> None:
        """Each item's attempt, and the request's own (for its noise)."""
        self.attempts = []
        for prompt in self.prompts:
            key = prompt_hash(prompt)
            per_prompt[key] += 1
            self.attempts.append(per_prompt[key])
        self.envelope_attempt = per_prompt[prompt_hash(self.envelope)] + 1
        per_prompt[prompt_hash(self.envelope)] = self.envelope_attempt

    def plan(self, config: MockConfig) -> tuple[float, Fault | None]:
        """The slowest item's delay and the first item's fault (else the request's noise)."""
        delay, fault = 0.0, None
        for prompt, attempt in zip(self.prompts, self.attempts, strict=True):
            extra, item_fault = plan(prompt, attempt, config, noise=False)
            delay = max(delay, extra)
            fault = fault or item_fault
        if fault is None and config.noise:
            fault = _noise(self.envelope, self.envelope_attempt, config)
        return delay, fault

    def answer(self, model: str | None, messages: list[Any], params: dict[str, Any]) -> str:
        """The pack's answer: each item's answer to its prompt asked alone."""
        system = next(
            (
                m.get("content")
                for m in messages
                if isinstance(m, dict) and m.get("role") == "system" and m.get("content") != PACK_INSTRUCTION
            ),
            None,
        )
        alone = {k: v for k, v in params.items() if k != "response_format"}
        for name in ("max_tokens", "max_completion_tokens"):  # a pack asks for each row's, scaled
            if isinstance(alone.get(name), int):
                alone[name] = row_max_tokens(alone[name], len(self.ids))
        if self.item_schema is not None:
            alone["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": DEFAULT_SCHEMA_NAME, "schema": self.item_schema, "strict": True},
            }
        key = item_id_key(self.item_schema)
        items: list[dict[str, Any]] = []
        for item_id, prompt in zip(self.ids, self.prompts, strict=True):
            text, _ = within_max_tokens(answer_text(model, system, prompt, alone), alone)  # as if alone
            if self.item_schema is None:
                fields: dict[str, Any] = {"answer": text}
            else:
                try:
                    value = json.loads(text)
                except ValueError:
                    return '{"items": [' + text  # one item's broken JSON breaks the pack's answer
                fields = value if isinstance(value, dict) else {"value": value}
            if "[[pack_drop]]" in prompt:
                continue
            shown = f"x{item_id}" if "[[pack_unknown]]" in prompt else item_id
            items.append({key: shown, **fields})
            if "[[pack_dup]]" in prompt:
                other = {"answer": f"duplicate of {item_id}"} if self.item_schema is None else fields
                items.append({key: item_id, **other})
        return json.dumps({"items": items}, ensure_ascii=False)  # a model writes UTF-8, not \u escapes


def parse_pack(body: dict[str, Any], envelope: str) -> Pack | None:
    """The pack a request carries, or None for a request of one prompt."""
    response_format = body.get("response_format")
    schema_spec = response_format.get("json_schema") if isinstance(response_format, dict) else None
    if not isinstance(schema_spec, dict) or schema_spec.get("name") != PACK_SCHEMA_NAME:
        return None
    try:
        items = json.loads(envelope)["items"]
        ids = [str(item["id"]) for item in items]
        prompts = [str(item["prompt"]) for item in items]
        item = schema_spec["schema"]["properties"]["items"]["items"]
    except (ValueError, KeyError, TypeError):
        return None
    properties = dict(item.get("properties") or {})
    if set(properties) == {"id", "answer"}:
        return Pack(ids, prompts, None, envelope)
    key = next(iter(properties))  # the id field comes first
    properties.pop(key)
    schema = {**item, "properties": properties, "required": [r for r in item.get("required", []) if r != key]}
    return Pack(ids, prompts, schema, envelope)
