"""An adaptive request rate: learn the quota a server enforces from its answers, without being told.

One :class:`AdaptiveRate` sits next to a client's limiter. The limiter's :class:`~.limits.Pacer` keeps
spacing requests evenly (GCRA, no burst after a pause); the controller only sets the pacer's rate
(:meth:`Pacer.set_requests_per_minute`) and its pauses. The client reports every answer:
``on_success`` / ``on_throttled`` / ``on_failure`` with the time the request was sent, the time the
answer came and its headers.

Three parts, one job each, and this module couples them to the pacer:

- :mod:`.rate_model` moves the learned rate: slow start, one cut per congestion episode from the
  answered rate, the remeasure of the cut that ends slow start, the additive climb that shares a
  quota between clients, and the calm spans in which any refusal is noise.
- :mod:`.refusal_evidence` says whether the refusals are a quota or noise: **a single 429 is
  evidence, not a verdict**. Slow start ends on a share of refusals, not on one; later, a cut needs
  more refusals than the noise floor explains (a share learned all along from the calm requests);
  the cut that ends slow start is tested, and undone when the refusals go on as before it.
- :mod:`.rate_headers` reads what the server states: OpenAI's refilling buckets give ceilings,
  Azure's fixed windows give the rate outright (the server's own word replaces the learned one) and
  pause the client when a window is exhausted.

What this module decides itself:

- **Retry hints** (``retry-after-ms`` / ``Retry-After``, parsed by the caller) pause the whole client
  only when they come with quota evidence (rate headers at zero, a cluster of refusals); an isolated
  one delays only its own row, so a gateway's random refusal costs one row a few hundred ms instead
  of stopping every worker.
- **The start is the concurrency's**: a slow start that reaches ``max_concurrency / latency`` with
  nothing refused stops pacing (the concurrency alone bounds it, as a bare client's); the first
  refusal or rate header paces again from the answered rate (see :mod:`.rate_pacing`).
- **A hint-less 429 taken for noise** (a known floor explains it) retries within ``QUICK_RETRY``;
  with quota evidence, or nothing known yet, its row backs off by its own policy.
- **5xx, resets and timeouts are not congestion**: they count as failures and leave the rate alone.
  While they are isolated (under 5 % of the answers lately) a row's first retry comes within
  ``QUICK_RETRY`` (0.1 s) instead of its 0.5 s backoff: a worker held 0.5 s per random 500, and the
  retried rows that end a run, cost 0.12 of the limit at 2 % of 500s (simulated, adaptive=False).
  When they are not isolated (an outage) the row backs off by its own policy. A 503 (or
  ``congestion=True``) is a refusal without a hint, judged like a 429.
- **Ceilings**: ``requests_per_minute`` is never exceeded (the pacer's rate never goes above it);
  ``tokens_per_minute`` stays the pacer's own token schedule; ``max_concurrency`` is the caller's
  semaphore, and bounds the rate. ``adaptive=False`` pins the rate to ``requests_per_minute``
  (unlimited when None) and ignores everything but retry hints: the behaviour without this module.
- **Patience**: a 429 is congestion, not a row failure; :meth:`AdaptiveRate.patience_exhausted` says
  when the client has been throttled for ``patience`` seconds without a single success, so rows may
  then give up.
- **The pacer coupling** (:mod:`.rate_pacing`): small steps up batched, cuts and pauses at once.

Thread-safe: one lock around arithmetic, never held while anything waits; the pacer's own lock is
taken inside it and never the other way round.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from airflow_provider_llmq.core.pacing.limits import Pacer
from airflow_provider_llmq.core.pacing.rate_headers import RateHeaders
from airflow_provider_llmq.core.pacing.rate_model import FIXED, SLOW_START, AdaptiveSettings, RateModel
from airflow_provider_llmq.core.pacing.rate_pacing import PacerLink
from airflow_provider_llmq.core.pacing.refusal_evidence import RefusalEvidence, Verdict

__all__ = ["QUICK_RETRY", "AdaptiveRate", "AdaptiveStats"]

QUICK_RETRY = 0.1
"""Seconds an isolated failure's row waits at most before its first retry (see on_failure)."""
_ISOLATED_SHARE = 0.05
_FAILURES_KEPT = 64


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


class AdaptiveRate:
    """The request rate of one client (a thread pool or an event loop), learned from the answers.

    :param requests_per_minute: a ceiling never exceeded, and the starting rate; None: no ceiling.
    :param max_concurrency: the caller's concurrency; bounds the rate by ``max_concurrency / latency``.
    :param adaptive: False pins the rate to ``requests_per_minute`` (retry hints are still honoured).
    :param patience: seconds of 429s without a single success before :meth:`patience_exhausted`.
    :param settings: tuning, see :class:`~.rate_model.AdaptiveSettings`.
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
        self._lock = threading.Lock()
        self._link = PacerLink()

        start = s.initial_rate
        if max_concurrency is not None:
            start = max(start, max_concurrency / s.initial_round_trip)
        rate = min(self._ceiling, start) if requests_per_minute is None else self._ceiling
        self._model = RateModel(s, rate, self._ceiling, max_concurrency)
        if not adaptive:
            self._model.phase = FIXED
        # unpaced once slow start reaches the concurrency's rate (see RateModel.may_unpace)
        self._model.may_unpace = adaptive and requests_per_minute is None and max_concurrency is not None
        self._headers = RateHeaders()
        self._evidence = RefusalEvidence()
        self._avg_tokens: float | None = None
        self._successes = self._throttled = self._failures = 0
        self._throttled_since: float | None = None
        self._failed_at: deque[float] = deque(maxlen=_FAILURES_KEPT)  # when failures came (see on_failure)

    # -- wiring -------------------------------------------------------------------------------------

    def bind(self, pacer: Pacer) -> None:
        """Drive ``pacer``'s request rate and pauses from now on (its clock must be this one's).

        Bind before any request waits on the pacer: from then on its waiters look at their slot often
        enough to follow a rate that changes (see :meth:`Pacer.set_requests_per_minute`).
        """
        with self._lock:
            now = self.clock()
            self._link.bind(pacer, self._admitted(now), fixed=not self.adaptive)

            if self.adaptive:
                self._push(now, force=True)  # the header pauses and the concurrency bound too

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
            model = self._model
            self._successes += 1
            self._throttled_since = None
            model.answered(sent_at, now)
            if tokens is not None and tokens > 0:
                self._avg_tokens = (
                    float(tokens) if self._avg_tokens is None else 0.9 * self._avg_tokens + 0.1 * tokens
                )
            if not self.adaptive:
                return
            verdict = self._evidence.record(
                sent_at, refused=False, calm=model.calm(sent_at), latency=model.latency or 0.0
            )
            if verdict is not None:
                self._judged(verdict, now)
            if model.probe_at is not None:
                model.remeasure(sent_at, now)
            self._headers.read(sent_at, headers)
            ceiling, stated = self._header_limits(now, apply_pauses=False)
            if stated is not None:
                # the server states its budget: the learned rate follows it, should the headers stop
                model.rate = max(self.settings.min_rate, min(stated, ceiling, self._ceiling))
            elif (
                sent_at >= model.last_cut
                and min(ceiling, self._ceiling) >= 0.98 * model.rate
                and not self._evidence.testing()  # a cut under test holds its rate (see refusal_evidence)
            ):
                # answers to requests sent before a cut say nothing new, and a rate held down by a
                # ceiling has not been tried: neither may grow it
                model.grow(now)
                model.check_concurrency()
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
        it backs off by its own retry policy (no usable hint and quota evidence, or nothing known
        yet: a server answering ``Retry-After: 0`` must not get its retries within milliseconds),
        ``QUICK_RETRY`` for a hint-less refusal taken for noise, 0 when the whole client pauses for
        the hint, else the hint: an isolated refusal delays only its own row."""
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
    ) -> float | None:
        """Any other failed attempt (5xx, timeout, connection error: ``status`` None);
        ``congestion=True`` treats it as a 429 without a hint without counting it as one.

        Returns the longest its row should wait before its first retry: ``QUICK_RETRY`` s while
        failures are isolated (fewer than one in ``_ISOLATED_SHARE`` answers lately, a replica
        shedding one request), None when they are not (an outage: the row's own backoff)."""
        with self._lock:
            now = self.clock() if now is None else now
            self._failures += 1
            self._failed_at.append(now)
            if congestion or status == 503:
                self._refused(sent_at, now, None, None)
                return None
            return QUICK_RETRY if self._isolated(now) else None

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
                phase=self._model.phase,
                answered_rate=self._model.answered_rate(now) or 0.0,
                successes=self._successes,
                throttled=self._throttled,
                failures=self._failures,
                episodes=self._model.episodes,
                paused_seconds=self._link.paused_seconds(now),
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
        self._model.start_pacing(now)
        if not self.adaptive:
            if hinted:
                assert retry_after is not None
                self._pause(now, now + retry_after)
            return None if retry_after is None else 0.0
        model, evidence = self._model, self._evidence
        self._headers.read(sent_at, headers)
        latency = model.latency or 0.0
        verdict = evidence.record(sent_at, refused=True, calm=model.calm(sent_at), latency=latency)
        if verdict is not None:
            self._judged(verdict, now)
        exhausted = self._headers.exhausted(headers)
        if model.phase == SLOW_START and not evidence.floor_known:
            # slow start's own test is a small sample, made for a ramp that crosses a quota fast;
            # once a floor is known (a cut undone as spurious) the window's test judges
            quota = exhausted or evidence.ends_slow_start(latency)
        else:
            quota = exhausted or evidence.says_quota(now, latency)
        # a hint pauses everyone only with quota evidence: headers at zero or a cluster of refusals
        # (over a floor of zero too: a slow start's first refusal paused everyone for its hint, and
        # two clients on one quota took turns pausing, 21 of 48 simulated pairs unfair, now 14)
        pause = hinted and (exhausted or (quota and evidence.clustered(now, latency)))
        if pause:
            assert retry_after is not None
            self._pause(now, now + retry_after)
            self._headers.hint_ends_windows(now + retry_after)
        # an episode's later 429s answer requests sent before its cut took effect (one round trip)
        if quota and sent_at > model.last_cut + latency:
            evidence.end_test()  # a cut under test that was not deep enough stands
            before = model.state()
            ended_slow_start = model.phase == SLOW_START
            model.cut(now, self._admitted(now) or model.rate)
            evidence.on_cut()
            if ended_slow_start:
                # the cut that ends slow start is tested (see refusal_evidence): at the start of a run
                # few outcomes tell noise from a quota, and noise taken for one would hold it down
                evidence.start_test(now, latency, model.rate, before)
        self._push(now, force=True)
        if retry_after is None:
            # no usable hint: with quota evidence the row backs off by its own policy (a server
            # answering every request with 429 must not be asked again within milliseconds); a
            # refusal the evidence takes for noise retries soon, as an isolated 500 does
            noise = not quota and evidence.floor > 0 and model.phase != SLOW_START
            return QUICK_RETRY if noise else None
        return 0.0 if pause else retry_after

    def _isolated(self, now: float) -> bool:
        """Whether the failures lately are few among the answers (see on_failure)."""
        span = max(1.0, 2.0 * (self._model.latency or 0.0))
        failed = sum(1 for t in self._failed_at if t > now - span)
        answered = (self._model.answered_rate(now) or 0.0) * span
        return failed <= 1 + _ISOLATED_SHARE * answered

    def _judged(self, verdict: Verdict, now: float) -> None:
        """A cut's test is over: a spurious one is undone (the rate and phase it interrupted)."""
        if verdict.spurious:
            self._model.undo(verdict.before, now)
            self._push(now, force=True)

    def _admitted(self, now: float, apply_pauses: bool = False) -> float | None:
        """The rate given to the pacer: the learned rate, or the server's stated one, under every
        ceiling (None: unlimited, as ``adaptive=False`` without a ceiling, or an unpaced start)."""
        if not self.adaptive:
            return None if math.isinf(self._ceiling) else self._ceiling
        ceiling, stated = self._header_limits(now, apply_pauses)
        if self._model.unpaced:
            if stated is None and math.isinf(ceiling):
                return None
            self._model.start_pacing(now)
        rate = min(self._model.rate if stated is None else stated, self._ceiling, ceiling)
        return max(self.settings.min_rate, rate)

    def _header_limits(self, now: float, apply_pauses: bool) -> tuple[float, float | None]:
        """(the lowest header ceiling in requests/s, the lowest rate a known window states or None)."""
        pushed = self._link.pushed
        sending = pushed if pushed is not None and math.isfinite(pushed) else self._model.rate
        ceiling, stated, pause_until = self._headers.limits(now, sending, self._avg_tokens)
        if pause_until is not None and apply_pauses:
            self._pause(now, pause_until)
        return ceiling, stated

    def _pause(self, now: float, deadline: float) -> None:
        self._link.pause(now, deadline)

    def _push(self, now: float, force: bool = False) -> None:
        rate = self._admitted(now, apply_pauses=True)
        self._link.push(rate, force)
