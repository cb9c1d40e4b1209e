"""The mock server's token count: deterministic, word and punctuation based, like a BPE tokenizer.

Real tokenizers (tiktoken's ``cl100k_base`` / ``o200k_base``) give a common English word one token
(its leading space included), split long or rare words, give each punctuation mark a token and
split numbers into groups of up to three digits. This count does the same with fixed rules, so the
server's ``usage`` is realistic without a tokenizer file (these machines are offline), and a client's
estimate can be measured against it rather than against its own formula:

- a run of ASCII letters: one token per 8 letters, started (``"classification"`` is 2);
- digits: one token per group of up to 3 (``"2024"`` is 2);
- any other non-space character: one token (punctuation; a non-ASCII letter, so other scripts
  count high, as they do in a real tokenizer);
- a chat request bills each message's text plus 3 tokens per message and 3 for the reply's priming
  (OpenAI's published framing);
- prompt caching as OpenAI reports it: when the messages before the last one (the system prompt, a
  shared prefix) come to 1,024 tokens or more, that prefix is reported as
  ``prompt_tokens_details.cached_tokens``, in steps of 128 tokens from 1,024. Unlike OpenAI, the
  first request reports it too (as if an earlier run had warmed the cache), so every request's
  cost is known in advance.

"The quick brown fox jumps over the lazy dog." is 10 tokens, as in ``cl100k_base``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "CACHE_MIN_TOKENS",
    "MESSAGE_TOKENS",
    "cached_prefix_tokens",
    "count_messages",
    "count_text",
    "truncate_text",
    "within_max_tokens",
]

MESSAGE_TOKENS = 3
_PIECE = re.compile(r"[A-Za-z]+|[0-9]{1,3}|[^\sA-Za-z0-9]")
_LETTERS_PER_TOKEN = 8
CACHE_MIN_TOKENS = 1024  # OpenAI caches prompts from 1,024 tokens, in steps of 128
_CACHE_STEP = 128


def count_text(text: str) -> int:
    """Tokens of a text (no chat framing)."""
    count = 0
    for piece in _PIECE.findall(text):
        if piece[0].isascii() and piece[0].isalpha():
            count += -(-len(piece) // _LETTERS_PER_TOKEN)
        else:
            count += 1
    return count


def truncate_text(text: str, limit: int) -> str:
    """The longest start of ``text`` that counts at most ``limit`` tokens: what a model cut by
    ``max_tokens`` wrote (a long word is cut between its 8-letter tokens)."""
    count = 0
    for match in _PIECE.finditer(text):
        piece = match.group()
        cost = -(-len(piece) // _LETTERS_PER_TOKEN) if piece[0].isascii() and piece[0].isalpha() else 1
        if count + cost > limit:
            room = (limit - count) * _LETTERS_PER_TOKEN if cost > 1 else 0
            return text[: match.start() + room]
        count += cost
    return text


def within_max_tokens(text: str, body: Mapping[str, Any]) -> tuple[str, bool]:
    """``text`` as a model writes it under the request's ``max_completion_tokens`` (or
    ``max_tokens``): cut at that limit, and whether it was cut."""
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if not isinstance(limit, int) or isinstance(limit, bool) or count_text(text) <= limit:
        return text, False
    return truncate_text(text, max(limit, 0)), True


def count_messages(texts: Iterable[str]) -> int:
    """What a chat request bills as ``prompt_tokens``: each message's text and framing, and the
    reply's priming."""
    texts = list(texts)
    return sum(count_text(text) for text in texts) + MESSAGE_TOKENS * (len(texts) + 1)


def cached_prefix_tokens(texts: Iterable[str]) -> int:
    """The prompt tokens a request reports as cached: its prefix (every message but the last, with
    their framing) rounded down to a step of 128 from 1,024; 0 below 1,024."""
    texts = list(texts)
    prefix = sum(count_text(text) + MESSAGE_TOKENS for text in texts[:-1])
    if prefix < CACHE_MIN_TOKENS:
        return 0
    return CACHE_MIN_TOKENS + (prefix - CACHE_MIN_TOKENS) // _CACHE_STEP * _CACHE_STEP
