"""Mock answers to structured-output requests (``response_format`` of type ``json_schema``).

The answer is JSON built from the request's schema, deterministically: every choice (a string, a
number, an enum member, an array's length, a null for a nullable field) is drawn from a generator
seeded by the request, as :func:`~.faults.expected_answer` is; an enum that is a sentiment scale
(positive / neutral / negative) is answered from the prompt's words (:mod:`.lexicon`). Markers in
the prompt make it answer wrongly, for every attempt of that prompt:

- ``[[invalid_json]]``: text that is not JSON;
- ``[[schema_mismatch]]``: the root object without its first property;
- ``[[overflow]]``: the first integer field set to ``2**70`` (else the first number to ``1e999``);
- ``[[bad_enum]]``: the first enum field set to a value outside its list.

A repair request (its last user message is the repair text, without the marker) is answered
correctly. Tests compute what the server answers with :func:`expected_structured_answer`.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

from .faults import expected_answer, normalise_params
from .lexicon import sentiment_label

__all__ = ["MARKERS", "expected_structured_answer", "output_schema_of"]

MARKERS = ("invalid_json", "schema_mismatch", "overflow", "bad_enum")
_OVERFLOW_NUMBER = "__llmq_overflow_number__"  # replaced by 1e999 in the text: json.dumps cannot write it
_NOT_IN_ENUM = "__not_in_enum__"


def output_schema_of(params: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a request asks its answer to follow, or None for a free-text request."""
    response_format = (params or {}).get("response_format")
    if not isinstance(response_format, dict) or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, dict) else None
    return schema if isinstance(schema, dict) else None


def answer_text(model: str | None, system_prompt: str | None, prompt: str, params: dict[str, Any]) -> str:
    """What the chat route and a batch line answer: JSON built from the schema for a ``json_schema``
    request (or broken as the prompt's marker says), else the plain expected answer."""
    answer = expected_structured_answer(model, system_prompt, prompt, params)
    return expected_answer(model, system_prompt, prompt, params) if answer is None else answer


def expected_structured_answer(
    model: str | None, system_prompt: str | None, prompt: str, params: dict[str, Any] | None
) -> str | None:
    """The text the server answers to a ``json_schema`` request (None for any other request).

    The arguments are those of :func:`~.faults.expected_answer`: ``params`` is the body minus
    ``messages``, ``model`` and ``stream``, so it holds the ``response_format``.
    """
    schema = output_schema_of(params)
    if schema is None:
        return None
    blob = json.dumps([model, system_prompt, prompt, normalise_params(params)], sort_keys=True)
    rng = random.Random(hashlib.sha256(blob.encode("utf-8")).hexdigest())
    marker = next((m for m in MARKERS if f"[[{m}]]" in prompt), None)
    # a marked answer has no nulls, so the field the marker breaks is always there
    value = _value(schema, rng, prompt, nulls=marker is None)
    if marker == "invalid_json":
        return json.dumps(value)[:-1] + ", oops"  # cut and garbled: no JSON parser accepts it
    if marker == "schema_mismatch" and isinstance(value, dict) and value:
        value.pop(next(iter(value)))
    elif marker == "overflow":
        if not _replace_first(value, schema, "integer", 2**70):
            _replace_first(value, schema, "number", _OVERFLOW_NUMBER)
    elif marker == "bad_enum":
        _replace_first(value, schema, "enum", _NOT_IN_ENUM)
    return json.dumps(value).replace(f'"{_OVERFLOW_NUMBER}"', "1e999")


def _types(node: dict[str, Any]) -> list[str]:
    declared = node.get("type")
    kinds = [declared] if isinstance(declared, str) else list(declared or [])
    if not kinds and "enum" in node:
        kinds = ["string"]
    return kinds


def _branch(node: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """(the schema without its null option, whether null is allowed)."""
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        return branches[0], len(branches) < len(node["anyOf"])
    kinds = _types(node)
    return node, "null" in kinds or None in node.get("enum", [])


def _value(node: dict[str, Any], rng: random.Random, text: str, nulls: bool = True) -> Any:
    node, nullable = _branch(node)
    draw = rng.random()  # always drawn, so a field's null does not shift the later fields' values
    if nulls and nullable and draw < 0.2:
        return None
    if "enum" in node:
        members = [v for v in node["enum"] if v is not None]
        drawn = rng.choice(members)  # drawn even when the text decides, for the same reason
        read = sentiment_label(members, text)  # a sentiment scale is answered from the words
        return drawn if read is None else read
    kind = next(k for k in _types(node) if k != "null")
    if kind == "object":
        return {name: _value(child, rng, text, nulls) for name, child in node.get("properties", {}).items()}
    if kind == "array":
        return [_value(node["items"], rng, text, nulls) for _ in range(rng.randint(0, 3))]
    if kind == "integer":
        low, high = max(node.get("minimum", -1000), -1000), min(node.get("maximum", 1000), 1000)
        return rng.randint(int(low), int(high))
    if kind == "number":
        return round(rng.uniform(-1000, 1000), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if node.get("format") == "date":
        return f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    return f"s{rng.randrange(10**6)}"


def _replace_first(value: Any, node: dict[str, Any], kind: str, new: Any) -> bool:
    """Sets the first field (depth-first) of ``kind`` (a JSON type, or ``enum``) that holds a value
    to ``new``; False when there is none."""
    node, _ = _branch(node)
    if isinstance(value, dict):
        for name, child in node.get("properties", {}).items():
            child_node, _ = _branch(child)
            matches = "enum" in child_node if kind == "enum" else kind in _types(child_node)
            if matches and value.get(name) is not None:
                value[name] = new
                return True
            if _replace_first(value.get(name), child, kind, new):
                return True
    if isinstance(value, list):
        items, _ = _branch(node.get("items", {}))
        for index, item in enumerate(value):
            matches = "enum" in items if kind == "enum" else kind in _types(items)
            if matches and item is not None:
                value[index] = new
                return True
            if _replace_first(item, items, kind, new):
                return True
    return False
