"""The mock's Responses API over real sockets, through the openai SDK as its users call it: the same
answer as the chat route, its faults and cap, and openaivec's packs answered item by item."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from airflow_provider_llmq.testing.mock_server import expected_answer
from airflow_provider_llmq.testing.mock_server.faults import prompt_hash
from tests.conftest import DEPLOYMENT, TEST_KEY

pytestmark = pytest.mark.timeout(60)


class Verdict(BaseModel):
    label: str
    score: int


def _trust(server: Any) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=server.ca_path)


@pytest.fixture
def client(server: Any) -> Iterator[openai.OpenAI]:
    with httpx.Client(verify=_trust(server)) as http:
        yield openai.OpenAI(
            base_url=server.openai_base_url, api_key=TEST_KEY, http_client=http, max_retries=0
        )


def test_a_text_answer_is_the_chat_routes_answer_with_its_usage(server: Any, client: openai.OpenAI) -> None:
    answer = client.responses.create(model=DEPLOYMENT, instructions="Be brief.", input="Name a colour.")
    assert answer.status == "completed"
    assert answer.output_text == expected_answer(DEPLOYMENT, "Be brief.", "Name a colour.", {})
    stats = server.stats()
    assert answer.usage is not None and answer.usage.input_tokens == stats["prompt_tokens_total"] > 0
    assert answer.usage.output_tokens == stats["completion_tokens_total"] > 0
    assert stats["chat_routes"] == {"/v1/responses": 1}


def test_a_json_schema_answer_parses_and_matches_the_chat_route(client: openai.OpenAI) -> None:
    messages: list[Any] = [
        {"role": "system", "content": "Judge."},
        {"role": "user", "content": "Great kettle"},
    ]
    parsed = client.responses.parse(model=DEPLOYMENT, input=messages, text_format=Verdict)
    assert isinstance(parsed.output_parsed, Verdict)
    chat = client.chat.completions.parse(model=DEPLOYMENT, messages=messages, response_format=Verdict)
    assert parsed.output_text == chat.choices[0].message.content


def test_max_output_tokens_cuts_the_answer_as_incomplete(client: openai.OpenAI) -> None:
    answer = client.responses.create(model=DEPLOYMENT, input="Tell a long story.", max_output_tokens=3)
    assert answer.status == "incomplete" and answer.incomplete_details is not None
    assert answer.incomplete_details.reason == "max_output_tokens"


def test_faults_and_access_as_on_the_chat_route(server: Any, client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        client.responses.create(model=DEPLOYMENT, input="once [[500]]")
    assert client.responses.create(model=DEPLOYMENT, input="once [[500]]").status == "completed"
    with pytest.raises(openai.BadRequestError) as filtered:
        client.responses.create(model=DEPLOYMENT, input="bad [[content_filter]]")
    assert filtered.value.code == "content_filter"
    with pytest.raises(openai.AuthenticationError):
        client.with_options(api_key="wrong").responses.create(model=DEPLOYMENT, input="hi")
    with httpx.Client(verify=_trust(server)) as http:  # Azure's v1 form takes the api-key header
        azure = http.post(
            f"{server.base_url}/openai/v1/responses",
            headers={"api-key": TEST_KEY},
            json={
                "model": DEPLOYMENT,
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
            },
        )
    assert azure.status_code == 200
    assert azure.json()["output"][0]["content"][0]["text"] == expected_answer(DEPLOYMENT, None, "hi", {})
    server.configure(rps=1)
    client.responses.create(model=DEPLOYMENT, input="first")
    with pytest.raises(openai.RateLimitError):
        client.responses.create(model=DEPLOYMENT, input="second")


def _openaivec_request(system: str, prompts: list[str]) -> dict[str, Any]:
    """A request as openaivec's BatchResponses sends it (string bodies)."""
    message = {
        "type": "object",
        "properties": {"id": {"type": "integer"}, "body": {"type": "string"}},
        "required": ["id", "body"],
        "additionalProperties": False,
    }
    schema = {
        "type": "object",
        "properties": {"assistant_messages": {"type": "array", "items": message}},
        "required": ["assistant_messages"],
        "additionalProperties": False,
    }
    return {
        "model": DEPLOYMENT,
        "instructions": f"<SystemMessage><ElementInstructions><Instruction>{system}</Instruction>"
        "</ElementInstructions><BatchInstructions>...</BatchInstructions></SystemMessage>",
        "input": json.dumps({"user_messages": [{"id": i, "body": p} for i, p in enumerate(prompts)]}),
        "text": {"format": {"type": "json_schema", "name": "ResponseT", "schema": schema, "strict": True}},
    }


def test_an_openaivec_pack_is_answered_item_by_item(server: Any) -> None:
    prompts = ["first row", "second row [[500]]", "third row"]
    with httpx.Client(verify=_trust(server), headers={"Authorization": f"Bearer {TEST_KEY}"}) as http:
        url = f"{server.openai_base_url}/responses"
        assert http.post(url, json=_openaivec_request("Classify.", prompts)).status_code == 500  # one item
        answer = http.post(url, json=_openaivec_request("Classify.", prompts)).json()
        bad = http.post(url, json=_openaivec_request("Classify.", ["ok", "no [[content_filter]]"]))
    items = json.loads(answer["output"][0]["content"][0]["text"])["assistant_messages"]
    assert items == [
        {"id": i, "body": expected_answer(DEPLOYMENT, "Classify.", p, {})} for i, p in enumerate(prompts)
    ]
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "content_filter"
    asked = server.stats()["requests_per_prompt"]
    assert [asked[prompt_hash(p)] for p in prompts] == [2, 2, 2]  # each item counted as its own attempt
