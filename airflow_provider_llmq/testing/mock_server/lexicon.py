"""A sentiment the mock server reads from the text, so a demo's labels make sense.

A label drawn at random made a five-star "Absolutely love it" come back ``neutral``: a newcomer's
first run looked like a tool giving wrong answers. A small word lexicon (in the spirit of VADER,
far smaller) is enough for reviews: words of praise and of complaint are counted, a negation
("not", "never", "no") flips the next word, and words of a middling verdict ("okay", "average",
"mixed") pull the label to neutral. It is a mock: no model, and the demo says so.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["SENTIMENT_LABELS", "sentiment_label", "sentiment_of_text"]
SENTIMENT_LABELS = ("positive", "neutral", "negative")


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_POSITIVE = _words(
    """
    love loved loves lovely best excellent exceeded fantastic perfect great good happy solid nice
    pleasantly recommend recommended worth awesome amazing superb wonderful favourite favorite
    comfortable clear crisp easy easily fast quick sturdy reliable impressive impressed glad
    surprisingly early well stunning brilliant flawless
    """
)
_NEGATIVE = _words(
    """
    disappointed disappointing disappointment waste terrible awful horrible poor worst broke broken
    breaks cracked crushed returned returning return refund avoid useless defective faulty stopped
    failed fails died dead peeling frayed hiss muffled overpriced junk cheap flimsy leaks leaking
    worse problem problems issue issues complaint trouble never annoying loose wobbly rattles
    """
)
_MIDDLING = _words("okay ok average mixed fine decent meh flawed mediocre")
_NEGATIONS = _words("not no never don't doesn't didn't isn't wasn't cannot can't")
_WORD = re.compile(r"[a-z']+")


def sentiment_of_text(text: str) -> str:
    """``positive``, ``neutral`` or ``negative`` for a piece of text, by its words."""
    score, middling, flip = 0, 0, False
    for word in _WORD.findall(text.lower()):
        if word in _NEGATIONS:
            flip = True
            continue
        sign = 1 if word in _POSITIVE else -1 if word in _NEGATIVE else 0
        if word in _MIDDLING:
            middling += 1
        elif sign:
            score += -sign if flip else sign
        flip = False
    if middling and abs(score) <= middling + 1:
        return "neutral"
    return "positive" if score > 0 else "negative" if score < 0 else "neutral"


def sentiment_label(members: Sequence[object], text: str) -> object | None:
    """The member of an enum that names the text's sentiment (matched without case), or None when
    the enum is not a sentiment scale (it names no positive and no negative label)."""
    by_name = {str(member).lower(): member for member in members if isinstance(member, str)}
    if "positive" not in by_name or "negative" not in by_name:
        return None
    label = sentiment_of_text(text)
    if label == "neutral" and "neutral" not in by_name:
        return None
    return by_name[label]
