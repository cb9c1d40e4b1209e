"""Benchmark: rows_per_request (issue 23), packed rows beside one row per request, in one run.

The mock server runs in a child process over TLS (Azure URL form), 200 ms per request; the client
is ``query_async_limited(max_concurrency=64)`` in this process, with a system prompt of about 300
tokens and short rows (one review line each). Scenarios, each with the same rows:

* ``clean``: no server limit. One row per request is bound to 64 / 0.2 s = 320 rows/s.
* ``cap-100rps``: the server admits 100 requests per second (more get a 429 with
  ``retry-after-ms``), which the client is not told: the adaptive rate finds it.
* ``faults``: 3 % of the rows' prompts fail their first request (500, 429, reset, malformed body:
  inside a pack, one such item fails the whole pack once) and 0.5 % are content-filtered (a 400 on
  every request that carries them), no cap.

Measured per run: wall time, rows/s of rows answered with their own answer (checked against the
mock's ``expected_answer``), misplaced answers (another row's), errors by code, the requests and
429s the server saw, and the prompt tokens it counted per row; rows lost (neither an answer nor an
error of their own). openaivec (the issue's anchor) runs beside them against the same server, on
its Responses API, in its own virtualenv (:mod:`packing_openaivec`); without it, it is left out and
the report says why.

Run: ``.venv/bin/python benchmarks/packing.py [--rows 3000] [--latency-ms 200] [--concurrency 64]
[--openaivec-python /work/venv-oaivec/bin/python]``. Writes ``benchmarks/PACKING.md`` (the table,
the command, the git SHA and the raw JSON) and ``benchmarks/packing.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for _path in (ROOT, HERE):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from packing_chart import chart  # noqa: E402
from packing_openaivec import DEFAULT_PYTHON, available, run_openaivec  # noqa: E402
from run import API_VERSION, DEPLOYMENT, KEY, git_revision, machine_info  # noqa: E402

from airflow_provider_llmq.core.endpoint.endpoint import EndpointConfig  # noqa: E402
from airflow_provider_llmq.core.methods import query_async_limited  # noqa: E402
from airflow_provider_llmq.testing.mock_server import MockConfig, MockServerProcess, expected_answer  # noqa: E402
from airflow_provider_llmq.testing.mock_server.faults import planned_fault  # noqa: E402
from airflow_provider_llmq.testing.mock_server.tokens import count_text  # noqa: E402

_RULES = (
    "Classify the sentiment of one customer review of a kitchen appliance as positive, neutral or "
    "negative. Read the whole review before you decide. Sarcasm counts as negative. A review that "
    "only describes delivery, packaging or the seller, not the product, is neutral. Mixed reviews "
    "take the sentiment of their final sentence. Ignore star ratings quoted in the text. "
)


def system_prompt(tokens: int = 300) -> str:
    """A system prompt of about ``tokens`` tokens as the mock server counts them."""
    text = ""
    while count_text(text) < tokens:
        text += _RULES
    words = text.split(" ")
    while count_text(" ".join(words)) > tokens:
        words.pop()
    return " ".join(words)


SCENARIOS: dict[str, dict[str, Any]] = {
    "clean": {},
    "cap-100rps": {"rps": 100, "retry_after_ms": 200},
    "faults": {
        "fault_rate": 0.03,
        "fault_kinds": ["500", "429", "reset", "malformed"],
        "content_filter_rate": 0.005,
        "retry_after_ms": 50,
        "seed": 23,
    },
}
OPENAIVEC = "openaivec, automatic batch size"
PACKINGS: dict[str, int | str] = {
    "one row per request": 1,
    'rows_per_request="auto"': "auto",
    OPENAIVEC: "openaivec",
}


@dataclass
class Measurement:
    scenario: str
    packing: str
    rows: int
    seconds: float = 0.0
    right: int = 0
    misplaced: int = 0
    lost: int = 0  # rows that came back with neither an answer nor an error of their own
    errors_by_code: dict[str, int] = field(default_factory=dict)
    filtered_planned: int = 0
    filtered_as_own_error: int = 0
    requests: int = 0
    throttled: int = 0
    prompt_tokens: int = 0
    run_error: str | None = None  # what ended a run early (openaivec stops at its first failure)

    @property
    def rows_per_s(self) -> float:
        return self.right / self.seconds if self.seconds else 0.0

    @property
    def prompt_tokens_per_row(self) -> float:
        return self.prompt_tokens / self.rows if self.rows else 0.0


def run_one(server: MockServerProcess, scenario: str, packing: str, args: argparse.Namespace) -> Measurement:
    server.configure(**{**asdict(MockConfig(api_key=KEY, latency_ms=args.latency_ms)), **SCENARIOS[scenario]})
    server.reset()
    system = system_prompt()
    tag = f"{scenario}/{packing}"
    rows = [
        (i, f"[{tag}] Review #{i}: the kettle {'boils fast' if i % 3 else 'leaks'}.")
        for i in range(args.rows)
    ]
    config = MockConfig(**{"latency_ms": args.latency_ms, **SCENARIOS[scenario]})
    filtered = {i for i, p in rows if planned_fault(p, config) == "content_filter"}
    endpoint = EndpointConfig(
        api_base=server.base_url,
        api_key=KEY,
        api_type="azure",
        model=DEPLOYMENT,
        api_version=API_VERSION,
        ca_cert=server.ca_path,
        timeout=60.0,
    )
    if packing == OPENAIVEC:
        spec = {
            "base_url": f"{server.base_url}/openai/v1",  # Azure's v1 API: openaivec's AsyncOpenAI form
            "key": KEY,
            "ca": server.ca_path,
            "model": DEPLOYMENT,
            "system": system,
            "prompts": [p for _, p in rows],
            "concurrency": args.concurrency,
        }
        child = run_openaivec(args.openaivec_python, spec)
        seconds, answers = float(child["seconds"]), child["answers"]
        outcomes = [] if answers is None else [(i, a, None) for (i, _), a in zip(rows, answers, strict=True)]
        run_error = child["error"]
    else:
        started = time.perf_counter()
        results = list(
            query_async_limited(
                endpoint,
                rows,
                max_concurrency=args.concurrency,
                system_prompt=system,
                rows_per_request=PACKINGS[packing],
                retry_backoff=0.05,
            )
        )
        seconds = time.perf_counter() - started
        outcomes = [
            (r.row_id, r.response if r.ok else None, None if r.ok else r.error_code or "?") for r in results
        ]
        run_error = None
    stats = server.stats()
    m = Measurement(scenario, packing, len(rows), seconds=round(seconds, 3), run_error=run_error)
    answers_of = {expected_answer(DEPLOYMENT, system, p, {}): i for i, p in rows}
    prompts = dict(rows)
    seen = Counter(i for i, _, _ in outcomes)
    codes: Counter[str] = Counter()
    for row_id, response, code in outcomes:
        if code is not None:
            codes[code] += 1
            if row_id in filtered and code == "content_filter":
                m.filtered_as_own_error += 1
        elif response is None:
            m.lost += 1
        elif response == expected_answer(DEPLOYMENT, system, prompts[row_id], {}):
            m.right += 1
        elif answers_of.get(response) is not None:
            m.misplaced += 1
        else:
            codes["wrong_answer"] += 1
    m.lost += sum(1 for i in prompts if seen[i] == 0) + sum(n - 1 for n in seen.values() if n > 1)
    m.errors_by_code = dict(+codes)
    m.filtered_planned = len(filtered)
    m.requests = int(stats["chat_requests"])
    m.throttled = int(stats["requests_by_status"].get("429", 0))
    m.prompt_tokens = int(stats["prompt_tokens_total"])
    return m


def table(ms: list[Measurement]) -> str:
    lines = [
        "| scenario | packing | rows/s | vs unpacked | prompt tokens/row | vs unpacked | requests | 429s "
        "| right | misplaced | lost | errors | filtered rows: own error |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    base = {m.scenario: m for m in ms if m.packing == "one row per request"}
    for m in ms:
        ref = base[m.scenario]
        speed = f"{m.rows_per_s / ref.rows_per_s:.1f}x" if ref.rows_per_s else "-"
        tokens = (
            f"{ref.prompt_tokens_per_row / m.prompt_tokens_per_row:.1f}x fewer"
            if m.prompt_tokens and m.right  # a run that answered nothing saved nothing
            else "-"
        )
        errors = ", ".join(f"{k} {v}" for k, v in sorted(m.errors_by_code.items())) or "0"
        lines.append(
            f"| {m.scenario} | {m.packing} | {m.rows_per_s:.0f} | {speed} | {m.prompt_tokens_per_row:.1f} "
            f"| {tokens} | {m.requests} | {m.throttled} | {m.right}/{m.rows} | {m.misplaced} | {m.lost} "
            f"| {errors} | {m.filtered_as_own_error}/{m.filtered_planned} |"
        )
    return "\n".join(lines)


def verdicts(ms: list[Measurement]) -> list[str]:
    by = {(m.scenario, m.packing): m for m in ms}
    auto = 'rows_per_request="auto"'
    one = "one row per request"
    cap_p, cap_u = by[("cap-100rps", auto)], by[("cap-100rps", one)]
    speed = cap_p.rows_per_s / cap_u.rows_per_s if cap_u.rows_per_s else 0.0
    tokens = cap_u.prompt_tokens_per_row / cap_p.prompt_tokens_per_row if cap_p.prompt_tokens else 0.0
    faults = by[("faults", auto)]
    cap_ok = "PASS" if speed >= 8 and cap_p.right == cap_p.rows else "FAIL"
    unfiltered = faults.rows - faults.filtered_planned
    out = [
        f"- against the 100 requests/s cap: packed {speed:.1f}x the rows/s of unpacked (target >= 8x), "
        f"{cap_p.right}/{cap_p.rows} answered: {cap_ok}",
        f"- prompt tokens per row: {tokens:.1f}x fewer (target >= 4x): {'PASS' if tokens >= 4 else 'FAIL'}",
        f"- faults in packs: {faults.right} of {unfiltered} unfiltered rows answered, "
        f"{faults.filtered_as_own_error}/{faults.filtered_planned} filtered rows their own "
        f"content_filter error, {faults.misplaced} misplaced: "
        + (
            "PASS"
            if faults.right == faults.rows - faults.filtered_planned
            and faults.filtered_as_own_error == faults.filtered_planned
            and faults.misplaced == 0
            and faults.lost == 0
            else "FAIL"
        ),
    ]
    for m in ms:
        if m.packing == OPENAIVEC:
            ended = f"its run ended with `{m.run_error}`" if m.run_error else "it answered every row"
            out.append(
                f"- openaivec, {m.scenario}: {m.right}/{m.rows} rows answered in {m.requests} requests, "
                f"{m.lost} lost, {m.misplaced} misplaced; {ended}"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--latency-ms", type=float, default=200.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output", default=str(HERE / "PACKING.md"))
    parser.add_argument("--openaivec-python", default=DEFAULT_PYTHON, help="a Python with openaivec")
    args = parser.parse_args(argv)
    os.environ.setdefault("LLMQ_BENCH_API_KEY", KEY)
    info = machine_info()
    revision = git_revision()
    openaivec = available(args.openaivec_python)
    info["openaivec"] = openaivec or f"not importable under {args.openaivec_python}: not measured"
    packings = [p for p in PACKINGS if openaivec or p != OPENAIVEC]
    ms: list[Measurement] = []
    with MockServerProcess(MockConfig(api_key=KEY)) as server:
        for scenario in SCENARIOS:
            for packing in packings:
                m = run_one(server, scenario, packing, args)
                print(
                    f"{scenario:12} {packing:32} {m.rows_per_s:7.0f} rows/s  "
                    f"{m.prompt_tokens_per_row:6.1f} tok/row  "
                    f"{m.requests} requests, {m.right}/{m.rows} right, {m.lost} lost, errors "
                    f"{m.errors_by_code} {m.run_error or ''}",
                    flush=True,
                )
                ms.append(m)
    raw = {
        "args": vars(args),
        "git": revision,
        "machine": info,
        "measurements": [
            {
                **asdict(m),
                "rows_per_s": round(m.rows_per_s, 1),
                "prompt_tokens_per_row": round(m.prompt_tokens_per_row, 2),
            }
            for m in ms
        ],
    }
    command = "python benchmarks/packing.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report = "\n".join(
        [
            "# Packing rows (`rows_per_request`, issue 23): packed vs one row per request",
            "",
            f"Command: `{command.strip()}`  ",
            f"Git: `{revision}`  ",
            f"Machine: {info['cores']}; load average at start {info['load average at start']}; "
            f"{info['python']}",
            "",
            f"{args.rows} rows per run, {args.latency_ms:g} ms per request, "
            f"`query_async_limited(max_concurrency={args.concurrency})`, a system prompt of "
            f"{count_text(system_prompt())} tokens (as the mock counts), short rows (one review line). "
            "Mock server in a child process over TLS. `rows/s` counts rows answered with their own "
            "answer; `lost` rows came back with neither an answer nor an error of their own. "
            + (
                f"openaivec {openaivec} (`Series.aio.responses(system, batch_size=None, "
                f"max_concurrency={args.concurrency})`, its automatic batch size, the SDK's default "
                "retries) runs in its own virtualenv against the same server's Responses API on "
                "Azure's v1 path (benchmarks/packing_openaivec.py)."
                if openaivec
                else f"openaivec is not measured: it is not importable under {args.openaivec_python} "
                "(see benchmarks/packing_openaivec.py for the virtualenv it needs)."
            ),
            "",
            table(ms),
            "",
            "![rows/s and rows answered per scenario](packing.png)",
            "",
            *verdicts(ms),
            "",
            "## Raw JSON",
            "",
            "```json",
            json.dumps(raw, indent=1),
            "```",
            "",
        ]
    )
    from packing_batch import kept_section  # its Batch API section is measured by packing_batch.py

    kept = kept_section(Path(args.output))
    Path(args.output).write_text(report if kept is None else f"{report}\n{kept}\n")
    chart(ms, Path(args.output).with_name("packing.png"))
    print(table(ms))
    print("\n".join(verdicts(ms)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
