"""A pack's answer back to its rows: parsed, matched by id, each item checked on its own.

Nothing is matched by position: an item whose id was not asked, or an id answered twice, gives no
row an answer; the rows without exactly one valid answer are asked again by the runner.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from airflow_provider_llmq.core.packing.envelope import item_id_key
from airflow_provider_llmq.core.request.structured import StructuredOutput

__all__ = ["Unpacked", "unpack"]


@dataclass
class Unpacked:
    """What a pack's answer gave.

    :param answers: pack id -> the item's answer text (for an output schema: its JSON, id removed).
    :param missing: asked ids with no usable answer (absent, answered twice, or invalid).
    :param duplicated: ids answered more than once (none of their answers is used).
    :param unknown: ids answered that were not asked.
    :param invalid: ids whose one answer did not follow the schema, with the reason.
    :param problem: why the answer as a whole is unusable (not JSON, no ``items`` list); then every
        asked id is missing.
    """

    answers: dict[str, str] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)
    invalid: dict[str, str] = field(default_factory=dict)
    problem: str | None = None


def unpack(content: str, asked: list[str], output: StructuredOutput | None) -> Unpacked:
    """Matches ``content`` (a pack's answer text) to the ids ``asked``."""
    try:
        data = json.loads(content)
    except ValueError as exc:
        return Unpacked(missing=list(asked), problem=f"the pack's answer is not valid JSON ({exc})"[:300])
    items = data.get("items") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return Unpacked(missing=list(asked), problem='the pack\'s answer has no "items" list')
    key = item_id_key(output.schema if output is not None else None)
    wanted = set(asked)
    by_id: dict[str, object] = {}
    counts: Counter[str] = Counter()
    result = Unpacked()
    for item in items:
        item_id = item.get(key) if isinstance(item, dict) else None
        item_id = str(item_id) if isinstance(item_id, str | int) and not isinstance(item_id, bool) else None
        if item_id is None or item_id not in wanted:
            result.unknown.append(str(item_id))
            continue
        counts[item_id] += 1
        by_id[item_id] = item
    for item_id in asked:
        if counts[item_id] > 1:
            result.duplicated.append(item_id)
            result.missing.append(item_id)
            continue
        item = by_id.get(item_id)
        if not isinstance(item, dict):
            result.missing.append(item_id)
            continue
        text, reason = _item_answer(item, key, output)
        if reason is not None:
            result.invalid[item_id] = reason
            result.missing.append(item_id)
        else:
            result.answers[item_id] = text
    return result


def _item_answer(
    item: dict[str, object], key: str, output: StructuredOutput | None
) -> tuple[str, str | None]:
    if output is None:
        answer = item.get("answer")
        if not isinstance(answer, str) or set(item) != {key, "answer"}:
            return "", 'the item is not {"id", "answer": string}'
        return answer, None
    fields = {name: value for name, value in item.items() if name != key}
    text = json.dumps(fields, ensure_ascii=False)
    return text, output.problem(text)
