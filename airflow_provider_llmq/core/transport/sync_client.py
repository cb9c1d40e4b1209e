"""The ``requests`` client: a pooled session shared by threads, with a whole-request deadline.

It only performs the steps of the per-row policy (:mod:`.engine`). It sends each request once to
the configured URL: redirects are never followed, the proxy is computed once (see
:meth:`EndpointConfig.proxy_url`), and ``timeout`` is a deadline for the whole request, kept by a
watchdog thread (``requests``' own timeout bounds each socket read only).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.pacing.limits import ThreadLimiter
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.transport.client_base import ClientBase
from airflow_provider_llmq.core.transport.engine import Acquire, Plan, Received, Send, Sleep, resume

__all__ = ["SyncClient"]


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


class SyncClient(ClientBase[ThreadLimiter]):
    """A pooled ``requests.Session``, safe to share between threads.

    :param endpoint: where to send.
    :param options: request, retry and limits.
    :param pool_size: connections kept open (the thread pool's size).
    """

    def __init__(self, endpoint: EndpointConfig, options: QueryOptions | None = None, pool_size: int = 32):
        super().__init__(endpoint, options, ThreadLimiter, pool_size)
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
        result: QueryResult = self._run(self._plan(row_id, prompt))
        return result

    def query_pack(self, rows: list[tuple[Any, Any]]) -> list[QueryResult]:
        """The rows of one pack (``rows_per_request``), each with its own result."""
        results: list[QueryResult] = self._run(self._pack_plan(rows))
        return results

    def _run(self, plan: Plan) -> Any:
        while isinstance(outcome := self.advance(plan), Sleep):
            time.sleep(outcome.seconds)
        return outcome

    def advance(self, plan: Plan) -> Any:
        """Performs the plan's steps until it ends (its value) or asks to wait: the :class:`Sleep`
        is returned, not slept, so the thread pool can give the thread to another row meanwhile;
        the next call resumes the plan after its wait."""
        step = resume(plan)
        while isinstance(step, (Acquire, Send)):
            if isinstance(step, Acquire):
                self.limiter.acquire(step.tokens, self.rate.patience_exhausted)
                step = resume(plan)
            else:
                step = resume(plan, self._post(step.body))
        return step  # a Sleep, or the plan's value

    def _post(self, body: bytes) -> Received:
        try:
            headers = self._request_headers()  # may refresh an Entra ID token, before the deadline runs
        except Exception as exc:  # returned, so the engine raises it scrubbed
            return exc
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
                headers=headers,
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
        if self.budget is not None:  # a share of a run's budget: what it did not use goes back now
            self.budget.release()
        self._session.close()
        self._watchdog.close()

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
