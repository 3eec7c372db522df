"""The OpenAI-compatible HTTP server driven by the official `openai` client and by raw HTTP (the SSE format), over
one mock engine with the embedded model's tokenizer (its chat template included) shared by the module."""

import json

import httpx
import openai
import pytest

from nexus_jax.testing.engines import expected, record_requests
from nexus_jax.testing.http import http_serving
from nexus_jax.testing.serving import server_engine
from runner.sampling import mask_ids

TOKEN = "s3cret"
MODEL = "embedded-default"


@pytest.fixture(scope="module")
def server(tokenizer):
    with http_serving(server_engine(tokenizer=tokenizer), auth_token=TOKEN, max_n=8) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key=TOKEN, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=f"http://127.0.0.1:{server.port}", headers={"Authorization": f"Bearer {TOKEN}"},
                      timeout=30) as http:
        yield http


def chat_ids(tokenizer, messages):
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def test_models_lists_the_served_model(client, server):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.owned_by == "nexus-jax"
    assert model.model_extra["max_model_len"] == server.llm.engine.max_model_len


def test_a_missing_or_wrong_token_is_401_but_probes_need_none(server):
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        wrong.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
    base = f"http://127.0.0.1:{server.port}"
    assert httpx.get(f"{base}/v1/models").status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200
    assert b"nexus_num_requests_running" in httpx.get(f"{base}/metrics").content
    for path in ("/v1/completions", "/v1/chat/completions"):  # the token is checked before the body is read
        r = httpx.post(f"{base}{path}", content=b"{not json", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_the_generation_routes_answer_in_the_api_schema_before_any_generation(http):
    """They are plain ASGI in front of FastAPI (server/http/direct.py): same errors as the other routes."""
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = http.get(path)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"]["type"] == "invalid_request_error"
        for body in (b"", b"[1, 2]", b'{"prompt": "x", "messages": [], "max_tokens": "many"}'):
            r = http.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400 and r.headers["content-type"] == "application/json", (path, body)
            assert r.json()["error"]["type"] == "invalid_request_error" and r.json()["error"]["message"]
        r = http.post(path, json={"model": MODEL, "prompt": [1], "messages": [], "max_tokens": "many"})
        assert r.json()["error"]["param"] in {"max_tokens", "prompt", "messages"}
    assert http.get("/v1/nothing-here").status_code == 404  # FastAPI's, in the same schema
    assert http.get("/v1/nothing-here").json()["error"]["type"] == "not_found_error"


def test_completion_text_usage_and_logprobs_with_token_text(client, tokenizer):
    ids = tokenizer.encode("hello there")
    want = expected(ids, 6)
    r = client.completions.create(model=MODEL, prompt="hello there", max_tokens=6, temperature=0, logprobs=2)
    (choice,) = r.choices
    assert choice.text == tokenizer.decode(want) and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 6, len(ids) + 6)
    texts = [tokenizer.decode([t], skip_special_tokens=False) for t in want]
    assert choice.logprobs.tokens == texts
    assert all(len(top) == 2 and text in top for text, top in zip(texts, choice.logprobs.top_logprobs))
    assert choice.logprobs.text_offset == [sum(map(len, texts[:i])) for i in range(6)]
    assert all(lp < 0 for lp in choice.logprobs.token_logprobs)


def test_completion_stream_with_n_2_gives_each_choice_its_text_and_one_finish(client, tokenizer):
    text = tokenizer.decode(expected(tokenizer.encode("hello there"), 7))
    got, finishes = {0: "", 1: ""}, []
    for chunk in client.completions.create(model=MODEL, prompt="hello there", max_tokens=7, temperature=0, n=2,
                                           stream=True):
        (choice,) = chunk.choices
        got[choice.index] += choice.text
        if choice.finish_reason is not None:
            finishes.append((choice.index, choice.finish_reason))
    assert got == {0: text, 1: text}
    assert sorted(finishes) == [(0, "length"), (1, "length")]


def test_several_token_id_prompts_number_their_choices_in_order(client, tokenizer):
    prompts = [[5, 6, 7], [40, 41]]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [tokenizer.decode(expected(p, 3)) for p in prompts for _ in range(2)]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 12)


def test_chat_renders_the_chat_template(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    ids = chat_ids(tokenizer, messages)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    (choice,) = r.choices
    assert choice.message.role == "assistant" and choice.message.content == tokenizer.decode(expected(ids, 5))
    assert r.usage.prompt_tokens == len(ids) and r.object == "chat.completion"


def test_chat_stream_names_the_role_first_and_ends_with_usage(client, tokenizer):
    messages = [{"role": "user", "content": "Tell me a story"}]
    ids = chat_ids(tokenizer, messages)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=6,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == tokenizer.decode(expected(ids, 6))
    assert [c.choices[0].finish_reason for c in chunks[:-1]][-1] == "length"
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].object == "chat.completion.chunk"
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(ids), 6)


def test_chat_logprobs_carry_the_token_text(client, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    want = expected(chat_ids(tokenizer, messages), 4)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [tokenizer.decode([t], skip_special_tokens=False) for t in want]
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
               for e in content)
    assert all(e.bytes == list(e.token.encode()) for e in content)


@pytest.mark.parametrize("fields, param", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3.0}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0.0}}, "repetition_penalty"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex"),
    ({"extra_body": {"guided_choice": []}}, "guided_choice"),
    ({"extra_body": {"structured_outputs": {"jsn": {}}}}, "structured_outputs"),
    ({"response_format": {"type": "json_object"}, "extra_body": {"guided_regex": "a"}}, "response_format"),
    ({"extra_body": {"bad_words": [""]}}, "bad_words"),
    ({"extra_body": {"prompt_logprobs": 21}}, "prompt_logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"logit_bias": {"five": 10}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"extra_body": {"allowed_token_ids": []}}, "allowed_token_ids"),
    ({"extra_body": {"allowed_token_ids": [100000]}}, "allowed_token_ids"),
    ({"temperature": -1.0}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": None, "max_completion_tokens": 0}, "max_completion_tokens"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 9}, "n"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
])
def test_bad_or_unsupported_fields_are_400_naming_the_field(client, fields, param):
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**request)
    assert e.value.status_code == 400
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == param
    assert "not both" not in e.value.body["message"]


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_sse_events_are_json_data_lines_ending_with_done(http, tokenizer):
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 5, "temperature": 0, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: {") and "\n" not in e for e in events[:-2])
    assert all(c["object"] == "text_completion" and "usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(c["choices"][0]["text"] for c in chunks) == tokenizer.decode(
        expected(tokenizer.encode("hello there"), 5))


def test_a_prompt_the_engine_refuses_is_400_json_even_when_streaming(http):
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [[5, 99999]], "max_tokens": 2, "stream": True})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["param"] == "prompt"
    r = http.post("/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_program_and_thread_ids_reach_the_engine_as_fields_or_headers(http, server):
    seen = record_requests(server.llm.engine)
    try:
        assert http.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 1, "program_id": "agent-1",
                                                  "thread_id": "t9"}).status_code == 200
        assert http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                       "max_tokens": 1},
                         headers={"X-Program-Id": "agent-2", "X-Thread-Id": "t3"}).status_code == 200
    finally:
        del server.llm.engine.prepare_request  # back to the class's method
    assert [(program, thread) for _, program, thread in seen] == [("agent-1", "t9"), ("agent-2", "t3")]


def test_tokenize_detokenize_and_metrics(http, tokenizer):
    r = http.post("/tokenize", json={"prompt": "hello there"}).json()
    assert r["tokens"] == tokenizer.encode("hello there") and r["count"] == len(r["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    assert http.post("/tokenize", json={"messages": messages}).json()["tokens"] == chat_ids(tokenizer, messages)
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": "hello there"}
    assert http.post("/detokenize", json={"tokens": [10**6]}).json()["error"]["param"] == "tokens"
    assert b'nexus_request_success_total{finished_reason="length"}' in http.get("/metrics").content


def test_logit_bias_penalties_and_allowed_ids_reach_the_sampler_of_every_step(client, server):
    engine = server.llm.engine
    steps = []
    real = engine.executor.dispatch
    engine.executor.dispatch = lambda step: steps.append(step) or real(step)
    try:
        r = client.completions.create(model=MODEL, prompt=[7, 8], max_tokens=3, temperature=0,
                                      logit_bias={"9": 5, "300": -100}, presence_penalty=0.5, frequency_penalty=0.25,
                                      extra_body={"repetition_penalty": 1.5, "allowed_token_ids": [9, 10, 300]})
    finally:
        del engine.executor.dispatch  # back to the class's method
    assert r.choices[0].finish_reason == "length"
    assert len(steps) >= 3 and all(step.bias == [{9: 5.0, 300: -100.0}] for step in steps)
    assert all([mask_ids(m) for m in step.allowed] == [[9, 10, 300]] for step in steps)
    (row,) = steps[0].penalties
    assert (row.repetition, row.frequency, row.presence) == (1.5, 0.25, 0.5) and list(row.ids)[:2] == [7, 8]


def test_usage_reports_the_prompt_tokens_served_from_the_prefix_cache(client, server):
    prompt = list(range(100, 150))  # several full blocks
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    block = server.llm.engine.block_manager.block_size
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < len(prompt) and cached % block == 0


def test_a_bug_in_a_generation_route_is_a_500_in_the_api_schema_and_the_server_keeps_serving(http, server,
                                                                                              monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(server.llm.engine.tokenizer, "encode", broken)
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 2})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal_server_error"
    assert "tokenizer exploded" not in r.text  # the trace goes to the log, not to the client
    assert any("tokenizer exploded" in rec.getMessage() or (rec.exc_info and "exploded" in str(rec.exc_info[1]))
               for rec in caplog.records)
    monkeypatch.undo()
    assert http.post("/v1/completions", json={"model": MODEL, "prompt": [1, 2], "max_tokens": 1}).status_code == 200
