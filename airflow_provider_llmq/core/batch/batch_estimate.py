"""What a Batch API request line will cost, counted before it is sent: its prompt tokens as a live
request's budget reservation counts them (:class:`~..accounting.cost.TokenCounter`), and its completion cap. A
pack line (``rows_per_request``) is counted by its real messages: the system prompt and the pack
instruction once, the envelope of its rows; its completion is each row's, with their ids.

A batch cannot be stopped part way once created, so the budget holds a file's whole estimate from
the moment its batch is asked for until its usage is collected."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_llmq.core.accounting.cost import MESSAGE_OVERHEAD_TOKENS, TokenCounter
from airflow_provider_llmq.core.packing.envelope import pack_items, pack_max_tokens

__all__ = ["LineEstimator"]


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


@dataclass(frozen=True)
class LineEstimator:
    """(prompt, completion) tokens of one request line.

    :param completion: completion tokens counted for a line whose body sets no ``max_tokens`` /
        ``max_completion_tokens`` (the expected completion length, or a default).
    """

    completion: int
    counter: TokenCounter = field(default_factory=TokenCounter.shared)

    def __call__(self, line: bytes) -> tuple[int, int]:
        body = json.loads(line)["body"]
        texts = [_text(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict)]
        texts = [t for t in texts if t]
        prompt = sum(self.counter.count(t) for t in texts) + MESSAGE_OVERHEAD_TOKENS * (len(texts) + 1)
        cap = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(cap, int) and not isinstance(cap, bool):
            return prompt, cap  # a pack's is already its rows', scaled
        items = pack_items(body)  # a pack answers each of its rows, with their ids
        return prompt, self.completion if items is None else pack_max_tokens(self.completion, len(items))
