"""The mock OpenAI / Azure server over real TLS sockets: answers, faults, limits, counters, runners.

Note: ``requests`` lets ``REQUESTS_CA_BUNDLE`` override ``Session.verify``, so every call here passes
``verify=`` explicitly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from typing import Any

import pytest
import requests

from airflow_provider_llmq.testing.mock_server import (
    MockConfig,
    MockServer,
    MockServerProcess,
    expected_answer,
    plan,
    planned_fault,
)
from airflow_provider_llmq.testing.mock_server.tokens import count_messages, count_text

KEY = "test-key"
DEP = "gpt-test"
_DEFAULTS = {f.name: getattr(MockConfig(), f.name) for f in fields(MockConfig) if f.name != "api_key"}


@pytest.fixture(scope="module")
def _server() -> Iterator[MockServer]:
    with MockServer(MockConfig(api_key=KEY), tls=True) as srv:
        yield srv


@pytest.fixture
def srv(_server: MockServer) -> Iterator[MockServer]:
    """One server per module (cert generation is the slow part); each test starts from zero."""
    _server.configure(**_DEFAULTS)
    deadline = time.monotonic() + 5  # a handler whose client timed out may still be sleeping
    while _server.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    _server.reset()
    yield _server
    _server.configure(**_DEFAULTS)


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def azure(
    srv: MockServer,
    http: requests.Session,
    prompt: str,
    system: str | None = None,
    key: str = KEY,
    deployment: str = DEP,
    timeout: float = 10,
    **params: Any,
) -> requests.Response:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return http.post(
        srv.azure_chat_url(deployment),
        json={"messages": messages, **params},
        headers={"api-key": key},
        verify=srv.ca_path,
        timeout=timeout,
    )


def openai(
    srv: MockServer,
    http: requests.Session,
    prompt: str,
    model: str = "gpt-4o-mini",
    key: str = KEY,
    **params: Any,
) -> requests.Response:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **params}
    return http.post(
        srv.openai_base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        verify=srv.ca_path,
        timeout=10,
    )


def test_answer_shape_on_both_routes(srv: MockServer, http: requests.Session) -> None:
    r = azure(srv, http, "What is 2+2?", system="Be brief.", temperature=0, max_tokens=50)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == DEP
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["message"]["role"] == "assistant"
    answer = choice["message"]["content"]
    assert answer == expected_answer(DEP, "Be brief.", "What is 2+2?", {"temperature": 0, "max_tokens": 50})
    usage = body["usage"]
    # word/punctuation tokens (tokens.py): Be brief . | What is 2 + 2 ? ; 3 per message + 3 priming
    assert usage["prompt_tokens"] == 3 + 6 + 3 * 3 == count_messages(["Be brief.", "What is 2+2?"])
    assert usage["completion_tokens"] == count_text(answer)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    r2 = openai(srv, http, "What is 2+2?", model="gpt-4o-mini")
    assert r2.status_code == 200
    answer2 = r2.json()["choices"][0]["message"]["content"]
    assert answer2 == expected_answer("gpt-4o-mini", None, "What is 2+2?")
    # the bare /chat/completions route is the OpenAI form too
    r3 = http.post(
        srv.base_url + "/chat/completions",
        verify=srv.ca_path,
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": "m", "messages": [{"role": "user", "content": "q"}], "stream": False},
    )
    assert r3.json()["choices"][0]["message"]["content"] == expected_answer("m", None, "q", None)
    stats = srv.stats()
    assert stats["requests_by_status"] == {"200": 3}
    assert stats["prompt_tokens_total"] == usage["prompt_tokens"] + count_messages(
        ["What is 2+2?"]
    ) + count_messages(["q"])
    assert stats["completion_tokens_total"] == count_text(answer) + count_text(answer2) + count_text(
        r3.json()["choices"][0]["message"]["content"]
    )


def test_system_prompt_params_and_last_user_message_decide_the_answer(
    srv: MockServer, http: requests.Session
) -> None:
    base = azure(srv, http, "p").json()["choices"][0]["message"]["content"]
    with_system = azure(srv, http, "p", system="S").json()["choices"][0]["message"]["content"]
    with_params = azure(srv, http, "p", temperature=0.5).json()["choices"][0]["message"]["content"]
    other_dep = azure(srv, http, "p", deployment="other").json()["choices"][0]["message"]["content"]
    assert len({base, with_system, with_params, other_dep}) == 4
    assert expected_answer(DEP, None, "p", None) == expected_answer(DEP, None, "p", {}) == base
    body = {
        "messages": [
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "last"},
        ]
    }
    r = http.post(srv.azure_chat_url(DEP), json=body, headers={"api-key": KEY}, verify=srv.ca_path)
    assert r.json()["choices"][0]["message"]["content"] == expected_answer(DEP, None, "last")


def test_wrong_or_missing_key_is_401_without_echoing_it(srv: MockServer, http: requests.Session) -> None:
    responses = [
        azure(srv, http, "k", key="wrong-secret"),
        openai(srv, http, "k", key="wrong-secret"),
        http.post(
            srv.azure_chat_url(DEP), json={"messages": [{"role": "user", "content": "k"}]}, verify=srv.ca_path
        ),
        # the OpenAI header on the Azure route is a client bug: rejected
        http.post(
            srv.azure_chat_url(DEP),
            json={"messages": [{"role": "user", "content": "k"}]},
            headers={"Authorization": f"Bearer {KEY}"},
            verify=srv.ca_path,
        ),
        http.get(
            srv.openai_base_url + "/models", headers={"Authorization": "Bearer nope"}, verify=srv.ca_path
        ),
    ]
    for r in responses:
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "wrong-secret" not in r.text and KEY not in r.text
    assert srv.stats()["auth_failures"] == len(responses)


def test_models_routes_and_api_version(srv: MockServer, http: requests.Session) -> None:
    r = http.get(
        srv.base_url + "/openai/models?api-version=2024-02-01", headers={"api-key": KEY}, verify=srv.ca_path
    )
    assert r.status_code == 200 and r.json()["object"] == "list"
    for path in ("/v1/models", "/models"):
        assert (
            http.get(
                srv.base_url + path, headers={"Authorization": f"Bearer {KEY}"}, verify=srv.ca_path
            ).status_code
            == 200
        )
    no_version = http.post(
        srv.base_url + f"/openai/deployments/{DEP}/chat/completions",
        headers={"api-key": KEY},
        json={"messages": [{"role": "user", "content": "v"}]},
        verify=srv.ca_path,
    )
    assert no_version.status_code == 400 and no_version.json()["error"]["code"] == "invalid_api_version"
    bad_body = http.post(
        srv.azure_chat_url(DEP), data=b"not json", headers={"api-key": KEY}, verify=srv.ca_path
    )
    assert bad_body.status_code == 400
    assert srv.stats()["chat_requests"] == 2


def test_unknown_deployment_is_404(srv: MockServer, http: requests.Session) -> None:
    srv.configure(deployments=[DEP])
    assert azure(srv, http, "d").status_code == 200
    r = azure(srv, http, "d", deployment="nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "DeploymentNotFound"


def test_500x2_then_success_on_attempt_3(srv: MockServer, http: requests.Session) -> None:
    prompt = "flaky [[500x2]]"
    codes = [azure(srv, http, prompt).status_code for _ in range(3)]
    assert codes == [500, 500, 200]
    assert srv.attempts_for(prompt) == 3
    srv.reset()  # attempt numbers start over
    assert azure(srv, http, prompt).status_code == 500


@pytest.mark.parametrize(
    ("marker", "status", "failures"), [("503x1", 503, 1), ("408", 408, 1), ("409", 409, 1), ("502x3", 502, 3)]
)
def test_status_markers(
    srv: MockServer, http: requests.Session, marker: str, status: int, failures: int
) -> None:
    prompt = f"m [[{marker}]]"
    codes = [azure(srv, http, prompt).status_code for _ in range(failures + 1)]
    assert codes == [status] * failures + [200]


def test_429_markers_and_headers(srv: MockServer, http: requests.Session) -> None:
    r = azure(srv, http, "r [[429x2]]")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1" and r.headers["retry-after-ms"] == "200"
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    assert azure(srv, http, "r [[429x2]]").status_code == 429
    assert azure(srv, http, "r [[429x2]]").status_code == 200
    r = azure(srv, http, "r [[429:ms=300]]")
    assert r.headers["retry-after-ms"] == "300" and r.headers["Retry-After"] == "1"
    r = azure(srv, http, "r [[429:s=86400x99]]")
    assert r.headers["Retry-After"] == "86400" and "retry-after-ms" not in r.headers
    assert plan("[[429:s=86400x99]]", 99, srv.config)[1] is not None
    assert plan("[[429:s=86400x99]]", 100, srv.config)[1] is None


def test_reset_closes_connection_without_answer(srv: MockServer, http: requests.Session) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        azure(srv, http, "boom [[reset]]")
    assert azure(srv, http, "boom [[reset]]").status_code == 200
    assert srv.stats()["requests_by_status"] == {"reset": 1, "200": 1}


def test_malformed_and_empty_bodies(srv: MockServer, http: requests.Session) -> None:
    r = azure(srv, http, "x [[malformed]]")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    with pytest.raises(ValueError):
        json.loads(r.text)
    r = azure(srv, http, "x [[empty]]")
    assert r.status_code == 200 and r.json()["choices"] == []
    assert azure(srv, http, "x [[empty]]").json()["choices"][0]["message"]["content"].startswith("answer:")


def test_slow_marker_delays_every_attempt_and_triggers_client_timeouts(
    srv: MockServer, http: requests.Session
) -> None:
    for _ in range(2):
        t0 = time.monotonic()
        assert azure(srv, http, "s [[slow:150]]").status_code == 200
        assert time.monotonic() - t0 >= 0.15
    with pytest.raises(requests.exceptions.Timeout):
        azure(srv, http, "s [[slow:1000]]", timeout=0.3)


@pytest.mark.parametrize(
    ("marker", "code"), [("content_filter", "content_filter"), ("context_length", "context_length_exceeded")]
)
def test_permanent_400_markers(srv: MockServer, http: requests.Session, marker: str, code: str) -> None:
    for _ in range(3):  # never recovers: a client must not retry these
        r = azure(srv, http, f"bad [[{marker}]]")
        assert r.status_code == 400 and r.json()["error"]["code"] == code
    if marker == "content_filter":
        assert r.json()["error"]["innererror"]["code"] == "ResponsibleAIPolicyViolation"


def test_header_markers_replace_the_wait_headers(srv: MockServer, http: requests.Session) -> None:
    r = azure(srv, http, "h [[429x3]] [[retry-after=0]]")
    assert r.status_code == 429 and r.headers["Retry-After"] == "0" and "retry-after-ms" not in r.headers
    r = azure(srv, http, "h2 [[429]] [[retry-after-ms=-250]]")
    assert r.headers["retry-after-ms"] == "-250" and "Retry-After" not in r.headers
    r = azure(srv, http, "h3 [[503]] [[retry-after=Wed, 21 Oct 2015 07:28:00 GMT]] [[x-should-retry=false]]")
    assert r.status_code == 503 and r.headers["Retry-After"] == "Wed, 21 Oct 2015 07:28:00 GMT"
    assert r.headers["x-should-retry"] == "false"
    r = azure(srv, http, "h4 [[400x1]] [[x-should-retry=true]]")
    assert r.status_code == 400 and r.headers["x-should-retry"] == "true"
    assert azure(srv, http, "h4 [[400x1]] [[x-should-retry=true]]").status_code == 200


def test_redirect_quota_and_echo_markers(srv: MockServer, http: requests.Session) -> None:
    r = http.post(
        srv.azure_chat_url(DEP),
        json={"messages": [{"role": "user", "content": "r [[redirect]]"}]},
        headers={"api-key": KEY},
        verify=srv.ca_path,
        allow_redirects=False,
    )
    assert r.status_code == 307 and r.headers["Location"].startswith("/")
    srv.configure(redirect_url="http://127.0.0.1:9/elsewhere")
    r = http.post(
        srv.azure_chat_url(DEP),
        json={"messages": [{"role": "user", "content": "r [[redirect]]"}]},
        headers={"api-key": KEY},
        verify=srv.ca_path,
        allow_redirects=False,
    )
    assert r.headers["Location"] == "http://127.0.0.1:9/elsewhere"
    for _ in range(2):  # permanent
        r = azure(srv, http, "q [[quota]]")
        assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
        assert r.json()["error"]["type"] == "insufficient_quota" and "Retry-After" not in r.headers
    r = http.post(
        srv.azure_chat_url(DEP),
        json={"messages": [{"role": "user", "content": "e [[echo:404]]"}]},
        headers={"api-key": KEY, "X-Sub": "sub-value"},
        verify=srv.ca_path,
    )
    assert r.status_code == 404 and "sub-value" in r.json()["error"]["code"] and KEY in r.text


@pytest.mark.parametrize(
    ("marker", "content", "finish", "extra"),
    [
        ("filtered", "", "content_filter", None),
        ("tool_calls", None, "tool_calls", "tool_calls"),
        ("refusal", None, "stop", "refusal"),
        ("length", "", "length", None),
        ("length_text", "ANSWER", "length", None),
        ("parts", "PARTS", "stop", None),
    ],
)
def test_200_shape_markers(
    srv: MockServer, http: requests.Session, marker: str, content: Any, finish: str, extra: str | None
) -> None:
    prompt = f"s [[{marker}]]"
    for _ in range(2):  # every attempt: a client must not retry them
        r = azure(srv, http, prompt)
        assert r.status_code == 200
        choice = r.json()["choices"][0]
        message = choice["message"]
        answer = expected_answer(DEP, None, prompt)
        if content == "ANSWER":
            assert message["content"] == answer
        elif content == "PARTS":
            assert [p["type"] for p in message["content"]] == ["text", "text"]
            assert "".join(p["text"] for p in message["content"]) == answer
        else:
            assert message["content"] == content
        assert choice["finish_reason"] == finish and r.json()["usage"]["prompt_tokens"] > 0
        if extra:
            assert message[extra]


def test_drip_marker_trickles_the_normal_answer(srv: MockServer, http: requests.Session) -> None:
    started = time.monotonic()
    r = azure(srv, http, "d [[drip:2]]", timeout=0.5)  # every read is quick: no per-read timeout fires
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == expected_answer(DEP, None, "d [[drip:2]]")
    assert elapsed >= len(r.content) * 0.002 > 0.5


def test_rps_limit_answers_429_with_retry_after_ms(srv: MockServer, http: requests.Session) -> None:
    srv.configure(rps=5)
    responses = [azure(srv, http, f"rps {i}") for i in range(25)]
    limited = [r for r in responses if r.status_code == 429]
    ok = [r for r in responses if r.status_code == 200]
    stats = srv.stats()
    assert limited and len(ok) <= 5 * len(stats["per_second_counts"])
    for r in limited:
        assert r.headers["Retry-After"] == "1" and 1 <= int(r.headers["retry-after-ms"]) <= 1000
    assert 1 <= stats["max_per_second"] <= 5


def test_max_in_flight_and_concurrency_limit(srv: MockServer, http: requests.Session) -> None:
    srv.configure(latency_ms=500)  # long enough for 8 threads to open TLS connections meanwhile

    def one(i: int) -> requests.Response:
        with requests.Session() as s:
            return azure(srv, s, f"conc {i}")

    with ThreadPoolExecutor(8) as pool:
        assert all(r.status_code == 200 for r in pool.map(one, range(8)))
    assert srv.stats()["max_in_flight"] == 8

    srv.reset()
    srv.configure(max_concurrency=3)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(one, range(8)))
    limited = [r for r in responses if r.status_code == 429]
    assert len(limited) == 5 and all(r.headers["retry-after-ms"] == "50" for r in limited)
    assert srv.stats()["max_in_flight"] == 3


def test_key_in_url_is_counted(srv: MockServer, http: requests.Session) -> None:
    assert azure(srv, http, "u").status_code == 200
    assert srv.stats()["keys_in_url"] == 0
    http.post(
        srv.azure_chat_url(DEP) + f"&api-key={KEY}",
        json={"messages": [{"role": "user", "content": "u"}]},
        headers={"api-key": KEY},
        verify=srv.ca_path,
    )
    assert srv.stats()["keys_in_url"] == 1


def test_auth_fail_after_n_then_recovers(srv: MockServer, http: requests.Session) -> None:
    srv.configure(auth_fail={"after": 2, "count": 2})
    codes = [azure(srv, http, f"af {i}").status_code for i in range(6)]
    assert codes == [200, 200, 401, 401, 200, 200]
    assert srv.stats()["auth_failures"] == 2


def test_fault_rate_is_deterministic_and_planned_fault_agrees(
    srv: MockServer, http: requests.Session
) -> None:
    changes = {
        "seed": 7,
        "fault_rate": 0.4,
        "content_filter_rate": 0.1,
        "slow_rate": 0.1,
        "slow_ms": 1.0,
        "fault_kinds": ["500", "429", "reset", "malformed", "empty"],
    }
    srv.configure(**changes)
    cfg = MockConfig(api_key=KEY, **changes)
    prompts = [f"row {i}" for i in range(80)]
    planned = {p: planned_fault(p, cfg) for p in prompts}
    kinds = set(planned.values())
    assert {"content_filter", "500", "429", "reset", "malformed", "slow", None} <= kinds
    for p in prompts:
        try:
            r = azure(srv, http, p)
        except requests.exceptions.ConnectionError:
            assert planned[p] == "reset"
            continue
        kind = planned[p]
        if kind == "content_filter":
            assert r.status_code == 400 and r.json()["error"]["code"] == "content_filter"
        elif kind in ("500", "429"):
            assert r.status_code == int(kind)
        elif kind == "malformed":
            assert r.status_code == 200 and r.text == '{"choices": ['
        elif kind == "empty":
            assert r.json()["choices"] == []
        else:
            assert r.json()["choices"][0]["message"]["content"] == expected_answer(DEP, None, p)
    # second attempt: only the permanent content filter still fails
    second = [azure(srv, http, p).status_code for p in prompts]
    assert [c == 400 for c in second] == [planned[p] == "content_filter" for p in prompts]
    other_seed = MockConfig(api_key=KEY, **{**changes, "seed": 8})
    assert [planned_fault(p, other_seed) for p in prompts] != list(planned.values())


def test_noise_refuses_a_share_of_every_request_on_top_of_a_quota(
    srv: MockServer, http: requests.Session
) -> None:
    srv.configure(
        seed=3,
        noise={"429": 0.1, "429_no_hint": 0.1, "503": 0.1},
        quota={"kind": "token_bucket", "rate": 1000},
    )
    cfg = MockConfig(api_key=KEY, seed=3, noise={"429": 0.1, "429_no_hint": 0.1, "503": 0.1})
    seen: dict[str, int] = {}
    for i in range(200):
        prompt = f"noisy {i}"
        _, fault = plan(prompt, 1, cfg)
        r = azure(srv, http, prompt)
        kind = "ok" if r.status_code == 200 else str(r.status_code)
        if r.status_code == 429:
            kind += "+hint" if "retry-after-ms" in r.headers else ""
            assert (
                "Retry-After" in r.headers
                if "retry-after-ms" in r.headers
                else "Retry-After" not in r.headers
            )
        seen[kind] = seen.get(kind, 0) + 1
        # the draw is the planned one, per request: a second attempt draws again
        assert (fault is None) == (r.status_code == 200)
    assert set(seen) == {"ok", "429+hint", "429", "503"}
    assert 100 <= seen["ok"] <= 180  # 70 % expected
    assert srv.stats()["quota"]["throttled"] == 0  # admitted by the quota, refused by the noise
    with pytest.raises(ValueError, match="noise"):
        MockConfig(noise={"explode": 0.1})
    with pytest.raises(ValueError, match="add up"):
        MockConfig(noise={"429": 0.6, "500": 0.6})


def test_config_validation(srv: MockServer, http: requests.Session) -> None:
    with pytest.raises(ValueError):
        srv.configure(not_a_field=1)
    with pytest.raises(ValueError):
        MockConfig(fault_kinds=["explode"])
    r = http.post(srv.base_url + "/_mock/config", json={"latency_ms": 1}, verify=srv.ca_path)
    assert r.status_code == 200 and r.json()["latency_ms"] == 1 and "api_key" not in r.json()
    bad = http.post(srv.base_url + "/_mock/config", json={"fault_rate": 2}, verify=srv.ca_path)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_config"
    assert srv.config.fault_rate == 0.0


def test_quota_token_bucket_refuses_with_its_hint_before_the_fault_plan(
    srv: MockServer, http: requests.Session
) -> None:
    srv.configure(quota={"kind": "token_bucket", "rate": 2, "burst": 3})
    codes = [azure(srv, http, f"bucket {i} [[500]]").status_code for i in range(6)]
    # the burst of 3 is admitted (and meets its planned 500), the rest is refused fast
    assert codes[:3] == [500, 500, 500] and codes[3:] == [429, 429, 429]
    refused = azure(srv, http, "bucket refused")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(refused.headers["retry-after-ms"]) <= 500 and "Retry-After" not in refused.headers
    stats = srv.stats()
    assert stats["quota"]["throttled"] == 4 and stats["quota"]["admitted"] == 3
    # refused requests did not count as attempts of their prompt: the next one is still attempt 1
    assert srv.attempts_for("bucket 3 [[500]]") == 0
    assert stats["requests_by_status"] == {"500": 3, "429": 4}


def test_quota_headers_on_answers(srv: MockServer, http: requests.Session) -> None:
    srv.configure(quota={"kind": "openai", "requests_per_minute": 600, "tokens_per_minute": 60_000})
    r = openai(srv, http, "headers please", max_tokens=10)
    assert r.status_code == 200
    assert (
        r.headers["x-ratelimit-limit-requests"] == "600" and r.headers["x-ratelimit-limit-tokens"] == "60000"
    )
    assert r.headers["x-ratelimit-remaining-requests"] == "9"  # a bucket of one second: 10
    # charged before serving: the prompt's tokens plus max_tokens
    prompt_tokens = r.json()["usage"]["prompt_tokens"]
    assert int(r.headers["x-ratelimit-remaining-tokens"]) == 1000 - prompt_tokens - 10
    assert r.headers["x-ratelimit-reset-requests"].endswith("ms")

    srv.configure(quota={"kind": "azure", "requests_per_minute": 60, "window": 10})  # 10 per window
    answers = [azure(srv, http, f"azure {i}") for i in range(11)]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers[:10]] == [
        str(9 - i) for i in range(10)
    ]
    assert answers[10].status_code == 429
    assert 1 <= int(answers[10].headers["Retry-After"]) <= 10 and "retry-after-ms" in answers[10].headers


def test_quota_tokens_counted_per_second_and_validated(srv: MockServer, http: requests.Session) -> None:
    srv.configure(quota={"kind": "tokens_per_minute", "tokens_per_minute": 600_000})
    r = azure(srv, http, "x" * 400)  # 100 prompt tokens, and the answer it is about to write
    usage = r.json()["usage"]
    quota = srv.stats()["quota"]
    assert quota["kind"] == "tokens_per_minute"
    assert (
        quota["tokens_admitted"] == usage["total_tokens"] == sum(quota["admitted_tokens_per_second_counts"])
    )
    with pytest.raises(ValueError, match="unknown quota kind"):
        srv.configure(quota={"kind": "leaky"})
    with pytest.raises(ValueError, match="unknown field"):
        MockConfig(quota={"kind": "token_bucket", "rate": 1, "rpm": 2})
    bad = http.post(srv.base_url + "/_mock/config", json={"quota": {"kind": "x"}}, verify=srv.ca_path)
    assert bad.status_code == 400 and srv.config.quota == {
        "kind": "tokens_per_minute",
        "tokens_per_minute": 600_000,
    }
    srv.configure(quota=None)
    assert azure(srv, http, "free again").status_code == 200 and srv.stats()["quota"]["kind"] is None


def test_server_process_starts_answers_and_stops(tmp_path: Any) -> None:
    cfg = MockConfig(api_key="proc-key", deployments=["d1"])
    with MockServerProcess(cfg, tls=True, cert_dir=tmp_path / "certs") as proc:
        assert proc.base_url.startswith("https://127.0.0.1:")
        assert proc.ca_path == str(tmp_path / "certs" / "ca.pem") and "BEGIN CERTIFICATE" in proc.ca_pem
        url = proc.azure_chat_url("d1")
        r = requests.post(
            url,
            json={"messages": [{"role": "user", "content": "hello"}]},
            headers={"api-key": "proc-key"},
            verify=proc.ca_path,
            timeout=10,
        )
        assert r.json()["choices"][0]["message"]["content"] == expected_answer("d1", None, "hello")
        assert proc.configure(latency_ms=5)["latency_ms"] == 5
        stats = proc.stats()
        assert stats["requests_by_status"] == {"200": 1} and proc.attempts_for("hello") == 1
        # the counters alone, without a count per prompt (cheap to poll during a million requests)
        counters = proc.counters()
        assert counters["chat_requests"] == 1 and "requests_per_prompt" not in counters
        proc.reset()
        assert proc.stats()["requests_total"] == 0
        child = proc.proc
        assert child is not None
    assert child.returncode == 0  # SIGTERM -> clean shutdown


def test_cli_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "airflow_provider_llmq.testing.mock_server", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0
    for option in (
        "--no-tls",
        "--cert-dir",
        "--rps",
        "--max-concurrency",
        "--fault-rate",
        "--deployments",
        "--quota",
    ):
        assert option in out.stdout
