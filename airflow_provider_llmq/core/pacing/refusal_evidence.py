"""Whether the refusals a client meets say "quota" or are noise, from the refusals themselves.

A quota refuses in proportion to how far the client sends above it: cut the rate below it and the
refusals stop. Noise (a gateway's pool drained by another tenant, one replica shedding a request)
refuses a share of requests whatever the rate: cut the rate and it goes on as before.

So the **noise floor** is the share of refusals among *calm* requests: those sent while the client
was below every rate a quota refused it at (a round trip after a cut took effect and until the climb
back reaches the rate cut from, and slow start before its last round trip). A quota refuses none of
them; noise refuses its share of them. It is a running share over the newest few thousand calm
outcomes, so it follows noise that comes and goes and falls back towards zero while a quota is the
only thing that refuses, and it is learned again after every cut, not once: a floor learned too low
by chance costs a cut or two, not the run (before, a floor of zero made every later refusal a cut).

Once a cut has been undone as spurious (noise shown), the floor is at least the share of refusals
over every recent outcome (``_OUTCOMES``): the calm spans are short and their tests stop at their
third refusal, so their share alone learned 2-3 % for 5 % of noise, and every cluster of noise then
cut again (20,000 simulated rows at 5 %: 26-52 cuts and 0.74-0.84 of the limit; over real sockets,
0.285). From then on slow start's own small-sample test gives way to the window's (``floor_known``).

Slow start ends on a share of refusals, not on one: the rate doubles every few round trips, so a
quota it crosses soon refuses a large share, while noise keeps its small one. The cut that ends slow
start is then a test, as TCP's undo of a spurious retransmission (Eifel, RFC 3522; DSACK undo,
RFC 3708) tests its own: the rate is held, and the requests sent a round trip after the cut are
watched. If they go on being refused (at most ``_MAX_UNDONE_SHARE``), the cut bought nothing: it is
undone (the rate and slow start come back). Only that first cut is undone: undoing later ones let a
client on a shared quota take another client's overshoot for noise and starve it (simulated).

From then on a refusal is quota evidence only when the recent refusals exceed what the floor
explains (a one-sided Poisson test, ``z`` deviations). Over a floor of zero that is one refusal (one
cut per round trip at most, as a small quota needs); noise that a zero floor takes for a quota
teaches the floor from the calm requests after that cut.

Refusals above the floor but few are evidence enough to cut, not to pause the whole client for a
retry hint: that takes a cluster (``cluster`` more than the floor explains), or the rate headers at
zero (the caller's knowledge).

Shares above ``max_noise`` (10 %) are never taken for noise: a server refusing that much is a quota
or an outage, and the cut stands (a quota that drops by half looks like that).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RefusalEvidence", "Verdict"]

_OUTCOMES = 1024  # the newest answers and refusals kept, with their send times
_SPURIOUS_REFUSALS = 3  # refusals after a cut that show it did not answer them...
# a share this high after the cut is more likely a shared quota that others still overfill than noise
_MAX_UNDONE_SHARE = 0.07
_MIN_TEST = 64  # ...among at least this many outcomes
# outcomes that confirm a quota when fewer than _SPURIOUS_REFUSALS of them are refused: enough that
# 2 % of noise shows its 3 refusals (400: 99 %), unless that takes longer than _TEST_SECONDS
_TEST_OUTCOMES = (100, 400)
_TEST_SECONDS = 5.0
_SLOW_START_REFUSALS = 3  # refusals among...
_SLOW_START_OUTCOMES = 32  # ...at least this many newest outcomes that end slow start...
_SLOW_START_MARGIN = 0.1  # ...with a share of refusals this much above the noise floor
_CALM_MEMORY = 2000.0  # calm outcomes the floor is a share of (exponentially weighted)
_CALM_KEEP = 1.0 - 1.0 / _CALM_MEMORY  # the weight an outcome keeps at each newer one
_MIN_SHARE_OUTCOMES = 256  # outcomes before their share may be the floor (after an undo)
_MIN_CALM = 64  # calm outcomes before their share is the floor (else the share before slow start ended)


@dataclass
class _Test:
    """One cut under test: what the refusals were before it, what they are after it."""

    counts_from: float  # a round trip after the cut: what was sent before met the overshoot's drain
    share_before: float
    needed: int  # outcomes of requests sent after the cut that confirm a quota when few are refused
    before: Any  # the controller's state before the cut, given back on an undo
    sent: int = 0
    refused: int = 0
    # a refusal comes back at once, an answer a round trip later: a refusal is counted once an
    # answer to a request sent after it is in, so the share is that of requests in send order
    unsettled: deque[float] = field(default_factory=deque)
    refusal_ranks: list[int] = field(default_factory=list)  # where in the outcomes they came

    def count(self, sent_at: float, refused: bool) -> None:
        if refused:
            self.unsettled.append(sent_at)
            return
        while self.unsettled and self.unsettled[0] <= sent_at:
            self.unsettled.popleft()
            self.sent += 1
            self.refused += 1
            self.refusal_ranks.append(self.sent)
        self.sent += 1

    def refusals_go_on(self) -> bool:
        """Refusals the cut did not answer: at least ``_SPURIOUS_REFUSALS`` among ``_MIN_TEST``
        outcomes or more, at a share that noise explains, and still coming in the newer half of the
        outcomes (a quarter of them at least). Another client's overshoot on a shared quota refuses
        this one's requests for a while after its cut too, but it thins out as that client cuts."""
        if not (
            self.refused >= _SPURIOUS_REFUSALS
            and self.sent >= _MIN_TEST
            and self.refused <= _MAX_UNDONE_SHARE * self.sent
        ):
            return False
        return 4 * self.newer_refusals() >= self.refused

    def newer_refusals(self) -> int:
        """Refusals among the newer half of the outcomes so far."""
        return sum(1 for rank in self.refusal_ranks if 2 * rank > self.sent)


@dataclass(frozen=True)
class Verdict:
    """The end of a cut's test: ``spurious`` (undo it, with ``before``) or a confirmed quota."""

    spurious: bool
    before: Any


class RefusalEvidence:
    """The refusal record of one client; the controller calls it under its own lock.

    :param window: seconds of outcomes a test looks at (at least; two round trips when longer).
    :param z: deviations above the floor's expectation that count as evidence.
    :param cluster: refusals above the floor's expectation that make a cluster (a pause).
    :param max_noise: the largest refusal share ever taken for noise.
    """

    def __init__(
        self, window: float = 1.0, z: float = 3.0, cluster: float = 2.0, max_noise: float = 0.1
    ) -> None:
        self.window, self.z, self.cluster, self.max_noise = window, z, cluster, max_noise
        self.undone = 0  # cuts undone as spurious
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=_OUTCOMES)
        self._refused_recent = 0  # refusals among them
        self._test: _Test | None = None
        # calm outcomes, exponentially weighted (see the module docstring)
        self._calm = self._calm_refused = 0.0
        self._prior = 0.0  # the share before slow start ended, until enough calm outcomes came
        self._pending: deque[tuple[float, bool]] = deque()  # calm outcomes not counted yet

    @property
    def floor(self) -> float:
        """The background refusal share: what noise refuses of every request."""
        share = self._calm_refused / self._calm if self._calm >= _MIN_CALM else self._prior
        if self.undone and len(self._outcomes) >= _MIN_SHARE_OUTCOMES:
            # noise shown once (a cut undone): the share over every recent outcome, a sample many
            # times larger than the calm spans' (whose sequential tests stop at a few refusals and
            # learned 2-3 % for 5 % of noise, so that its clusters cut again and again)
            share = max(share, self._refused_recent / len(self._outcomes))
        return min(self.max_noise, share)

    @property
    def floor_known(self) -> bool:
        """Whether enough calm outcomes came for the floor to be their share."""
        return self._calm >= _MIN_CALM

    # -- the record -------------------------------------------------------------------------------

    def record(
        self, sent_at: float, refused: bool, calm: bool = False, latency: float = 0.0
    ) -> Verdict | None:
        """One answer or refusal; ``calm``: sent below every rate a quota refused (see the module
        docstring). Returns the verdict of the cut under test once it is in."""
        outcomes = self._outcomes
        if len(outcomes) == outcomes.maxlen:
            self._refused_recent -= outcomes[0][1]
        outcomes.append((sent_at, refused))
        self._refused_recent += refused
        test = self._test
        tested = test is not None and sent_at >= test.counts_from
        if calm and not tested:  # a test's outcomes count when it ends
            self._pending.append((sent_at, refused))
        # calm outcomes count once a cut could no longer come from them: the refusals of a cut too
        # shallow to stop a quota (the one ending slow start often is) are not noise
        horizon = sent_at - max(self.window, 2.0 * latency)
        pending = self._pending
        while pending and pending[0][0] < horizon:
            self._count_calm(1, pending.popleft()[1])
        if test is None or not tested:
            return None
        test.count(sent_at, refused)
        # refusals that go on after a cut (the rate is held at the cut while it is tested, so a
        # quota below it refuses nothing more) did not answer it: a sequential test, so that noise
        # is told within a few of its own refusals, however slow the rate
        spurious = test.refusals_go_on()
        if not spurious and test.sent < test.needed:
            return None
        self._test = None
        self.undone += spurious
        # the refusals of a test that goes on are noise; those of a confirmed quota thinned out as
        # its overshoot drained (another client's too): its newer half alone is the calm share
        if spurious:
            self._count_calm(test.sent, test.refused)
        else:
            self._count_calm(test.sent - test.sent // 2, test.newer_refusals())
        return Verdict(spurious, test.before)

    def _count_calm(self, sent: int, refused: int) -> None:
        """``sent`` calm outcomes, ``refused`` of them refusals, into the weighted share."""
        keep = _CALM_KEEP**sent
        self._calm = self._calm * keep + sent
        self._calm_refused = self._calm_refused * keep + refused

    def _recent(self, now: float, latency: float) -> tuple[int, int]:
        """(outcomes, refusals) among requests sent within the window before ``now``."""
        horizon = now - max(self.window, 2.0 * latency)
        sent = refused = 0
        for sent_at, was_refused in reversed(self._outcomes):
            if sent_at < horizon:
                break
            sent += 1
            refused += was_refused
        return sent, refused

    def _excess(self, now: float, latency: float) -> tuple[int, float, float]:
        """(recent refusals, those above what the floor explains, the evidence threshold)."""
        sent, refused = self._recent(now, latency)
        floor = self.floor
        if self._test is not None:
            # while a cut is tested, refusals at the share it was made at (up to max_noise) are its
            # test, not a reason to cut again: cuts cascading on noise leave a noisy server idle
            floor = max(floor, min(self._test.share_before, self.max_noise))
        expected = floor * sent
        return refused, refused - expected, self.z * math.sqrt(expected)

    # -- what the controller asks -----------------------------------------------------------------

    def says_quota(self, now: float, latency: float) -> bool:
        """Whether the refusals lately exceed the noise floor: a cut is due."""
        refused, excess, threshold = self._excess(now, latency)
        return refused > 0 and excess > threshold

    def _slow_start_split(self, latency: float) -> tuple[int, int, int, int]:
        """(newest outcomes, their refusals, older outcomes, their refusals): the newest are a round
        trip's, at least ``_SLOW_START_OUTCOMES``."""
        outcomes = self._outcomes
        if not outcomes:
            return 0, 0, 0, 0
        horizon = outcomes[-1][0] - latency
        newest = newest_refused = older_refused = 0
        for sent_at, refused in reversed(outcomes):
            if newest < _SLOW_START_OUTCOMES or sent_at >= horizon:
                newest += 1
                newest_refused += refused
            else:
                older_refused += refused
        return newest, newest_refused, len(outcomes) - newest, older_refused

    def ends_slow_start(self, latency: float) -> bool:
        """In slow start the rate doubles every few round trips: a quota it crosses soon refuses a
        large share, while noise keeps its small one. So slow start ends on a share, not on a
        refusal: ``_SLOW_START_REFUSALS`` or more among the newest outcomes (a round trip's, at least
        ``_SLOW_START_OUTCOMES``), and ``_SLOW_START_MARGIN`` above the noise floor (``z``
        deviations when that is more): the calm share once known, else the share of the refusals
        before them (sent well under any quota that would have refused more: noise)."""
        newest, refused, older, older_refused = self._slow_start_split(latency)
        if self._calm >= _MIN_CALM:
            floor = self.floor
        else:
            floor = min(self.max_noise, older_refused / older) if older else 0.0
        expected = floor * newest
        margin = max(_SLOW_START_MARGIN * newest, self.z * math.sqrt(expected))
        return refused >= _SLOW_START_REFUSALS and refused > expected + margin

    def clustered(self, now: float, latency: float) -> bool:
        """Whether the refusals lately are a cluster above the floor: a retry hint pauses everyone."""
        _, excess, threshold = self._excess(now, latency)
        return excess >= max(self.cluster, threshold)

    def testing(self) -> bool:
        return self._test is not None

    def start_test(self, now: float, latency: float, rate: float, before: Any) -> None:
        """The cut ending slow start at ``now``, from ``rate`` requests/s: watch the requests sent
        after it; ``before`` comes back on an undo. The outcomes of slow start before its last round
        trip are calm: they are the floor until enough calm outcomes came after the cut."""
        _, _, older, older_refused = self._slow_start_split(latency)
        if older and self._calm < _MIN_CALM:
            self._prior = older_refused / older
        sent, refused = self._recent(now, latency)
        share = refused / max(sent, 1)
        low, high = _TEST_OUTCOMES
        needed = min(high, max(low, math.ceil(_TEST_SECONDS * rate)))
        self._test = _Test(now + latency, share, needed, before)

    def on_cut(self) -> None:
        """A cut: the calm outcomes not counted yet may be what called for it."""
        self._pending.clear()

    def end_test(self) -> None:
        """Another cut came while one was tested: the refusals went on above it, so it stands."""
        self._test = None
