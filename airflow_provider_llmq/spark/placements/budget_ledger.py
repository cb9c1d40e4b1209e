"""The driver's budget ledger: what one Spark job's tasks may spend, handed out as grants.

A fixed share per task strands budget (a task whose share ran out stops while another's lies
unused); instead each executor task's budget draws grants of a few requests' worst case from this
ledger and gives back what it did not use. The ledger keeps, per holder (one task's client), the
ceiling it was granted and what it was billed, and answers a draw:

- a grant when the need fits beside every ceiling (the sum of ceilings never passes what the job
  may spend);
- *wait* when it fits only once reservations in flight settle or unused grants come back;
- *closed* when what was billed plus the need passes the budget (or a wait outlived ``max_wait``:
  a task killed mid-request keeps its grant until the job ends, so a wait on it would never end).

The ledger is not the truth across jobs or tries: after each job the driver counts what its results
say was billed, from the checkpoint, as it always did.

Protocol: ``multiprocessing.connection`` framing over TCP with its HMAC challenge both ways, keyed
by a random secret that travels in the task closure: stdlib only, authenticated before a byte of
a message is read, and the messages are JSON (never unpickled).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import TYPE_CHECKING, Any

from airflow_provider_llmq.core.accounting.grants import Room
from airflow_provider_llmq.core.endpoint.secrets import Scrubber

if TYPE_CHECKING:
    from airflow_provider_llmq.core.request.options import QueryOptions
    from airflow_provider_llmq.spark.placements.base import Work

__all__ = ["JobBudgets", "Ledger", "LedgerServer"]

log = logging.getLogger(__name__)

HANDSHAKE_SECONDS = 5.0  # a peer that connects and does not answer the challenge is dropped
_ACCEPT_POLL = 0.2  # how often the accept loop looks whether the server was stopped
MAX_WAIT_SECONDS = 600.0


@dataclass
class _Holder:
    ceiling: Room = field(default_factory=Room)  # granted (billed and in flight included)
    spent: Room = field(default_factory=Room)  # billed
    waiting_since: float | None = None


class Ledger:
    """What a job may spend (``max_tokens`` and ``max_cost``, None for no limit in that unit) and
    what each holder was granted and billed. Safe for threads."""

    def __init__(
        self, max_tokens: int | None, max_cost: float | None, max_wait: float = MAX_WAIT_SECONDS
    ) -> None:
        self.max_tokens = max_tokens
        self.max_cost = max_cost
        self.max_wait = max_wait
        self._holders: dict[str, _Holder] = {}
        self._lock = threading.Lock()

    def _held(self, skip: str | None = None) -> tuple[int, float]:
        """Tokens and cost granted or billed, over every holder but ``skip``."""
        tokens, cost = 0, 0.0
        for name, h in self._holders.items():
            if name != skip:
                tokens += max(h.ceiling.tokens, h.spent.tokens)
                cost += max(h.ceiling.cost, h.spent.cost)
        return tokens, cost

    def _update(self, holder: str, standing: list[Any]) -> _Holder:
        spent_tokens, spent_cost, kept_tokens, kept_cost = standing
        h = self._holders.setdefault(holder, _Holder())
        # billing only grows
        h.spent = Room(max(h.spent.tokens, int(spent_tokens)), max(h.spent.cost, float(spent_cost)))
        h.ceiling = Room(int(kept_tokens), float(kept_cost))
        return h

    def _billed(self) -> Room:
        """Tokens and cost billed, over every holder."""
        return Room(
            sum(h.spent.tokens for h in self._holders.values()),
            sum(h.spent.cost for h in self._holders.values()),
        )

    def draw(
        self, holder: str, standing: list[Any], need: list[Any], chunk: list[Any], now: float | None = None
    ) -> dict[str, Any]:
        """A holder's draw: ``standing`` is (billed tokens, billed cost, kept tokens, kept cost),
        ``need`` and ``chunk`` are (tokens, cost)."""
        now = time.monotonic() if now is None else now
        need_tokens, need_cost = int(need[0]), float(need[1])
        with self._lock:
            h = self._update(holder, standing)
            other_tokens, other_cost = self._held(skip=holder)
            answer: dict[str, Any] = {"elsewhere": [other_tokens, other_cost]}
            max_tokens, max_cost = self.max_tokens, self.max_cost
            free_tokens = None if max_tokens is None else max_tokens - other_tokens - h.ceiling.tokens
            free_cost = None if max_cost is None else max_cost - other_cost - h.ceiling.cost
            fits_tokens = free_tokens is None or need_tokens <= free_tokens
            if fits_tokens and (free_cost is None or need_cost <= free_cost):
                tokens = 0 if free_tokens is None else min(max(need_tokens, int(chunk[0])), free_tokens)
                cost = 0.0 if free_cost is None else min(max(need_cost, float(chunk[1])), free_cost)
                h.ceiling = h.ceiling.plus(tokens, cost)
                h.waiting_since = None
                return {**answer, "tokens": tokens, "cost": cost}
            billed = self._billed()
            over = (self.max_tokens is not None and billed.tokens + need_tokens > self.max_tokens) or (
                self.max_cost is not None and billed.cost + need_cost > self.max_cost
            )
            h.waiting_since = now if h.waiting_since is None else h.waiting_since
            if over or now - h.waiting_since > self.max_wait:
                return {**answer, "closed": True}
            return {**answer, "wait": True}

    def give_back(self, holder: str, standing: list[Any]) -> None:
        """The holder keeps only what it was billed and has in flight."""
        with self._lock:
            self._update(holder, standing)

    def totals(self) -> dict[str, Any]:
        """Granted (or billed, where more) and billed, over every holder; the holders' count."""
        with self._lock:
            billed = self._billed()
            return {
                "granted": self._held(),
                "billed": (billed.tokens, billed.cost),
                "holders": len(self._holders),
            }


class LedgerServer:
    """Serves a :class:`Ledger` on ``host`` (a free port) to holders that know the secret.

    Use as a context manager: started on entry, stopped on exit (also on a failure)."""

    def __init__(self, ledger: Ledger, host: str) -> None:
        self.ledger = ledger
        self.secret = secrets.token_hex(32)
        self.scrubber = Scrubber([self.secret])  # the one scrubbing path, for what this server logs
        self._socket = socket.create_server((host, 0))
        self._socket.settimeout(_ACCEPT_POLL)
        self.address: tuple[str, int] = (host, self._socket.getsockname()[1])
        self._stopped = threading.Event()
        self._peers: set[socket.socket] = set()
        self._peers_lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept, name="llmq-ledger", daemon=True)

    def __repr__(self) -> str:  # never the secret
        return f"LedgerServer({self.address[0]}:{self.address[1]})"

    def __enter__(self) -> LedgerServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """No new holder; every open line is cut (a holder then sends nothing more)."""
        self._stopped.set()
        self._thread.join(timeout=5)
        self._socket.close()
        with self._peers_lock:
            peers, self._peers = self._peers, set()
        for peer in peers:
            with contextlib.suppress(OSError):
                peer.shutdown(socket.SHUT_RDWR)
            peer.close()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                peer, _ = self._socket.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._peers_lock:
                if self._stopped.is_set():
                    peer.close()
                    return
                self._peers.add(peer)
            threading.Thread(target=self._serve, args=(peer,), name="llmq-ledger-line", daemon=True).start()

    def _serve(self, peer: socket.socket) -> None:
        peer.settimeout(None)
        conn = Connection(os.dup(peer.fileno()))
        try:
            _timed(peer, HANDSHAKE_SECONDS)
            deliver_challenge(conn, self.secret.encode())
            answer_challenge(conn, self.secret.encode())
            _timed(peer, None)  # a holder spends its grant between two messages: no read timeout
            while True:
                message = json.loads(conn.recv_bytes())
                conn.send_bytes(json.dumps(self._answer(message)).encode())
        except (EOFError, OSError):
            pass  # the holder closed its line, or the server was stopped
        except Exception as exc:  # a refused handshake or a malformed message: that line only
            log.debug("budget ledger line dropped: %s", self.scrubber.text(str(exc)))
        finally:
            conn.close()
            with self._peers_lock:
                self._peers.discard(peer)
            peer.close()

    def _answer(self, message: dict[str, Any]) -> dict[str, Any]:
        holder, standing = str(message["holder"]), list(message["standing"])
        if message["op"] == "draw":
            return self.ledger.draw(holder, standing, list(message["need"]), list(message["chunk"]))
        self.ledger.give_back(holder, standing)
        return {}


def _timed(peer: socket.socket, seconds: float | None) -> None:
    """A receive timeout on the socket itself (the connection reads its file descriptor directly)."""
    micros = int((seconds or 0) * 1_000_000)
    value = micros // 1_000_000, micros % 1_000_000
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(*value))


def _timeval(sec: int, usec: int) -> bytes:
    import struct

    return struct.pack("ll", sec, usec)


class JobBudgets:
    """The budget of each Spark job of one try (UDF, executors): the job's tasks draw from a ledger
    served by this process for the job's length, or, where it cannot serve, each of ``workers``
    Python workers keeps a fixed share (:func:`~.base.job_share`), as the log then says once.

    :param enabled: False keeps fixed shares (the placements' ``budget_ledger=False``).
    """

    def __init__(self, work: Work, workers: int, enabled: bool = True) -> None:
        self.work = work
        self.workers = workers
        self.host = str(work.spark.conf.get("spark.driver.host", None) or socket.gethostname())
        self.reason: str | None = None  # why the jobs keep fixed shares
        if not enabled:
            self.reason = "budget_ledger=False"
        elif type(work.spark).__module__.startswith("pyspark.sql.connect"):
            self._fixed("Spark Connect: the Spark driver is the Connect server, not this process")

    def _fixed(self, reason: str) -> None:
        self.reason = reason
        log.warning("the budget is split in fixed shares between the Spark workers (%s)", reason)

    @contextlib.contextmanager
    def job(self, written: list[str]) -> Iterator[QueryOptions]:
        """The options of the next job, whose caller appends its result file to ``written`` inside
        the block: what is left after the files in ``written``, with the ledger's ticket."""
        from airflow_provider_llmq.spark.placements.base import job_share
        from airflow_provider_llmq.spark.placements.ledger_line import LedgerTicket

        options = self.work.options
        if options.max_total_tokens is None and options.max_cost is None:
            yield options
            return
        spent = self.work.checkpoint.spent(written)
        share = job_share(options, spent, self.workers)
        if self.reason is not None:
            yield share
            return
        left = job_share(options, spent, 1)
        try:
            server = LedgerServer(Ledger(left.max_total_tokens, left.max_cost), self.host)
        except OSError as exc:
            self._fixed(f"no ledger could listen on spark.driver.host {self.host}: {exc.strerror}")
            yield share
            return
        with server:
            host, port = server.address
            ticket = LedgerTicket(host, port, server.secret, share.max_total_tokens, share.max_cost)
            before = len(written)
            yield dataclasses.replace(left, budget_grants=ticket)
            billed = self.work.checkpoint.spent(written[before:])
            if server.ledger.totals()["holders"] == 0 and (billed[0] or billed[1]):
                # tasks sent requests without one draw: they could not reach this host
                self._fixed(
                    f"the executors did not reach the ledger at {host}:{port} (spark.driver.host) "
                    "within their first draw's timeout"
                )
