"""The learned request rate: slow start, one cut per congestion episode, the climb back.

TCP's congestion control on a rate instead of a window (:class:`RateModel`; the controller in
:mod:`.adaptive` decides *when* a refusal is a quota, this module *how* the rate moves):

- **Slow start** from ``max(initial_rate, max_concurrency / initial_round_trip)``: each answer adds
  ``slow_start_gain`` requests/s, so the rate doubles about every ``0.7 / slow_start_gain`` s of
  answers. The start scales with the concurrency the caller chose (as TCP's initial window is a few
  segments, not one): at 64 in flight, 32/s instead of 20/s. Starting at the concurrency's whole
  rate (``64 / 0.25 s``) reached 0.93 of the limit on a clean simulated server but let two clients
  that start together on one small quota overfill it (6-20 % 429s on short two-process runs) and
  split it unfairly; half the concurrency per second keeps every simulated quota test.
- **One cut per congestion episode**: the rate drops to ``decrease`` times the rate the server
  *answered* lately (never above the rate admitted), which lands just under a quota even after a
  slow-start overshoot of 2-3x. A cut of 10 % keeps a hard quota busy: a deep cut (TCP's 50 %)
  leaves the quota idle during the whole climb back, which a token bucket never gives back. With
  (almost) no answers at all the rate halves: the quota may be far below it.
- **The cut that ends slow start is remeasured**: it is made while the answers still lag the ramp
  (over real sockets the answered rate was then a third of the quota); the answers to the requests
  sent before it arrive at the rate the server admitted them, the quota, and a cut below that is
  raised to ``decrease`` times it (:meth:`RateModel.remeasure`).
- **Congestion avoidance**: each answer adds ``increase * sqrt(rate) / rate``, about
  ``increase * sqrt(rate)`` requests/s per second, the additive half of AIMD, which is what shares a
  quota between clients that each only see their own 429s (a step proportional to the rate would
  keep any unfair split forever; a fixed one cannot suit both 1/s and 500/s). A client whose own
  climb brings episodes closer than ``episode_requests`` answers apart (a small quota) climbs slower,
  so that at most about one request in that many is a 429.
- **Never far above what the server answers**: growth stops at ``headroom`` times the answered rate
  (``slow_start_headroom`` in slow start, over the newest answers only) and at
  ``max_concurrency / latency``, so a client bound by its concurrency or by slow answers does not
  ramp an unused rate into the next 429 storm.
- **Calm spans** (:meth:`RateModel.calm`): requests sent from a round trip after a cut until the
  climb back nears the rate the cut took for the quota are below every rate a quota refused; their
  refusals are noise, which is how :mod:`.refusal_evidence` learns its floor.

Not thread-safe: the controller holds its lock around every call.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["AVOIDANCE", "FIXED", "SLOW_START", "AdaptiveSettings", "RateModel"]

SLOW_START = "slow_start"
AVOIDANCE = "avoidance"
FIXED = "fixed"

_RATE_SAMPLES = 32  # the answered rate is measured over at most this many newest answers...
_MIN_SAMPLES = 8  # ...and over a span long enough for this many at the current rate
# in slow start, over the newest this many only: the ramp doubles every few round trips, and a longer
# window's average lags it so far that the headroom (growth up to twice the answered rate) holds the
# ramp back to a doubling per window
_SLOW_START_SAMPLES = 12
_MIN_STEP_SCALE = 1e-3


@dataclass(frozen=True)
class AdaptiveSettings:
    """Tuning of the controller; the defaults are what the simulations in the tests were tuned with.

    :param initial_rate: requests/s at start when no ``requests_per_minute`` is given (at least).
    :param initial_round_trip: ...or ``max_concurrency`` requests per this many seconds when that is
        more: the start scales with the concurrency (see the module docstring).
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
    initial_round_trip: float = 2.0
    min_rate: float = 0.1
    slow_start_gain: float = 10.0
    decrease: float = 0.9
    increase: float = 1.0
    episode_requests: float = 25.0
    headroom: float = 2.0
    slow_start_headroom: float = 4.0
    window: float = 1.0

    def __post_init__(self) -> None:
        for name in ("initial_rate", "initial_round_trip", "min_rate", "slow_start_gain", "window"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not 0 < self.decrease < 1:
            raise ValueError(f"decrease must be within (0, 1), got {self.decrease!r}")
        if self.increase < 0:
            raise ValueError(f"increase must be >= 0, got {self.increase!r}")
        for name in ("headroom", "slow_start_headroom"):
            if not getattr(self, name) > 1:
                raise ValueError(f"{name} must be > 1, got {getattr(self, name)!r}")


class RateModel:
    """The rate one client learned, and the state of its episodes (see the module docstring).

    :param settings: tuning.
    :param rate: requests/s at start.
    :param ceiling: requests/s never exceeded (``requests_per_minute / 60``; inf when none).
    :param max_concurrency: the caller's concurrency, or None when it sends in bursts.
    """

    def __init__(
        self, settings: AdaptiveSettings, rate: float, ceiling: float, max_concurrency: int | None
    ) -> None:
        self.settings = settings
        self.rate = rate
        self.start_rate = rate
        self.ceiling = ceiling
        self.max_concurrency = max_concurrency
        self.phase = SLOW_START
        self.episodes = 0
        self.may_unpace = False  # set by the controller: no ceiling and a known concurrency
        self.unpaced = False  # the pacer is unlimited: the concurrency alone bounds the client
        self.last_cut = -math.inf
        self.latency: float | None = None  # smoothed seconds from send to answer
        self._since_cut = 0  # answers since the last cut
        self._step_scale = 1.0  # of the additive step, see cut
        self._cut_from = math.inf  # the admitted rate the last cut started from
        self._refused_at = math.inf  # the rate the last cut took for the quota (see calm)
        # when requests were sent calm: the open span, and a few closed ones whose answers may
        # still come in
        self._calm_span = (math.inf, math.inf)
        self._calm_spans: deque[tuple[float, float]] = deque(maxlen=4)
        # after the cut that ends slow start: the answers to requests sent before it, counted as they
        # arrive (the time of the cut, how many came since), see remeasure
        self.probe_at: float | None = None
        self._probe_count = 0
        self._answers: deque[float] = deque(maxlen=_RATE_SAMPLES)

    # -- what happened ----------------------------------------------------------------------------

    def answered(self, sent_at: float, now: float) -> None:
        """An answer at ``now`` to a request sent at ``sent_at``."""
        self._since_cut += 1
        self._answers.append(now)
        latency = max(0.0, now - sent_at)
        self.latency = latency if self.latency is None else 0.875 * self.latency + 0.125 * latency

    def cut(self, now: float, admitted: float) -> None:
        """A congestion episode at ``now``; ``admitted``: the rate the pacer was given."""
        # the step shrinks when the client's own climb brought the episode (it was back at the rate
        # of the previous cut) sooner than episode_requests answers, and grows back with every answer
        # (see grow): it settles where a small quota's episodes are about that far apart. Episodes
        # that come before the climb back (someone else's climb, a quota that dropped) say nothing
        # about the step.
        s = self.settings
        if admitted >= 0.98 * self._cut_from:
            ratio = max(self._since_cut, 1) / s.episode_requests
            self._step_scale = max(_MIN_STEP_SCALE, self._step_scale * min(1.0, ratio))
        self._since_cut = 0
        self._cut_from = admitted
        # the first cut comes while the answers still lag the ramp by a round trip: its answered rate
        # is that of a round trip ago, often half the quota; the answers now in flight tell the quota
        self.probe_at = now if self.phase == SLOW_START else None
        self._probe_count = 0
        answered = self.answered_rate(now)
        if answered is None:
            # 429s and (almost) no answers: the quota may be far below the rate, as after starting
            # 20x too fast; halving finds it in a few episodes instead of dozens of 10 % cuts
            self.rate = max(s.min_rate, 0.5 * admitted)
        else:
            self.rate = max(s.min_rate, s.decrease * min(admitted, answered))
        self._refused_at = self.rate / s.decrease
        self.phase = AVOIDANCE
        self.last_cut = now
        self.episodes += 1
        self._end_calm(now)
        self._calm_span = (now + (self.latency or 0.0), math.inf)

    def remeasure(self, sent_at: float, now: float) -> None:
        """After the cut that ended slow start (``probe_at`` set): the answers to the requests sent
        before it arrive at the rate the server admitted them while the client sent too fast, which
        is the quota. Once the first answer to a later request shows they are all in, a rate cut
        below that quota is raised to ``decrease`` times it (never above the rate the cut started
        from)."""
        assert self.probe_at is not None
        if sent_at <= self.probe_at:
            self._probe_count += 1
            return
        # over the whole time they took to come in, from the cut to the first later answer: answers
        # arriving in clumps (a busy server, a busy client) must not look like a higher rate
        count, span = self._probe_count, now - self.probe_at
        self.probe_at = None
        if count < _MIN_SAMPLES or span <= 0:
            return  # too few to tell (a small quota): the cut stands
        measured = count / span
        self.rate = max(self.rate, min(self.settings.decrease * measured, self._cut_from, self.ceiling))
        self._refused_at = max(self._refused_at, self.rate / self.settings.decrease)

    def grow(self, now: float) -> None:
        """One answer's worth of growth (slow start or the additive climb), under the limits."""
        s = self.settings
        rate = self.rate
        if self.phase == SLOW_START:
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
        if self.max_concurrency is not None and self.latency:
            limit = self.max_concurrency / self.latency
        answered = self.answered_rate(now)
        if answered is not None:
            headroom = s.slow_start_headroom if self.phase == SLOW_START else s.headroom
            limit = min(limit, max(headroom * answered, self.start_rate))
        self.rate = min(self.ceiling, max(rate, min(grown, limit)))
        if self.rate >= 0.97 * self._refused_at:
            self._end_calm(now)  # back near the rate the quota refused: refusals may be its own again

    def check_concurrency(self) -> None:
        """Unpaced from now on when slow start grew the rate to what the concurrency allows
        (``max_concurrency / latency``) and nothing refused yet: no pacer adds anything there, it
        only loses the slots a late answer leaves idle (see :mod:`.rate_pacing`)."""
        if not self.may_unpace or self.unpaced or self.phase != SLOW_START:
            return
        if self.max_concurrency is not None and self.latency:
            self.unpaced = self.rate >= 0.95 * self.max_concurrency / self.latency

    def start_pacing(self, now: float) -> None:
        """The first refusal (or rate header): paced for good from here, at what the server answered
        so far (the quota's rate when there is one, the concurrency's when the refusal is noise),
        never above what slow start had grown to."""
        if not self.may_unpace:
            return
        self.may_unpace = False
        if self.unpaced:
            self.unpaced = False
            answered = self.answered_rate(now)
            if answered is not None:
                self.rate = min(self.rate, max(self.start_rate, answered))

    # -- the undo of a spurious cut ---------------------------------------------------------------

    def state(self) -> tuple[Any, ...]:
        """What a cut changes, to give back if it proves spurious (see :meth:`undo`)."""
        return (self.rate, self.phase, self._step_scale, self._cut_from, self._since_cut, self.last_cut)

    def undo(self, before: tuple[Any, ...], now: float) -> None:
        """A cut that bought nothing (refusal_evidence): the rate and phase it interrupted come back."""
        rate, phase, step_scale, cut_from, since_cut, last_cut = before
        self.rate = max(self.rate, rate)
        self._end_calm(now)
        self.phase, self._step_scale, self._cut_from = phase, step_scale, cut_from
        self._since_cut += since_cut
        self.last_cut, self.probe_at = last_cut, None

    # -- what it knows ----------------------------------------------------------------------------

    def calm(self, sent_at: float) -> bool:
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

    def answered_rate(self, now: float) -> float | None:
        """Answers/s lately, or None when too few came lately to tell (at the start, after a pause).

        Over the last ``window`` s, stretched to cover ``_MIN_SAMPLES`` answers at the current rate (a
        slow quota answers too rarely for a fixed window), and over the newest ``_RATE_SAMPLES`` at
        most (a slow start's ramp or a quota's drop shows without lag; ``_SLOW_START_SAMPLES`` in slow
        start). Answers from before an idle spell are not counted: they would make a busy quota look
        empty.
        """
        answers = self._answers
        span = max(self.settings.window, _MIN_SAMPLES / max(self.rate, self.settings.min_rate))
        if self.phase == SLOW_START:
            span = max(2.0 * (self.latency or 0.05), 0.1)
        horizon = now - span
        count = len(answers)
        first = count
        while first > 0 and answers[first - 1] > horizon:
            first -= 1
        if self.phase == SLOW_START:
            first = max(first, count - _SLOW_START_SAMPLES)
        if count - first < 2:
            return None
        # up to now, not to the newest answer: answers that stopped coming lower the rate
        return (count - 1 - first) / max(now - answers[first], 1e-9)
