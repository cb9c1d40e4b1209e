"""LLMQueryHook: an Airflow connection of type ``llmq`` turned into an :class:`EndpointConfig`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
from collections.abc import Iterable
from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from airflow_provider_llmq.core.accounting.result import QueryResult
from airflow_provider_llmq.core.endpoint.api_forms import API_TYPES, guess_api_type
from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig
from airflow_provider_llmq.core.endpoint.entra_id import INSTALL_HINT, EntraIdConfig
from airflow_provider_llmq.core.endpoint.entra_token import add_token_listener
from airflow_provider_llmq.core.endpoint.secrets import MIN_SECRET_LENGTH, Scrubber, url_credentials
from airflow_provider_llmq.core.errors import (
    LLMQueryAuthError,
    LLMQueryConfigError,
    LLMQueryError,
    LLMQueryQuotaError,
)
from airflow_provider_llmq.core.request.options import QueryOptions
from airflow_provider_llmq.core.request.payload import DEFAULT_SYSTEM_PROMPT
from airflow_provider_llmq.core.transport.async_client import AsyncClient
from airflow_provider_llmq.core.transport.sync_client import SyncClient

_FALSE_WORDS = frozenset({"false", "0", "no", "off"})
AUTH_TYPES = ("api_key", "entra_id")
# the connection extras an Entra ID credential is made of (EntraIdConfig's fields but the PEM ones)
_ENTRA_EXTRAS = ("tenant_id", "client_id", "client_secret", "authority_host", "scope")


def _as_bool(value: Any, default: bool = True) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_WORDS
    return bool(value)


def _headers_extra(value: Any, conn_id: str) -> dict[str, str]:
    """Extra ``headers``: a JSON object, or its text (what a form field or an env variable holds)."""
    if isinstance(value, str) and value.strip():
        try:
            value = json.loads(value)
        except ValueError:
            value = None  # not echoed: the text may hold a subscription key
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise LLMQueryConfigError(f"connection {conn_id!r}: extra headers must be a JSON object")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _register_secrets(values: Iterable[str]) -> None:
    """Airflow's masker hides these in every task log line, whoever logs them."""
    for value in values:
        if value and len(value.strip()) >= MIN_SECRET_LENGTH:
            mask_secret(value)
            if value.strip() != value:
                mask_secret(value.strip())


def _has_azure_identity() -> bool:
    try:
        return importlib.util.find_spec("azure.identity") is not None
    except ImportError:  # no azure namespace at all
        return False


def _entra_id(extra: dict[str, Any]) -> EntraIdConfig | None:
    """Extra ``auth_type`` ``entra_id``: the credential from the other extras; None for a key."""
    auth_type = str(extra.get("auth_type") or "api_key").strip().lower()
    if auth_type not in AUTH_TYPES:
        raise LLMQueryConfigError(f"extra auth_type must be one of {AUTH_TYPES}, got {auth_type!r}")
    if auth_type == "api_key":
        return None
    if not _has_azure_identity():  # said before Spark starts, not at the first row
        raise LLMQueryConfigError(INSTALL_HINT)
    fields = {name: str(extra[name]) for name in _ENTRA_EXTRAS if extra.get(name)}
    return EntraIdConfig(
        **fields,
        certificate=extra.get("certificate_path") or None,
        certificate_password=str(extra.get("certificate_password") or "") or None,
        authority_ca_cert=extra.get("authority_ca_cert") or None,
    )


class LLMQueryHook(BaseHook):
    """Talks to an OpenAI or Azure OpenAI chat-completions endpoint.

    Credentials and TLS come from the connection only: host (API base URL), password (API key),
    extras ``api_type``, ``api_version``, ``deployment`` / ``model``, ``ca_cert``, ``verify``,
    ``timeout``, ``headers`` (values treated as secrets), ``proxy`` (a URL; wins over
    ``HTTPS_PROXY`` / ``NO_PROXY``). With extra ``auth_type`` ``entra_id`` there is no key: Entra
    ID tokens from ``DefaultAzureCredential``, or from the service principal of ``tenant_id``,
    ``client_id`` and ``client_secret`` or ``certificate_path``; ``authority_host``, ``scope`` and
    ``authority_ca_cert`` are optional. The key, the client secret, header values, proxy
    credentials and every token obtained are registered with Airflow's secrets masker and scrubbed
    from every message this hook returns.

    :param llm_conn_id: the ``llmq`` connection to use.
    """

    conn_name_attr = "llm_conn_id"
    default_conn_name = "llmq_default"
    conn_type = "llmq"
    hook_name = "LLM Query (OpenAI / Azure OpenAI)"

    def __init__(self, llm_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.llm_conn_id = llm_conn_id

    def __repr__(self) -> str:
        return f"LLMQueryHook(llm_conn_id={self.llm_conn_id!r})"

    @cached_property
    def endpoint(self) -> EndpointConfig:
        """The connection as an :class:`EndpointConfig` (what the core methods take)."""
        conn = self.get_connection(self.llm_conn_id)
        extra = conn.extra_dejson
        headers = _headers_extra(extra.get("headers"), self.llm_conn_id)
        proxy = extra.get("proxy") or None
        raw_secrets = [conn.password or "", *headers.values(), *url_credentials(proxy)]
        raw_secrets += [str(extra.get(name) or "") for name in ("client_secret", "certificate_password")]
        add_token_listener(mask_secret)  # every Entra ID token this process obtains, whoever asks
        _register_secrets(raw_secrets)
        self._scrubber = Scrubber(raw_secrets)
        try:
            endpoint = self._endpoint_from(conn, extra, headers, proxy)
        except LLMQueryConfigError as exc:
            raise LLMQueryConfigError(
                self._scrubber.text(f"connection {self.llm_conn_id!r}: {exc}")
            ) from None
        # the environment's proxy credentials too, now that the endpoint has chosen its proxy
        _register_secrets(endpoint.secrets())
        self._scrubber = Scrubber([*raw_secrets, *endpoint.secrets()])
        tokens = endpoint.token_source()
        if tokens is not None:
            tokens.watch(self._scrubber)
        return endpoint

    def _endpoint_from(
        self, conn: Any, extra: dict[str, Any], headers: dict[str, str], proxy: str | None
    ) -> EndpointConfig:
        api_type = str(
            extra.get("api_type") or guess_api_type(conn.host or "", bool(extra.get("deployment")))
        ).lower()
        if api_type not in API_TYPES:
            raise LLMQueryConfigError(f"extra api_type must be one of {API_TYPES}, got {api_type!r}")
        verify = _as_bool(extra.get("verify"), default=True)
        if not verify:
            self.log.warning(
                "Connection %r has verify=false: TLS certificates are NOT checked", self.llm_conn_id
            )
        host = conn.host or ""
        if conn.port and host and ":" not in host.split("://")[-1]:
            host = f"{host.rstrip('/')}:{conn.port}"
        try:
            timeout = float(extra.get("timeout") or 60)
        except (TypeError, ValueError):
            raise LLMQueryConfigError("extra timeout must be a number of seconds") from None
        return EndpointConfig(
            api_base=host,
            api_key=conn.password or "",
            api_type=api_type,  # type: ignore[arg-type]
            model=extra.get("deployment") or extra.get("model") or None,
            api_version=extra.get("api_version") or None,
            ca_cert=extra.get("ca_cert") or None,
            verify=verify,
            timeout=timeout,
            headers=headers,
            proxy=proxy,
            entra_id=_entra_id(extra),
        )

    @property
    def scrubber(self) -> Scrubber:
        """Hides the connection's key, header values and proxy credentials in a message."""
        with contextlib.suppress(LLMQueryError):
            _ = self.endpoint  # builds the scrubber from the connection's values
        return getattr(self, "_scrubber", Scrubber())

    def query(
        self,
        prompt: str,
        *,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        model: str | None = None,
        max_retries: int = 6,
        **request_params: Any,
    ) -> QueryResult:
        """Ask one prompt; failures come back as a result with ``status="error"``.

        :param prompt: the user message.
        :param system_prompt: the system message (None: none).
        :param model: overrides the connection's deployment / model.
        :param max_retries: retries after the first attempt.
        :param request_params: body fields such as ``temperature=0, max_tokens=50``.
        """
        options = QueryOptions(system_prompt, model, request_params, max_retries)
        with SyncClient(self.endpoint, options, pool_size=1) as client:
            return client.query(None, prompt)

    async def aquery(
        self,
        prompt: str,
        *,
        system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        model: str | None = None,
        max_retries: int = 6,
        **request_params: Any,
    ) -> QueryResult:
        """:meth:`query` for async code (deferrable triggers, notebooks); same arguments."""
        endpoint = await asyncio.to_thread(lambda: self.endpoint)  # the connection lookup may block
        options = QueryOptions(system_prompt, model, request_params, max_retries)
        async with AsyncClient(endpoint, options, concurrency=1) as client:
            return await client.query(None, prompt)

    def test_connection(self) -> tuple[bool, str]:
        """One real, cheap request (a 1-token completion), reported as Airflow's (ok, message)."""
        ok, message = self._test_connection()
        return ok, self.scrubber.text(message)

    def _test_connection(self) -> tuple[bool, str]:
        via = ""
        try:
            endpoint = self.endpoint
            tokens = endpoint.token_source()
            if tokens is not None:
                try:
                    tokens.token()
                except LLMQueryError as exc:
                    return False, f"Entra ID authentication failed: {exc}"
                via = f"; Entra ID token from {tokens.credential_name}"
            result = self.query("ping", system_prompt=None, max_retries=0, max_tokens=1)
        except LLMQueryAuthError as exc:
            return False, f"Authentication failed: {exc}"
        except LLMQueryQuotaError as exc:
            return False, f"Quota exhausted: {exc}"
        except LLMQueryConfigError as exc:
            return False, str(exc)
        except LLMQueryError as exc:
            return False, f"{type(exc).__name__}: {exc}"
        if result.ok or (result.http_status is not None and 400 <= result.http_status < 500):
            # a 400 to the probe (e.g. a model that rejects max_tokens) still proves reach and auth
            return True, (
                f"Connection successful: {endpoint.api_type} endpoint {endpoint.api_base} answered "
                f"HTTP {result.http_status} for model {endpoint.model or '(from request)'}{via}"
            )
        if result.error_code == "connection_error":
            return False, f"Could not reach {endpoint.api_base}: {result.error_message}"
        if result.error_code == "timeout":
            return False, f"Timed out reaching {endpoint.api_base} (timeout {endpoint.timeout:g} s)"
        return False, f"The endpoint answered HTTP {result.http_status}: {result.error_message}"
