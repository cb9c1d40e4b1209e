"""The one Entra ID token a process keeps per credential, replaced before it expires.

**Why llmq keeps its own token.** The sync credentials (MSAL) never cache a token that lives 300 s
or less, so asking them per request sends every request to the authority; the async ones hand
out tokens with 1 s left. The clients therefore never ask the credential per request: they read
the token a :class:`TokenSource` holds, and the source replaces it in one place, under a lock, a
margin before it expires (:func:`refresh_margin`). While one thread refreshes, the others keep
sending with the old token if it is still valid; only an expired or refused one makes them wait.

**Sync credential for both clients.** The async client uses the same sync credential, called in
the event loop's default executor only when the token is due (:meth:`TokenSource.aheader`); the
hot path is a lock-free read. One credential per process then means one count of authority
requests, one refresh rule and one scrubbing path for threads and event loops alike, and no
``aiohttp`` session of azure-identity's own per loop.

There is one source per process and config (:func:`token_source`): a Spark worker's clients share
it across tasks, and a forked worker builds its own (see :mod:`.entra_id` on executors). Every
token obtained is handed to the scrubbers watching the source (the clients' own) and to the
process's listeners (Airflow's masker, registered by the hook).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmq.core.endpoint.entra_id import (
    EntraIdConfig,
    LLMQueryCredentialError,
    build_credential,
    get_token,
)
from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.core.errors import LLMQueryAuthError

MAX_MARGIN = 300.0  # what MSAL and azure-core leave for an hour-long token
_log = logging.getLogger(__name__)


def refresh_margin(lifetime: float) -> float:
    """How long before its expiry a token is replaced: a fifth of its life, at most 300 s, at least
    1 s (a request in flight on a loaded machine), but never more than a quarter of a life shorter
    than 4 s, so that even a test's 3 s token is used for three quarters of it."""
    return min(MAX_MARGIN, max(lifetime * 0.2, min(1.0, lifetime * 0.25)))


@dataclass(frozen=True)
class _Token:
    value: str
    lifetime: float  # seconds it lived when first obtained: what the margin is scaled to
    refresh_at: float  # monotonic
    expires_at: float  # monotonic
    generation: int
    stale: bool = False  # refused by the server: nobody sends it again


# called with every token obtained in this process (Airflow's masker, registered by the hook)
_listeners: list[Callable[[str], object]] = []


def add_token_listener(listener: Callable[[str], object]) -> None:
    """``listener(token)`` for every token any source of this process obtains from now on."""
    if listener not in _listeners:
        _listeners.append(listener)


class TokenSource:
    """The process's token for one :class:`EntraIdConfig`: obtained lazily, replaced in one place.

    :param config: the credential.
    :param clock: monotonic seconds (tests).
    """

    def __init__(self, config: EntraIdConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._lock = threading.Lock()
        self._credential: Any = None
        self._token: _Token | None = None
        self._issued: list[str] = []  # for scrubbers that start watching later
        self._scrubbers: weakref.WeakSet[Scrubber] = weakref.WeakSet()
        # a refused credential, for a second: the threads that queued behind the refusal get it too,
        # instead of each asking the authority again with the same wrong secret
        self._refused: tuple[str, float] | None = None
        self.requests = 0  # how often the credential was asked: about once per token lifetime
        self.credential_name = config.describe()  # which credential gave the last token

    def __repr__(self) -> str:
        return f"TokenSource({self.config.describe()})"

    @property
    def generation(self) -> int:
        """Which token is current; a 401 to a request sent with it :meth:`expire`\\ s that one only."""
        held = self._token
        return held.generation if held else 0

    def current(self) -> str | None:
        """The token when it needs no refresh (a lock-free read), else None."""
        held = self._token
        return held.value if held is not None and not held.stale and self._clock() < held.refresh_at else None

    def token(self) -> str:
        """The current token, refreshed first when it is due (blocking: not on an event loop)."""
        value = self.current()
        if value is not None:
            return value
        held = self._token
        usable = held is not None and not held.stale and self._clock() < held.expires_at
        # someone else is refreshing and the old token still works: no need to wait for them
        if not self._lock.acquire(blocking=not usable):
            assert held is not None
            return held.value
        try:
            value = self.current()
            if value is not None:
                return value
            if self._refused is not None and self._clock() < self._refused[1]:
                raise LLMQueryCredentialError(self._refused[0])
            try:
                return self._refresh()
            except LLMQueryCredentialError as exc:
                self._refused = (str(exc), self._clock() + 1.0)
                raise
        finally:
            self._lock.release()

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token()}"}

    async def aheader(self) -> dict[str, str]:
        """:meth:`header` for an event loop: a refresh runs in the loop's default executor."""
        value = self.current()
        if value is None:
            value = await asyncio.get_running_loop().run_in_executor(None, self.token)
        return {"Authorization": f"Bearer {value}"}

    def expire(self, generation: int) -> None:
        """The server refused the token of ``generation``: the next request gets a fresh one. A
        token already replaced is left alone, so concurrent 401s cause one refresh."""
        with self._lock:
            held = self._token
            if held is not None and held.generation == generation:
                self._token = _Token(
                    held.value, held.lifetime, held.refresh_at, held.expires_at, generation, True
                )

    def watch(self, scrubber: Scrubber) -> None:
        """``scrubber`` hides every token this source obtained and will obtain."""
        with self._lock:
            for value in self._issued:
                scrubber.add(value)
            self._scrubbers.add(scrubber)

    def _refresh(self) -> str:
        """Asks the credential (under the lock). A failure while the old token still works keeps
        it and tries again a little later, so a blip at the authority does not end a run."""
        held = self._token
        try:
            value, remaining = self._ask()
            if held is not None and held.stale and value == held.value:
                # the server refused this token (revoked, or expired early) but MSAL's cache hands
                # it back while it thinks it has time left: a new credential has an empty cache
                stale_credential, self._credential = self._credential, None
                with contextlib.suppress(Exception):
                    stale_credential.close()
                value, remaining = self._ask()
        except LLMQueryAuthError as exc:
            now = self._clock()
            if held is None or held.stale or now >= held.expires_at:
                raise
            _log.warning("llmq: keeping the current Entra ID token, the refresh failed: %s", exc)
            retry_at = now + min(5.0, (held.expires_at - now) / 2)
            self._token = _Token(held.value, held.lifetime, retry_at, held.expires_at, held.generation)
            return held.value
        now = self._clock()
        # a token seen before (the credential's cache) keeps its first lifetime for the margin
        lifetime = held.lifetime if held is not None and held.value == value else max(remaining, 0.0)
        # a credential handing back a cached token inside our margin is asked again once a second
        # (or at the token's expiry), never per request
        wait = max(remaining - refresh_margin(lifetime), min(remaining, 1.0))
        generation = (held.generation if held else 0) + 1
        self._token = _Token(value, lifetime, now + wait, now + remaining, generation)
        if held is None or held.value != value:
            self._publish(value)
        return value

    def _publish(self, value: str) -> None:
        self._issued = [*self._issued[-63:], value]  # a run's worth: older ones have long expired
        for scrubber in list(self._scrubbers):
            scrubber.add(value)
        for listener in _listeners:
            with contextlib.suppress(Exception):  # a masker that fails must not fail the request
                listener(value)

    def _ask(self) -> tuple[str, float]:
        if self._credential is None:
            self._credential = build_credential(self.config)
        self.requests += 1
        value, remaining, self.credential_name = get_token(self._credential, self.config)
        return value, remaining


_sources: dict[tuple[int, EntraIdConfig], TokenSource] = {}
_sources_lock = threading.Lock()


def token_source(config: EntraIdConfig) -> TokenSource:
    """The process's source for ``config``: every client of the process shares its token. Keyed by
    the process id too: a forked Spark worker builds its own (a lock held at the fork is not its)."""
    key = (os.getpid(), config)
    with _sources_lock:
        source = _sources.get(key)
        if source is None:
            source = _sources[key] = TokenSource(config)
        return source


def forget_tokens() -> None:
    """Drops this process's sources: the next client builds its credential again (after the
    environment it reads changed: a test, a rotated secret)."""
    with _sources_lock:
        _sources.clear()


__all__ = [
    "MAX_MARGIN",
    "TokenSource",
    "add_token_listener",
    "forget_tokens",
    "refresh_margin",
    "token_source",
]
