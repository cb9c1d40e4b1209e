"""The OpenAI / Azure OpenAI Files and Batches APIs: upload a request file, create, poll, list and
cancel batches, stream result files. Plain ``requests``; no Airflow, no Spark.

The API forms differ in the ``api-version`` query, the per-line URL and the request-count limit
per file, so each is one small ``_BatchForm``; the paths sit under the endpoint's ``api_root``
(``/v1``, ``/openai``, ``/openai/v1``); URL, key header (or the
process's Entra ID token, refreshed when due, one fresh token after a 401), TLS and proxy come from
the :class:`EndpointConfig` as for chat requests. A management call that fails is
classified by :func:`classify_response` like a chat request: 401/403/404 and ``insufficient_quota``
raise the same errors, 429/5xx and transport errors are retried with the run's retry policy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

from airflow_provider_llmq.core.endpoint.api_forms import DEFAULT_AZURE_API_VERSION
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.errors import LLMQueryError
from airflow_provider_llmq.core.pacing.retry import RetryPolicy
from airflow_provider_llmq.core.request.payload import Failure, classify_response
from airflow_provider_llmq.core.transport.transport_errors import classify_exception

MAX_FILE_BYTES = 200_000_000  # both APIs: 200 MB per request file
ACTIVE_STATUSES = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
TOKEN_LIMIT_EXCEEDED = "token_limit_exceeded"  # Azure: the deployment's enqueued-token quota is full
COMPLETION_WINDOW = "24h"
_LIST_PAGE = 100
_FILE_READY_WAIT = 120.0  # seconds an uploaded file may stay "pending" (Azure processes it first)


class LLMQueryBatchError(LLMQueryError):
    """A Files / Batches API call failed after its retries, or a batch cannot go on; the checkpoint
    keeps every answer collected, and a retry of the task re-attaches to the batches."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class _BatchForm:
    line_url: str  # each request line's "url", and the batch's "endpoint"
    max_requests: int

    def params(self, api_version: str | None) -> dict[str, str]:
        return {}


class _OpenAIForm(_BatchForm):
    line_url, max_requests = "/v1/chat/completions", 50_000


class _AzureForm(_BatchForm):
    line_url, max_requests = "/chat/completions", 100_000

    def params(self, api_version: str | None) -> dict[str, str]:
        return {"api-version": api_version or DEFAULT_AZURE_API_VERSION}


class _AzureV1Form(_BatchForm):
    line_url, max_requests = "/chat/completions", 100_000

    def params(self, api_version: str | None) -> dict[str, str]:
        return {"api-version": api_version} if api_version else {}  # only preview / latest


_FORMS: dict[str, _BatchForm] = {"openai": _OpenAIForm(), "azure": _AzureForm(), "azure_v1": _AzureV1Form()}


@dataclass(frozen=True)
class BatchInfo:
    """What the API says of one batch (the fields llmq reads)."""

    id: str
    status: str
    created_at: float = 0.0
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: tuple[tuple[str, str], ...] = ()  # (code, message) of batch-level errors
    request_counts: Mapping[str, int] = field(default_factory=dict)
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchInfo:
        errors = (data.get("errors") or {}).get("data") or []
        return cls(
            id=str(data["id"]),
            status=str(data.get("status") or "validating"),
            created_at=float(data.get("created_at") or 0),
            output_file_id=data.get("output_file_id") or None,
            error_file_id=data.get("error_file_id") or None,
            errors=tuple((str(e.get("code") or ""), str(e.get("message") or "")) for e in errors),
            request_counts={k: int(v or 0) for k, v in (data.get("request_counts") or {}).items()},
            metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
        )

    @property
    def active(self) -> bool:
        return self.status not in TERMINAL_STATUSES

    @property
    def refused_for_quota(self) -> bool:
        """Failed because the enqueued-token quota was full: nothing ran, it can be sent again."""
        return self.status == "failed" and any(code == TOKEN_LIMIT_EXCEEDED for code, _ in self.errors)

    def error_text(self) -> str | None:
        return "; ".join(f"{code}: {message}" for code, message in self.errors) or None


class _TLSAdapter(HTTPAdapter):
    """The endpoint's SSL context for direct and proxied connections (``requests`` takes only a CA
    path in ``verify=``), without certifi's bundle loaded on top of it."""

    def __init__(self, ssl_context: Any) -> None:
        self._ssl_context = ssl_context
        super().__init__(max_retries=0)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["ssl_context"] = self._ssl_context
        super().init_poolmanager(*args, **kwargs)

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("ssl_context", self._ssl_context)
        return super().proxy_manager_for(proxy, **proxy_kwargs)

    def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
        super().cert_verify(conn, url, verify, cert)
        conn.ca_certs = conn.ca_cert_dir = None


class BatchApiClient:
    """One ``requests`` session to an endpoint's Files and Batches APIs.

    :param endpoint: the connection's endpoint (base URL, key, api type, TLS, proxy).
    :param retry: how management calls are retried (429, 5xx, transport errors).
    :param api_version: Azure ``api-version`` for these calls; None keeps the endpoint's.
    """

    def __init__(
        self, endpoint: EndpointConfig, retry: RetryPolicy | None = None, api_version: str | None = None
    ) -> None:
        self.endpoint = endpoint
        self.form = _FORMS[endpoint.api_type]
        self.retry = retry or RetryPolicy()
        self.scrubber = Scrubber(endpoint.secrets())
        self._params = self.form.params(api_version or endpoint.api_version)
        self._headers = {k: v for k, v in endpoint.request_headers().items() if k != "Content-Type"}
        self._tokens = endpoint.token_source()  # Entra ID: the same token the chat clients use
        if self._tokens is not None:
            self._tokens.watch(self.scrubber)
        self._session = requests.Session()
        self._session.trust_env = False  # the proxy comes from the endpoint; nothing else from the env
        self._session.verify = endpoint.verify
        proxy = endpoint.proxy_url()
        self._session.proxies = {"http": proxy, "https": proxy} if proxy else {}
        if endpoint.is_tls:
            self._session.mount("https://", _TLSAdapter(endpoint.ssl_context()))

    def __repr__(self) -> str:
        return f"BatchApiClient({self.endpoint!r})"

    @property
    def line_url(self) -> str:
        return self.form.line_url

    @property
    def max_requests(self) -> int:
        return self.form.max_requests

    def upload(self, filename: str, content: bytes) -> str:
        """Uploads a request file (``purpose=batch``) and returns its id once the API has processed it."""
        files = {"file": (filename, content, "application/jsonl")}
        data = self._call("POST", "/files", "upload a batch file", data={"purpose": "batch"}, files=files)
        deadline = time.monotonic() + _FILE_READY_WAIT
        while data.get("status") in ("uploaded", "pending", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            data = self._call("GET", f"/files/{data['id']}", "read a batch file's status")
        if data.get("status") == "error":
            raise LLMQueryBatchError(
                self.scrubber.text(f"the API refused the file: {data.get('status_details')}")
            )
        return str(data["id"])

    def create_batch(self, input_file_id: str, metadata: Mapping[str, str]) -> BatchInfo:
        body = {
            "input_file_id": input_file_id,
            "endpoint": self.form.line_url,
            "completion_window": COMPLETION_WINDOW,
            "metadata": dict(metadata),
        }
        return BatchInfo.from_json(self._call("POST", "/batches", "create a batch", json=body))

    def get_batch(self, batch_id: str) -> BatchInfo:
        return BatchInfo.from_json(self._call("GET", f"/batches/{batch_id}", "read a batch"))

    def cancel_batch(self, batch_id: str) -> BatchInfo:
        return BatchInfo.from_json(self._call("POST", f"/batches/{batch_id}/cancel", "cancel a batch"))

    def list_batches(self, at_most: int = 500) -> Iterator[BatchInfo]:
        """The account's batches, newest first, ``at_most`` of them."""
        after: str | None = None
        seen = 0
        while seen < at_most:
            params = {"limit": str(min(_LIST_PAGE, at_most - seen)), **({"after": after} if after else {})}
            page = self._call("GET", "/batches", "list batches", params=params)
            for item in page.get("data") or []:
                seen += 1
                yield BatchInfo.from_json(item)
            after = page.get("last_id")
            if not page.get("has_more") or not after:
                return

    def file_lines(self, file_id: str) -> Iterator[bytes]:
        """A result file's lines, streamed (never the whole file in memory)."""
        response = self._send("GET", f"/files/{file_id}/content", "download a result file", stream=True)
        try:
            for line in response.iter_lines():
                if line.strip():
                    yield line
        finally:
            response.close()

    def delete_file(self, file_id: str) -> None:
        self._call("DELETE", f"/files/{file_id}", "delete a batch file")

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> BatchApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, what: str, **kwargs: Any) -> dict[str, Any]:
        response = self._send(method, path, what, **kwargs)
        try:
            data = response.json()
        except ValueError:
            raise LLMQueryBatchError(f"could not {what}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise LLMQueryBatchError(f"could not {what}: the answer is not a JSON object")
        return data

    def _send(
        self, method: str, path: str, what: str, params: Mapping[str, str] | None = None, **kwargs: Any
    ) -> requests.Response:
        """One call with the retry policy; a refused call raises, its message scrubbed."""
        url = f"{self.endpoint.api_root}{path}"
        attempts = 0
        reauthorized = False  # the one fresh Entra ID token a 401 may ask for
        while True:
            attempts += 1
            token = self._tokens.generation if self._tokens is not None else 0
            try:
                response = self._session.request(
                    method,
                    url,
                    params={**self._params, **(params or {})},
                    headers=self._call_headers(),
                    timeout=self.endpoint.timeout,
                    allow_redirects=False,
                    **kwargs,
                )
            except requests.RequestException as exc:
                failure = self._classified(classify_exception, exc)
            else:
                if response.status_code < 300:
                    return response
                if response.status_code == 401 and self._tokens is not None and not reauthorized:
                    # an expired or revoked token: one fresh token, asked again without a retry spent
                    response.close()
                    reauthorized, attempts = True, attempts - 1
                    self._tokens.expire(token)
                    continue
                failure = self._classified(
                    classify_response, response.status_code, response.headers, response.content
                )
                response.close()
            if not self.retry.should_retry(failure, attempts):
                status = f"HTTP {failure.http_status}" if failure.http_status else "no answer"
                message = self.scrubber.text(
                    f"could not {what} ({status}, {failure.code}): {failure.message}"
                )
                raise LLMQueryBatchError(message, failure.code)
            time.sleep(self.retry.delay(failure, attempts))

    def _call_headers(self) -> dict[str, str]:
        """With Entra ID the current token's (refreshed here when due; its errors raise scrubbed)."""
        if self._tokens is None:
            return self._headers
        try:
            return {**self._headers, **self._tokens.header()}
        except LLMQueryError as exc:
            raise self.scrubber.exception(exc) from None

    def _classified(self, classify: Any, *args: Any) -> Failure:
        """A failed call as a chat request's failure would be; raises what a chat request raises
        (401/403/404, insufficient quota, TLS), scrubbed."""
        try:
            outcome = classify(*args)
        except LLMQueryError as exc:
            raise self.scrubber.exception(exc) from None
        assert isinstance(outcome, Failure)  # only errors and redirects are classified here
        return outcome


__all__ = [
    "ACTIVE_STATUSES",
    "MAX_FILE_BYTES",
    "TERMINAL_STATUSES",
    "TOKEN_LIMIT_EXCEEDED",
    "BatchApiClient",
    "BatchInfo",
    "LLMQueryBatchError",
]
