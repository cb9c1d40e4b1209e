r"""Keeps secrets out of everything llmq records or raises.

A row's error message is written to the output, the checkpoint and the task log, and an exception
ends up in the log with its whole chain; any of them may quote what a transport library saw (a
header, a proxy URL). Rather than trusting every message source, each run builds one
:class:`Scrubber` from its endpoint's secrets (the key, every extra header value, proxy
credentials) and passes every recorded message and every raised exception through it. Secrets
that appear during a run (an Entra ID token, each time it is refreshed) are :meth:`Scrubber.add`\ ed
to the same scrubber.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import threading
from collections.abc import Iterable
from urllib.parse import quote, unquote, urlsplit

from airflow_provider_llmq.core.accounting.result import QueryResult

MASK = "***"
# shorter values are not secrets anyone relies on, and masking them would shred every message
MIN_SECRET_LENGTH = 4
_MAX_CHAIN = 16


def url_credentials(url: str | None) -> list[str]:
    """The secret parts of a URL's userinfo: the password and ``user:password`` as written, decoded
    and base64-encoded (the form ``Proxy-Authorization: Basic`` carries)."""
    if not url or "@" not in url:
        return []
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        username, password = parts.username, parts.password
    except ValueError:
        return []
    if not password:
        return []
    found = [password, unquote(password)]
    userinfo = f"{unquote(username or '')}:{unquote(password)}"
    found += [userinfo, f"{username or ''}:{password}", base64.b64encode(userinfo.encode()).decode()]
    return found


def without_credentials(url: str) -> str:
    """``scheme://host:port`` of a URL, for messages: never its userinfo, path or query."""
    try:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an unparsable URL)"
    host = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{host}{port}"


def _forms(secret: str) -> set[str]:
    """How a value may appear in a message: as is, stripped, percent-encoded, or escaped by a
    ``repr()`` or a JSON dump (a trailing newline shows as ``\\n`` there)."""
    forms = {secret, secret.strip(), quote(secret, safe=""), repr(secret)[1:-1], json.dumps(secret)[1:-1]}
    return {form for form in forms if len(form) >= MIN_SECRET_LENGTH}


class Scrubber:
    """Replaces every known secret in a text, a result or an exception chain with ``***``.

    :param secrets: the values to hide; None and values shorter than 4 characters are ignored.
    """

    __slots__ = ("__weakref__", "_lock", "_secrets")

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        self._extend(secrets)

    def add(self, secret: str | None) -> None:
        """Hides ``secret`` from now on too (a token obtained during the run); safe from any thread."""
        self._extend([secret])

    def _extend(self, secrets: Iterable[str | None]) -> None:
        forms: set[str] = set()
        for secret in secrets:
            if isinstance(secret, str) and len(secret.strip()) >= MIN_SECRET_LENGTH:
                forms |= _forms(secret)
        if not forms:
            return
        with self._lock:
            # longest first: a secret that contains another is masked whole; readers see the old
            # tuple or the new one, never a half-built one
            self._secrets = tuple(sorted(forms | set(self._secrets), key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def __repr__(self) -> str:
        return f"Scrubber({len(self._secrets)} forms)"

    def leaks(self, text: str) -> bool:
        return any(secret in text for secret in self._secrets)

    def text(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def result(self, result: QueryResult) -> QueryResult:
        """The result with its error message and code scrubbed: the API's error body sets both."""
        message, code = result.error_message or "", result.error_code or ""
        if not (self.leaks(message) or self.leaks(code)):
            return result
        return dataclasses.replace(
            result,
            error_message=self.text(message) if result.error_message is not None else None,
            error_code=self.text(code) if result.error_code is not None else None,
        )

    def exception(self, exc: BaseException) -> BaseException:
        """``exc`` with its message scrubbed in place, or a clean stand-in of the same type when its
        text is not built from its arguments. Its cause / context chain is scrubbed too, and cut
        at the first link that would still show a secret."""
        if not self._secrets:
            return exc
        self._scrub_args(exc)
        if self._shows_secret(exc):
            exc = self._stand_in(exc)
        link = exc
        for _ in range(_MAX_CHAIN):
            nxt = link.__cause__ or link.__context__
            if nxt is None:
                return exc
            self._scrub_args(nxt)
            if self._shows_secret(nxt):
                link.__cause__ = link.__context__ = None
                link.__suppress_context__ = True
                return exc
            link = nxt
        link.__cause__ = link.__context__ = None  # a chain this long is not worth reading
        return exc

    def _scrub_args(self, exc: BaseException) -> None:
        with contextlib.suppress(AttributeError, TypeError):  # an exception type with read-only args
            exc.args = tuple(self.text(arg) if isinstance(arg, str) else arg for arg in exc.args)

    def _shows_secret(self, exc: BaseException) -> bool:
        try:
            return self.leaks(f"{exc!s} {exc!r}")
        except Exception:  # a __str__ that fails cannot be checked: treat it as leaking
            return True

    def _stand_in(self, exc: BaseException) -> BaseException:
        try:
            text = self.text(str(exc))
        except Exception:
            text = f"{type(exc).__name__} (message hidden)"
        try:
            clean = type(exc)(text)
        except Exception:
            clean = RuntimeError(f"{type(exc).__name__}: {text}")
        if self._shows_secret(clean):
            clean = RuntimeError(f"{type(exc).__name__} (message hidden: it contained a secret)")
        clean.__suppress_context__ = True
        return clean
