"""Every request and retry setting of a run, declared once.

An operator, the hook and plain Python all build one frozen :class:`QueryOptions` and hand it to a
query method or a client; the clients derive the request body and the retry policy from it. A
new setting is one field here (SynapseML's ``ServiceParam`` idea), not a keyword listed in five
signatures.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_llmq.core.accounting.cost import parse_prices
from airflow_provider_llmq.core.accounting.grants import GrantTicket
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.pacing.retry import RetryPolicy
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT, ChatRequest
from airflow_provider_llmq.core.request.structured import StructuredOutput

__all__ = ["QueryOptions", "check_rows_per_request"]

_NUMBERS: dict[str, type] = {
    "max_retries": numbers.Integral,
    "request_timeout": numbers.Real,
    "max_retry_wait": numbers.Real,
    "retry_backoff": numbers.Real,
    "requests_per_minute": numbers.Real,
    "tokens_per_minute": numbers.Real,
    "patience": numbers.Real,
    "max_total_tokens": numbers.Integral,
    "max_cost": numbers.Real,
    "expected_completion_tokens": numbers.Integral,
}


@dataclass(frozen=True)
class QueryOptions:
    """What is the same for every row of a run.

    :param system_prompt: system message sent before each prompt (None: none).
    :param model: overrides the connection's deployment (Azure, in the URL) or model (OpenAI, body).
    :param request_params: extra body fields: temperature, max_tokens, response_format, ...
    :param max_retries: retries per row after the first attempt; a 429 spends none (see ``patience``),
        unless its wait is over ``max_retry_wait``; 0 means one request, whatever comes back.
    :param request_timeout: per-request timeout in seconds; None keeps the connection's.
    :param max_retry_wait: cap in seconds on one server-requested wait (Retry-After); it pauses the
        whole client.
    :param retry_backoff: first computed backoff in seconds, doubled per retry up to 16 times it.
    :param requests_per_minute: requests/min ceiling, spread evenly, under which the adaptive rate
        learns (and where it starts); None for none.
    :param tokens_per_minute: tokens/min ceiling (estimated prompt + max_tokens, corrected by the usage);
        None for none.
    :param adaptive: learn the rate the server allows from its answers (429s, rate headers, retry
        hints), under ``requests_per_minute`` as a ceiling; False sends at exactly
        ``requests_per_minute`` (unlimited when None) and only honours retry hints.
    :param patience: seconds a run keeps asking while every request is refused with a 429, without
        a single answer, before the refused rows end ``rate_limited`` (a 429 spends no retry).
    :param output_schema: a JSON schema (an object at the root) every answer must follow: sent as a
        strict ``json_schema`` ``response_format``; an answer that is not JSON following it is the
        row error ``invalid_output``, with its text kept. None: free text.
    :param output_check_schema: the schema answers are validated against, when stricter than the
        one sent (the Spark layer adds its column types' bounds); None: ``output_schema``.
    :param repair_invalid_output: after an ``invalid_output`` answer, send one more request with
        the invalid text and the reason, and validate its answer again.
    :param prices: model or deployment -> price per million tokens (``{"input": 0.15, "output":
        0.6}`` or ``(0.15, 0.6)``): each result then carries its cost. No price table ships.
    :param max_total_tokens: the tokens this run may spend (prompt + completion); a request that
        would pass it is not sent (``budget_exceeded``), see :class:`~..accounting.budget.Budget`.
    :param max_cost: the cost this run may spend, at ``prices`` (which must price the model).
    :param expected_completion_tokens: the completion length to count per request before it is
        sent, when it is better known than ``max_tokens`` (estimates and the budget's reservation).
    :param rows_per_request: rows sent in one request (a *pack*, see :mod:`~..packing`): 1 (the
        default) sends one row per request; an integer > 1 packs that many; ``"auto"`` picks the size
        (about 2,000 prompt tokens, at most 64 rows). Each row keeps its own answer or error;
        ``max_tokens`` stays a row's: a pack asks for each of its rows' (and their ids).
    :param budget_grants: where the budget draws its room from when many clients share it (set by
        the Spark layer on executors: the driver's ledger); None: each client's budget is its own.
    """

    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    model: str | None = None
    request_params: Mapping[str, Any] = field(default_factory=dict)
    max_retries: int = 6
    request_timeout: float | None = None
    max_retry_wait: float = 60.0
    retry_backoff: float = 0.5
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    adaptive: bool = True
    patience: float = 1800.0
    output_schema: Mapping[str, Any] | None = None
    output_check_schema: Mapping[str, Any] | None = None
    repair_invalid_output: bool = False
    prices: Mapping[str, Any] | None = None
    max_total_tokens: int | None = None
    max_cost: float | None = None
    expected_completion_tokens: int | None = None
    rows_per_request: int | str = 1
    budget_grants: GrantTicket | None = None

    def __post_init__(self) -> None:
        # a wrong type is a configuration error like a wrong value, never a TypeError deep in a retry
        if not isinstance(self.request_params or {}, Mapping):
            raise LLMQueryConfigError("request_params must be a mapping (a dict of body fields)")
        for name, kinds in _NUMBERS.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                raise LLMQueryConfigError(f"{name} must be a number, got {type(value).__name__}")
        if self.patience is None:
            raise LLMQueryConfigError("patience must be a number of seconds (float('inf') for no limit)")
        if not isinstance(self.adaptive, bool):
            raise LLMQueryConfigError(f"adaptive must be True or False, got {type(self.adaptive).__name__}")
        # a private copy: the caller's dict may change after the run started
        object.__setattr__(self, "request_params", dict(self.request_params or {}))
        for name in ("requests_per_minute", "tokens_per_minute", "request_timeout", "patience"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise LLMQueryConfigError(f"{name} must be positive, got {value!r}")
        if not isinstance(self.repair_invalid_output, bool):
            raise LLMQueryConfigError("repair_invalid_output must be True or False")
        if self.output_schema is None and self.output_check_schema is not None:
            raise LLMQueryConfigError("output_check_schema needs an output_schema")
        for name in ("max_total_tokens", "max_cost", "expected_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise LLMQueryConfigError(f"{name} must be >= 0, got {value!r}")
        check_rows_per_request(self.rows_per_request)
        parse_prices(self.prices)  # validates the prices now
        self.retry_policy()  # validates the retry settings now, not at the first failure
        ChatRequest(params=self.request_params, output=self.structured_output())  # validates the body now

    @classmethod
    def of(cls, options: QueryOptions | None = None, **settings: Any) -> QueryOptions:
        """``options`` with ``settings`` (a query method's keyword arguments) applied on top."""
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise LLMQueryConfigError(f"unknown query option(s) {unknown}")
        base = options or cls()
        return dataclasses.replace(base, **settings) if settings else base

    def bind(self, endpoint: EndpointConfig) -> EndpointConfig:
        """The endpoint with this run's model and timeout applied."""
        return endpoint.with_options(model=self.model, timeout=self.request_timeout)

    def chat_request(self, endpoint: EndpointConfig) -> ChatRequest:
        """The body template for ``endpoint`` (the model in the body, but for Azure's dated API)."""
        bound = self.bind(endpoint)
        return ChatRequest(
            system_prompt=self.system_prompt,
            model=bound.body_model(),
            params=self.request_params,
            output=self.structured_output(),
            limit_param=bound.limit_param(),
        )

    def structured_output(self) -> StructuredOutput | None:
        """The schema answers must follow, or None for free text."""
        if self.output_schema is None:
            return None
        return StructuredOutput(
            self.output_schema, self.output_check_schema, repair=self.repair_invalid_output
        )

    @property
    def packed(self) -> bool:
        """Rows go several to a request."""
        return self.rows_per_request != 1

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_retries=self.max_retries,
            initial_backoff=self.retry_backoff,
            max_backoff=self.retry_backoff * 16,  # 0.5 s doubling to 8 s, as the openai SDK
            max_retry_wait=self.max_retry_wait,
        )


def check_rows_per_request(value: object) -> None:
    if value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise LLMQueryConfigError(f'rows_per_request must be an integer >= 1 or "auto", got {value!r}')
