"""An executor task's line to the driver's budget ledger (:mod:`.budget_ledger`): the grant source
of its client's budget. The ticket travels in the task closure (its secret never in a log, a
``repr`` or Spark conf); each budget opens its own line, connected at its first draw."""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, answer_challenge, deliver_challenge
from typing import Any

from airflow_provider_llmq.core.accounting.grants import GrantAnswer, GrantsUnreachable, Standing
from airflow_provider_llmq.core.endpoint.secrets import Scrubber
from airflow_provider_llmq.spark.placements.budget_ledger import _timed

__all__ = ["LedgerLine", "LedgerTicket"]

CONNECT_SECONDS = 3.0  # the reachability check: the first draw, this long at most
ANSWER_SECONDS = 30.0  # a ledger that takes longer to answer a draw is taken as lost


@dataclass(frozen=True)
class LedgerTicket:
    """Where the ledger listens, its secret, and the fixed share a task keeps when it cannot be
    reached (tokens, cost; None where that unit has no limit)."""

    host: str
    port: int
    secret: str = field(repr=False)
    share_tokens: int | None
    share_cost: float | None
    connect_seconds: float = CONNECT_SECONDS

    def __repr__(self) -> str:  # the options' repr keys the pooled clients: never the secret
        return f"LedgerTicket({self.host}:{self.port})"

    def open(self) -> LedgerLine:
        return LedgerLine(self)


class LedgerLine:
    """One holder's line (:class:`~airflow_provider_llmq.core.accounting.grants.GrantSource`)."""

    def __init__(self, ticket: LedgerTicket) -> None:
        self.ticket = ticket
        self.holder = uuid.uuid4().hex
        self._scrubber = Scrubber([ticket.secret])
        self._conn: Connection | None = None
        self._socket: socket.socket | None = None
        self._reached = False
        self._lock = threading.Lock()

    def fallback(self) -> tuple[int | None, float | None]:
        return self.ticket.share_tokens, self.ticket.share_cost

    def secrets(self) -> tuple[str, ...]:
        return (self.ticket.secret,)

    def draw(self, standing: Standing, need: tuple[int, float], chunk: tuple[int, float]) -> GrantAnswer:
        answer = self._ask({"op": "draw", "standing": _standing(standing), "need": need, "chunk": chunk})
        elsewhere = answer.get("elsewhere", (0, 0.0))
        return GrantAnswer(
            tokens=int(answer.get("tokens", 0)),
            cost=float(answer.get("cost", 0.0)),
            wait=bool(answer.get("wait", False)),
            closed=bool(answer.get("closed", False)),
            elsewhere_tokens=int(elsewhere[0]),
            elsewhere_cost=float(elsewhere[1]),
        )

    def give_back(self, standing: Standing) -> None:
        if self._conn is not None:  # never drew: nothing to give back
            self._ask({"op": "give_back", "standing": _standing(standing)})

    def _ask(self, message: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            try:
                conn = self._connect()
                conn.send_bytes(json.dumps({**message, "holder": self.holder}).encode())
                if not conn.poll(ANSWER_SECONDS):
                    raise TimeoutError(f"no answer in {ANSWER_SECONDS:g} s")
                answer: dict[str, Any] = json.loads(conn.recv_bytes())
                return answer
            except Exception as exc:
                self._close()
                where = f"{self.ticket.host}:{self.ticket.port}"
                reason = self._scrubber.text(f"{type(exc).__name__}: {exc}")
                if not self._reached:
                    raise GrantsUnreachable(f"no answer from the driver at {where}: {reason}") from None
                raise ConnectionError(f"the line to the driver at {where} broke: {reason}") from None

    def _connect(self) -> Connection:
        if self._conn is not None:
            return self._conn
        ticket = self.ticket
        sock = socket.create_connection((ticket.host, ticket.port), timeout=ticket.connect_seconds)
        sock.settimeout(None)  # the connection reads the descriptor itself: a socket-level timeout
        _timed(sock, ticket.connect_seconds)
        conn = Connection(os.dup(sock.fileno()))
        self._socket, self._conn = sock, conn
        answer_challenge(conn, ticket.secret.encode())
        deliver_challenge(conn, ticket.secret.encode())
        _timed(sock, None)
        self._reached = True
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._socket is not None:
            self._socket.close()
        self._conn = self._socket = None

    def __del__(self) -> None:
        self._close()


def _standing(standing: Standing) -> list[Any]:
    return [standing.spent_tokens, standing.spent_cost, standing.kept_tokens, standing.kept_cost]
