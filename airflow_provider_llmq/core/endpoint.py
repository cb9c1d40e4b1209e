"""Where requests go and how they authenticate: URL, headers and TLS for Azure OpenAI and OpenAI.

The two API forms differ in exactly two things, the URL and the auth header, so each is one small
``_ApiForm`` and everything else is shared. The key travels only in a header, never in a URL, a
``repr()`` or an exception.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import quote, urlsplit

from airflow_provider_llmq.core.errors import LLMQueryConfigError

ApiType = Literal["azure", "openai"]
API_TYPES: tuple[str, ...] = ("azure", "openai")
DEFAULT_AZURE_API_VERSION = "2024-06-01"


class _ApiForm:
    def url(self, base: str, model: str | None, api_version: str | None) -> str:
        raise NotImplementedError

    def auth_headers(self, key: str) -> dict[str, str]:
        raise NotImplementedError


class _AzureForm(_ApiForm):
    def url(self, base: str, model: str | None, api_version: str | None) -> str:
        if not model:
            raise LLMQueryConfigError(
                "Azure OpenAI needs a deployment name: set extra 'deployment' on the connection "
                "or pass model=..."
            )
        version = quote(api_version or DEFAULT_AZURE_API_VERSION, safe="")
        return f"{base}/openai/deployments/{quote(model, safe='')}/chat/completions?api-version={version}"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"api-key": key}


class _OpenAIForm(_ApiForm):
    def url(self, base: str, model: str | None, api_version: str | None) -> str:
        return f"{base}/chat/completions"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}


_FORMS: dict[str, _ApiForm] = {"azure": _AzureForm(), "openai": _OpenAIForm()}


def normalize_base_url(host: str) -> str:
    """``myres.openai.azure.com`` and ``https://myres.openai.azure.com/`` mean the same base."""
    host = host.strip().rstrip("/")
    if not host:
        raise LLMQueryConfigError("the connection has no host (API base URL)")
    if "://" not in host:
        host = f"https://{host}"
    parts = urlsplit(host)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LLMQueryConfigError(f"the API base URL {host!r} is not an http(s) URL")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise LLMQueryConfigError(
            "the API base URL must not carry a query, fragment or credentials: put the key in the "
            "connection's password"
        )
    return host


def _is_pem_text(ca_cert: str) -> bool:
    return "-----BEGIN" in ca_cert


@dataclass(frozen=True)
class EndpointConfig:
    """One chat-completions endpoint.

    :param api_base: API base URL (``https://myres.openai.azure.com``, ``https://api.openai.com/v1``);
        a missing scheme means https.
    :param api_key: the key; sent only as a header, hidden from ``repr()``.
    :param api_type: ``"azure"`` (``api-key`` header, deployment in the URL) or ``"openai"`` (Bearer).
    :param model: the Azure deployment name, or the OpenAI model sent in the body.
    :param api_version: Azure ``api-version`` query parameter.
    :param ca_cert: a CA bundle path, or the PEM text itself, for a self-signed or corporate CA.
    :param verify: TLS verification; False only when asked for explicitly.
    :param timeout: per-request timeout in seconds.
    :param headers: extra static headers.
    """

    api_base: str
    api_key: str = field(default="", repr=False)
    api_type: ApiType = "openai"
    model: str | None = None
    api_version: str | None = None
    ca_cert: str | None = field(default=None, repr=False)
    verify: bool = True
    timeout: float = 60.0
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.api_type not in _FORMS:
            raise LLMQueryConfigError(f"api_type must be one of {API_TYPES}, got {self.api_type!r}")
        object.__setattr__(self, "api_base", normalize_base_url(self.api_base))
        if self.timeout <= 0:
            raise LLMQueryConfigError(f"timeout must be positive, got {self.timeout!r}")
        for name in self.headers:
            if name.lower() in ("api-key", "authorization"):
                raise LLMQueryConfigError(
                    f"extra header {name!r} would carry a credential: put the key in the password"
                )

    @property
    def _form(self) -> _ApiForm:
        return _FORMS[self.api_type]

    def url(self, model: str | None = None) -> str:
        """The chat-completions URL; ``model`` overrides the configured deployment / model."""
        return self._form.url(self.api_base, model or self.model, self.api_version)

    def request_headers(self) -> dict[str, str]:
        if not self.api_key:
            raise LLMQueryConfigError("the connection has no API key (set its password)")
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **dict(self.headers),
            **self._form.auth_headers(self.api_key),
        }

    def body_model(self, model: str | None = None) -> str | None:
        """The ``model`` field of the body (OpenAI needs it; Azure takes it from the URL)."""
        return model or self.model

    def with_options(self, *, model: str | None = None, timeout: float | None = None) -> EndpointConfig:
        return replace(
            self,
            model=model or self.model,
            timeout=self.timeout if timeout is None else float(timeout),
        )

    @property
    def is_tls(self) -> bool:
        return self.api_base.startswith("https://")

    def ssl_context(self) -> ssl.SSLContext:
        """One SSL context per endpoint (building one costs ~15 ms): system CAs, or the given CA."""
        return _build_ssl_context(self.ca_cert, self.verify)

    def cache_key(self) -> tuple[object, ...]:
        """Identifies a client that can be shared: same target, same credentials, same TLS."""
        return (
            self.api_base,
            self.api_type,
            self.api_version,
            self.api_key,
            self.ca_cert,
            self.verify,
            self.timeout,
            tuple(sorted(self.headers.items())),
        )


@functools.lru_cache(maxsize=32)
def _build_ssl_context(ca_cert: str | None, verify: bool) -> ssl.SSLContext:
    if not verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if not ca_cert:
        return ssl.create_default_context()
    try:
        if _is_pem_text(ca_cert):
            return ssl.create_default_context(cadata=ca_cert)
        return ssl.create_default_context(cafile=ca_cert)
    except FileNotFoundError:
        raise LLMQueryConfigError(f"CA certificate file not found: {ca_cert}") from None
    except (ssl.SSLError, ValueError) as exc:
        raise LLMQueryConfigError(f"the CA certificate could not be loaded: {exc}") from None
