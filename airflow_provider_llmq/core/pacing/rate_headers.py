"""What a server's rate headers say about its quota: ceilings before any 429, and Azure's windows.

Two header families, two kinds of budget (:class:`RateHeaders` reads both, per ``requests`` and
``tokens``):

- **OpenAI**: ``x-ratelimit-limit-*`` (per minute), ``-remaining-*`` and ``-reset-*`` describe a
  refilling bucket. The ceiling is the limit's per-second rate, or more while the bucket holds more
  than it can refill before it is full (that surplus may go too; it converges to limit / 60 with the
  bucket half full).
- **Azure**: ``x-ratelimit-remaining-requests`` / ``-tokens`` alone, over fixed windows of 1 s or
  10 s. The window is learned from the jumps of ``remaining`` and from retry hints
  (:class:`_WindowQuota`); once it is known, the rest of a window's budget spread over the rest of the
  window is exactly what the server allows, so it replaces any learned rate (the server's own word),
  and an exhausted window pauses until it ends.

Token budgets become request rates through the average tokens an answer used (the caller's). Kept
apart from the learned rate (:mod:`.rate_model`): headers are the server's statement, the model is
what the client infers when the server states nothing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

__all__ = ["RateHeaders", "parse_duration"]

_KINDS = ("requests", "tokens")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h|d)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}
_KNOWN_WINDOWS = (1.0, 10.0, 60.0)  # Azure enforces per-minute quotas over 1 s or 10 s windows


def parse_duration(text: str | None) -> float | None:
    """Seconds in an OpenAI reset header: ``20ms``, ``1s``, ``1.5s``, ``6m0s``, ``1h2m3s``; a bare number
    is seconds. None for anything else."""
    if text is None:
        return None
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if value >= 0 and math.isfinite(value) else None
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos else None


def _number(headers: Mapping[str, str], name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if number >= 0 and math.isfinite(number) else None


class _WindowQuota:
    """One Azure budget (requests or tokens) seen only through ``remaining`` in fixed windows.

    Answers come back roughly in the order they were sent, so ``remaining`` falls within a window and
    jumps up when a new one starts: a jump dates a window start (at the send time of the first answer
    showing it), and two of them give the window's length, snapped to Azure's 1 s / 10 s / 60 s when
    close. A retry hint on a 429 tells a window's end directly.
    """

    __slots__ = ("last_remaining", "last_sent", "peak", "period", "start")

    def __init__(self) -> None:
        self.last_remaining: float | None = None
        self.last_sent = -math.inf
        self.peak = 0.0
        self.start: float | None = None  # a window start (any one)
        self.period: float | None = None

    def observe(self, sent_at: float, remaining: float) -> None:
        if sent_at < self.last_sent:
            return  # overtaken by a newer answer: older news
        previous = self.last_remaining
        jumped = previous is not None and remaining > previous + max(2.0, 0.25 * self.peak)
        # the window turned between the two requests; unless that start is already dated, the later
        # send time is the closer bound while requests go out back to back
        if jumped and (self.start is None or not self.last_sent < self.start <= sent_at):
            self._window_started(sent_at, exact=False)
        self.last_remaining, self.last_sent = remaining, sent_at
        self.peak = max(self.peak, remaining)

    def window_ends_at(self, end: float) -> None:
        self._window_started(end, exact=True)

    def _window_started(self, at: float, exact: bool) -> None:
        if self.start is None:
            self.start = at
            return
        gap = at - self.start
        windows = 1 if self.period is None else round(gap / self.period)
        if windows < 1 or gap < 0.5:
            # the same start seen again (a hint, then the jump): a hint dates it exactly
            if exact:
                self.start = at
            return
        gap /= windows  # several windows may have passed unseen
        snapped = min(_KNOWN_WINDOWS, key=lambda w: abs(w - gap))
        self.period = snapped if abs(snapped - gap) <= 0.2 * snapped else gap
        self.start = at

    def next_end(self, now: float) -> float | None:
        if self.start is None or self.period is None:
            return None
        return self.start + (math.floor((now - self.start) / self.period) + 1) * self.period

    def plan(
        self, now: float, spent_per_second: float, unit: float
    ) -> tuple[float | None, bool, float | None]:
        """(units/s for now or None, whether that rate is the server's own word, pause until or None);
        ``unit``: what one request costs of this budget.

        Once the window is known, what is left of its budget spread evenly over what is left of it is
        exactly what the server allows, so it replaces any learned rate: n clients that each do this
        on a shared window see its budget fall like ``time_left ** n`` and use all of it, evenly and
        in equal shares, without a 429.
        """
        if self.last_remaining is None:
            return None, False, None
        end = self.next_end(now)
        if end is None:
            # window unknown yet: spread what is left over a second, the shorter Azure window, and
            # keep probing at one a second once it is gone (the 429's hint dates the window)
            budget = self.last_remaining - spent_per_second * max(0.0, now - self.last_sent)
            return max(budget, unit), False, None
        assert self.period is not None
        left = max(end - now, 1e-3)
        # never more than twice the window's average rate: a budget left for the last moments of a
        # 10 s window would otherwise go in a burst that a 1 s window (also Azure's) refuses
        most = 2.0 * max(self.peak, unit) / self.period
        if self.last_sent < end - self.period - 1e-9:
            # no answer from this window yet: its budget is presumably whole again
            return min(max(self.peak, unit) / left, most), True, None
        budget = self.last_remaining - spent_per_second * max(0.0, now - self.last_sent)
        if budget < unit:
            return None, True, end
        return min(budget / left, most), True, None


class RateHeaders:
    """The rate headers one client has seen: OpenAI ceilings and Azure windows, per kind of budget.
    Not thread-safe: the controller calls it under its own lock."""

    def __init__(self) -> None:
        self.limit_ceiling: dict[str, float] = {}  # OpenAI: units/s per kind
        self.windows: dict[str, _WindowQuota] = {}  # Azure: per kind

    def read(self, sent_at: float, headers: Mapping[str, str] | None) -> None:
        """The headers of an answer (or refusal) to a request sent at ``sent_at``."""
        if not headers:
            return
        lowered = {k.lower(): v for k, v in headers.items()}
        for kind in _KINDS:
            remaining = _number(lowered, f"x-ratelimit-remaining-{kind}")
            limit = _number(lowered, f"x-ratelimit-limit-{kind}")
            if limit is not None and limit > 0:
                # OpenAI: a bucket refilling limit/60 per second; while it holds more than it refills
                # until full, that surplus may go too (it converges to limit/60 with the bucket half full)
                ceiling = limit / 60.0
                reset = parse_duration(lowered.get(f"x-ratelimit-reset-{kind}"))
                if remaining is not None and reset:
                    ceiling = max(ceiling, remaining / reset)
                self.limit_ceiling[kind] = ceiling
            elif remaining is not None:
                self.windows.setdefault(kind, _WindowQuota()).observe(sent_at, remaining)

    def exhausted(self, headers: Mapping[str, str] | None) -> bool:
        """Whether a budget is at zero: in these headers (a refusal's), or a window's latest."""
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        for kind in _KINDS:
            remaining = _number(lowered, f"x-ratelimit-remaining-{kind}")
            if remaining is not None and remaining < 1:
                return True
        return any(w.last_remaining is not None and w.last_remaining < 1.0 for w in self.windows.values())

    def hint_ends_windows(self, end: float) -> None:
        """A retry hint that paused the client: for a window about exhausted, it is the window's end."""
        for window in self.windows.values():
            if window.last_remaining is not None and window.last_remaining < 1.0 + 0.1 * window.peak:
                window.window_ends_at(end)

    def limits(
        self, now: float, sending: float, avg_tokens: float | None
    ) -> tuple[float, float | None, float | None]:
        """(the lowest ceiling in requests/s, the lowest rate a known window states or None, the end
        of an exhausted window to pause until or None); ``sending``: the requests/s sent now."""
        ceiling = math.inf
        for kind, value in self.limit_ceiling.items():
            ceiling = min(ceiling, _per_request(kind, value, avg_tokens))
        stated: float | None = None
        pause: float | None = None
        for kind, window in self.windows.items():
            unit = 1.0 if kind == "requests" else avg_tokens or 1.0
            rate, authoritative, pause_until = window.plan(now, sending * unit, unit)
            if pause_until is not None:
                pause = pause_until if pause is None else max(pause, pause_until)
            if rate is None:
                continue
            rate = _per_request(kind, rate, avg_tokens)
            if authoritative:
                stated = rate if stated is None else min(stated, rate)
            else:
                ceiling = min(ceiling, rate)
        return ceiling, stated, pause


def _per_request(kind: str, units_per_second: float, avg_tokens: float | None) -> float:
    if kind == "requests":
        return units_per_second
    return units_per_second / avg_tokens if avg_tokens else math.inf
