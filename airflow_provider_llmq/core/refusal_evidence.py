"""Whether the refusals a client meets say "quota" or are noise, from the refusals themselves.

A quota refuses in proportion to how far the client sends above it: cut the rate below it and the
refusals stop. Noise (a gateway's pool drained by another tenant, one replica shedding a request)
refuses a share of requests whatever the rate: cut the rate and it goes on as before.

Slow start ends on a share of refusals, not on one: the rate doubles every few round trips, so a
quota it crosses soon refuses a large share, while noise keeps its small one; the share of the
refusals before that is the first **noise floor**. The cut that ends slow start is then a test, as
TCP's undo of a spurious retransmission (Eifel, RFC 3522; DSACK undo, RFC 3708) tests its own: the
rate is held, and the requests sent a round trip after the cut are watched. If they go on being
refused (at most ``_MAX_UNDONE_SHARE``), the cut bought nothing: it is undone, and their share
becomes the floor. Only that first cut is tested: undoing later ones let a client on a shared quota
take another client's overshoot for noise and starve it (simulated).

From then on a refusal is quota evidence only when the recent refusals exceed what the floor
explains (a one-sided Poisson test, ``z`` deviations), so 2 % of random 429s at 320 requests/s,
which come one every 150 ms, no longer cut the rate six times a second. A cut the refusals answer
(they stop) confirms a quota and halves the floor, so a floor learned from a passing noise burst
does not hide a real quota for long.

Refusals above the floor but few (one more than the floor explains within the recent window) are
evidence enough to cut, not to pause the whole client for a retry hint: that takes a cluster
(``cluster`` more than the floor explains), or the rate headers at zero (the caller's knowledge).

Shares above ``max_noise`` (10 %) are never taken for noise: a server refusing that much is a quota
or an outage, and the cut stands (a quota that drops by half looks like that).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["RefusalEvidence", "Verdict"]

_OUTCOMES = 1024  # the newest answers and refusals kept, with their send times
_SPURIOUS_REFUSALS = 3  # refusals after a cut that show it did not answer them...
# a share this high after the cut is more likely a shared quota that others still overfill than noise
_MAX_UNDONE_SHARE = 0.07
_MIN_TEST = 64  # ...among at least this many outcomes (their share becomes the noise floor)
_SLOW_START_REFUSALS = 3  # refusals among...
_SLOW_START_OUTCOMES = 32  # ...at least this many newest outcomes that end slow start...
_SLOW_START_MARGIN = 0.1  # ...with a share of refusals this much above the noise floor


@dataclass
class _Test:
    """One cut under test: what the refusals were before it, what they are after it."""

    counts_from: float  # a round trip after the cut: what was sent before met the overshoot's drain
    share_before: float
    needed: int  # outcomes of requests sent after the cut that confirm a quota when few are refused
    before: Any  # the controller's state before the cut, given back on an undo
    sent: int = 0
    refused: int = 0


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
        self.floor = 0.0  # the background refusal share learned from undone cuts
        self.undone = 0  # cuts undone as spurious
        self._outcomes: deque[tuple[float, bool]] = deque(maxlen=_OUTCOMES)
        self._test: _Test | None = None

    # -- the record -------------------------------------------------------------------------------

    def record(self, sent_at: float, refused: bool) -> Verdict | None:
        """One answer or refusal; returns the verdict of the cut under test once it is in."""
        self._outcomes.append((sent_at, refused))
        test = self._test
        if test is None or sent_at < test.counts_from:
            return None
        test.sent += 1
        test.refused += refused
        after = test.refused / test.sent
        # refusals that go on after a cut (the rate is held at the cut while it is tested, so a
        # quota below it refuses nothing more) did not answer it: a sequential test, so that noise
        # is told within a few of its own refusals, however slow the rate
        spurious = (
            test.refused >= _SPURIOUS_REFUSALS and test.sent >= _MIN_TEST and after <= _MAX_UNDONE_SHARE
        )
        if not spurious and test.sent < test.needed:
            return None
        self._test = None
        if spurious:
            self.undone += 1
            self.floor = min(self.max_noise, max(self.floor, after))
        elif after <= self.max_noise:  # the refusals answered the cut: a quota, the floor was high
            self.floor *= 0.5
        return Verdict(spurious, test.before)

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

    def _excess(self, now: float, latency: float) -> tuple[float, float]:
        """(refusals above what the floor explains, the evidence threshold) in the recent window."""
        sent, refused = self._recent(now, latency)
        floor = self.floor
        if self._test is not None:
            # while a cut is tested, refusals at the share it was made at (up to max_noise) are its
            # test, not a reason to cut again: cuts cascading on noise leave a noisy server idle
            floor = max(floor, min(self._test.share_before, self.max_noise))
        expected = floor * sent
        return refused - expected, self.z * math.sqrt(expected)

    # -- what the controller asks -----------------------------------------------------------------

    def says_quota(self, now: float, latency: float) -> bool:
        """Whether the refusals lately exceed the noise floor: a cut is due."""
        excess, threshold = self._excess(now, latency)
        return excess > threshold  # the threshold is never negative: one refusal over a zero floor

    def ends_slow_start(self, latency: float) -> bool:
        """In slow start the rate doubles every few round trips: a quota it crosses soon refuses a
        large share, while noise keeps its small one. So slow start ends on a share, not on a
        refusal: ``_SLOW_START_REFUSALS`` or more among the newest outcomes (a round trip's, at least
        ``_SLOW_START_OUTCOMES``), and ``_SLOW_START_MARGIN`` above the share of the refusals before
        them (sent well under any quota that would have refused more: noise), which becomes the
        noise floor once slow start ends."""
        outcomes = list(self._outcomes)
        if not outcomes:
            return False
        horizon = outcomes[-1][0] - latency
        newest = len(outcomes) - _SLOW_START_OUTCOMES
        while newest > 0 and outcomes[newest - 1][0] >= horizon:
            newest -= 1
        newest = max(newest, 0)
        window = [r for _, r in outcomes[newest:]]
        older = [r for _, r in outcomes[:newest]]
        self.floor = min(self.max_noise, sum(older) / len(older)) if older else 0.0
        refused = sum(window)
        return refused >= _SLOW_START_REFUSALS and refused > (self.floor + _SLOW_START_MARGIN) * len(window)

    def clustered(self, now: float, latency: float) -> bool:
        """Whether the refusals lately are a cluster above the floor: a retry hint pauses everyone."""
        excess, threshold = self._excess(now, latency)
        return excess >= max(self.cluster, threshold)

    def testing(self) -> bool:
        return self._test is not None

    def start_test(self, now: float, latency: float, before: Any) -> None:
        """A cut at ``now``: watch the requests sent after it; ``before`` comes back on an undo."""
        sent, refused = self._recent(now, latency)
        share = refused / max(sent, 1)
        # enough outcomes that the share before the cut would show twice the refusals that make a
        # cut spurious, within reason: a quota is confirmed within about a second
        needed = min(400, max(100, math.ceil(2 * _SPURIOUS_REFUSALS / max(share, 1e-3))))
        self._test = _Test(now + latency, share, needed, before)

    def end_test(self) -> None:
        """Another cut came while one was tested: the refusals went on above it, so it stands."""
        self._test = None
