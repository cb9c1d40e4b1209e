"""One row's view of the run's :class:`~.budget.Budget`: the completion limit each of its attempts
sends when the user set none, and each attempt's reservation."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.accounting.budget import Budget, Hold, _Wait
from airflow_provider_llmq.core.accounting.cost import TokenCounter

if TYPE_CHECKING:
    from airflow_provider_llmq.core.request.payload import ChatRequest

__all__ = ["RowBudget"]


class RowBudget:
    """One row's view of the run's budget: the completion limit each attempt sends when the user set
    none, and each attempt's reservation (its conversation counted as it is sent: a repair request
    carries the invalid answer too)."""

    def __init__(self, budget: Budget, request: ChatRequest) -> None:
        self.budget = budget
        self.request = request
        self.user_limit = request.max_completion_tokens()
        self.limit: int | None = None  # the limit llmq sent with the latest attempt
        self.cut_at = 0  # the limit that cut the latest cut answer

    @property
    def owns_limit(self) -> bool:
        """llmq sets the completion limit (the user set no ``max_tokens``)."""
        return self.user_limit is None

    def body(self, conversation: dict[str, Any]) -> dict[str, Any]:
        """The attempt's body: the conversation, with the limit llmq sets when it sets one (twice
        the limit that cut the previous answer, if one did)."""
        if not self.owns_limit:
            return conversation
        self.limit = max(self.budget.completion_limit(), 2 * self.cut_at)
        return self.request.with_limit(conversation, self.limit)

    def reserve(self, body: dict[str, Any]) -> Hold | _Wait | None:
        texts = [m["content"] for m in body.get("messages", ()) if isinstance(m.get("content"), str)]
        estimate = TokenCounter.shared().messages_tokens(texts)
        completion = self.limit if self.owns_limit else self.user_limit
        return self.budget.reserve(estimate, completion or 0)

    def cut(self) -> None:
        """The latest answer stopped at llmq's limit: the next attempt asks for twice as much."""
        self.cut_at = self.limit or 0
