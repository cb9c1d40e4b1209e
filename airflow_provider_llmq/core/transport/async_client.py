"""The ``aiohttp`` client: one session per event loop, its connector sized to the concurrency.

It only performs the steps of the per-row policy (:mod:`.engine`). It sends each request once to
the configured URL: redirects are never followed, the proxy is computed once (see
:meth:`EndpointConfig.proxy_url`), and ``timeout`` is a deadline for the whole request
(``ClientTimeout(total=...)``).
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.pacing.limits import AsyncLimiter
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.client_base import ClientBase
from airflow_provider_llmq.core.transport.engine import Acquire, Plan, Received, Send, Sleep, resume

__all__ = ["AsyncClient"]


def _aiohttp_proxy(proxy: str | None) -> tuple[str | None, dict[str, str] | None]:
    """The proxy URL without its credentials, and those as a ``Proxy-Authorization`` header: the
    form aiohttp keeps (credentials in the URL or ``proxy_auth`` are deprecated there)."""
    if not proxy:
        return None, None
    parts = urlsplit(proxy)
    if parts.username is None and parts.password is None:
        return proxy, None
    netloc = parts.hostname or ""
    netloc = f"[{netloc}]" if ":" in netloc else netloc
    if parts.port:
        netloc += f":{parts.port}"
    userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    header = f"Basic {base64.b64encode(userinfo.encode('utf-8')).decode('ascii')}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), {"Proxy-Authorization": header}


class AsyncClient(ClientBase[AsyncLimiter]):
    """One ``aiohttp.ClientSession`` per event loop, its connector sized to the concurrency.

    Use as ``async with AsyncClient(endpoint, options, concurrency) as client``; ``bursts=True`` when
    the caller sends its requests in batches (see :class:`~.engine.ClientBase`).
    """

    def __init__(
        self,
        endpoint: EndpointConfig,
        options: QueryOptions | None = None,
        concurrency: int = 32,
        *,
        bursts: bool = False,
    ):
        super().__init__(endpoint, options, AsyncLimiter, concurrency, bursts)
        self._concurrency = max(1, concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._proxy_url, self._proxy_headers = _aiohttp_proxy(self._proxy)

    async def __aenter__(self) -> AsyncClient:
        ssl_arg: Any = None
        if self.endpoint.is_tls:
            ssl_arg = self.endpoint.ssl_context() if self.endpoint.verify else False
        connector = aiohttp.TCPConnector(limit=self._concurrency, ssl=ssl_arg)
        self._session = aiohttp.ClientSession(
            connector=connector,
            # total: connect, headers and body under one deadline
            timeout=aiohttp.ClientTimeout(total=self.endpoint.timeout),
            # no default headers: aiohttp copies a session's defaults into the CONNECT it sends a
            # proxy, in clear text, and sends an Authorization header there as Proxy-Authorization
            trust_env=False,  # the proxy comes from the endpoint; nothing else from the environment
        )
        return self

    async def __aexit__(self, exc_type: object, *rest: object) -> None:
        await self.close()
        if exc_type is not None:
            # requests cut mid-flight leave TLS transports closing: let them finish before the
            # loop goes away, or they leak (ResourceWarning)
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        if self.budget is not None:  # a share of a run's budget: what it did not use goes back now
            await asyncio.to_thread(self.budget.release)  # a call to the driver, off the loop
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def query(self, row_id: Any, prompt: Any) -> QueryResult:
        result: QueryResult = await self._run(self._plan(row_id, prompt))
        return result

    async def query_pack(self, rows: list[tuple[Any, Any]]) -> list[QueryResult]:
        """The rows of one pack (``rows_per_request``), each with its own result."""
        results: list[QueryResult] = await self._run(self._pack_plan(rows))
        return results

    async def _run(self, plan: Plan) -> Any:
        while isinstance(outcome := await self.advance(plan), Sleep):
            await asyncio.sleep(outcome.seconds)
        return outcome

    async def advance(self, plan: Plan) -> Any:
        """Performs the plan's steps until it ends (its value) or asks to wait: the :class:`Sleep`
        is returned, not slept, so a pooled method can give the worker to another row meanwhile;
        the next call resumes the plan after its wait."""
        step = resume(plan)
        while isinstance(step, (Acquire, Send)):
            if isinstance(step, Acquire):
                await self.limiter.acquire(step.tokens, self.rate.patience_exhausted)
                step = resume(plan)
            else:
                step = resume(plan, await self._post(step.body))
        return step  # a Sleep, or the plan's value

    async def _post(self, body: bytes) -> Received:
        if self._session is None:
            raise RuntimeError("AsyncClient used outside 'async with'")
        try:
            headers = await self._arequest_headers()  # an Entra ID refresh runs off the loop
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy_url,
                proxy_headers=self._proxy_headers,
            ) as response:
                return response.status, response.headers, await response.read()
        except Exception as exc:  # every transport error is classified, not raised
            return exc
