"""A sample dataset for the example DAGs, the demo and the tests: product reviews to classify.

The rows are generated, not shipped: :func:`generate_reviews` builds them deterministically from a
seed (same seed and size, same rows, on every machine), combining products, aspect phrases and
review templates per category and star rating. ``expected_sentiment`` is the label a careful
reader would give (from the rating and the text), so a real model's answers can be scored.

No Spark here: the rows are written with pyarrow, so the demo can create them without a session.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import uuid
from typing import Any

SAMPLE_SEED = 20240611
DEFAULT_ROWS = 3000
#: overrides the number of generated rows (the tests use a few hundred)
ROWS_ENV = "LLMQ_SAMPLE_ROWS"
#: base folder of the example DAGs' data (source, per-run outputs)
DATA_DIR_ENV = "LLMQ_DATA_DIR"

_CATALOG: dict[str, dict[str, dict[str, list[str]]]] = {
    "Headphones & Audio": {
        "Aurora X2 Wireless Earbuds": {
            "good": [
                "noise cancelling blocks out the train completely",
                "pairing with my phone took five seconds",
                "they stay in my ears even when I run",
                "the case is small enough for a jeans pocket",
            ],
            "bad": [
                "the left earbud keeps disconnecting",
                "battery life dropped to two hours after a month",
                "calls sound muffled to the other person",
                "the charging case stopped closing properly",
            ],
            "meh": ["the touch controls are a bit too sensitive", "the app is required for basic settings"],
        },
        "Basswave Over-Ear Headphones": {
            "good": [
                "the sound is clear and the bass is punchy without being muddy",
                "I can wear them for hours without my ears hurting",
                "battery easily lasts a full week of commuting",
                "they fold flat and fit in my backpack",
            ],
            "bad": [
                "the ear cushions started peeling after six weeks",
                "there is a constant hiss when nothing is playing",
                "the headband cracked at the hinge",
                "the right side cuts out unless I wiggle the cable",
            ],
            "meh": ["they are a bit bulky", "the sound is fine for podcasts but flat for music"],
        },
        "Pulse Mini Bluetooth Speaker": {
            "good": [
                "it is surprisingly loud for its size",
                "it survived being dropped in the pool",
                "the battery lasts a whole weekend camping",
                "pairing two of them for stereo was easy",
            ],
            "bad": [
                "it distorts badly above half volume",
                "it stopped charging after two months",
                "the Bluetooth connection drops if I walk into the next room",
                "the rubber coating got sticky in the sun",
            ],
            "meh": ["the bass is thin", "the power button is hard to find by feel"],
        },
    },
    "Kitchen": {
        "ChefMate 5-Quart Stand Mixer": {
            "good": [
                "it handles bread dough without straining",
                "the bowl locks in securely and never wobbles",
                "it whips cream in under two minutes",
                "the attachments are dishwasher safe",
            ],
            "bad": [
                "it rattles loudly on the highest setting",
                "the motor started smelling hot on the second batch",
                "the beater scrapes the bottom of the bowl",
                "the speed dial broke in the first month",
            ],
            "meh": ["it is heavy to move around", "it takes up more counter space than I would like"],
        },
        "BrewRight Pour-Over Coffee Kettle": {
            "good": [
                "the gooseneck spout gives a really controlled pour",
                "it holds the temperature I set to the degree",
                "it boils a full kettle in about three minutes",
                "it looks great on the counter",
            ],
            "bad": [
                "the lid does not seal and drips when I pour",
                "rust spots appeared inside after a few weeks",
                "the handle gets too hot to touch",
                "the base stopped turning on without warning",
            ],
            "meh": ["the beep is very loud", "the capacity is smaller than the pictures suggest"],
        },
        "Crispy Air Fryer 4L": {
            "good": [
                "fries come out crispy without any oil",
                "cleanup takes two minutes because the basket is non-stick",
                "it heats up fast and cooks evenly",
                "the presets are actually useful",
            ],
            "bad": [
                "the non-stick coating flaked off after a few weeks",
                "the timer dial broke in the first month",
                "it smells like burning plastic every time",
                "the basket handle came loose",
            ],
            "meh": ["the basket only fits food for two people", "the fan is louder than I expected"],
        },
        "EverSharp 8-inch Chef's Knife": {
            "good": [
                "the blade is still razor sharp after months of daily use",
                "it is well balanced and comfortable to hold",
                "it glides through tomatoes and onions",
                "the handle does not slip when wet",
            ],
            "bad": [
                "the tip chipped the first time I cut squash",
                "rust spots appeared after the first wash",
                "it went dull within a couple of weeks",
                "the handle has a sharp seam that rubs my finger",
            ],
            "meh": ["it is heavier than my old knife", "the sheath is flimsy"],
        },
    },
    "Home & Office": {
        "ErgoFlex Mesh Office Chair": {
            "good": [
                "assembly took twenty minutes with clear instructions",
                "my back pain is noticeably better after a week",
                "the mesh keeps me cool on long days",
                "the lumbar support is properly adjustable",
            ],
            "bad": [
                "one of the screws was missing from the box",
                "the armrest cracked within two months",
                "it slowly sinks during the day",
                "the seat cushion flattened out quickly",
            ],
            "meh": ["the color is a little different from the photos", "the armrests do not go low enough"],
        },
        "Lumen LED Desk Lamp": {
            "good": [
                "the light is bright but not harsh on the eyes",
                "the color temperature setting is great for evening work",
                "the arm stays exactly where I put it",
                "the USB port on the base is handy",
            ],
            "bad": [
                "it flickers at low brightness",
                "the touch control stopped responding",
                "the joint loosened and the head droops",
                "it buzzes when dimmed",
            ],
            "meh": ["the base is larger than I expected", "the cable is a bit short"],
        },
        "QuietType Mechanical Keyboard": {
            "good": [
                "the keys feel great and are quieter than my old keyboard",
                "switching between my laptop and tablet is instant",
                "the backlight is even and not too bright",
                "it feels solid and does not flex",
            ],
            "bad": [
                "several keys started double typing",
                "the space bar rattles",
                "the wireless connection lags in games",
                "the feet snapped off the first week",
            ],
            "meh": ["the software is clunky", "the layout takes some getting used to"],
        },
        "StandUp Electric Desk Frame": {
            "good": [
                "the motor is quiet and the height presets are handy",
                "it feels solid even at full height",
                "it goes from sitting to standing in about ten seconds",
                "the cable tray keeps everything tidy",
            ],
            "bad": [
                "the desk wobbles badly at standing height",
                "one leg stopped moving and the top tilted",
                "it arrived with a bent crossbar",
                "the control panel shows an error code every few days",
            ],
            "meh": ["assembly took two people and an afternoon", "the motor is slower than advertised"],
        },
    },
    "Outdoor & Sports": {
        "TrailPeak 2-Person Tent": {
            "good": [
                "it kept us completely dry through a night of heavy rain",
                "setup takes ten minutes even for one person",
                "it packs down smaller than I expected",
                "the two doors make getting out at night easy",
            ],
            "bad": [
                "a seam started leaking on the second trip",
                "the poles bent in moderate wind",
                "the zipper on the fly snagged and tore",
                "condensation drips on us every morning",
            ],
            "meh": ["it is heavier than the listing says", "it is tight for two people with gear"],
        },
        "HydroCore Insulated Water Bottle": {
            "good": [
                "water stays cold for a full day in the car",
                "it fits in my car's cup holder",
                "the lid is easy to open with one hand",
                "it does not sweat at all",
            ],
            "bad": [
                "the lid leaks when the bottle is on its side",
                "the paint chipped within a week",
                "it left a metallic taste in my coffee",
                "the straw lid cracked",
            ],
            "meh": ["it is hard to clean the bottom", "it is heavier than plastic bottles"],
        },
        "Stride Pro Running Shoes": {
            "good": [
                "the cushioning is excellent on long runs",
                "they are light and breathable",
                "no blisters even on my first half marathon in them",
                "the grip is great on wet pavement",
            ],
            "bad": [
                "the sole started separating after 100 miles",
                "the heel rubs and gives me blisters",
                "the mesh tore near the little toe",
                "they squeak on every step",
            ],
            "meh": ["the sizing runs half a size small", "the laces are too short"],
        },
        "Summit 30L Daypack": {
            "good": [
                "it carries weight well and has smart pockets",
                "the back panel keeps my back from getting sweaty",
                "the rain cover has already saved my laptop",
                "the hip belt pockets fit my phone",
            ],
            "bad": [
                "a zipper broke on the first hike",
                "the straps dig into my shoulders",
                "the stitching on the handle came undone",
                "the water bladder sleeve is too small for a 2L bladder",
            ],
            "meh": ["it does the job but feels a bit cheap", "the colors are duller than the photos"],
        },
    },
    "Beauty & Personal Care": {
        "GlowDaily Vitamin C Serum": {
            "good": [
                "my skin feels softer after a week",
                "dark spots are fading after a month",
                "a small amount goes a long way",
                "it absorbs quickly and is not sticky",
            ],
            "bad": [
                "it caused a rash on my cheeks",
                "it turned orange in the bottle within weeks",
                "the dropper broke the first day",
                "it stings every time I apply it",
            ],
            "meh": ["I have not noticed much difference yet", "it is expensive for the size"],
        },
        "SmoothGlide Electric Shaver": {
            "good": [
                "it gives a close shave without irritation",
                "the battery lasts about three weeks",
                "it works well in the shower",
                "cleaning it takes seconds",
            ],
            "bad": [
                "the battery barely lasts two shaves",
                "it pulls hairs instead of cutting them",
                "the foil cracked after a month",
                "it stopped charging entirely",
            ],
            "meh": ["it is louder than my old shaver", "the travel case is flimsy"],
        },
        "SilkAir Hair Dryer": {
            "good": [
                "it dries my hair in half the time of my old one",
                "my hair is much less frizzy",
                "it is light enough to hold for a long time",
                "the cool shot button actually works",
            ],
            "bad": [
                "it gets very hot and smells like burning plastic",
                "it shut off mid-use and never turned back on",
                "the diffuser does not stay attached",
                "the cord is frayed already",
            ],
            "meh": ["the cord could be longer", "the packaging is nice, the product is average"],
        },
    },
}

_SERVICE_GOOD = [
    "Delivery was a day early.",
    "It arrived well packaged.",
    "Customer service answered my question within an hour.",
    "Great value for the price.",
]
_SERVICE_BAD = [
    "The box was crushed on arrival.",
    "Support never answered my emails.",
    "The replacement took three weeks to arrive.",
    "Way overpriced for what you get.",
]

_OPENERS = {
    5: [
        "Absolutely love it.",
        "Best purchase this year.",
        "Exceeded my expectations.",
        "Five stars, no doubt.",
    ],
    4: ["Really good overall.", "Very happy with it.", "Solid product.", "Pleasantly surprised."],
    3: ["It's okay.", "Mixed feelings about this one.", "Average.", "Not bad, not great."],
    2: ["Disappointed.", "Not what I hoped for.", "Expected better.", "Meh, probably returning it."],
    1: ["Do not buy.", "Complete waste of money.", "Terrible.", "Returned it after a week."],
}
_CLOSERS = {
    5: ["Would buy again.", "Highly recommend.", "Already ordered a second one as a gift."],
    4: ["Would recommend.", "Happy with the purchase.", "Minor quibbles aside, worth it."],
    3: ["It does the job.", "Fine if it is on sale.", "Might look for something else next time."],
    2: ["Would not buy again.", "Look elsewhere.", "Only two stars because it sort of works."],
    1: ["Avoid.", "I want my money back.", "Save yourself the trouble."],
}
_TITLES = {
    5: ["Fantastic", "Love it", "Worth every penny", "Perfect"],
    4: ["Very good", "Great value", "Does what it promises", "Nice"],
    3: ["Okay", "Decent but flawed", "It's fine", "Mixed bag"],
    2: ["Disappointing", "Not great", "Quality issues", "Meh"],
    1: ["Broke quickly", "Avoid", "Waste of money", "Very poor"],
}
# a realistic skew: most reviews are 5 or 1 stars
_RATING_WEIGHTS = {5: 44, 4: 21, 3: 11, 2: 8, 1: 16}
_FIRST_DAY = dt.date(2024, 1, 1)


def sentiment_of(rating: int) -> str:
    """The label for a star rating: 4-5 positive, 3 neutral, 1-2 negative."""
    return "positive" if rating >= 4 else "neutral" if rating == 3 else "negative"


def _sentence(text: str) -> str:
    """``text`` with its first letter upper-cased (``str.capitalize`` would lower-case an "I")."""
    return text[:1].upper() + text[1:]


def _review_text(rng: random.Random, rating: int, aspects: dict[str, list[str]]) -> str:
    good, bad, meh = aspects["good"], aspects["bad"], aspects["meh"]
    opener = rng.choice(_OPENERS[rating])
    closer = rng.choice(_CLOSERS[rating])
    if rating == 5:
        a, b = rng.sample(good, 2)
        body = f"{_sentence(a)}, and {b}."
        extra = rng.choice(_SERVICE_GOOD) if rng.random() < 0.4 else ""
    elif rating == 4:
        body = f"{_sentence(rng.choice(good))}. Only complaint: {rng.choice(meh)}."
        extra = rng.choice(_SERVICE_GOOD) if rng.random() < 0.3 else ""
    elif rating == 3:
        body = f"On the plus side {rng.choice(good)}. On the other hand {rng.choice(bad)}."
        extra = _sentence(rng.choice(meh)) + "." if rng.random() < 0.5 else ""
    elif rating == 2:
        body = f"{_sentence(rng.choice(bad))}. Also, {rng.choice(meh)}."
        extra = rng.choice(_SERVICE_BAD) if rng.random() < 0.4 else ""
    else:
        a, b = rng.sample(bad, 2)
        body = f"{_sentence(a)}, and {b}."
        extra = rng.choice(_SERVICE_BAD) if rng.random() < 0.6 else ""
    return " ".join(part for part in (opener, body, extra, closer) if part)


def generate_reviews(rows: int = DEFAULT_ROWS, seed: int = SAMPLE_SEED) -> list[dict[str, Any]]:
    """``rows`` product reviews, the same for the same (rows, seed) on every machine.

    Columns: review_id (unique, ``R000001``...), product_id, product, category, rating (1-5),
    title, review_text, review_date (ISO date), verified_purchase, helpful_votes,
    expected_sentiment (positive / neutral / negative).
    """
    rng = random.Random(seed)
    products = [
        (category, name, aspects)
        for category in sorted(_CATALOG)
        for name, aspects in sorted(_CATALOG[category].items())
    ]
    ratings, weights = zip(*_RATING_WEIGHTS.items(), strict=True)
    reviews = []
    for n in range(1, rows + 1):
        index = rng.randrange(len(products))
        category, product, aspects = products[index]
        rating = rng.choices(ratings, weights)[0]
        reviews.append(
            {
                "review_id": f"R{n:06d}",
                "product_id": f"P{index + 101}",
                "product": product,
                "category": category,
                "rating": rating,
                "title": rng.choice(_TITLES[rating]),
                "review_text": _review_text(rng, rating, aspects),
                "review_date": (_FIRST_DAY + dt.timedelta(days=rng.randrange(366))).isoformat(),
                "verified_purchase": rng.random() < 0.85,
                "helpful_votes": int(rng.paretovariate(1.5)) - 1,
                "expected_sentiment": sentiment_of(rating),
            }
        )
    return reviews


def default_data_dir() -> str:
    """``$LLMQ_DATA_DIR``, else ``$AIRFLOW_HOME/llmq_data`` (``~/airflow/llmq_data``)."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    home = os.environ.get("AIRFLOW_HOME") or os.path.join("~", "airflow")
    return os.path.abspath(os.path.join(os.path.expanduser(home), "llmq_data"))


def sample_rows() -> int:
    """``$LLMQ_SAMPLE_ROWS`` or :data:`DEFAULT_ROWS`."""
    return int(os.environ.get(ROWS_ENV) or DEFAULT_ROWS)


def write_reviews(path: str, rows: int | None = None, seed: int = SAMPLE_SEED) -> str:
    """Writes the sample as a parquet folder at ``path`` (replacing it whole) and returns ``path``."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = sample_rows() if rows is None else rows
    table = pa.Table.from_pylist(generate_reviews(rows, seed))
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    pq.write_table(table, os.path.join(tmp, "part-00000.parquet"))
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)  # readers see the old folder or the new one, never half of it
    return path


def ensure_reviews(path: str, rows: int | None = None, seed: int = SAMPLE_SEED) -> str:
    """Writes the sample at ``path`` unless a parquet folder with ``rows`` rows is already there."""
    import pyarrow.parquet as pq

    rows = sample_rows() if rows is None else rows
    part = os.path.join(path, "part-00000.parquet")
    if os.path.exists(part) and pq.ParquetFile(part).metadata.num_rows == rows:
        return path
    return write_reviews(path, rows, seed)


__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_ROWS",
    "ROWS_ENV",
    "SAMPLE_SEED",
    "default_data_dir",
    "ensure_reviews",
    "generate_reviews",
    "sample_rows",
    "sentiment_of",
    "write_reviews",
]
