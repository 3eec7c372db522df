"""Structured output through xgrammar on the random-weight default model: whatever the weights, a completion follows
its JSON schema, JSON object, regex, choice or EBNF grammar and ends when the grammar does; the overlapped and
synchronous loops give the same tokens; specs are checked and compiled once."""

import json
import re
import sys

import pytest

from nexus_jax import LLM, SamplingParams
from nexus_jax.core.structured_outputs import StructuredOutputsParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0,
                                                                            "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}
PROMPT = {"prompt_token_ids": [1, 60, 61, 62, 63]}


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def _params(seed: int, max_tokens: int = 80, **spec) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


def _valid(text: str) -> dict:
    value = json.loads(text)
    assert list(value) == ["name", "age", "tags"]  # the schema's order
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 120
    assert set(value["tags"]) <= {"a", "b"} and len(value["tags"]) <= 3
    try:
        import jsonschema
    except ImportError:  # the hand check above covers this schema
        return value
    jsonschema.validate(value, SCHEMA)
    return value


def _texts(llm, params):
    return [(o.outputs[0].text, o.outputs[0].finish_reason) for o in
            llm.generate([PROMPT] * len(params), params, use_tqdm=False)]


def test_every_kind_of_spec_is_followed_on_random_weights(llm):
    params = [_params(s, json=SCHEMA) for s in range(3)] + [
        _params(3, json=json.dumps(SCHEMA)), _params(4, json_object=True, max_tokens=120),
        _params(5, regex=r"[a-c]{2,5}-\d\d"), _params(6, choice=["yes", "no way", "maybe"]),
        _params(7, grammar='root ::= "(" num ("," num)? ")"\nnum ::= [0-9] | [1-9] [0-9]'),
        SamplingParams(temperature=1.0, seed=8, max_tokens=8)]
    texts = _texts(llm, params)
    for text, reason in texts[:4]:
        _valid(text)
        assert reason == "stop"
    assert texts[4][1] == "length" or isinstance(json.loads(texts[4][0]), dict), texts[4]
    assert re.fullmatch(r"[a-c]{2,5}-\d\d", texts[5][0]) and texts[5][1] == "stop"
    assert texts[6] in (("yes", "stop"), ("no way", "stop"), ("maybe", "stop"))
    assert re.fullmatch(r"\((\d|[1-9]\d)(,(\d|[1-9]\d))?\)", texts[7][0]) and texts[7][1] == "stop"


def test_the_grammar_ends_the_completion_even_with_ignore_eos_and_children_keep_their_own(llm):
    params = SamplingParams(temperature=1.0, seed=11, max_tokens=50, n=3, ignore_eos=True,
                            structured_outputs={"choice": ["red", "green", "blue"]})
    (out,) = llm.generate([PROMPT], params, use_tqdm=False)
    assert all(c.text in ("red", "green", "blue") and c.finish_reason == "stop" for c in out.outputs)


def test_the_overlapped_and_synchronous_loops_give_the_same_tokens(llm):
    params = [_params(s, json=SCHEMA) for s in range(2)] + [
        _params(2, regex=r"[a-z]{3,6}"), SamplingParams(temperature=1.0, seed=3, max_tokens=24, bad_words=["ab"])]
    executor, steps = llm.llm_engine.executor, []
    dispatch = executor.dispatch
    executor.dispatch = lambda step: steps.append(step) or dispatch(step)
    try:
        ours = llm.generate([PROMPT] * 4, params, use_tqdm=False)
    finally:
        del executor.dispatch
    sync = LLM(dtype="float32", async_scheduling=False).generate([PROMPT] * 4, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in ours] == [o.outputs[0].token_ids for o in sync]
    # The grammars took their masks late (after the step in flight landed), and no request skipped a step: each
    # step runs every request still going, so there are as many steps as the longest completion has tokens + 1.
    assert sum(s.late is not None for s in steps) >= len(steps) - 2
    assert len(steps) <= max(len(o.outputs[0].token_ids) for o in ours) + 1


def test_specs_are_checked_and_compiled_once(llm):
    for spec, message in (({}, "exactly one"), ({"regex": "a", "choice": ["a"]}, "exactly one"),
                          ({"json": "{nope"}, "not valid JSON"), ({"choice": []}, "non-empty list"),
                          ({"choice": ["a", 3]}, "non-empty strings"), ({"json_object": "yes"}, "True or False"),
                          ({"regex": ""}, "non-empty string"), ({"grammar": 5}, "non-empty string"),
                          ({"jsn": {}}, "unknown fields: jsn")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(structured_outputs=spec)
    engine = llm.llm_engine
    for spec, field in (({"regex": "(unclosed"}, "regex"), ({"grammar": "root ::= undefined_rule"}, "grammar"),
                        ({"json": {"type": "no-such-type"}}, "json")):
        with pytest.raises(ValueError, match=f"structured_outputs.{field} does not compile"):
            engine.add_request("bad", PROMPT, SamplingParams(structured_outputs=spec))
    assert not engine.has_unfinished_requests()
    compiler = engine.constraints.compiler
    spec = StructuredOutputsParams(json=SCHEMA)
    assert compiler.compile(spec) is compiler.compile(StructuredOutputsParams(json=json.dumps(SCHEMA)))


def test_without_xgrammar_a_structured_request_is_refused_with_the_reason(tokenizer, monkeypatch):
    from nexus_jax.core.constraints import ConstraintFactory

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # what importing it gives on a machine without the wheel
    factory = ConstraintFactory(tokenizer, 512, (2,))
    with pytest.raises(ValueError, match="structured_outputs needs the xgrammar package"):
        factory.prepare(SamplingParams(structured_outputs={"regex": "a+"}))
    assert factory.prepare(SamplingParams(allowed_token_ids=[3]))() is not None  # the rest works without it


def test_logits_wider_than_the_tokenizer_give_the_same_masks_and_never_allow_the_extra_ids(tokenizer):
    """A model whose logits outnumber its tokenizer's ids (a preset on the embedded tokenizer, Qwen's padded
    vocabulary): xgrammar sees the tokenizer's ids and the stop tokens only, the rest of the mask is zero."""
    import numpy as np

    from nexus_jax.core.grammar import GrammarCompiler
    from runner.sampling import mask_words

    spec = StructuredOutputsParams(json=SCHEMA)
    narrow, wide = GrammarCompiler(tokenizer, 512, (2,)), GrammarCompiler(tokenizer, 4096 + 7, (2, 700))
    assert (narrow.grammar_vocab_size, wide.grammar_vocab_size) == (512, 701)  # a stop id past the tokenizer counts
    matchers = [c.matcher(c.compile(spec)) for c in (narrow, wide)]
    for token in tokenizer.encode('{"name": "', add_special_tokens=False) + [None]:
        tables = [np.full((1, mask_words(c.vocab_size)), -1, np.int32) for c in (narrow, wide)]
        for c, m, t in zip((narrow, wide), matchers, tables):
            c.fill_masks([m], t)
        bits = [np.unpackbits(t.view(np.uint8), bitorder="little") for t in tables]
        assert bits[0].any() and (bits[1][:512] == bits[0]).all(), token
        assert not bits[1][512:].any(), token  # 700 is a stop id, not allowed before the object closes
        if token is not None:
            assert all(m.accept(token) for m in matchers)
