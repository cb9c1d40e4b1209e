"""Entra ID (Azure AD) credentials: what a connection names, and azure-identity made from it.

:class:`EntraIdConfig` is declarative (which credential, tenant, client, authority, scope) and frozen,
so it travels inside an :class:`~.endpoint.EndpointConfig` wherever the endpoint goes, Spark
executors included; :func:`build_credential` turns it into an ``azure-identity`` credential in the
process that needs one, and :func:`get_token` asks it. The token a process keeps, and when it is
replaced, is :mod:`.entra_token`'s.

**Spark executors.** Each Python worker builds its own credential from the same config and gets
its own token: a managed identity is then the node's own, a service principal's secret (or its
certificate, read into the config where it is made) travels like the API key does, and no token
ever crosses the network inside a task. The cost is one token per worker process per lifetime.

A refused credential raises :class:`LLMQueryCredentialError` naming the credential (tenant and
client ids), never its secret: a configuration error, so the task fails without a retry.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError

DEFAULT_SCOPE = "https://cognitiveservices.azure.com/.default"
_MICROSOFT_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
    }
)
INSTALL_HINT = "Entra ID authentication needs azure-identity: pip install 'airflow-provider-llmq[azure]'"


class LLMQueryCredentialError(LLMQueryAuthError, LLMQueryConfigError):
    """The authority refused the credential (a wrong secret, an unknown client or tenant, no identity
    on this host). No retry can fix it: it is a configuration error, so the task fails at once."""


def _pem_or_file(value: str | None, what: str) -> str | None:
    """PEM text as given, or the file's text: read where the config is made, so no executor needs it."""
    if not value or "-----BEGIN" in value:
        return value or None
    try:
        with open(value, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise LLMQueryConfigError(f"{what} could not be read: {value} ({exc.strerror})") from None


@dataclass(frozen=True)
class EntraIdConfig:
    """Which Entra ID credential gets the tokens.

    With ``client_secret`` or ``certificate`` it is that service principal (``tenant_id`` and
    ``client_id`` required); otherwise ``DefaultAzureCredential`` (environment variables, workload
    identity, managed identity, the az CLI), where ``client_id`` picks a user-assigned identity.

    :param tenant_id: the directory (tenant) id.
    :param client_id: the application (client) id, or a user-assigned managed identity's.
    :param client_secret: the service principal's secret; hidden from ``repr()``, scrubbed everywhere.
    :param certificate: the service principal's certificate with its private key, as PEM text or a
        path (read at once, so the text travels to executors).
    :param certificate_password: the password of an encrypted private key in ``certificate``;
        hidden from ``repr()``, scrubbed everywhere.
    :param authority_host: e.g. ``https://login.microsoftonline.us`` for a sovereign cloud; None: the
        environment's ``AZURE_AUTHORITY_HOST``, else the public cloud. Instance discovery is turned
        off for any host that is not Microsoft's (it would ask login.microsoftonline.com first).
    :param scope: the token's scope.
    :param authority_ca_cert: a CA bundle (PEM text or a path) the authority's certificate is
        checked against instead of the system's (a private or test authority).
    """

    tenant_id: str | None = None
    client_id: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    certificate: str | None = field(default=None, repr=False)
    certificate_password: str | None = field(default=None, repr=False)
    authority_host: str | None = None
    scope: str = DEFAULT_SCOPE
    authority_ca_cert: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for name in ("tenant_id", "client_id", "client_secret", "authority_host", "scope"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise LLMQueryConfigError(f"Entra ID {name} must be a string")
            value = value.strip() if value else None
            if value and any(ord(c) < 32 for c in value):
                raise LLMQueryConfigError(f"Entra ID {name} contains a control character")
            object.__setattr__(self, name, value)
        if not self.scope:
            object.__setattr__(self, "scope", DEFAULT_SCOPE)
        if self.certificate_password is not None and not isinstance(self.certificate_password, str):
            raise LLMQueryConfigError("Entra ID certificate_password must be a string")
        object.__setattr__(self, "certificate_password", self.certificate_password or None)
        if self.certificate_password and not self.certificate:
            raise LLMQueryConfigError("Entra ID: a certificate password was given without a certificate")
        if self.client_secret and self.certificate:
            raise LLMQueryConfigError("Entra ID: give a client secret or a certificate, not both")
        if (self.client_secret or self.certificate) and not (self.tenant_id and self.client_id):
            raise LLMQueryConfigError("Entra ID: a service principal needs tenant_id and client_id")
        if self.authority_host:
            host = self.authority_host.rstrip("/")
            host = host if "://" in host else f"https://{host}"
            if urlsplit(host).scheme != "https":
                raise LLMQueryConfigError("Entra ID authority_host must be an https:// URL")
            object.__setattr__(self, "authority_host", host)
        object.__setattr__(self, "certificate", _pem_or_file(self.certificate, "the Entra ID certificate"))
        object.__setattr__(
            self, "authority_ca_cert", _pem_or_file(self.authority_ca_cert, "the authority's CA certificate")
        )

    @property
    def kind(self) -> str:
        return "client_secret" if self.client_secret else "certificate" if self.certificate else "default"

    def describe(self) -> str:
        """The credential in words, for messages: ids only, never a secret."""
        if self.kind == "default":
            return "DefaultAzureCredential" + (f" (client {self.client_id})" if self.client_id else "")
        name = "ClientSecretCredential" if self.kind == "client_secret" else "CertificateCredential"
        return f"{name} for tenant {self.tenant_id}, client {self.client_id}"

    def secrets(self) -> tuple[str, ...]:
        values = (self.client_secret, self.certificate, self.certificate_password)
        return tuple(value for value in values if value)

    def authority(self) -> str:
        """The authority this process's credential asks: the config's, else the environment's."""
        return (
            self.authority_host
            or os.environ.get("AZURE_AUTHORITY_HOST")
            or "https://login.microsoftonline.com"
        )


def get_token(credential: Any, config: EntraIdConfig) -> tuple[str, float, str]:
    """(token, seconds it has left, which credential gave it) from an azure-identity credential;
    its failures as llmq errors that name the credential, scrubbed of its secret."""
    from azure.core.exceptions import ClientAuthenticationError

    scrub = Scrubber(config.secrets())
    try:
        info = credential.get_token(config.scope)
    except ClientAuthenticationError as exc:
        raise LLMQueryCredentialError(
            scrub.text(f"{config.describe()} could not get a token: {_reason(exc)}")
        ) from None
    except Exception as exc:  # the authority unreachable, TLS, a 5xx after azure-core's retries
        raise LLMQueryAuthError(
            scrub.text(
                f"{config.describe()} could not reach the authority {config.authority()}: "
                f"{type(exc).__name__}: {_reason(exc)}"
            )
        ) from None
    chosen = getattr(credential, "_successful_credential", None)  # DefaultAzureCredential's choice
    name = config.describe() + (f" via {type(chosen).__name__}" if chosen else "")
    return str(info.token), float(info.expires_on) - time.time(), name


def _reason(exc: BaseException) -> str:
    """The first lines of an azure-identity message (a chain's message lists every credential)."""
    text = str(getattr(exc, "message", None) or exc).replace("\r", "")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("Trace ID")]
    reason = " ".join(lines)
    return reason[:600] + ("..." if len(reason) > 600 else "")


def build_credential(config: EntraIdConfig) -> Any:
    """The azure-identity credential ``config`` names (imported here: an optional extra)."""
    try:
        from azure.identity import CertificateCredential, ClientSecretCredential, DefaultAzureCredential
    except ImportError:
        raise LLMQueryConfigError(INSTALL_HINT) from None
    common: dict[str, Any] = {}
    if config.authority_host:
        common["authority"] = config.authority_host
    if urlsplit(config.authority()).hostname not in _MICROSOFT_HOSTS:
        # else MSAL first asks login.microsoftonline.com about this host, and fails after ~5 s
        common["disable_instance_discovery"] = True
    if config.authority_ca_cert:
        common["connection_verify"] = _ca_file(config.authority_ca_cert)
    tenant, client = config.tenant_id or "", config.client_id or ""  # checked by the config
    if config.kind == "client_secret":
        return ClientSecretCredential(tenant, client, config.client_secret or "", **common)
    if config.kind == "certificate":
        data = (config.certificate or "").encode()
        if config.certificate_password:  # azure-identity decrypts the key with it (bytes or str)
            common["password"] = config.certificate_password
        try:
            return CertificateCredential(tenant, client, certificate_data=data, **common)
        except (TypeError, ValueError) as exc:  # no or a wrong password, an unreadable key
            raise LLMQueryCredentialError(
                f"{config.describe()}: the certificate's private key could not be loaded ({_reason(exc)}); "
                "check certificate_path and certificate_password"
            ) from None
    if config.client_id:
        common.update(
            managed_identity_client_id=config.client_id, workload_identity_client_id=config.client_id
        )
    if config.tenant_id:
        common["workload_identity_tenant_id"] = config.tenant_id
    return DefaultAzureCredential(**common)


_ca_files: dict[str, str] = {}


def _ca_file(pem: str) -> str:
    """A private file holding ``pem``, once per process: azure-core takes a CA only as a path."""
    path = _ca_files.get(pem)
    if path is None:
        handle, path = tempfile.mkstemp(prefix="llmq-authority-ca-", suffix=".pem")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(pem)
        atexit.register(_remove, path)
        _ca_files[pem] = path
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


__all__ = [
    "DEFAULT_SCOPE",
    "INSTALL_HINT",
    "EntraIdConfig",
    "LLMQueryCredentialError",
    "build_credential",
    "get_token",
]
