"""The request engine: one row's attempts, limits and retries, driven by a sync or an async client.

``_attempts`` is the whole policy for one row as a generator that yields the blocking steps it
needs (take a slot from the limiter, send, sleep) and receives what the network answered. The
two clients below only perform those steps, with ``requests`` or with ``aiohttp``: they share
every rule about payloads, errors, retries, pauses, limits and secrets, and differ only in I/O.
Both send each request once to the configured URL: redirects are never followed, the proxy is
computed once (see :meth:`EndpointConfig.proxy_url`), and ``timeout`` is a deadline for the whole
request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Generator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

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
from airflow_provider_llmq.core.secrets import Scrubber


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
    scrubber: Scrubber

    def estimated_tokens(self, prompt: str) -> int:
        """What a request reserves against tokens/min before it is sent: prompt + max_tokens."""
        text = (self.request.system_prompt or "") + prompt
        return estimate_request_tokens(text, self.request.max_completion_tokens())


def _is_empty(prompt: object) -> bool:
    return not isinstance(prompt, str) or not prompt.strip()


def _attempts(
    row_id: Any, prompt: Any, policy: _RowPolicy, limiter: ThreadLimiter | AsyncLimiter
) -> Generator[_Step, _Received | None, QueryResult]:
    """One row, start to end. Every result it returns and every exception it raises passes the
    endpoint's scrubber here, the one place messages leave the engine."""
    try:
        result = yield from _row_attempts(row_id, prompt, policy, limiter)
    except Exception as exc:
        clean = policy.scrubber.exception(exc)
    else:
        return policy.scrubber.result(result)
    # raised outside the handler, so a stand-in does not carry the original as its context
    raise clean


def _row_attempts(
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
        if estimate and outcome.prompt_tokens is not None:
            # a 200 that is no usable answer (filtered, cut, a tool call) was billed all the same
            limiter.adjust_tokens(estimate, outcome.prompt_tokens + (outcome.completion_tokens or 0))
        if isinstance(outcome, Answer):
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
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                latency_ms=round((time.monotonic() - started) * 1000, 3),
                finish_reason=outcome.finish_reason,
            )
        delay = policy.retry.delay(outcome, attempts)
        if outcome.code == RATE_LIMITED and outcome.retry_after is not None:
            # the server throttles the whole deployment: hold every request of this client
            limiter.pause_for(delay)
        else:
            yield _Sleep(delay)


class _Deadline:
    """One request's deadline and the pooled connection it is using, if any yet."""

    __slots__ = ("at", "conn", "expired")

    def __init__(self, at: float) -> None:
        self.at = at
        self.conn: Any = None
        self.expired = False


class _DeadlineExceeded(TimeoutError):
    """The whole-request deadline passed (classified as ``timeout``)."""


class _Watchdog:
    """Ends ``requests`` calls that outlive their deadline by shutting their socket down.

    ``requests``' timeout bounds each socket read, so a server that trickles its body (one byte a
    second) would hold a worker for as long as it likes. One thread per client watches every
    request in flight; all share one timeout, so the oldest request always expires first and the
    thread wakes about once per timeout, not once per request. The per-request cost is a few
    lock operations, about 2 us; the thread pool's client CPU stayed at 0.70 ms a request (TLS,
    32 threads, about 1500 requests/s against the mock server in its own process).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._active: dict[_Deadline, None] = {}  # insertion order is deadline order
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False

    def start(self, seconds: float) -> _Deadline:
        if self._pid != os.getpid():  # a forked child (a Spark worker) inherits no thread
            self._reset()
        with self._cond:
            deadline = _Deadline(time.monotonic() + seconds)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmq-deadline", daemon=True)
                self._thread.start()
            if not self._active:
                self._cond.notify()
            self._active[deadline] = None
            return deadline

    def attach(self, deadline: _Deadline, conn: Any) -> None:
        with self._cond:
            if deadline.expired:
                raise _DeadlineExceeded("the request deadline passed before a connection was ready")
            deadline.conn = conn

    def detach(self, deadline: _Deadline, conn: Any) -> None:
        """The connection goes back to the pool: from now on it belongs to another request."""
        with self._cond:
            if deadline.conn is conn:
                deadline.conn = None

    def finish(self, deadline: _Deadline) -> None:
        with self._cond:
            self._active.pop(deadline, None)
            deadline.conn = None

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                if not self._active:
                    self._cond.wait()
                    continue
                deadline = next(iter(self._active))
                left = deadline.at - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                del self._active[deadline]
                deadline.expired = True
                sock = getattr(deadline.conn, "sock", None)
                if sock is not None:
                    # the base method: SSLSocket.shutdown would also drop the TLS object under
                    # the reading thread's feet
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)


# the deadline of the request this thread is sending, for the pools below to attach connections to
_in_flight = threading.local()


class _WatchedPoolMixin:
    """Tells the requesting thread's deadline which connection its request runs on."""

    def _get_conn(self, timeout: float | None = None) -> Any:
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        deadline: _Deadline | None = getattr(_in_flight, "deadline", None)
        watchdog = getattr(_in_flight, "watchdog", None)
        if deadline is not None and watchdog is not None:
            watchdog.attach(deadline, conn)
        return conn

    def _put_conn(self, conn: Any) -> None:
        deadline: _Deadline | None = getattr(_in_flight, "deadline", None)
        watchdog = getattr(_in_flight, "watchdog", None)
        if deadline is not None and watchdog is not None and conn is not None:
            watchdog.detach(deadline, conn)
        super()._put_conn(conn)  # type: ignore[misc]


class _WatchedHTTPPool(_WatchedPoolMixin, HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_WatchedPoolMixin, HTTPSConnectionPool):
    pass


_WATCHED_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


class _Adapter(HTTPAdapter):
    """The connection pools of a :class:`SyncClient`: deadline-watched, and for TLS the endpoint's
    SSL context (``requests`` takes only a CA path in ``verify=``, not PEM text), also through a
    proxy (``requests`` does not hand the pool's SSL settings to its proxy managers)."""

    def __init__(self, ssl_context: Any, **kwargs: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        if self._ssl_context is not None:
            kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _WATCHED_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        if self._ssl_context is not None:
            proxy_kwargs.setdefault("ssl_context", self._ssl_context)
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _WATCHED_POOLS
        return manager

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        if self._ssl_context is not None:
            # requests points every connection at certifi's bundle, and urllib3 would load it into
            # our shared context on each new connection: ~23 ms each, and the configured CA would
            # no longer be the only one trusted. The context already holds the right trust roots.
            conn.ca_certs = None
            conn.ca_cert_dir = None


class _Client:
    """What both clients derive from the endpoint and the options: URL, headers, proxy, row policy."""

    def __init__(self, endpoint: EndpointConfig, options: QueryOptions | None) -> None:
        self.options = options or QueryOptions()
        self.endpoint = self.options.bind(endpoint)
        self._policy = _RowPolicy(
            request=self.options.chat_request(self.endpoint),
            retry=self.options.retry_policy(),
            count_tokens=self.options.tokens_per_minute is not None,
            scrubber=Scrubber(self.endpoint.secrets()),
        )
        self._url = self.endpoint.url()
        self._headers = self.endpoint.request_headers()
        self._proxy = self.endpoint.proxy_url()

    @property
    def scrubber(self) -> Scrubber:
        return self._policy.scrubber

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
        self._watchdog = _Watchdog()
        self._session = requests.Session()
        self._session.verify = self.endpoint.verify
        # trust_env would also let REQUESTS_CA_BUNDLE and .netrc override the connection's CA and
        # key: the proxy, the one thing wanted from the environment, is computed by the endpoint
        self._session.trust_env = False
        self._session.proxies = {"http": self._proxy, "https": self._proxy} if self._proxy else {}
        adapter = _Adapter(
            self.endpoint.ssl_context() if self.endpoint.is_tls else None,
            pool_connections=1,
            pool_maxsize=max(1, pool_size),
            max_retries=0,
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
        timeout = self.endpoint.timeout
        deadline = self._watchdog.start(timeout)
        _in_flight.deadline, _in_flight.watchdog = deadline, self._watchdog
        response: requests.Response | None = None
        try:
            # stream: the body is read here, under the deadline, and the connection goes back to
            # the pool only once the watchdog has let go of it
            response = self._session.post(
                self._url,
                data=body,
                headers=self._headers,
                timeout=timeout,
                allow_redirects=False,
                stream=True,
            )
            return response.status_code, response.headers, response.content
        except Exception as exc:  # every transport error is classified, not raised
            if deadline.expired:
                return _DeadlineExceeded(f"no complete answer within the {timeout:g} s request deadline")
            return exc
        finally:
            _in_flight.deadline = _in_flight.watchdog = None
            self._watchdog.finish(deadline)
            if response is not None:
                response.close()

    def close(self) -> None:
        self._session.close()
        self._watchdog.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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


class AsyncClient(_Client):
    """One ``aiohttp.ClientSession`` per event loop, its connector sized to the concurrency.

    Use as ``async with AsyncClient(endpoint, options, concurrency) as client``.
    """

    def __init__(self, endpoint: EndpointConfig, options: QueryOptions | None = None, concurrency: int = 32):
        super().__init__(endpoint, options)
        self.limiter = AsyncLimiter(self.options.requests_per_minute, self.options.tokens_per_minute)
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
            async with self._session.post(
                self._url,
                data=body,
                headers=self._headers,
                allow_redirects=False,
                proxy=self._proxy_url,
                proxy_headers=self._proxy_headers,
            ) as response:
                return response.status, response.headers, await response.read()
        except Exception as exc:  # every transport error is classified, not raised
            return exc


__all__ = ["AsyncClient", "QueryOptions", "SyncClient"]
