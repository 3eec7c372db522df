"""Structured output, bad_words and prompt_logprobs over HTTP, on the random-weight default model driven by the
official `openai` client: a json_schema response parses and validates whatever the weights."""

import json
import re

import openai
import pytest

from nexus_jax import LLM
from nexus_jax.testing.http import http_serving

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rooms"],
          "properties": {"city": {"type": "string", "maxLength": 10},
                         "rooms": {"type": "integer", "minimum": 1, "maximum": 9}}}


@pytest.fixture(scope="module")
def client():
    with http_serving(LLM(dtype="float32").llm_engine, model_name="default") as server:
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none", max_retries=0)


def _check(value: dict) -> None:
    assert list(value) == ["city", "rooms"] and isinstance(value["city"], str) and len(value["city"]) <= 10
    assert isinstance(value["rooms"], int) and 1 <= value["rooms"] <= 9
    try:
        import jsonschema
    except ImportError:  # the check above covers this schema
        return
    jsonschema.validate(value, SCHEMA)


def test_a_json_schema_response_parses_and_validates(client):
    for seed in range(2):
        r = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "A flat, as JSON"}], max_tokens=60, seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "flat", "schema": SCHEMA}})
        assert r.choices[0].finish_reason == "stop"
        _check(json.loads(r.choices[0].message.content))


def test_vllm_fields_reach_the_engine(client):
    r = client.completions.create(model="default", prompt="Pick", max_tokens=20, seed=1,
                                  extra_body={"guided_choice": ["left", "right"], "prompt_logprobs": 1})
    assert r.choices[0].text in ("left", "right")
    prompt_logprobs = r.choices[0].model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and len(prompt_logprobs) >= 2 and all(prompt_logprobs[1:])
    r = client.completions.create(model="default", prompt="Code", max_tokens=20, seed=2,
                                  extra_body={"structured_outputs": {"regex": "[A-Z]{3}-[0-9]{2}"}})
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", r.choices[0].text)
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "JSON"}], seed=3,
                                       max_tokens=60, extra_body={"guided_json": SCHEMA, "bad_words": ["the"]})
    _check(json.loads(r.choices[0].message.content))


def test_prompt_logprobs_in_chat_and_in_streams(client):
    chat = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=2, extra_body={"prompt_logprobs": 0})
    whole = chat.model_extra["prompt_logprobs"]
    assert whole[0] is None and len(whole) > 2 and all(len(p) == 1 for p in whole[1:])
    chunks = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2, stream=True, extra_body={"prompt_logprobs": 0}))
    assert chunks[0].model_extra["prompt_logprobs"] == whole
    assert all("prompt_logprobs" not in c.model_extra for c in chunks[1:])
    text = list(client.completions.create(model="default", prompt="Hi there", max_tokens=2, stream=True,
                                          extra_body={"prompt_logprobs": 1}))
    assert text[0].choices[0].model_extra["prompt_logprobs"][0] is None
