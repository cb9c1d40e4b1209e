"""The driver's budget ledger: its arithmetic, and budgets drawing from it over a real socket."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time

import pytest

from airflow_provider_llmq.core.accounting.budget import WAIT, Budget, Hold
from airflow_provider_llmq.spark.placements.budget_ledger import Ledger, LedgerServer
from airflow_provider_llmq.spark.placements.ledger_line import LedgerTicket


def _standing(spent: int, kept: int) -> list[float]:
    return [spent, 0.0, kept, 0.0]


def test_grants_never_pass_what_is_left_and_what_comes_back_is_granted_again() -> None:
    ledger = Ledger(1000, None)
    first = ledger.draw("a", _standing(0, 0), [100, 0.0], [400, 0.0])
    assert first["tokens"] == 400
    second = ledger.draw("b", _standing(0, 0), [100, 0.0], [400, 0.0])
    assert second["tokens"] == 400 and second["elsewhere"][0] == 400
    third = ledger.draw("c", _standing(0, 0), [100, 0.0], [400, 0.0])
    assert third["tokens"] == 200  # what is left, not the chunk
    # nothing free, but a would give back: c waits rather than closes
    assert ledger.draw("c", _standing(0, 200), [100, 0.0], [400, 0.0]).get("wait")
    ledger.give_back("a", _standing(50, 50))  # a billed 50 and holds nothing in flight
    after = ledger.draw("c", _standing(0, 200), [100, 0.0], [400, 0.0])
    assert after["tokens"] == 350  # 1000 - a's 50 - b's 400 - c's 200
    totals = ledger.totals()
    assert totals["granted"][0] == 1000 and totals["billed"][0] == 50


def test_a_draw_closes_only_when_what_was_billed_plus_the_need_passes() -> None:
    ledger = Ledger(1000, None, max_wait=60)
    ledger.draw("a", _standing(0, 0), [900, 0.0], [900, 0.0])
    assert ledger.draw("b", _standing(0, 0), [200, 0.0], [800, 0.0], now=0).get("wait")
    ledger.give_back("a", _standing(850, 850))  # a was billed 850
    assert ledger.draw("b", _standing(0, 0), [200, 0.0], [800, 0.0], now=1).get("closed")
    assert ledger.draw("b", _standing(0, 0), [150, 0.0], [600, 0.0], now=2)["tokens"] == 150


def test_a_wait_on_a_grant_that_never_comes_back_ends_closed() -> None:
    ledger = Ledger(1000, None, max_wait=10)
    ledger.draw("killed", _standing(0, 0), [900, 0.0], [900, 0.0])  # a task that died holding it
    assert ledger.draw("b", _standing(0, 0), [200, 0.0], [200, 0.0], now=0).get("wait")
    assert ledger.draw("b", _standing(0, 0), [200, 0.0], [200, 0.0], now=5).get("wait")
    assert ledger.draw("b", _standing(0, 0), [200, 0.0], [200, 0.0], now=11).get("closed")


def test_cost_is_granted_beside_tokens() -> None:
    ledger = Ledger(None, 1.0)
    answer = ledger.draw("a", [0, 0.0, 0, 0.0], [0, 0.3], [0, 1.2])
    assert answer["cost"] == pytest.approx(1.0) and answer["tokens"] == 0
    assert ledger.draw("b", [0, 0.0, 0, 0.0], [0, 0.3], [0, 1.2]).get("wait")


def test_concurrent_draws_from_threads_never_grant_more_than_is_left() -> None:
    ledger = Ledger(10_000, None, max_wait=1e9)
    seen: list[int] = []
    lock = threading.Lock()

    def holder(name: str) -> None:
        rng = random.Random(name)
        spent = kept = 0
        for _ in range(300):
            need = rng.randint(10, 200)
            answer = ledger.draw(name, _standing(spent, kept), [need, 0.0], [4 * need, 0.0])
            kept += answer.get("tokens", 0)
            used = rng.randint(0, kept - spent)  # billed some of it, gives the rest back
            spent += used
            kept = spent
            ledger.give_back(name, _standing(spent, kept))
            with lock:
                seen.append(ledger.totals()["granted"][0])

    threads = [threading.Thread(target=holder, args=(f"h{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen and max(seen) <= 10_000
    assert ledger.totals()["billed"][0] <= 10_000


def _ticket(server: LedgerServer, share: int) -> LedgerTicket:
    host, port = server.address
    return LedgerTicket(host, port, server.secret, share, None)


def _spend(budget: Budget, attempts: int, rng: random.Random) -> int:
    """Reserves and settles like the engine: waits on WAIT; returns what was billed."""
    billed = 0
    for _ in range(attempts):
        while True:
            hold = budget.reserve(20, 80)  # a worst case of 20 x 1.5 + 80 = 110
            if hold is not WAIT:
                break
            time.sleep(0.01)
        if hold is None:
            return billed
        assert isinstance(hold, Hold)
        used = rng.randint(30, 100)
        budget.settle(hold, 20, used - 20)
        billed += used
    return billed


def test_budgets_of_many_threads_draw_the_whole_budget_and_never_pass_it() -> None:
    limit = 20_000
    with LedgerServer(Ledger(limit, None), "127.0.0.1") as server:
        # one busy holder and three that stop early: what those leave is drawn by the busy one
        budgets = [Budget(limit, grants=_ticket(server, limit // 4).open()) for _ in range(4)]
        billed = [0] * 4

        def run(i: int) -> None:
            billed[i] = _spend(budgets[i], 10_000 if i == 0 else 10, random.Random(i))
            budgets[i].release()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        total = sum(billed)
        assert total <= limit
        assert total >= limit - 110  # stops within one attempt's worst case of the budget
        assert billed[0] > limit // 4 * 3  # far more than a fixed quarter
        assert budgets[0].closed
        # every holder released: the ledger holds nothing beyond what was billed
        totals = server.ledger.totals()
        assert totals["granted"] == totals["billed"] and totals["billed"][0] == total


def test_an_unreachable_ledger_leaves_the_fixed_share_and_says_so_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import airflow_provider_llmq.core.accounting.budget as budget_module

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    budget_module._fell_back.clear()
    ticket = LedgerTicket("127.0.0.1", port, "s" * 64, 500, None, connect_seconds=0.5)
    with caplog.at_level(logging.INFO):
        budgets = [Budget(10_000, grants=ticket.open()) for _ in range(2)]
        billed = [_spend(b, 100, random.Random(1)) for b in budgets]
    assert all(b <= 500 for b in billed) and all(b > 300 for b in billed)
    lines = [r.getMessage() for r in caplog.records if "ledger cannot be reached" in r.getMessage()]
    assert len(lines) == 1 and "s" * 64 not in lines[0]


def test_a_wrong_secret_is_refused_before_any_message() -> None:
    with LedgerServer(Ledger(1000, None), "127.0.0.1") as server:
        host, port = server.address
        wrong = LedgerTicket(host, port, "x" * 64, 100, None, connect_seconds=1.0)
        budget = Budget(1000, grants=wrong.open())
        assert _spend(budget, 50, random.Random(2)) <= 100  # fell back to its share
        assert server.ledger.totals()["holders"] == 0
        assert "x" * 64 not in repr(wrong) and server.secret not in repr(server)
