"""What requests cost: the user's prices, and token counts known before anything is sent.

No price table ships here (prices change and would go stale): the user gives ``prices``, a mapping
of model or Azure deployment name to its input and output price per million tokens.

Token counts before a run come from :class:`TokenCounter`: tiktoken when it is installed and its
encoding loads (it downloads its BPE file on first use, so an offline machine without a cached copy
falls back), else a heuristic. The heuristic is OpenAI's rule of thumb for English, about 3/4 of a
word per token (``ceil(words * 4 / 3)``), plus the chat framing of each message: measured against the
mock server's word/punctuation count on the sample reviews it is within 1 % over a run, where
``chars / 4`` (the tokens/min pacer's conservative estimate) was 14 % high.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from airflow_provider_llmq.core.errors import LLMQueryConfigError
from airflow_provider_llmq.core.pacing.limits import DEFAULT_MAX_TOKENS

__all__ = [
    "HEURISTIC",
    "MESSAGE_OVERHEAD_TOKENS",
    "Price",
    "Prices",
    "RequestEstimate",
    "TokenCounter",
    "estimate_prompts",
    "parse_prices",
]

HEURISTIC = "heuristic"
MESSAGE_OVERHEAD_TOKENS = 3
"""Tokens the chat format adds per message (role and separators), and once more for the reply's
priming: OpenAI's published count for its chat models."""
_WORD = re.compile(r"\S+")
_TIKTOKEN_ENCODING = "o200k_base"  # the gpt-4o family's encoding; cl100k_base as the older fallback


@dataclass(frozen=True)
class Price:
    """One model's price in currency units per million tokens.

    :param input: price per million prompt tokens.
    :param output: price per million completion tokens.
    :param cached_input: price per million prompt tokens the API served from its prompt cache
        (``usage.prompt_tokens_details.cached_tokens``); None: they cost ``input``.
    """

    input: float
    output: float
    cached_input: float | None = None

    def cost(
        self, prompt_tokens: int | None, completion_tokens: int | None, cached_tokens: int | None = None
    ) -> float:
        """The cost of one request's usage; its cached prompt tokens (part of ``prompt_tokens``) at
        ``cached_input`` when the table gives that rate."""
        prompt = prompt_tokens or 0
        cached = min(max(cached_tokens or 0, 0), prompt) if self.cached_input is not None else 0
        uncached = (prompt - cached) * self.input + cached * (self.cached_input or 0.0)
        return (uncached + (completion_tokens or 0) * self.output) / 1_000_000


Prices = Mapping[str, Price]


def parse_prices(prices: Mapping[str, Any] | None) -> dict[str, Price]:
    """The user's ``prices`` as :class:`Price` objects. Each value is a :class:`Price`, a mapping
    ``{"input": ..., "output": ...}`` (with an optional ``"cached_input"``), a pair
    ``(input, output)`` or a triple ``(input, output, cached_input)``, per million tokens."""
    if prices is None:
        return {}
    if not isinstance(prices, Mapping):
        raise LLMQueryConfigError("prices must map a model or deployment name to its input and output price")
    parsed: dict[str, Price] = {}
    for model, value in prices.items():
        try:
            if isinstance(value, Price):
                price = value
            elif isinstance(value, Mapping):
                cached = value.get("cached_input")
                price = Price(
                    float(value["input"]), float(value["output"]), None if cached is None else float(cached)
                )
            else:
                pair = tuple(value)
                if len(pair) not in (2, 3):
                    raise ValueError
                price = Price(*(float(v) for v in pair))
        except (KeyError, TypeError, ValueError):
            raise LLMQueryConfigError(
                f"prices[{model!r}] must be {{'input': <per 1M tokens>, 'output': <per 1M tokens>}} "
                f"(optionally 'cached_input') or (input, output[, cached_input]), got {value!r}"
            ) from None
        values = (price.input, price.output, *(() if price.cached_input is None else (price.cached_input,)))
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise LLMQueryConfigError(f"prices[{model!r}] must be finite and >= 0, got {value!r}")
        parsed[str(model)] = price
    return parsed


class TokenCounter:
    """Counts the tokens of a text before it is sent: tiktoken when it loads, else the heuristic.

    ``method`` says which (``tiktoken:o200k_base`` or ``heuristic``). One counter is shared by every
    thread of a process: tiktoken's encodings are thread-safe, and loading is done once, under a lock.
    """

    _lock = threading.Lock()
    _shared: TokenCounter | None = None

    def __init__(self, use_tiktoken: bool = True) -> None:
        self._encoding: Any = _load_tiktoken() if use_tiktoken else None
        self.method = f"tiktoken:{self._encoding.name}" if self._encoding is not None else HEURISTIC

    @classmethod
    def shared(cls) -> TokenCounter:
        """The process's counter (tiktoken is tried once per process, not once per request)."""
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    def count(self, text: str | None) -> int:
        """Tokens of ``text`` alone, without the chat framing."""
        if not text:
            return 0
        if self._encoding is not None:
            return len(self._encoding.encode(text, disallowed_special=()))
        return math.ceil(len(_WORD.findall(text)) * 4 / 3)

    def prompt_tokens(self, system_prompt: str | None, prompt: str | None) -> int:
        """What the API bills as ``prompt_tokens`` for one chat request: each message's text plus
        its framing, plus the reply's priming."""
        return self.messages_tokens([text for text in (system_prompt, prompt) if text])

    def messages_tokens(self, texts: Sequence[str]) -> int:
        """What the API bills as ``prompt_tokens`` for a conversation of these message texts (a
        repair request's, say)."""
        return sum(self.count(text) for text in texts) + MESSAGE_OVERHEAD_TOKENS * (len(texts) + 1)


def _load_tiktoken() -> Any:
    try:
        import tiktoken
    except ImportError:
        return None
    for name in (_TIKTOKEN_ENCODING, "cl100k_base"):
        try:
            encoding = tiktoken.get_encoding(name)
            encoding.encode("probe")
        except Exception:  # offline without a cached BPE file, or an old tiktoken: fall back
            continue
        return encoding
    return None


@dataclass(frozen=True)
class RequestEstimate:
    """What a set of requests will cost, counted before any is sent.

    :param requests: requests that would be sent (empty prompts are not).
    :param prompt_tokens: estimated prompt tokens, chat framing included.
    :param completion_tokens: ``max_tokens`` (or the expected completion length) per request.
    :param cost: at the given prices; None without a price for the model.
    :param method: how tokens were counted (``tiktoken:<encoding>`` or ``heuristic``).
    :param completion_basis: where the completion length came from (``max_tokens``,
        ``expected_completion_tokens`` or ``default``).
    """

    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    method: str
    completion_basis: str

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "cost": None if self.cost is None else round(self.cost, 6),
            "token_count_method": self.method,
            "completion_basis": self.completion_basis,
        }


def completion_tokens_per_request(
    max_tokens: int | None, expected_completion_tokens: int | None
) -> tuple[int, str]:
    """The completion length to count for one request, and where it came from: the expected length
    when given (a better guess than the cap), else ``max_tokens``, else the pacer's default."""
    if expected_completion_tokens is not None:
        return int(expected_completion_tokens), "expected_completion_tokens"
    if max_tokens is not None:
        return int(max_tokens), "max_tokens"
    return DEFAULT_MAX_TOKENS, "default"


def estimate_prompts(
    prompts: Iterable[str | None],
    *,
    system_prompt: str | None = None,
    model: str | None = None,
    max_tokens: int | None = None,
    expected_completion_tokens: int | None = None,
    prices: Mapping[str, Any] | None = None,
    counter: TokenCounter | None = None,
) -> RequestEstimate:
    """Counts what asking ``prompts`` would cost, without sending anything (plain Python).

    :param prompts: the prompt texts; null or blank ones are not sent, so not counted.
    :param system_prompt: the system message sent with each prompt.
    :param model: the model or deployment ``prices`` are looked up by.
    :param max_tokens: the completion cap each request would send.
    :param expected_completion_tokens: the completion length expected per request (wins over
        ``max_tokens``, which only caps it).
    :param prices: model -> price per million tokens (see :func:`parse_prices`).
    :param counter: the token counter; default: the process's (tiktoken when it loads).
    """
    counter = counter or TokenCounter.shared()
    per_completion, basis = completion_tokens_per_request(max_tokens, expected_completion_tokens)
    requests = prompt_tokens = 0
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():
            continue
        requests += 1
        prompt_tokens += counter.prompt_tokens(system_prompt, prompt)
    completion_tokens = requests * per_completion
    price = parse_prices(prices).get(model or "")
    cost = price.cost(prompt_tokens, completion_tokens) if price is not None else None
    return RequestEstimate(requests, prompt_tokens, completion_tokens, cost, counter.method, basis)
