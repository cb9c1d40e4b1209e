"""Measure what a pack's answer adds to its rows' answers: the completion tokens of each item's id and
JSON punctuation (``ITEM_ANSWER_OVERHEAD``) and of the ``{"items": [...]}`` around them
(``PACK_ANSWER_OVERHEAD``), as the mock server counts them and as o200k_base (tiktoken) does.

The rows' answers are the mock's (cut at a tight per-row ``max_tokens``: 5, 10), and answers with
quotes, newlines and accents (which JSON escapes); the pack's answer is written four ways: the
mock's (``json.dumps``, UTF-8), with ``\\u`` escapes, compact (no spaces, as models often write
strict JSON) and indented (as some write it). ``room`` is what ``pack_max_tokens`` leaves each row
beyond its own answer's tokens: a pack is cut at ``max_tokens`` when its JSON needs more.

tiktoken runs under the Python given by ``--tiktoken-python`` (the openaivec virtualenv of
:mod:`packing_openaivec`, which has tiktoken and bpe-openai's offline o200k_base); without it only
the mock's count is shown.

Run: ``.venv/bin/python benchmarks/packing_overhead.py`` (writes benchmarks/PACKING_OVERHEAD.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
for _path in (HERE.parent, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from packing_openaivec import DEFAULT_PYTHON, available  # noqa: E402
from run import git_revision  # noqa: E402

from airflow_provider_llmq.core.packing.envelope import (  # noqa: E402
    ITEM_ANSWER_OVERHEAD,
    PACK_ANSWER_OVERHEAD,
    pack_max_tokens,
)
from airflow_provider_llmq.testing.mock_server import expected_answer  # noqa: E402
from airflow_provider_llmq.testing.mock_server.tokens import count_text, truncate_text  # noqa: E402

_TIKTOKEN = """
import json, os, sys
from packing_openaivec import _tiktoken_cache
_tiktoken_cache()
import tiktoken
encoding = tiktoken.get_encoding("o200k_base")
print(json.dumps([len(encoding.encode_ordinary(t)) for t in json.load(sys.stdin)]))
"""
_ESCAPED = ['He said "no".', "line one\nline two", "café naïve résumé", 'a\\b "q"', "ok"]
_WRITERS: dict[str, Callable[[object], str]] = {
    "mock (spaced, UTF-8)": lambda o: json.dumps(o, ensure_ascii=False),
    "spaced, \\u escapes": json.dumps,
    "compact, UTF-8": lambda o: json.dumps(o, ensure_ascii=False, separators=(",", ":")),
    "indented (2 spaces), UTF-8": lambda o: json.dumps(o, ensure_ascii=False, indent=2),
}


def _o200k(python: str, texts: list[str]) -> list[int] | None:
    if available(python) is None:
        return None
    cache = Path(python).absolute().parent.parent / "tiktoken-cache"
    env = {"TIKTOKEN_CACHE_DIR": str(cache), "PYTHONPATH": str(HERE), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [python, "-c", _TIKTOKEN],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiktoken-python", default=DEFAULT_PYTHON)
    parser.add_argument("--output", default=str(HERE / "PACKING_OVERHEAD.md"))
    args = parser.parse_args(argv)
    mock_answers = [
        expected_answer("gpt-test", "Be brief.", f"Review #{i}: it leaks.", {}) for i in range(64)
    ]
    cases = []  # (per_row, answers kind, rows, writer, cut answers, pack text)
    for per_row in (5, 10):
        for kind, texts in (("mock answers", mock_answers), ("quotes, newlines, accents", _ESCAPED * 13)):
            for rows in (1, 8, 64):
                cut = [truncate_text(t, per_row) for t in texts[:rows]]
                for writer, dumps in _WRITERS.items():
                    pack = dumps({"items": [{"id": str(i + 1), "answer": c} for i, c in enumerate(cut)]})
                    cases.append((per_row, kind, rows, writer, cut, pack))
    texts = [t for case in cases for t in (*case[4], case[5])]
    o200k = _o200k(args.tiktoken_python, texts)
    counts = iter(o200k or [])
    lines = [
        "| per-row max_tokens | answers | rows | written | mock: needed/row | room/row | cut? | cut with 16? "
        "| o200k: needed/row | room/row | cut? | cut with 16? |",
        "|---:|---|---:|---|---:|---:|---|---|---:|---:|---|---|",
    ]
    worst = {"mock": 0.0, "o200k": 0.0}
    old_cuts = {"mock": 0, "o200k": 0}

    def judged(name: str, per_row: int, rows: int, alone: list[int], whole: int) -> str:
        room = (pack_max_tokens(per_row, rows) - sum(alone)) / rows
        old = (rows * (per_row + 16) - sum(alone)) / rows  # the value before this measurement
        needed = (whole - sum(alone)) / rows
        worst[name] = max(worst[name], needed - room)
        old_cuts[name] += needed > old
        cut, cut_before = ("CUT" if needed > room else "no"), ("CUT" if needed > old else "no")
        return f"| {needed:.1f} | {room:.1f} | {cut} | {cut_before} "

    for per_row, kind, rows, writer, cut, pack in cases:
        row = f"| {per_row} | {kind} | {rows} | {writer} "
        row += judged("mock", per_row, rows, [count_text(c) for c in cut], count_text(pack))
        if o200k is not None:
            alone = [next(counts) for _ in cut]
            row += judged("o200k", per_row, rows, alone, next(counts)) + "|"
        else:
            row += "| - | - | - | - |"
        lines.append(row)
    head = [
        "# What a pack's answer adds per row (issue 23 item 3)",
        "",
        "Command: `python benchmarks/packing_overhead.py`  ",
        f"Git: `{git_revision()}`  ",
        f"ITEM_ANSWER_OVERHEAD = {ITEM_ANSWER_OVERHEAD}, PACK_ANSWER_OVERHEAD = {PACK_ANSWER_OVERHEAD}: "
        f"a pack's max_tokens is rows x (per-row max_tokens + {ITEM_ANSWER_OVERHEAD}) + "
        f"{PACK_ANSWER_OVERHEAD} (before: rows x (per-row + 16)). "
        "`room/row` is what that leaves each row beyond its own answer's tokens, `needed/row` what the "
        "pack's JSON takes beyond them; `CUT` where a pack would stop at max_tokens although every row "
        "asked alone fitted. o200k_base: "
        + ("tiktoken (bpe-openai's encoding file)." if o200k is not None else "not available here."),
        "",
        f"Largest shortfall per row: mock {worst['mock']:.1f}, o200k {worst['o200k']:.1f} "
        f"(<= 0: no pack is cut). With 16 and no frame: {old_cuts['mock']} of {len(cases)} packs cut "
        f"as the mock counts, {old_cuts['o200k']} in o200k_base.",
        "",
    ]
    Path(args.output).write_text("\n".join([*head, *lines, ""]))
    print("\n".join([*head, *lines]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
