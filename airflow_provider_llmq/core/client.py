"""The request engine: one row's attempts, limits and retries, driven by a sync or an async client.

``_attempts`` is the whole policy for one row as a generator that yields the blocking steps it
needs (take a slot from the limiter, send, sleep) and receives what the network answered. The
two clients below only perform those steps, with ``requests`` or with ``aiohttp``: they share
every rule about payloads, errors, retries, pauses and limits, and differ only in I/O.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import requests
from requests.adapters import HTTPAdapter

from airflow_provider_llmq.core.endpoint import EndpointConfig
from airflow_provider_llmq.core.limits import AsyncLimiter, ThreadLimiter, estimate_request_tokens
from airflow_provider_llmq.core.options import QueryOptions
from airflow_provider_llmq.core.payload import (
    EMPTY_PROMPT,
    RATE_LIMITED,
    Answer,
    ChatRequest,
    Failure,
    classify_exception,
    classify_response,
)
from airflow_provider_llmq.core.result import STATUS_ERROR, STATUS_OK, QueryResult
from airflow_provider_llmq.core.retry import RetryPolicy


@dataclass(frozen=True)
class _Acquire:
    tokens: int


@dataclass(frozen=True)
class _Send:
    body: bytes


@dataclass(frozen=True)
class _Sleep:
    seconds: float


_Step = _Acquire | _Send | _Sleep
# what a _Send gets back: (status, headers, body) or the transport exception
_Received = tuple[int, Mapping[str, str], bytes] | BaseException


@dataclass(frozen=True)
class _RowPolicy:
    """What one row's attempts follow, derived once per client from :class:`QueryOptions`."""

    request: ChatRequest
    retry: RetryPolicy
    count_tokens: bool

    def estimated_tokens(self, prompt: str) -> int:
        """What a request reserves against tokens/min before it is sent: prompt + max_tokens."""
        text = (self.request.system_prompt or "") + prompt
        return estimate_request_tokens(text, self.request.max_completion_tokens())


def _is_empty(prompt: object) -> bool:
    return not isinstance(prompt, str) or not prompt.strip()


def _attempts(
    row_id: Any, prompt: Any, policy: _RowPolicy, limiter: ThreadLimiter | AsyncLimiter
) -> Generator[_Step, _Received | None, QueryResult]:
    if _is_empty(prompt):
        return QueryResult(
            row_id, None, STATUS_ERROR, EMPTY_PROMPT, "prompt is null or empty: no request sent"
        )
    body = json.dumps(policy.request.body(prompt), ensure_ascii=False).encode("utf-8")
    estimate = policy.estimated_tokens(prompt) if policy.count_tokens else 0
    started = time.monotonic()
    attempts = 0
    while True:
        yield _Acquire(estimate)
        attempts += 1
        received = yield _Send(body)
        if isinstance(received, BaseException):
            outcome: Answer | Failure = classify_exception(received)
        else:
            assert received is not None
            outcome = classify_response(*received)
        if isinstance(outcome, Answer):
            if estimate and outcome.prompt_tokens is not None:
                limiter.adjust_tokens(estimate, outcome.prompt_tokens + (outcome.completion_tokens or 0))
            return QueryResult(
                row_id,
                outcome.content,
                STATUS_OK,
                http_status=200,
                attempts=attempts,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                latency_ms=round((time.monotonic() - started) * 1000, 3),
                finish_reason=outcome.finish_reason,
            )
        if not policy.retry.should_retry(outcome, attempts):
            return QueryResult(
                row_id,
                None,
                STATUS_ERROR,
                outcome.code,
                outcome.message,
                http_status=outcome.http_status,
                attempts=attempts,
                latency_ms=round((time.monotonic() - started) * 1000, 3),
            )
        delay = policy.retry.delay(outcome, attempts)
        if outcome.code == RATE_LIMITED and outcome.retry_after is not None:
            # the server throttles the whole deployment: hold every request of this client
            limiter.pause_for(delay)
        else:
            yield _Sleep(delay)


class _SSLContextAdapter(HTTPAdapter):
    """Lets ``requests`` trust a CA given as PEM text (``verify=`` only takes a path)."""

    def __init__(self, ssl_context: Any, **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        # requests points every connection at certifi's bundle, and urllib3 would load it into our
        # shared context on each new connection: ~23 ms each, and the configured CA would no
        # longer be the only one trusted. The context already holds the right trust roots.
        conn.ca_certs = None
        conn.ca_cert_dir = None


class _Client:
    """What both clients derive from the endpoint and the options: URL, headers, row policy, limits."""

    def __init__(self, endpoint: EndpointConfig, options: QueryOptions | None) -> None:
        self.options = options or QueryOptions()
        self.endpoint = self.options.bind(endpoint)
        self._policy = _RowPolicy(
            request=self.options.chat_request(self.endpoint),
            retry=self.options.retry_policy(),
            count_tokens=self.options.tokens_per_minute is not None,
        )
        self._url = self.endpoint.url()
        self._headers = self.endpoint.request_headers()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.endpoint!r})"


class SyncClient(_Client):
    """A pooled ``requests.Session``, safe to share between threads.

    :param endpoint: where to send.
    :param options: request, retry and limits.
    :param pool_size: connections kept open (the thread pool's size).
    """

    def __init__(self, endpoint: EndpointConfig, options: QueryOptions | None = None, pool_size: int = 32):
        super().__init__(endpoint, options)
        self.limiter = ThreadLimiter(self.options.requests_per_minute, self.options.tokens_per_minute)
        self._session = requests.Session()
        self._session.verify = self.endpoint.verify
        self._session.trust_env = False
        adapter_kwargs: dict[str, Any] = {
            "pool_connections": 1,
            "pool_maxsize": max(1, pool_size),
            "max_retries": 0,
        }
        adapter: HTTPAdapter = (
            _SSLContextAdapter(self.endpoint.ssl_context(), **adapter_kwargs)
            if self.endpoint.is_tls
            else HTTPAdapter(**adapter_kwargs)
        )
        self._session.mount("https://", adapter)
        self._session.mount("http://", adapter)

    def query(self, row_id: Any, prompt: Any) -> QueryResult:
        plan = _attempts(row_id, prompt, self._policy, self.limiter)
        received: _Received | None = None
        try:
            while True:
                step = plan.send(received)
                received = None
                if isinstance(step, _Acquire):
                    self.limiter.acquire(step.tokens)
                elif isinstance(step, _Sleep):
                    time.sleep(step.seconds)
                else:
                    received = self._post(step.body)
        except StopIteration as done:
            result: QueryResult = done.value
            return result

    def _post(self, body: bytes) -> _Received:
        try:
            response = self._session.post(
                self._url, data=body, headers=self._headers, timeout=self.endpoint.timeout
            )
            return response.status_code, response.headers, response.content
        except Exception as exc:  # every transport error is classified, not raised
            return exc

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Client):
    """One ``aiohttp.ClientSession`` per event loop, its connector sized to the concurrency.

    Use as ``async with AsyncClient(endpoint, options, concurrency) as client``.
    """

    def __init__(self, endpoint: EndpointConfig, options: QueryOptions | None = None, concurrency: int = 32):
        super().__init__(endpoint, options)
        self.limiter = AsyncLimiter(self.options.requests_per_minute, self.options.tokens_per_minute)
        self._concurrency = max(1, concurrency)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AsyncClient:
        ssl_arg: Any = None
        if self.endpoint.is_tls:
            ssl_arg = self.endpoint.ssl_context() if self.endpoint.verify else False
        connector = aiohttp.TCPConnector(limit=self._concurrency, ssl=ssl_arg)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout),
            headers=self._headers,
            trust_env=False,
        )
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        await self.close()
        if exc_type is not None:
            # requests cut mid-flight leave TLS transports closing: let them finish before the
            # loop goes away, or they leak (ResourceWarning)
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def query(self, row_id: Any, prompt: Any) -> QueryResult:
        plan = _attempts(row_id, prompt, self._policy, self.limiter)
        received: _Received | None = None
        try:
            while True:
                step = plan.send(received)
                received = None
                if isinstance(step, _Acquire):
                    await self.limiter.acquire(step.tokens)
                elif isinstance(step, _Sleep):
                    await asyncio.sleep(step.seconds)
                else:
                    received = await self._post(step.body)
        except StopIteration as done:
            result: QueryResult = done.value
            return result

    async def _post(self, body: bytes) -> _Received:
        if self._session is None:
            raise RuntimeError("AsyncClient used outside 'async with'")
        try:
            async with self._session.post(self._url, data=body) as response:
                return response.status, response.headers, await response.read()
        except Exception as exc:  # every transport error is classified, not raised
            return exc


__all__ = ["AsyncClient", "QueryOptions", "SyncClient"]
