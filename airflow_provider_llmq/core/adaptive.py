"""An adaptive request rate: learn the quota a server enforces from its answers, without being told.

One :class:`AdaptiveRate` sits next to a client's limiter. The limiter's :class:`~.limits.Pacer` keeps
spacing requests evenly (GCRA, no burst after a pause); the controller only sets the pacer's rate
(:meth:`Pacer.set_requests_per_minute`) and its pauses. The client reports every answer:
``on_success`` / ``on_throttled`` / ``on_failure`` with the time the request was sent, the time the
answer came and its headers.

How the rate moves (TCP's congestion control, on a rate instead of a window):

- **Slow start** from ``initial_rate`` (or from ``requests_per_minute`` when given): each answer adds
  ``slow_start_gain`` requests/s, so the rate doubles about every ``0.7 / slow_start_gain`` s, until
  the first 429.
- **One cut per congestion episode.** A 429 for a request sent more than one round trip after the
  last cut starts an episode: the rate drops to ``decrease`` times the rate the server *answered*
  lately (never above the rate admitted). 429s of the same burst (requests sent before the cut could
  show) are counted, not cut again. Cutting from the answered rate, not the admitted one, lands just
  under the quota even after a slow-start overshoot of 2-3x. The cut that ends slow start is made
  while the answers still lag the ramp (over real sockets the answered rate was then a third of the
  quota), so it is checked one round trip later: the answers to the requests sent before it arrive
  at the rate the server admitted them, the quota, and a cut below that is raised to ``decrease``
  times it. A cut of 10 % keeps a hard quota busy: a deep cut (TCP's 50 %) leaves the quota idle
  during the whole climb back, which a token bucket never gives back (about (1 - decrease) / 2 of the
  throughput is lost).
- **Congestion avoidance:** each answer adds ``increase * sqrt(rate) / rate``, about
  ``increase * sqrt(rate)`` requests/s per second: the additive half of AIMD, which is what shares a
  quota between clients that each only see their own 429s. The cut keeps their ratio; the climb,
  nearly the same for both, evens it out (a step proportional to the rate would keep any unfair split
  forever; a fixed one cannot suit both 1/s and 500/s). A client whose own climb brings episodes
  closer than ``episode_requests`` answers apart (a small quota) climbs slower, so that at most about
  one request in that many is a 429.
- **Never far above what the server answers:** growth stops at ``headroom`` times the answered rate
  (``slow_start_headroom`` in slow start, over the newest answers only: the ramp must not wait for a
  lagging average) and at ``max_concurrency / latency``, so a client bound by its concurrency or by
  slow answers does not ramp an unused rate into the next 429 storm.
- **Rate headers** give ceilings before any 429: OpenAI's ``x-ratelimit-limit-*`` (per minute),
  ``-remaining-*`` and ``-reset-*`` (a refilling bucket: the ceiling is the limit's per-second rate, or
  more while the bucket holds more than it can refill); Azure's ``x-ratelimit-remaining-requests`` /
  ``-tokens`` alone (fixed windows of 1 s or 10 s: the window is learned from the jumps of
  ``remaining`` and from retry hints, the rest of a window's budget is spread over the rest of the
  window, and an exhausted window pauses until it ends). Token ceilings become request ceilings through
  the average tokens an answer used.
- **A single 429 is evidence, not a verdict** (:mod:`.refusal_evidence`): slow start ends on a share
  of refusals, not on one; later, a cut needs more refusals than the noise floor explains, a share
  learned all along from the requests sent below the rate the last cut took for the quota (see
  ``_calm``); the cut that ends slow start is tested, and undone when the refusals go on as before
  it (noise).
- **Retry hints** (``retry-after-ms`` / ``Retry-After``, parsed by the caller) pause the whole client
  when they come with quota evidence (rate headers at zero, a cluster of refusals); an isolated one
  delays only its own row.
- **Ceilings:** ``requests_per_minute`` is never exceeded (the pacer's rate never goes above it);
  ``tokens_per_minute`` stays the pacer's own token schedule; ``max_concurrency`` is the caller's
  semaphore, and bounds the rate here. ``adaptive=False`` pins the rate to ``requests_per_minute``
  (unlimited when None) and ignores everything but retry hints: the behaviour without this module.
- **Patience:** a 429 is congestion, not a row failure; :meth:`patience_exhausted` says when the client
  has been throttled for ``patience`` seconds without a single success, so rows may then give up.

Thread-safe: one lock around arithmetic, never held while anything waits; the pacer's own lock is
taken inside it and never the other way round.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from airflow_provider_llmq.core.limits import Pacer
from airflow_provider_llmq.core.refusal_evidence import RefusalEvidence, Verdict

__all__ = [
    "AdaptiveRate",
    "AdaptiveSettings",
    "AdaptiveStats",
    "parse_duration",
]

SLOW_START = "slow_start"
AVOIDANCE = "avoidance"
FIXED = "fixed"

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
_RATE_SAMPLES = 32  # the answered rate is measured over at most this many newest answers...
_MIN_SAMPLES = 8  # ...and over a span long enough for this many at the current rate
# in slow start, over the newest this many only: the ramp doubles every few round trips, and a longer
# window's average lags it so far that the headroom (growth up to twice the answered rate) holds the
# ramp back to a doubling per window
_SLOW_START_SAMPLES = 12
_MIN_STEP_SCALE = 1e-3


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


@dataclass(frozen=True)
class AdaptiveSettings:
    """Tuning of the controller; the defaults are what the simulations in the tests were tuned with.

    :param initial_rate: requests/s at start when no ``requests_per_minute`` is given.
    :param min_rate: the rate never goes below this (one probe every ``1 / min_rate`` s).
    :param slow_start_gain: requests/s added per answer in slow start.
    :param decrease: a congestion episode cuts the rate to this times the answered rate.
    :param increase: in congestion avoidance the rate gains ``increase * sqrt(rate)`` requests/s per
        second of answers (at most: see ``episode_requests``).
    :param episode_requests: the climb slows down while the client's own episodes come closer than
        this many answers apart (a small quota), so that at most about 1 request in this many is a 429.
    :param headroom: growth stops at this times the answered rate.
    :param slow_start_headroom: the same in slow start, where the answered rate lags the ramp by a
        round trip and more (with 2, the ramp from 20/s to 1,000/s took 1.6 s at 50 ms latency).
    :param window: seconds over which the answered rate is measured (longer for a slow quota).
    """

    initial_rate: float = 20.0
    min_rate: float = 0.1
    slow_start_gain: float = 10.0
    decrease: float = 0.9
    increase: float = 1.0
    episode_requests: float = 25.0
    headroom: float = 2.0
    slow_start_headroom: float = 4.0
    window: float = 1.0

    def __post_init__(self) -> None:
        for name in ("initial_rate", "min_rate", "slow_start_gain", "window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be within (0, 1), got {self.decrease!r}")
        if self.increase < 0:
            raise ValueError(f"increase must be >= 0, got {self.increase!r}")
        for name in ("headroom", "slow_start_headroom"):
            if not getattr(self, name) > 1:
                raise ValueError(f"{name} must be > 1, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class AdaptiveStats:
    """What a progress line shows."""

    rate: float | None  # requests/s admitted now (None: unlimited)
    phase: str  # slow_start, avoidance, or fixed (adaptive=False)
    answered_rate: float  # answers/s over the last window
    successes: int
    throttled: int  # 429s
    failures: int  # other failed answers
    episodes: int  # congestion episodes (rate cuts)
    paused_seconds: float  # time held by retry hints and exhausted quota windows so far
    spurious_cuts: int = 0  # cuts undone: the refusals went on as before them (noise, not a quota)
    noise_floor: float = 0.0  # the share of refusals taken for noise

    @property
    def requests_per_minute(self) -> float | None:
        return None if self.rate is None else self.rate * 60.0


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


class AdaptiveRate:
    """The request rate of one client (a thread pool or an event loop), learned from the answers.

    :param requests_per_minute: a ceiling never exceeded, and the starting rate; None: no ceiling.
    :param max_concurrency: the caller's concurrency; bounds the rate by ``max_concurrency / latency``.
    :param adaptive: False pins the rate to ``requests_per_minute`` (retry hints are still honoured).
    :param patience: seconds of 429s without a single success before :meth:`patience_exhausted`.
    :param settings: tuning, see :class:`AdaptiveSettings`.
    :param clock: the pacer's clock; every ``now`` / ``sent_at`` passed in is on it.
    """

    def __init__(
        self,
        requests_per_minute: float | None = None,
        max_concurrency: int | None = None,
        *,
        adaptive: bool = True,
        patience: float = 1800.0,
        settings: AdaptiveSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if requests_per_minute is not None and not requests_per_minute > 0:
            raise ValueError(f"requests_per_minute must be positive or None, got {requests_per_minute!r}")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {max_concurrency!r}")
        if not patience > 0:
            raise ValueError(f"patience must be positive, got {patience!r}")
        self.settings = s = settings or AdaptiveSettings()
        self.adaptive = adaptive
        self.patience = patience
        self.clock = clock
        self._ceiling = math.inf if requests_per_minute is None else requests_per_minute / 60.0
        self._max_concurrency = max_concurrency
        self._lock = threading.Lock()
        self._pacer: Pacer | None = None
        self._pushed: float | None = None  # requests/s last given to the pacer (None: unlimited)

        self._rate = min(self._ceiling, s.initial_rate) if requests_per_minute is None else self._ceiling
        self._phase = SLOW_START if adaptive else FIXED
        self._last_cut = -math.inf
        self._since_cut = 0  # answers since the last cut
        self._step_scale = 1.0  # of the additive step, see _cut
        self._cut_from = math.inf  # the admitted rate the last cut started from
        self._refused_at = math.inf  # the rate the last cut took for the quota (see _calm)
        # when requests were sent calm (see _calm): the open span, and a few closed ones whose
        # answers may still come in
        self._calm_span = (math.inf, math.inf)
        self._calm_spans: deque[tuple[float, float]] = deque(maxlen=4)
        # after the cut that ends slow start: the answers to requests sent before it, counted as they
        # arrive (the time of the cut, how many came since), see _remeasure
        self._probe_at: float | None = None
        self._probe_count = 0
        self._latency: float | None = None  # smoothed seconds from send to answer
        self._answers: deque[float] = deque(maxlen=_RATE_SAMPLES)
        self._avg_tokens: float | None = None

        self._limit_ceiling: dict[str, float] = {}  # OpenAI: units/s per kind
        self._windows: dict[str, _WindowQuota] = {}  # Azure: per kind

        self._evidence = RefusalEvidence()
        self._successes = self._throttled = self._failures = self._episodes = 0
        self._throttled_since: float | None = None
        self._pause_end = -math.inf
        self._paused_total = 0.0

    # -- wiring -------------------------------------------------------------------------------------

    def bind(self, pacer: Pacer) -> None:
        """Drive ``pacer``'s request rate and pauses from now on (its clock must be this one's).

        Bind before any request waits on the pacer: from then on its waiters look at their slot often
        enough to follow a rate that changes (see :meth:`Pacer.set_requests_per_minute`).
        """
        with self._lock:
            self._pacer = pacer
            fixed = self._admitted(self.clock())
            if not self.adaptive and pacer.requests_per_minute == (None if fixed is None else fixed * 60):
                self._pushed = fixed  # already right, and it will never change
                return
            self._pushed = math.nan  # forces the first push
            self._push(self.clock(), force=True)

    @property
    def rate(self) -> float | None:
        """Requests/s admitted now; None when unlimited (``adaptive=False`` without a ceiling)."""
        with self._lock:
            return self._admitted(self.clock())

    def interval(self) -> float:
        """Seconds between two requests at the admitted rate (0 when unlimited)."""
        rate = self.rate
        return 0.0 if rate is None else 1.0 / rate

    # -- what the client reports ------------------------------------------------------------------

    def on_success(
        self,
        sent_at: float,
        now: float | None = None,
        headers: Mapping[str, str] | None = None,
        tokens: int | None = None,
    ) -> None:
        """An answer (HTTP 200) to a request sent at ``sent_at``; ``tokens``: its usage.total_tokens."""
        with self._lock:
            now = self.clock() if now is None else now
            self._successes += 1
            self._since_cut += 1
            self._throttled_since = None
            self._answers.append(now)
            latency = max(0.0, now - sent_at)
            self._latency = latency if self._latency is None else 0.875 * self._latency + 0.125 * latency
            if tokens is not None and tokens > 0:
                self._avg_tokens = (
                    float(tokens) if self._avg_tokens is None else 0.9 * self._avg_tokens + 0.1 * tokens
                )
            if not self.adaptive:
                return
            verdict = self._evidence.record(
                sent_at, refused=False, calm=self._calm(sent_at), latency=self._latency
            )
            if verdict is not None:
                self._judged(verdict, now)
            if self._probe_at is not None:
                self._remeasure(sent_at, now)
            self._read_headers(sent_at, headers)
            ceiling, stated = self._header_limits(now, apply_pauses=False)
            if stated is not None:
                # the server states its budget: the learned rate follows it, should the headers stop
                self._rate = max(self.settings.min_rate, min(stated, ceiling, self._ceiling))
            elif (
                sent_at >= self._last_cut
                and min(ceiling, self._ceiling) >= 0.98 * self._rate
                and not self._evidence.testing()  # a cut under test holds its rate (see refusal_evidence)
            ):
                # answers to requests sent before a cut say nothing new, and a rate held down by a
                # ceiling has not been tried: neither may grow it
                self._grow(now)
            self._push(now)

    def on_throttled(
        self,
        sent_at: float,
        now: float | None = None,
        retry_after: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> float | None:
        """A 429 to a request sent at ``sent_at``; ``retry_after``: the server's hint in seconds, parsed
        (``retry-after-ms`` first) and capped by the caller, or None when it sent none.

        Returns how long the refused row itself waits before it asks for a slot again: None when
        it backs off by its own retry policy (no usable hint: a server answering ``Retry-After: 0``
        must not get its retries within milliseconds), 0 when the whole client pauses for the hint,
        else the hint: an isolated refusal delays only its own row."""
        with self._lock:
            self._throttled += 1
            return self._refused(sent_at, self.clock() if now is None else now, retry_after, headers)

    def on_failure(
        self,
        sent_at: float,
        now: float | None = None,
        *,
        status: int | None = None,
        congestion: bool = False,
    ) -> None:
        """Any other failed attempt (5xx, timeout, connection error: ``status`` None);
        ``congestion=True`` treats it as a 429 without a hint without counting it as one."""
        with self._lock:
            self._failures += 1
            if congestion or status == 503:
                self._refused(sent_at, self.clock() if now is None else now, None, None)

    # -- what the client asks -------------------------------------------------------------------

    def patience_exhausted(self, now: float | None = None) -> bool:
        """True once 429s have come for ``patience`` seconds without a single success in between."""
        with self._lock:
            now = self.clock() if now is None else now
            return self._throttled_since is not None and now - self._throttled_since >= self.patience

    def stats(self, now: float | None = None) -> AdaptiveStats:
        with self._lock:
            now = self.clock() if now is None else now
            return AdaptiveStats(
                rate=self._admitted(now),
                phase=self._phase,
                answered_rate=self._answered_rate(now) or 0.0,
                successes=self._successes,
                throttled=self._throttled,
                failures=self._failures,
                episodes=self._episodes,
                paused_seconds=self._paused_total - max(0.0, self._pause_end - now),
                spurious_cuts=self._evidence.undone,
                noise_floor=self._evidence.floor,
            )

    # -- internals (the lock is held) ---------------------------------------------------------------

    def _refused(
        self, sent_at: float, now: float, retry_after: float | None, headers: Mapping[str, str] | None
    ) -> float | None:
        """A refusal (429, or a 503): what it says, and how long its row waits (see on_throttled)."""
        if self._throttled_since is None:
            self._throttled_since = now
        hinted = retry_after is not None and retry_after > 0
        if not self.adaptive:
            if hinted:
                assert retry_after is not None
                self._pause(now, now + retry_after)
            return None if retry_after is None else 0.0
        self._read_headers(sent_at, headers)
        verdict = self._evidence.record(
            sent_at, refused=True, calm=self._calm(sent_at), latency=self._latency or 0.0
        )
        if verdict is not None:
            self._judged(verdict, now)
        latency = self._latency or 0.0
        exhausted = self._exhausted(headers)
        if self._phase == SLOW_START:
            quota = exhausted or self._evidence.ends_slow_start(latency)
        else:
            quota = exhausted or self._evidence.says_quota(now, latency)
        # a hint pauses everyone only with quota evidence: headers at zero or a cluster of refusals
        pause = hinted and (
            exhausted or (quota and (self._evidence.floor == 0 or self._evidence.clustered(now, latency)))
        )
        if pause:
            assert retry_after is not None
            self._pause(now, now + retry_after)
            for window in self._windows.values():
                if window.last_remaining is not None and window.last_remaining < 1.0 + 0.1 * window.peak:
                    window.window_ends_at(now + retry_after)  # an exhausted window: the hint is its end
        # an episode's later 429s answer requests sent before its cut took effect (one round trip)
        if quota and sent_at > self._last_cut + latency:
            self._evidence.end_test()  # a cut under test that was not deep enough stands
            before = (
                self._rate,
                self._phase,
                self._step_scale,
                self._cut_from,
                self._since_cut,
                self._last_cut,
            )
            ended_slow_start = self._phase == SLOW_START
            self._cut(now)
            if ended_slow_start:
                # the cut that ends slow start is tested (see refusal_evidence): at the start of a run
                # few outcomes tell noise from a quota, and noise taken for one would hold it down
                self._evidence.start_test(now, latency, self._rate, before)
        self._push(now, force=True)
        if retry_after is None:
            return None  # no usable hint: the row backs off by its own policy, noise or quota
        return 0.0 if pause else retry_after

    def _calm(self, sent_at: float) -> bool:
        """Whether a request was sent below every rate a quota refused this client at: from a round
        trip after a cut until the climb back nears the rate the cut took for the quota (its
        refusals are noise, see refusal_evidence). Judged by the send time, as the answers of one
        moment come back at different times (a refusal at once, an answer a round trip later)."""
        start, end = self._calm_span
        if start <= sent_at < end:
            return True
        return any(a <= sent_at < b for a, b in self._calm_spans)

    def _end_calm(self, now: float) -> None:
        start, end = self._calm_span
        if start < now < end:
            self._calm_spans.append((start, now))
        if start < end:
            self._calm_span = (math.inf, math.inf)

    def _judged(self, verdict: Verdict, now: float) -> None:
        """A cut's test is over: a spurious one is undone (the rate and phase it interrupted)."""
        if not verdict.spurious:
            return
        rate, phase, step_scale, cut_from, since_cut, last_cut = verdict.before
        self._rate = max(self._rate, rate)
        self._end_calm(now)
        self._phase, self._step_scale, self._cut_from = phase, step_scale, cut_from
        self._since_cut += since_cut
        self._last_cut, self._probe_at = last_cut, None
        self._push(now, force=True)

    def _exhausted(self, headers: Mapping[str, str] | None) -> bool:
        """Whether the rate headers show a budget at zero (this refusal's, or a window's latest)."""
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        for kind in ("requests", "tokens"):  # the kinds _read_headers reads
            remaining = _number(lowered, f"x-ratelimit-remaining-{kind}")
            if remaining is not None and remaining < 1:
                return True
        return any(w.last_remaining is not None and w.last_remaining < 1.0 for w in self._windows.values())

    def _answered_rate(self, now: float) -> float | None:
        """Answers/s lately, or None when too few came lately to tell (at the start, after a pause).

        Over the last ``window`` s, stretched to cover ``_MIN_SAMPLES`` answers at the current rate (a
        slow quota answers too rarely for a fixed window), and over the newest ``_RATE_SAMPLES`` at
        most (a slow start's ramp or a quota's drop shows without lag; ``_SLOW_START_SAMPLES`` in slow
        start). Answers from before an idle spell are not counted: they would make a busy quota look
        empty.
        """
        answers = self._answers
        span = max(self.settings.window, _MIN_SAMPLES / max(self._rate, self.settings.min_rate))
        if self._phase == SLOW_START:
            span = max(2.0 * (self._latency or 0.05), 0.1)
        horizon = now - span
        count = len(answers)
        first = count
        while first > 0 and answers[first - 1] > horizon:
            first -= 1
        if self._phase == SLOW_START:
            first = max(first, count - _SLOW_START_SAMPLES)
        if count - first < 2:
            return None
        # up to now, not to the newest answer: answers that stopped coming lower the rate
        return (count - 1 - first) / max(now - answers[first], 1e-9)

    def _cut(self, now: float) -> None:
        admitted = self._admitted(now) or self._rate
        # the step shrinks when the client's own climb brought the episode (it was back at the rate
        # of the previous cut) sooner than episode_requests answers, and grows back with every answer
        # (see _grow): it settles where a small quota's episodes are about that far apart. Episodes
        # that come before the climb back (someone else's climb, a quota that dropped) say nothing
        # about the step.
        if admitted >= 0.98 * self._cut_from:
            ratio = max(self._since_cut, 1) / self.settings.episode_requests
            self._step_scale = max(_MIN_STEP_SCALE, self._step_scale * min(1.0, ratio))
        self._since_cut = 0
        self._cut_from = admitted
        # the first cut comes while the answers still lag the ramp by a round trip: its answered rate
        # is that of a round trip ago, often half the quota; the answers now in flight tell the quota
        self._probe_at = now if self._phase == SLOW_START else None
        self._probe_count = 0
        answered = self._answered_rate(now)
        if answered is None:
            # 429s and (almost) no answers: the quota may be far below the rate, as after starting
            # 20x too fast; halving finds it in a few episodes instead of dozens of 10 % cuts
            self._rate = max(self.settings.min_rate, 0.5 * admitted)
        else:
            self._rate = max(self.settings.min_rate, self.settings.decrease * min(admitted, answered))
        self._refused_at = self._rate / self.settings.decrease
        self._phase = AVOIDANCE
        self._last_cut = now
        self._episodes += 1
        self._evidence.on_cut()
        self._end_calm(now)
        self._calm_span = (now + (self._latency or 0.0), math.inf)

    def _remeasure(self, sent_at: float, now: float) -> None:
        """After the cut that ended slow start: the answers to the requests sent before it arrive at
        the rate the server admitted them while the client sent too fast, which is the quota. Once
        the first answer to a later request shows they are all in, a rate cut below that quota is
        raised to ``decrease`` times it (never above the rate the cut started from)."""
        assert self._probe_at is not None
        if sent_at <= self._probe_at:
            self._probe_count += 1
            return
        # over the whole time they took to come in, from the cut to the first later answer: answers
        # arriving in clumps (a busy server, a busy client) must not look like a higher rate
        count, span = self._probe_count, now - self._probe_at
        self._probe_at = None
        if count < _MIN_SAMPLES or span <= 0:
            return  # too few to tell (a small quota): the cut stands
        measured = count / span
        self._rate = max(self._rate, min(self.settings.decrease * measured, self._cut_from, self._ceiling))
        self._refused_at = max(self._refused_at, self._rate / self.settings.decrease)

    def _grow(self, now: float) -> None:
        s = self.settings
        rate = self._rate
        if self._phase == SLOW_START:
            grown = rate + s.slow_start_gain
        else:
            # requests/s gained per second: sqrt(rate) keeps AIMD's fair sharing (the same step for
            # everyone would, but one step cannot suit 1/s and 500/s); a client whose own episodes
            # come less than ``episode_requests`` answers apart (a small quota) climbs slower
            rate = max(rate, s.min_rate)
            grown = rate + s.increase * math.sqrt(rate) * self._step_scale / rate
            self._step_scale = min(1.0, self._step_scale * 2.0 ** (1.0 / s.episode_requests))
        # growth stops where the answers do not follow (concurrency, latency): it never shrinks the rate
        limit = math.inf
        if self._max_concurrency is not None and self._latency:
            limit = self._max_concurrency / self._latency
        answered = self._answered_rate(now)
        if answered is not None:
            headroom = s.slow_start_headroom if self._phase == SLOW_START else s.headroom
            limit = min(limit, max(headroom * answered, s.initial_rate))
        self._rate = min(self._ceiling, max(rate, min(grown, limit)))
        if self._rate >= 0.97 * self._refused_at:
            self._end_calm(now)  # back near the rate the quota refused: refusals may be its own again

    def _admitted(self, now: float, apply_pauses: bool = False) -> float | None:
        """The rate given to the pacer: the learned rate, or the server's stated one, under every
        ceiling (None: unlimited)."""
        if not self.adaptive:
            return None if math.isinf(self._ceiling) else self._ceiling
        ceiling, stated = self._header_limits(now, apply_pauses)
        rate = min(self._rate if stated is None else stated, self._ceiling, ceiling)
        return max(self.settings.min_rate, rate)

    def _per_request(self, kind: str, units_per_second: float) -> float:
        if kind == "requests":
            return units_per_second
        return units_per_second / self._avg_tokens if self._avg_tokens else math.inf

    def _header_limits(self, now: float, apply_pauses: bool) -> tuple[float, float | None]:
        """(the lowest header ceiling in requests/s, the lowest rate a known window states or None)."""
        ceiling = math.inf
        for kind, value in self._limit_ceiling.items():
            ceiling = min(ceiling, self._per_request(kind, value))
        stated: float | None = None
        sending = self._pushed if self._pushed is not None and math.isfinite(self._pushed) else self._rate
        for kind, window in self._windows.items():
            unit = 1.0 if kind == "requests" else self._avg_tokens or 1.0
            rate, authoritative, pause_until = window.plan(now, sending * unit, unit)
            if pause_until is not None and apply_pauses:
                self._pause(now, pause_until)
            if rate is None:
                continue
            rate = self._per_request(kind, rate)
            if authoritative:
                stated = rate if stated is None else min(stated, rate)
            else:
                ceiling = min(ceiling, rate)
        return ceiling, stated

    def _read_headers(self, sent_at: float, headers: Mapping[str, str] | None) -> None:
        if not headers:
            return
        lowered = {k.lower(): v for k, v in headers.items()}
        for kind in ("requests", "tokens"):
            remaining = _number(lowered, f"x-ratelimit-remaining-{kind}")
            limit = _number(lowered, f"x-ratelimit-limit-{kind}")
            if limit is not None and limit > 0:
                # OpenAI: a bucket refilling limit/60 per second; while it holds more than it refills
                # until full, that surplus may go too (it converges to limit/60 with the bucket half full)
                ceiling = limit / 60.0
                reset = parse_duration(lowered.get(f"x-ratelimit-reset-{kind}"))
                if remaining is not None and reset:
                    ceiling = max(ceiling, remaining / reset)
                self._limit_ceiling[kind] = ceiling
            elif remaining is not None:
                self._windows.setdefault(kind, _WindowQuota()).observe(sent_at, remaining)

    def _pause(self, now: float, deadline: float) -> None:
        start = max(now, self._pause_end)
        if deadline <= start:
            return
        self._paused_total += deadline - start
        self._pause_end = deadline
        if self._pacer is not None:
            self._pacer.pause_until(deadline)

    def _push(self, now: float, force: bool = False) -> None:
        if self._pacer is None:
            return
        rate = self._admitted(now, apply_pauses=True)
        pushed = self._pushed
        if rate is None:
            if pushed is not None:
                self._pacer.set_requests_per_minute(None)
                self._pushed = None
            return
        # small steps up are batched: each one re-anchors the pacer's schedule for nothing
        if force or pushed is None or math.isnan(pushed) or rate < pushed or rate > pushed * 1.01:
            self._pacer.set_requests_per_minute(rate * 60.0)
            self._pushed = rate
