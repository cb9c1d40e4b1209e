"""Whether the endpoint was ever reached: a server that is down fails the run in seconds.

Without this, a run against a host that refuses every connection spends each row's retries (about
24 s at the defaults) and ends with every row ``connection_error``: minutes or hours of nothing for
a large input. Until the first HTTP response of any status, connection failures are counted; once
they have gone on for ``give_up_after`` seconds (and at least ``min_failures`` of them) the run
stops with :class:`~..errors.LLMQueryUnreachableError`. After the first response the endpoint is
known to exist, and an outage later in a run is row errors (and the error policy), as a blip must
not end a run that was answering.
"""

from __future__ import annotations

import threading

from airflow_provider_llmq.core.errors import LLMQueryUnreachableError

__all__ = ["Reachability"]


class Reachability:
    """One per client, shared by its threads or tasks.

    :param url: where requests go (named in the error; it carries no secret).
    :param give_up_after: seconds of connection failures, with no response yet, that end the run.
    :param min_failures: failures needed as well, so one slow refusal is no verdict.
    """

    def __init__(self, url: str, give_up_after: float = 5.0, min_failures: int = 3) -> None:
        self.url = url
        self.give_up_after = give_up_after
        self.min_failures = min_failures
        self.reached = False
        self._lock = threading.Lock()
        self._first: float | None = None
        self._failures = 0

    def on_response(self) -> None:
        """Any HTTP response: the endpoint exists."""
        self.reached = True

    def on_connection_failure(self, now: float, message: str) -> None:
        """A request that never got a response; raises once the endpoint looks down."""
        if self.reached:
            return
        with self._lock:
            if self._first is None:
                self._first = now
            self._failures += 1
            failures, since = self._failures, now - self._first
        if failures >= self.min_failures and since >= self.give_up_after and not self.reached:
            raise LLMQueryUnreachableError(
                f"the endpoint {self.url} could not be reached: {failures} requests over {since:.0f} s "
                f"failed to connect and none was answered (last: {message}); nothing was paid. Check "
                "the connection's host and port, and that the server is up"
            )
