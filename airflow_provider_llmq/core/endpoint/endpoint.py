"""Where requests go and how they authenticate: URL, headers and TLS for Azure OpenAI and OpenAI.

The API forms (OpenAI, Azure's dated API, Azure's v1 API) differ in the URL, the key header and
whether the body names the model, so each is one small :class:`~.api_forms.ApiForm` and everything
else is shared. The key travels only in a header, never in a URL, a
``repr()`` or an exception. With Entra ID (``entra_id``) both forms send ``Authorization: Bearer``
with the process's token (:mod:`.entra_id`) instead of any key, added per request by the clients.
"""

from __future__ import annotations

import functools
import math
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal
from urllib.parse import SplitResult, urlsplit
from urllib.request import getproxies

from requests.utils import get_environ_proxies, select_proxy

from airflow_provider_llmq.core.endpoint.api_forms import API_TYPES, FORMS, ApiForm
from airflow_provider_llmq.core.endpoint.entra_id import EntraIdConfig
from airflow_provider_llmq.core.endpoint.entra_token import TokenSource, token_source
from airflow_provider_llmq.core.endpoint.secrets import url_credentials, without_credentials
from airflow_provider_llmq.core.errors import LLMQueryConfigError

ApiType = Literal["azure", "azure_v1", "openai"]


# RFC 9110 token: what a header name may be made of
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FORBIDDEN_HEADERS = frozenset({"api-key", "authorization", "proxy-authorization"})
_PROXY_SCHEMES = ("http", "https")


def _split_url(url: str, default_scheme: str, unparsable: str) -> tuple[str, SplitResult]:
    """The URL (``default_scheme`` added when it has none) and its parts; ``unparsable`` is the
    error, which never quotes the URL (a mistyped one may carry credentials)."""
    if "://" not in url:
        url = f"{default_scheme}://{url}"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise LLMQueryConfigError(unparsable) from None
    return url, parts


def normalize_base_url(host: str) -> str:
    """``myres.openai.azure.com`` and ``https://myres.openai.azure.com/`` mean the same base.

    Errors never quote the URL: a mistyped one may still carry credentials.
    """
    host = host.strip().rstrip("/")
    if not host:
        raise LLMQueryConfigError("the connection has no host (API base URL)")
    host, parts = _split_url(host, "https", "the API base URL could not be parsed (check its host and port)")
    if "@" in parts.netloc:
        raise LLMQueryConfigError(
            "the API base URL must not carry credentials: put the key in the connection's password"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        scheme = parts.scheme if parts.scheme.isalnum() else "?"
        raise LLMQueryConfigError(f"the API base URL is not an http(s) URL (scheme {scheme!r})")
    if parts.query or parts.fragment:
        raise LLMQueryConfigError(
            "the API base URL must not carry a query or fragment: put the key in the connection's password"
        )
    return host


def _control_character(value: str) -> bool:
    return any(ord(char) < 32 or ord(char) == 127 for char in value)


def _clean_key(key: object) -> str:
    """The key without the surrounding whitespace a file-mounted secret brings (``\n``, ``\r\n``)."""
    if key is None:
        return ""  # reported as a missing key when a client is built
    if not isinstance(key, str):
        raise LLMQueryConfigError("the API key must be a string")
    key = key.strip()
    if _control_character(key):
        raise LLMQueryConfigError(
            "the API key contains a control character (a line break or similar inside it): "
            "check the secret it was read from"
        )
    if not key.isascii():
        raise LLMQueryConfigError("the API key contains a non-ASCII character: check the secret")
    return key


def _clean_headers(headers: Mapping[str, object] | None) -> dict[str, str]:
    if headers is not None and not isinstance(headers, Mapping):
        raise LLMQueryConfigError("extra headers must be a mapping of header name to value")
    cleaned: dict[str, str] = {}
    for raw_name, raw_value in (headers or {}).items():
        name = str(raw_name).strip()
        if not _TOKEN.fullmatch(name):
            # not quoted: a name this malformed may be a whole "Name: value" line
            raise LLMQueryConfigError(
                "an extra header name is not a valid HTTP header name (letters, digits and -_.!#$%&'*+^`|~)"
            )
        if name.lower() in _FORBIDDEN_HEADERS:
            raise LLMQueryConfigError(
                f"extra header {name!r} would carry a credential: put the key in the password"
            )
        value = str(raw_value).strip()
        if _control_character(value):
            raise LLMQueryConfigError(
                f"header {name!r} contains a control character (a line break or similar inside its value)"
            )
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            raise LLMQueryConfigError(
                f"header {name!r} contains a character HTTP headers cannot carry (outside Latin-1)"
            ) from None
        cleaned[name] = value
    return cleaned


def _check_proxy(proxy: str, origin: str) -> str:
    """A usable proxy URL (``host:port`` means http). Errors name where it came from, never its value."""
    proxy = proxy.strip()
    proxy, parts = _split_url(proxy, "http", f"{origin} could not be parsed as a URL")
    if parts.scheme not in _PROXY_SCHEMES or not parts.hostname:
        scheme = parts.scheme if parts.scheme.isalnum() else "?"
        raise LLMQueryConfigError(
            f"{origin} must be an http:// or https:// proxy URL (got scheme {scheme!r})"
        )
    return proxy


def _is_pem_text(ca_cert: str) -> bool:
    return "-----BEGIN" in ca_cert


@dataclass(frozen=True)
class EndpointConfig:
    """One chat-completions endpoint.

    :param api_base: API base URL (``https://myres.openai.azure.com``, ``https://api.openai.com/v1``);
        a missing scheme means https; each form's rule for its path is in :mod:`.api_forms`.
    :param api_key: the key; surrounding whitespace is stripped; sent only as a header, hidden from
        ``repr()``.
    :param api_type: ``"azure"`` (``api-key`` header, deployment in the URL), ``"azure_v1"``
        (Azure's ``/openai/v1`` API: ``api-key``, deployment in the body) or ``"openai"`` (Bearer).
    :param model: the Azure deployment name, or the OpenAI model sent in the body.
    :param api_version: Azure ``api-version`` query parameter (v1 API: none, or ``preview``).
    :param ca_cert: a CA bundle path, or the PEM text itself, for a self-signed or corporate CA.
    :param verify: TLS verification; False only when asked for explicitly.
    :param timeout: deadline in seconds for one whole request (connect, headers and body).
    :param headers: extra static headers; their values are treated as secrets (an API-management
        subscription key, say): hidden from ``repr()`` and scrubbed from every message.
    :param proxy: an ``http://`` or ``https://`` proxy URL, credentials allowed; it wins over
        ``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``NO_PROXY``, which are honoured when it is not set.
    :param entra_id: authenticate with Entra ID tokens (``Authorization: Bearer``, both forms)
        instead of a key; ``api_key`` must then be empty.
    """

    api_base: str
    api_key: str = field(default="", repr=False)
    api_type: ApiType = "openai"
    model: str | None = None
    api_version: str | None = None
    ca_cert: str | None = field(default=None, repr=False)
    verify: bool = True
    timeout: float = 60.0
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    proxy: str | None = field(default=None, repr=False)
    entra_id: EntraIdConfig | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.api_type not in FORMS:
            raise LLMQueryConfigError(f"api_type must be one of {API_TYPES}, got {self.api_type!r}")
        object.__setattr__(self, "api_base", normalize_base_url(self.api_base))
        self._form.check(self.api_base, self.api_version)
        try:
            timeout = float(self.timeout)
        except (TypeError, ValueError):
            raise LLMQueryConfigError("timeout must be a number of seconds") from None
        if not (timeout > 0 and math.isfinite(timeout)):
            raise LLMQueryConfigError(f"timeout must be positive, got {self.timeout!r}")
        object.__setattr__(self, "timeout", timeout)
        object.__setattr__(self, "api_key", _clean_key(self.api_key))
        object.__setattr__(self, "headers", _clean_headers(self.headers))
        proxy = self.proxy.strip() if isinstance(self.proxy, str) else self.proxy
        if proxy is not None and not isinstance(proxy, str):
            raise LLMQueryConfigError("proxy must be a URL string")
        object.__setattr__(self, "proxy", _check_proxy(proxy, "the proxy setting") if proxy else None)
        if self.entra_id is not None:
            if not isinstance(self.entra_id, EntraIdConfig):
                raise LLMQueryConfigError("entra_id must be an EntraIdConfig")
            if self.api_key:
                # one credential: a key left beside Entra ID would be sent nowhere, or to the wrong place
                raise LLMQueryConfigError(
                    "the connection has both an API key and Entra ID authentication: clear the "
                    "password (the key) or set auth_type to api_key"
                )

    def __repr__(self) -> str:
        # header names help debugging; their values, the key, the CA and proxy credentials stay out
        proxy = without_credentials(self.proxy) if self.proxy else None
        return (
            f"EndpointConfig(api_base={self.api_base!r}, api_type={self.api_type!r}, "
            f"model={self.model!r}, api_version={self.api_version!r}, verify={self.verify!r}, "
            f"timeout={self.timeout!r}, headers={sorted(self.headers)!r}, proxy={proxy!r}, "
            f"auth={self.entra_id.describe() if self.entra_id else 'api_key'!r})"
        )

    @property
    def _form(self) -> ApiForm:
        return FORMS[self.api_type]

    def limit_param(self) -> str:
        """The body field of a completion limit llmq sets itself, as this API knows it."""
        return self._form.limit_param(self.api_version)

    def url(self, model: str | None = None) -> str:
        """The chat-completions URL; ``model`` overrides the configured deployment / model."""
        return self._form.chat_url(self.api_base, model or self.model, self.api_version)

    @property
    def api_root(self) -> str:
        """Where ``/chat/completions``, ``/files`` and ``/batches`` sit for this form."""
        return self._form.root(self.api_base)

    def request_headers(self) -> dict[str, str]:
        """Every request's headers; with Entra ID without ``Authorization``, which the clients add
        per request from :meth:`token_source` (the token changes during a run)."""
        if self.entra_id is not None:
            return {"Content-Type": "application/json", "Accept": "application/json", **dict(self.headers)}
        if not self.api_key:
            raise LLMQueryConfigError("the connection has no API key (set its password)")
        return {
            "Content-Type": "application/json",
            "Accept": "application/json",
            **dict(self.headers),
            **self._form.auth_headers(self.api_key),
        }

    def token_source(self) -> TokenSource | None:
        """With Entra ID, this process's token for the credential (shared by all its clients)."""
        return token_source(self.entra_id) if self.entra_id is not None else None

    def body_model(self, model: str | None = None) -> str | None:
        """The ``model`` field of the body: None for the dated Azure API, which takes it from the URL."""
        return (model or self.model) if self._form.model_in_body else None

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

    def proxy_url(self) -> str | None:
        """The proxy requests to this endpoint go through, credentials included, or None.

        The ``proxy`` setting wins; otherwise the environment decides as ``requests`` reads it
        (``HTTPS_PROXY`` / ``HTTP_PROXY`` / ``ALL_PROXY`` by the URL's scheme, ``NO_PROXY``
        bypassing), read when a client is built. Nothing else is taken from the environment:
        ``REQUESTS_CA_BUNDLE`` or ``.netrc`` must not override the connection's TLS or key.
        """
        if self.proxy:
            return self.proxy
        # scheme and host decide, as for requests: the path never matters to a proxy choice
        chosen = select_proxy(self.api_base, get_environ_proxies(self.api_base))
        return (
            _check_proxy(chosen, "the proxy from the environment (HTTPS_PROXY / HTTP_PROXY)")
            if chosen
            else None
        )

    def secrets(self) -> tuple[str, ...]:
        """Every value that must never show in a message: the key, extra header values, the
        credentials of the configured proxy and of every proxy the environment names (used for
        this endpoint or not: a log line may quote the environment)."""
        found = [self.api_key, *self.headers.values(), *url_credentials(self.proxy)]
        if self.entra_id is not None:
            found += self.entra_id.secrets()
        for proxy in getproxies().values():
            found += url_credentials(proxy)
        return tuple(value for value in found if value)

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
            # the environment's proxy too: a client built before HTTPS_PROXY changed must not be reused
            self.proxy_url(),
            self.entra_id,
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
