"""Property-based bad input (hypothesis): sampling parameters, prompts, batch lines and gRPC messages.

Every input either runs or gets a clear error: ValueError/TypeError naming what is wrong from the library, an error
record from the batch command, INVALID_ARGUMENT from gRPC. Accepted inputs run a few steps on the embedded model
without an engine error, and after all the bad input the engine still serves a good request.
"""

import dataclasses
import json

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nexus_jax import EngineConfig, LLMEngine, SamplingParams
from nexus_jax.entrypoints.batch import run_batch
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.server.client import request
from nexus_jax.server.grpc_server import SERVICE_NAME, ServerOptions, check_limits, prompt_of, sampling_params
from nexus_jax.server.proto import nexus_pb2 as pb
from nexus_jax.server.proto import nexus_pb2_grpc as pb_grpc
from nexus_jax.testing.engines import batch_engine
from nexus_jax.testing.jsonl import read_jsonl
from nexus_jax.testing.serving import serving_on_a_thread

MAX_LEN = 256
FEW = settings(max_examples=50, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FIELDS = [f.name for f in dataclasses.fields(SamplingParams)]
# Values of every kind a caller might pass by mistake: wrong types, signs, NaN, infinities, huge integers.
WILD = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.integers(-2, 24), st.floats(0, 1),
                 st.sampled_from([-1, 0, 1, 2, 2**31, 2**63, -2**63, 10**400, float("nan"), float("-inf")]),
                 st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(-3, 600), max_size=3),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(np.int64(3)))
TOKEN = st.one_of(st.integers(0, 511), st.integers(), st.sampled_from([-1, 512, 2**31, 2**64]))
INT32 = st.integers(-2**31, 2**31 - 1)
# Valid values of each field, so that many examples pass validation and run (logprobs: few values, each compiles).
PLAUSIBLE = {"n": st.integers(1, 2), "temperature": st.floats(0, 3), "top_p": st.floats(0, 1),
             "top_k": st.integers(-1, 600), "min_p": st.floats(0, 1), "seed": st.integers(-2**63, 2**63 - 1),
             "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2),
             "stop_token_ids": st.lists(st.integers(0, 511), max_size=2), "ignore_eos": st.booleans(),
             "max_tokens": st.integers(1, 8), "min_tokens": st.integers(0, 4), "logprobs": st.sampled_from([0, 20]),
             "skip_special_tokens": st.booleans(), "include_stop_str_in_output": st.booleans(),
             "spaces_between_special_tokens": st.booleans(), "cache_salt": st.text(min_size=1, max_size=3)}


def some_fields(odd: dict) -> st.SearchStrategy:
    """Up to three of odd's fields, each with a plausible value or one drawn from odd."""
    return st.lists(st.sampled_from(sorted(odd)), max_size=3, unique=True).flatmap(
        lambda names: st.fixed_dictionaries({n: st.one_of(PLAUSIBLE.get(n, odd[n]), odd[n]) for n in names}))


def tiny_engine() -> LLMEngine:
    return build_engine(EngineConfig(dtype="float32", max_model_len=MAX_LEN, max_num_seqs=8))


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


def run_briefly(engine: LLMEngine, rid: str) -> None:
    """Runs an accepted request a few steps (every sampling path), then aborts it; no step may fail."""
    outputs = []
    for _ in range(3):
        outputs += engine.step()
    engine.abort_request(rid)
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert all(o.error is None for o in outputs), [o.error for o in outputs]
    assert not engine.groups and engine.block_manager.usage == 0.0


def assert_serves(engine: LLMEngine) -> None:
    engine.add_request("good", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, ignore_eos=True))
    done = []
    while engine.has_unfinished_requests():
        done += [o for o in engine.step() if o.finished]
    assert [(o.error, len(o.outputs[0].token_ids)) for o in done] == [(None, 4)]


def test_sampling_params_fields(engine):
    @FEW
    @given(some_fields({name: WILD for name in FIELDS}))
    @example({"temperature": 10**400})  # bugs found here once, kept as fixed examples
    @example({"n": 10**12})
    @example({"stop_token_ids": [2**40], "min_tokens": 2})
    @example({"logprobs": 0})
    def check(kwargs):
        try:
            params = SamplingParams(**kwargs)
        except (ValueError, TypeError) as e:
            assert any(name in str(e) for name in kwargs), (kwargs, str(e))
            return
        try:
            engine.add_request("fuzz", {"prompt_token_ids": [1, 2, 3]}, params)
        except ValueError as e:
            assert any(name in str(e) for name in kwargs), (kwargs, str(e))
            return
        run_briefly(engine, "fuzz")

    check()
    with pytest.raises(TypeError):
        SamplingParams(1)  # keyword-only: vLLM's positional order does not silently apply
    with pytest.raises(ValueError, match="stop must be a list"):
        SamplingParams(stop={"a": 1})  # a mapping is no list, though iterating it gives strings
    for unknown in ("logits_processors", "bogus"):  # vLLM fields nexus-jax lacks are not silently ignored
        with pytest.raises(TypeError, match=unknown):
            SamplingParams(**{unknown: 1})
    assert_serves(engine)


def test_prompts(engine):
    def as_ids(strategy):
        return strategy.map(lambda ids: {"prompt_token_ids": ids})
    huge = st.integers(MAX_LEN - 8, 3 * MAX_LEN)
    valid = st.one_of(as_ids(st.lists(st.integers(0, 511), min_size=1, max_size=12)), st.text(max_size=12))
    odd = st.one_of(as_ids(st.lists(TOKEN, max_size=8)), as_ids(huge.map(lambda n: [7] * n)),
                    st.text(st.characters(blacklist_categories=()), max_size=12),  # lone surrogates included
                    huge.map(lambda n: "ab " * n), st.binary(max_size=8), WILD,
                    st.dictionaries(st.sampled_from(["prompt", "prompt_token_ids", "extra"]), WILD, max_size=2),
                    as_ids(st.lists(TOKEN, max_size=4).map(np.array)))
    prompts = st.one_of(valid, odd)
    max_tokens = 2

    @FEW
    @given(prompts)
    @example({"prompt": 5, "prompt_token_ids": [1]})
    def check(prompt):
        try:
            engine.add_request("fuzz", prompt, SamplingParams(max_tokens=max_tokens))
        except (ValueError, TypeError) as e:
            assert str(e)
            accepted = False
        else:
            run_briefly(engine, "fuzz")
            accepted = True
        if isinstance(prompt, (bytes, int, float, list, type(None))):
            assert not accepted
        if isinstance(prompt, dict) and not isinstance(prompt.get("prompt"), (str, type(None))):
            assert not accepted
        ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) and len(prompt) == 1 else None
        if isinstance(prompt, str):
            try:
                ids = engine.tokenizer.encode(prompt)
            except ValueError:
                assert not accepted  # text with a lone surrogate is no valid Unicode
                return
        if prompt == "" or prompt == {"prompt": ""}:
            ids = []  # empty text is an empty prompt, though the tokenizer would add BOS
        if isinstance(ids, list):  # the oracle: in the vocabulary, not empty, room for max_tokens
            ok = all(type(t) is int and 0 <= t < engine.vocab_size for t in ids) and \
                1 <= len(ids) <= MAX_LEN - max_tokens
            assert accepted == ok, (prompt if len(str(prompt)) < 200 else len(ids))
        elif ids is not None:  # a numpy array, a string, a number: not a list of token ids
            assert not accepted

    check()
    assert_serves(engine)


def test_tokenizer(tokenizer):
    @FEW
    @given(st.one_of(WILD, st.text(st.characters(blacklist_categories=()), max_size=8)),
           st.one_of(st.lists(TOKEN, max_size=6), WILD))
    @example("x", [5, -1])
    @example("x", [2**64])
    def check(text, ids):
        try:
            encoded = tokenizer.encode(text)
            assert isinstance(text, str) and all(0 <= t < tokenizer.vocab_size for t in encoded)
        except (ValueError, TypeError) as e:
            assert str(e)
        try:
            decoded = tokenizer.decode(ids)
            assert isinstance(decoded, str)
        except (ValueError, TypeError) as e:
            assert str(e)

    check()


def test_batch_lines(tmp_path_factory, tokenizer):
    json_values = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5)),
                               lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3),
                                                                                           inner, max_size=3),
                               max_leaves=6)
    fields = {k: json_values for k in ("id", "prompt", "prompt_token_ids", "max_tokens", "n", "temperature",
                                       "stop", "stop_token_ids", "seed", "bogus")}
    objects = st.fixed_dictionaries({}, optional=fields).map(json.dumps)
    raw = st.one_of(objects.map(str.encode), json_values.map(json.dumps).map(str.encode),
                    st.binary(max_size=20).filter(lambda b: b"\n" not in b and b"\r" not in b),
                    objects.map(lambda s: s[:len(s) // 2].encode()),  # torn lines
                    st.sampled_from([b"\xff\xfe", b'{"id": "s", "prompt": "\\ud800"}',
                                     b'{"id": "z", "prompt_token_ids": [-1]}']))

    @settings(FEW, max_examples=25)
    @given(st.lists(raw, min_size=1, max_size=6))
    @example([b"[" * 5000, b'{"id": 1, "max_tokens": ' + b"9" * 5000 + b"}"])  # these crashed the batch once
    def check(lines):
        folder = tmp_path_factory.mktemp("batch")
        inp, out, err = folder / "in.jsonl", folder / "out.jsonl", folder / "err.jsonl"
        good = json.dumps({"id": "good-line", "prompt_token_ids": [4], "max_tokens": 2}).encode()
        inp.write_bytes(b"\n".join(lines + [good]) + b"\n")
        engine = batch_engine(tokenizer)
        summary = run_batch(engine, str(inp), str(out), str(err), defaults={"max_tokens": 2}, progress=False)
        counted = sum(1 for line in lines if line.strip()) + 1
        assert summary.lines == counted and summary.completed + summary.errors == counted
        errors = read_jsonl(err)
        assert len(errors) == summary.errors and all(e["error"] and e["line"] >= 1 for e in errors)
        results = read_jsonl(out)
        assert len(results) == summary.completed
        assert [len(r["token_ids"]) for r in results if r["id"] == "good-line"] == [2]
        assert not engine.groups and engine.block_manager.usage == 0.0

    check()


@pytest.fixture(scope="module")
def grpc_server():
    """The embedded model behind a real loopback server on a thread of its own (its own event loop), so that
    hypothesis drives it with blocking calls. Limits keep accepted requests short."""
    engine = tiny_engine()
    options = dict(max_tokens_limit=8, max_n=2, max_prompt_tokens=64)
    with serving_on_a_thread(engine, **options) as server:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        yield pb_grpc.NexusStub(channel), channel, engine, ServerOptions(**options)
        channel.close()


def library_accepts(engine: LLMEngine, options: ServerOptions, msg: pb.GenerateRequest) -> bool:
    """The library's verdict on what a GenerateRequest asks for (the server must agree)."""
    try:
        params = sampling_params(msg.sampling_params, options.max_tokens_limit)
        prompt = prompt_of(msg, engine.tokenizer)
        check_limits(options, prompt, params)
        engine.prepare_request("verdict", prompt, params, priority=msg.priority,
                               program_id=msg.program_id or None, thread_id=msg.thread_id)
    except (ValueError, TypeError):
        return False
    return True


def generate(stub, msg) -> tuple[grpc.StatusCode, str, list]:
    try:
        return grpc.StatusCode.OK, "", list(stub.Generate(msg, timeout=30))
    except grpc.RpcError as e:
        return e.code(), e.details(), []


def test_grpc_fields(grpc_server):
    stub, _, engine, options = grpc_server
    # Any value each proto field can carry.
    sampling = some_fields({
        **{name: INT32 for name in ("max_tokens", "top_k", "min_tokens", "n", "logprobs")},
        **{name: st.floats() for name in ("temperature", "top_p", "min_p")},
        **{name: st.booleans() for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")},
        "seed": st.integers(-2**63, 2**63 - 1), "stop": st.lists(st.text(max_size=3), max_size=2),
        "stop_token_ids": st.lists(INT32, max_size=2)})
    prompts = st.one_of(st.text(max_size=20), st.lists(st.integers(0, 511), min_size=1, max_size=8),
                        st.lists(st.one_of(st.integers(0, 511), INT32), max_size=8),
                        st.integers(60, 200).map(lambda n: [3] * n))

    @settings(FEW, max_examples=40)
    @given(prompts, sampling, st.text(max_size=6), st.text(max_size=6), INT32)
    @example([5], {"logprobs": 0}, "", "", 0)  # stopped the engine thread once
    def check(prompt, fields, program_id, thread_id, priority):
        msg = request(prompt, program_id=program_id, thread_id=thread_id, priority=priority, **fields)
        code, details, responses = generate(stub, msg)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), (code, details)
        assert (code == grpc.StatusCode.OK) == library_accepts(engine, options, msg), (msg, details)
        if code == grpc.StatusCode.OK:
            kinds = [r.WhichOneof("response") for r in responses]
            assert "error" not in kinds and kinds.count("complete") == max(fields.get("n", 1), 1)
        else:
            assert details

    check()
    code, _, responses = generate(stub, request([5, 6], max_tokens=3, ignore_eos=True))
    assert code == grpc.StatusCode.OK and len(responses[-1].complete.output_ids) == 3


def test_grpc_malformed_messages(grpc_server):
    _, channel, engine, _ = grpc_server
    raw_generate = channel.unary_stream(f"/{SERVICE_NAME}/Generate", request_serializer=None,
                                        response_deserializer=pb.GenerateResponse.FromString)
    raw_end = channel.unary_unary(f"/{SERVICE_NAME}/EndSession", request_serializer=None,
                                  response_deserializer=pb.EndSessionResponse.FromString)

    def not_utf8(b: bytes) -> bool:
        try:
            b.decode("utf-8")
        except UnicodeDecodeError:
            return True
        return False

    def text_field(b: bytes) -> bytes:  # field 2 (text), length-delimited
        return b"\x12" + bytes([len(b)]) + b

    @settings(FEW, max_examples=40)
    @given(st.one_of(st.binary(min_size=1, max_size=40).filter(not_utf8).map(text_field), st.binary(max_size=40)))
    def check(data):
        for call in (lambda: list(raw_generate(data, timeout=30)), lambda: raw_end(data, timeout=30)):
            try:
                call()
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details(), (data, e.code(), e.details())

    check()
    with pytest.raises(grpc.RpcError) as e:
        list(raw_generate(text_field(b"ok \xff\xfe"), timeout=30))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "UTF-8" in e.value.details()
    stub = pb_grpc.NexusStub(channel)
    code, _, responses = generate(stub, request([9], max_tokens=2, ignore_eos=True))
    assert code == grpc.StatusCode.OK and len(responses[-1].complete.output_ids) == 2
    assert not engine.groups
