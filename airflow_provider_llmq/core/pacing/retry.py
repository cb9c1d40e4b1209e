"""When to try a request again, and how long to wait first.

Follows the openai SDK's rules (retry 408/409/429/5xx and transport errors, read ``retry-after-ms``
then ``Retry-After``, exponential backoff with jitter) with one difference: a server-requested
wait is honored up to ``max_retry_wait`` instead of being ignored past 60 s, so a throttled
deployment is respected while a server asking for hours cannot hang the task. What is retryable
is decided when an answer is classified (:mod:`payload`); this module only decides how long to wait.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.request.payload import Failure


@dataclass(frozen=True)
class RetryPolicy:
    """
    :param max_retries: retries after the first attempt (so at most ``max_retries + 1`` requests).
    :param initial_backoff: first backoff in seconds, doubled on each retry.
    :param max_backoff: cap on the computed (not server-requested) backoff.
    :param max_retry_wait: cap on one server-requested wait (``Retry-After``).
    :param jitter: fraction of the backoff removed at random, so clients desynchronise.
    """

    max_retries: int = 6
    initial_backoff: float = 0.5
    max_backoff: float = 8.0
    max_retry_wait: float = 60.0
    jitter: float = 0.25
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise LLMQueryConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.initial_backoff < 0 or self.max_backoff < 0 or self.max_retry_wait < 0:
            raise LLMQueryConfigError("backoff and max_retry_wait must be >= 0")
        if not 0 <= self.jitter <= 1:
            raise LLMQueryConfigError(f"jitter must be within [0, 1], got {self.jitter}")

    def should_retry(self, failure: Failure, attempts_made: int) -> bool:
        return failure.retryable and attempts_made <= self.max_retries

    def delay(self, failure: Failure, attempts_made: int) -> float:
        """Seconds to wait before attempt ``attempts_made + 1``."""
        if failure.retry_after is not None and failure.retry_after > 0:
            return min(failure.retry_after, self.max_retry_wait)
        # no usable server hint (none, zero, negative, a past date): a server answering
        # "Retry-After: 0" to every client must not get every retry within milliseconds
        backoff = min(self.initial_backoff * 2 ** (attempts_made - 1), self.max_backoff)
        return backoff * (1 - self.jitter * self.rng.random())
