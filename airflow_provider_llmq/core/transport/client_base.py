"""What both clients derive from the endpoint and the options, once per client: URL, headers, proxy,
the row policy of :mod:`.engine`, the limiter with the adaptive rate that drives it, the budget, and
the pack sizer of ``rows_per_request``."""

from __future__ import annotations

from collections.abc import Generator, Mapping
from typing import Any, Generic, TypeVar

from airflow_provider_llmq.core.accounting.budget import Budget
from airflow_provider_llmq.core.accounting.cost import parse_prices
from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.pacing.adaptive import AdaptiveRate, AdaptiveStats
from airflow_provider_llmq.core.pacing.limits import AsyncLimiter, ThreadLimiter
from airflow_provider_llmq.core.pacing.reachability import Reachability
from airflow_provider_llmq.core.packing import PackContext, PackSizer, pack_attempts, pack_policy_of
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.engine import Plan, Received, Step, _attempts, _RowPolicy

__all__ = ["ClientBase"]

L = TypeVar("L", ThreadLimiter, AsyncLimiter)


class ClientBase(Generic[L]):
    """What both clients derive from the endpoint and the options: URL, headers, proxy, row policy,
    and the limiter with the adaptive rate that drives it.

    :param concurrency: requests the client may have in flight (its pool or semaphore); it bounds
        the rate the controller may learn (``concurrency / latency``), unless the caller sends in
        bursts (``bursts=True``, the batch method: a batch must leave at once, not spread over a
        round trip; the headroom over the answered rate still bounds it).
    """

    limiter: L

    def __init__(
        self,
        endpoint: EndpointConfig,
        options: QueryOptions | None,
        limiter_class: type[L],
        concurrency: int,
        bursts: bool = False,
    ) -> None:
        self.options = options or QueryOptions()
        self.endpoint = self.options.bind(endpoint)
        request = self.options.chat_request(self.endpoint)
        price = parse_prices(self.options.prices).get(self.endpoint.model or "")
        self._tokens = self.endpoint.token_source()  # Entra ID: the process's token, else None
        self._policy = _RowPolicy(
            request=request,
            retry=self.options.retry_policy(),
            count_tokens=self.options.tokens_per_minute is not None,
            scrubber=Scrubber(self.endpoint.secrets()),
            price=price,
            tokens=self._tokens,
            reach=Reachability(self.endpoint.url()),
        )
        if self._tokens is not None:
            self._tokens.watch(self._policy.scrubber)  # every token, now and refreshed, is scrubbed
        # one budget per client: every thread or task of the client reserves against it
        self.budget: Budget | None = None
        if self.options.max_total_tokens is not None or self.options.max_cost is not None:
            ticket = self.options.budget_grants
            grants = ticket.open() if ticket is not None else None
            for secret in grants.secrets() if grants is not None else ():
                self._policy.scrubber.add(secret)
            self.budget = Budget(
                self.options.max_total_tokens,
                self.options.max_cost,
                price,
                expected_completion_tokens=self.options.expected_completion_tokens,
                grants=grants,
            )
        self._url = self.endpoint.url()
        self._headers = self.endpoint.request_headers()
        self._proxy = self.endpoint.proxy_url()
        # tokens_per_minute stays the pacer's own schedule; the request rate is the controller's,
        # under requests_per_minute as a ceiling
        self.limiter = limiter_class(self.options.requests_per_minute, self.options.tokens_per_minute)
        self.rate = AdaptiveRate(
            self.options.requests_per_minute,
            max_concurrency=None if bursts else max(1, concurrency),
            adaptive=self.options.adaptive,
            patience=self.options.patience,
            clock=self.limiter.pacer.clock,
        )
        self.rate.bind(self.limiter.pacer)  # before any request waits on the pacer
        # rows_per_request: one sizer per client, shared by its threads or tasks, as the rate is
        self.sizer: PackSizer | None = None
        self._packs: PackContext | None = None
        if self.options.packed:
            self.sizer = PackSizer(self.options.rows_per_request, request.max_completion_tokens())
            pack_policy = pack_policy_of(self._policy)
            self._packs = PackContext(
                self._policy, pack_policy, self.limiter, self.rate, self.budget, self.sizer
            )

    @property
    def scrubber(self) -> Scrubber:
        return self._policy.scrubber

    def _request_headers(self) -> Mapping[str, str]:
        """A request's headers: with Entra ID the current token's, refreshed here when due."""
        return self._headers if self._tokens is None else {**self._headers, **self._tokens.header()}

    async def _arequest_headers(self) -> Mapping[str, str]:
        """:meth:`_request_headers` for an event loop (a refresh runs off the loop)."""
        return self._headers if self._tokens is None else {**self._headers, **await self._tokens.aheader()}

    def stats(self) -> AdaptiveStats:
        """The admitted rate, 429s, pauses so far: what a progress line shows."""
        return self.rate.stats()

    def plan(self, item: Any) -> Plan:
        """A method's item as a plan: a row ``(row_id, prompt)``, or a pack of rows with packing."""
        return self._pack_plan(item) if self.sizer is not None else self._plan(*item)

    def _plan(self, row_id: Any, prompt: Any) -> Generator[Step, Received | None, QueryResult]:
        return _attempts(row_id, prompt, self._policy, self.limiter, self.rate, self.budget)

    def _pack_plan(self, rows: list[tuple[Any, Any]]) -> Generator[Step, Received | None, list[QueryResult]]:
        if self._packs is None:
            raise RuntimeError("this client does not pack rows (rows_per_request is 1)")
        return pack_attempts(rows, self._packs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint!r})"
