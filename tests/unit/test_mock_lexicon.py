"""The mock server's sentiment lexicon: the demo's labels agree with the stars of the sample
reviews, and an enum that is not a sentiment scale is still drawn from the request."""

from __future__ import annotations

import json

from airflow_provider_llmq.core.request.structured import StructuredOutput
from airflow_provider_llmq.sample_data import generate_reviews
from airflow_provider_llmq.testing.mock_server.lexicon import sentiment_label, sentiment_of_text
from airflow_provider_llmq.testing.mock_server.structured import expected_structured_answer

PROMPT_FORMAT = "Classify the sentiment of this customer review of %s.\n\nTitle: %s\nReview: %s\n\nSentiment:"


def test_the_labels_of_the_sample_reviews_agree_with_their_stars() -> None:
    reviews = generate_reviews(3000)
    agreeing = sum(
        sentiment_of_text(PROMPT_FORMAT % (r["product"], r["title"], r["review_text"]))
        == r["expected_sentiment"]
        for r in reviews
    )
    assert agreeing / len(reviews) >= 0.9, agreeing


def test_words_negation_and_middling_verdicts() -> None:
    assert sentiment_of_text("Absolutely love it. Highly recommend.") == "positive"
    assert sentiment_of_text("Terrible. The case cracked. Avoid.") == "negative"
    assert sentiment_of_text("Not good at all") == "negative"
    assert sentiment_of_text("It's okay. Not bad, not great.") == "neutral"
    assert sentiment_of_text("") == "neutral"


def test_only_a_sentiment_scale_is_read_and_its_own_spelling_is_kept() -> None:
    assert sentiment_label(["Positive", "Neutral", "Negative"], "love it") == "Positive"
    assert sentiment_label(["positive", "negative"], "it's okay") is None  # no neutral to give
    assert sentiment_label(["red", "green"], "love it") is None
    colour = {
        "type": "object",
        "properties": {"colour": {"type": "string", "enum": ["red", "green", "blue"]}},
        "required": ["colour"],
    }
    params = {"response_format": StructuredOutput(colour).response_format()}
    drawn = {
        json.loads(expected_structured_answer("m", None, f"love it {i}", params) or "")["colour"]
        for i in range(40)
    }
    assert drawn == {"red", "green", "blue"}
