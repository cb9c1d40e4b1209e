"""A request that got no HTTP answer (a reset, a refused connection, a timeout, a TLS failure), read
as a row's failure: the TLS failures end the task, the rest are retried."""

from __future__ import annotations

import re

from airflow_provider_llmq.core.errors import LLMQueryAuthError, LLMQueryConfigError
from airflow_provider_llmq.core.request.error_codes import CONNECTION_ERROR, TIMEOUT
from airflow_provider_llmq.core.request.payload import Failure


def classify_exception(exc: BaseException) -> Failure:
    """A transport error: TLS problems end the task, the rest are retried."""
    if isinstance(exc, LLMQueryAuthError | LLMQueryConfigError):
        raise exc
    text = f"{type(exc).__name__}: {exc}"
    if _is_certificate_error(exc):
        raise LLMQueryConfigError(
            "TLS failure: the server certificate could not be verified "
            "(set the connection's ca_cert to the CA that signed it)"
        ) from None
    if _is_timeout(exc):
        detail = str(exc).strip()
        return Failure(TIMEOUT, f"request timed out: {detail}"[:300] if detail else "request timed out", True)
    cause = _root_cause(exc)
    # the cause first: the full text of a pooled client's error is long and cut at 300 characters
    return Failure(CONNECTION_ERROR, (f"{cause}: {text}" if cause else text)[:300], True)


_ERRNO_TEXT = re.compile(r"\[Errno -?\d+\] ([^'\")\]]+)")


def _root_cause(exc: BaseException) -> str | None:
    """What went wrong underneath (``Connection refused``, ``Name or service not known``)."""
    for item in reversed(_chain(exc)):
        if isinstance(item, OSError) and item.strerror:
            return str(item.strerror)
    found = _ERRNO_TEXT.search(str(exc))
    return found.group(1).strip() if found else None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        nested = current.args[0] if current.args and isinstance(current.args[0], BaseException) else None
        current = current.__cause__ or current.__context__ or nested
    return seen


def _is_certificate_error(exc: BaseException) -> bool:
    import ssl

    for item in _chain(exc):
        if isinstance(item, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(item) or "certificate verify failed" in str(item):
            return True
    return False


def _is_timeout(exc: BaseException) -> bool:
    return any(isinstance(item, TimeoutError) or "Timeout" in type(item).__name__ for item in _chain(exc))
