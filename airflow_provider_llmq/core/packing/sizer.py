"""How many rows go into the next pack.

A fixed ``rows_per_request`` is the size asked for. ``"auto"`` packs as many rows as fit the first
of: a prompt-token target (the instruction is then a small share
of the request, and one failed pack does not cost much), what the model's context and its longest
answer allow (a context-length error; each row's ``max_tokens``, else the completion tokens per row
learned from the answers), and a row cap. A pack that comes back incomplete or fails whole in a way
that says it was too big halves the row count; whole packs grow it again (doubling, then by 4s).
It starts at the cap, not small: the methods read packs ahead (a window per worker), so a slow
start would have packed most of a run's rows at its first, small size before any answer came back.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from airflow_provider_llmq.core.packing.envelope import ITEM_ANSWER_OVERHEAD, PACK_ANSWER_OVERHEAD

__all__ = ["AUTO", "PackSizer"]

AUTO = "auto"
#: the prompt tokens an automatic pack aims at: the instruction and system prompt are then a small
#: share, and a pack is still short enough that a failure costs little to ask again
TARGET_PROMPT_TOKENS = 2_000
#: rows an automatic pack holds at most
MAX_AUTO_ROWS = 64
#: completion tokens a pack's answer may need at most (what current models write in one answer)
_COMPLETION_CAP = 16_384


@dataclass
class PackStats:
    """What packing did, for the summary."""

    packs: int = 0  # pack requests that came back (whole or not)
    packed_rows: int = 0  # rows answered from a pack
    whole_failures: int = 0  # packs that failed as a whole and were split
    incomplete: int = 0  # packs that came back without every row
    # counted before sending (tiktoken, else the heuristic), for both sides: what the answered rows
    # would have cost alone, less their share of their packs; negative when packing cost more
    prompt_tokens_saved: int = 0


class PackSizer:
    """The next pack's size, shared by every thread or task of one client.

    :param rows_per_request: a fixed size (> 1) or ``"auto"``.
    :param max_tokens: a row's ``max_tokens`` (a pack asks for that many per row).
    """

    def __init__(self, rows_per_request: int | str, max_tokens: int | None = None) -> None:
        self.auto = rows_per_request == AUTO
        self.fixed = 0 if self.auto else int(rows_per_request)
        self._rows = float(MAX_AUTO_ROWS if self.auto else self.fixed)
        self._max_tokens = max_tokens
        self._completion_per_row: float | None = None
        self._context_tokens: int | None = None  # prompt tokens a pack stays under after a context error
        self._lock = threading.Lock()
        self.stats = PackStats()

    def row_cap(self) -> int:
        """Rows the next pack may hold."""
        with self._lock:
            rows = max(1, int(self._rows))
            # the pack's answer must fit in what a model writes at most: each row's max_tokens, else
            # the completion per row learned from the answers (with a margin)
            per_row = self._max_tokens
            if per_row is None and self._completion_per_row:
                per_row = int(self._completion_per_row * 1.25)
            if per_row is not None:
                room = _COMPLETION_CAP - PACK_ANSWER_OVERHEAD
                rows = min(rows, max(1, room // (per_row + ITEM_ANSWER_OVERHEAD)))
            return rows

    def token_cap(self) -> int | None:
        """Prompt tokens the next pack may hold (None: no limit, for a fixed size)."""
        with self._lock:
            caps = [] if not self.auto else [TARGET_PROMPT_TOKENS]
            if self._context_tokens is not None:
                caps.append(self._context_tokens)
            return min(caps) if caps else None

    def largest(self) -> int:
        """Rows a pack can ever hold: what bounds the rows read ahead."""
        return MAX_AUTO_ROWS if self.auto else self.fixed

    def answered(self, rows: int, complete: bool, completion_tokens: int | None) -> None:
        """A pack of ``rows`` came back: grow when every row was answered, else halve."""
        with self._lock:
            self.stats.packs += 1
            if completion_tokens and rows:
                per_row = completion_tokens / rows
                previous = self._completion_per_row
                self._completion_per_row = per_row if previous is None else 0.8 * previous + 0.2 * per_row
            if not complete:
                self.stats.incomplete += 1
            if not self.auto:
                return
            if complete and rows >= int(self._rows):
                self._rows = min(MAX_AUTO_ROWS, self._rows * 2 if self._rows < 16 else self._rows + 4)
            elif not complete:
                self._rows = max(1.0, self._rows / 2)

    def failed(
        self, rows: int, prompt_tokens: int | None = None, *, size: bool, context: bool = False
    ) -> None:
        """A pack failed as a whole (it is split). ``size``: the failure says the pack was too big
        (an unusable or cut answer, a context-length error): shrink. A content filter or a refusal
        is one row's doing and leaves the size alone. A context-length error also caps the tokens."""
        with self._lock:
            self.stats.whole_failures += 1
            if context and prompt_tokens:
                cap = max(1, math.floor(prompt_tokens / 2))
                self._context_tokens = cap if self._context_tokens is None else min(cap, self._context_tokens)
            if self.auto and size:
                self._rows = max(1.0, min(self._rows, rows) / 2)

    def saved(self, rows: int, tokens: int) -> None:
        with self._lock:
            self.stats.packed_rows += rows
            self.stats.prompt_tokens_saved += tokens
