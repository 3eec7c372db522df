"""The gRPC API's chat messages and sampling features (penalties, logit_bias, allowed_token_ids, bad_words,
prompt_logprobs, structured output) on the default model; bad input is INVALID_ARGUMENT naming the field."""

import json

import grpc
import pytest

from nexus_jax import EngineConfig
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.server.proto import nexus_pb2 as pb
from nexus_jax.server.proto import nexus_pb2_grpc as pb_grpc
from nexus_jax.testing.serving import serving_on_a_thread

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["ok", "n"],
          "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 50}}}
CHAT = pb.Chat(messages=[pb.ChatMessage(role="user", content="Answer in JSON")])


@pytest.fixture(scope="module")
def stub():
    with serving_on_a_thread(build_engine(EngineConfig(dtype="float32"))) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        yield pb_grpc.NexusStub(channel)
        channel.close()


def complete(stub, **kw) -> pb.Complete:
    responses = list(stub.Generate(pb.GenerateRequest(**kw), timeout=60))
    assert responses[-1].WhichOneof("response") == "complete", responses[-1]
    return responses[-1].complete


def test_chat_with_a_json_schema(stub):
    done = complete(stub, chat=CHAT, sampling_params=pb.SamplingParams(
        max_tokens=40, seed=1, structured_outputs=pb.StructuredOutputs(json=json.dumps(SCHEMA))))
    value = json.loads(done.text)
    assert done.finish_reason == "stop" and isinstance(value["ok"], bool) and 0 <= value["n"] <= 50
    choice = complete(stub, token_ids=pb.TokenIds(ids=[1, 60, 61]), sampling_params=pb.SamplingParams(
        max_tokens=20, seed=2, structured_outputs=pb.StructuredOutputs(choice=pb.Choices(values=["up", "down"]))))
    assert choice.text in ("up", "down")


def test_sampling_fields_reach_the_engine(stub):
    prompt = pb.TokenIds(ids=[1, 60, 61, 62])
    greedy = dict(temperature=0.0, max_tokens=4, ignore_eos=True)
    forced = complete(stub, token_ids=prompt, sampling_params=pb.SamplingParams(logit_bias={77: 100.0}, **greedy))
    assert list(forced.output_ids) == [77] * 4
    allowed = complete(stub, token_ids=prompt, sampling_params=pb.SamplingParams(
        allowed_token_ids=[9, 10], presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.2, **greedy))
    assert set(allowed.output_ids) <= {9, 10}
    banned = complete(stub, token_ids=prompt, sampling_params=pb.SamplingParams(
        bad_words=["the"], prompt_logprobs=2, logit_bias={403: 100.0, 268: 90.0}, **greedy))
    assert 403 not in banned.output_ids and 268 not in banned.output_ids
    assert len(banned.prompt_logprobs) == 4 and not banned.prompt_logprobs[0].entries
    for position, token in enumerate(prompt.ids[1:], start=1):
        entries = banned.prompt_logprobs[position].entries
        assert token in [e.token_id for e in entries] and [e.rank for e in entries][:2] == [1, 2]


@pytest.mark.parametrize("fields, named", [
    (dict(sampling_params=pb.SamplingParams(presence_penalty=5.0)), "presence_penalty"),
    (dict(sampling_params=pb.SamplingParams(repetition_penalty=0.0)), "repetition_penalty"),
    (dict(sampling_params=pb.SamplingParams(logit_bias={5: 1000.0})), "logit_bias"),
    (dict(sampling_params=pb.SamplingParams(allowed_token_ids=[100000])), "allowed_token_ids"),
    (dict(sampling_params=pb.SamplingParams(bad_words=[" "])), "bad_words"),
    (dict(sampling_params=pb.SamplingParams(prompt_logprobs=50)), "prompt_logprobs"),
    (dict(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs())), "structured_outputs"),
    (dict(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(json="{no"))),
     "structured_outputs.json"),
    (dict(sampling_params=pb.SamplingParams(structured_outputs=pb.StructuredOutputs(regex="(open"))),
     "structured_outputs.regex"),
])
def test_bad_fields_are_invalid_argument_naming_them(stub, fields, named):
    request = {"token_ids": pb.TokenIds(ids=[1, 60]), **fields}
    with pytest.raises(grpc.RpcError) as e:
        complete(stub, **request)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and named in e.value.details(), e.value.details()


def test_bad_chat_is_invalid_argument(stub):
    with pytest.raises(grpc.RpcError) as e:
        complete(stub, chat=pb.Chat())
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "chat.messages" in e.value.details()
