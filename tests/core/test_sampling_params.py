"""SamplingParams (validation, vLLM defaults, sampler rows, children) and the output / metrics types."""

import dataclasses
import random

import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.core.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from nexus_jax.core.sampling_params import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, SamplingParams
from runner.sampling import SamplingRow, SamplingTensors, sample

VLLM_DEFAULTS = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=[], stop_token_ids=[],
                     ignore_eos=False, max_tokens=16, min_tokens=0, logprobs=None, skip_special_tokens=True,
                     include_stop_str_in_output=False, spaces_between_special_tokens=True, logit_bias=None,
                     presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0,
                     allowed_token_ids=None, bad_words=None, prompt_logprobs=None, structured_outputs=None)


def test_defaults_are_vllms():
    params = SamplingParams()
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    assert fields.pop("cache_salt") is None  # vLLM takes it with the prompt; here it rides with the settings
    assert fields == VLLM_DEFAULTS


BAD_VALUES = [
    ("n", 0), ("n", 1.0), ("n", True), ("n", "2"),
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
    ("temperature", 1e39), ("top_p", 1e-50),  # beyond float32, which the device rows use
    ("top_p", 0.0), ("top_p", 1.01), ("top_p", -0.5), ("top_p", None),
    ("top_k", -2), ("top_k", 2.5), ("top_k", False),
    ("min_p", -0.01), ("min_p", 1.5),
    ("seed", 1.5), ("seed", "7"), ("seed", True),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 8.0),
    ("min_tokens", -1), ("min_tokens", 1.0),
    ("logprobs", -1), ("logprobs", 21), ("logprobs", 2.0),
    ("stop", 5), ("stop", b"end"),
    ("stop_token_ids", 3), ("stop_token_ids", "12"),
    ("ignore_eos", 1), ("skip_special_tokens", None), ("include_stop_str_in_output", "yes"),
    ("spaces_between_special_tokens", 0),
    ("bad_words", "word"),
    ("prompt_logprobs", -1), ("prompt_logprobs", 21), ("prompt_logprobs", 1.0),
    ("structured_outputs", "json"),
]


@pytest.mark.parametrize("field,value", BAD_VALUES)
def test_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert field in message and (repr(value) in message or str(value) in message), message


@pytest.mark.parametrize("field,value,shown", [
    ("stop", ["ok", ""], "''"), ("stop", ["ok", 3], "3"), ("stop", ("a", None), "None"),
    ("bad_words", ["ok", " "], "' '"), ("bad_words", [3], "3"),
    ("stop_token_ids", [1, -1], "-1"), ("stop_token_ids", [1, 2.0], "2.0"), ("stop_token_ids", [True], "True"),
])
def test_validation_of_list_entries(field, value, shown):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**{field: value})
    assert shown in str(info.value)


def test_min_tokens_above_max_tokens():
    with pytest.raises(ValueError, match=r"min_tokens \(9\).*max_tokens \(8\)"):
        SamplingParams(min_tokens=9, max_tokens=8)
    assert SamplingParams(min_tokens=8, max_tokens=8).min_tokens == 8
    assert SamplingParams(min_tokens=1000, max_tokens=None).max_tokens is None


def test_unknown_and_positional_arguments_are_type_errors():
    with pytest.raises(TypeError, match="logits_processors"):
        SamplingParams(logits_processors=[print])
    with pytest.raises(TypeError):
        SamplingParams(2, 0.5)  # keyword-only: vLLM's positional order differs


def test_edges_accepted():
    params = SamplingParams(n=3, temperature=0.0, top_p=1e-9, top_k=-1, min_p=1.0, seed=-5, max_tokens=1,
                            logprobs=20)
    assert (params.n, params.top_k, params.seed, params.logprobs) == (3, -1, -5, 20)
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(seed=np.int64(3)).seed == 3 and type(SamplingParams(seed=np.int64(3)).seed) is int
    assert type(SamplingParams(temperature=1).temperature) is float


def test_normalisation():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "bc")).stop == ["a", "bc"]
    ids = SamplingParams(stop_token_ids=(np.int32(4), 7)).stop_token_ids
    assert ids == [4, 7] and all(type(i) is int for i in ids)
    assert SamplingParams(stop=None, stop_token_ids=None).stop == [] == SamplingParams().stop_token_ids


@pytest.mark.parametrize("top_k,expected", [(0, 0), (-1, 0), (1, 1), (40, 40)])
def test_top_k_off_values(top_k, expected):
    assert SamplingParams(top_k=top_k).to_row(seed=1).top_k == expected


def test_sampling_rows_drive_the_sampler():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(4, 32)).astype(np.float32) * 3)
    greedy = SamplingParams(temperature=1e-6, top_k=-1)
    assert greedy.greedy and greedy.to_row(3).temperature == 0.0
    assert not SamplingParams(temperature=1e-5).greedy
    row = SamplingParams(temperature=0.7, top_p=0.9, min_p=0.05, top_k=5).to_row(seed=11).at_step(4)
    assert row == SamplingRow(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=11, step=4)
    rows = [greedy.to_row(0), row, SamplingParams(top_k=1).to_row(5).at_step(2),
            SamplingParams(seed=3).to_row(3).at_step(9)]
    tokens = np.asarray(sample(logits, SamplingTensors.from_rows(rows, pad_to=4)))
    argmax = np.asarray(jnp.argmax(logits, axis=-1))
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]  # greedy, and top_k=1 leaves only the argmax
    # The same seed and step draw the same token, whatever the batch position.
    again = np.asarray(sample(logits[::-1], SamplingTensors.from_rows(rows[::-1], pad_to=4)))
    assert np.array_equal(again[::-1], tokens)
    with pytest.raises(ValueError, match="step"):
        SamplingRow.validated(seed=1, step=-1)
    with pytest.raises(ValueError, match="seed"):
        SamplingParams().to_row(seed=None)


@pytest.mark.parametrize("params,seed,expected", [  # what the former dict path (to_sampling_row, validate_row) built
    ({}, 5, (1.0, 0, 1.0, 0.0, 5, 0)),
    ({"temperature": 1e-6, "top_k": -1}, 3, (0.0, 0, 1.0, 0.0, 3, 0)),
    ({"temperature": 0.7, "top_p": 0.9, "min_p": 0.05, "top_k": 5}, -1, (0.7, 5, 0.9, 0.05, 2**32 - 1, 0)),
    ({"temperature": 2, "top_k": 2**40, "top_p": 2e-45}, 2**33 + 7, (2.0, 0, 2e-45, 0.0, 7, 0)),
    ({"temperature": 0.0, "top_k": 40, "min_p": 0.5}, 0, (0.0, 40, 1.0, 0.5, 0, 0)),
])
def test_rows_equal_the_former_dict_path(params, seed, expected):
    row = SamplingParams(**params).to_row(seed)
    assert type(row) is SamplingRow and row == SamplingRow(*expected)
    assert all(type(a) is type(b) for a, b in zip(row, expected))


def test_children():
    params = SamplingParams(n=4, seed=100, temperature=0.5, stop=["x"], max_tokens=9)
    children = [params.clone_for_child(i, drawn_seed=12345) for i in range(4)]
    assert [c.seed for c in children] == [100, 101, 102, 103]
    assert all(c.n == 1 and c.temperature == 0.5 and c.stop == ["x"] and c.max_tokens == 9 for c in children)
    assert params.n == 4 and params.seed == 100  # the request's own params are unchanged
    assert SamplingParams(seed=100).clone_for_child(0, drawn_seed=1).seed == 100  # n=1 reproduces child 0
    drawn = random.Random(0).getrandbits(32)
    unseeded = [SamplingParams(n=3).clone_for_child(i, drawn_seed=drawn) for i in range(3)]
    assert [c.seed for c in unseeded] == [drawn, drawn + 1, drawn + 2]
    for index in (-1, 4):
        with pytest.raises(ValueError, match="index"):
            params.clone_for_child(index, drawn_seed=0)
    with pytest.raises(ValueError, match="drawn_seed"):
        SamplingParams().clone_for_child(0, drawn_seed=None)


def test_metrics_from_hand_made_timestamps():
    metrics = RequestMetrics(arrival_time=10.0)
    assert (metrics.ttft, metrics.e2e, metrics.queue_time, metrics.tpot, metrics.itl) == (None, None, None, None, [])
    metrics.first_scheduled_time = 10.25
    for t in (10.5, 10.75, 11.0, 12.0):
        metrics.record_token(t)
    metrics.finished_time = 12.5
    assert metrics.first_token_time == 10.5 and metrics.last_token_time == 12.0
    assert metrics.token_times == [10.5, 10.75, 11.0, 12.0]
    assert metrics.ttft == 0.5 and metrics.e2e == 2.5 and metrics.queue_time == 0.25
    assert metrics.itl == [0.25, 0.25, 1.0]
    assert metrics.tpot == pytest.approx(0.5)  # (12.0 - 10.5) / 3 tokens after the first
    one = RequestMetrics(arrival_time=0.0, token_times=[3.0], first_token_time=3.0)
    assert one.tpot is None and one.itl == [] and one.ttft == 3.0


def test_random_metrics_match_numpy():
    rng = np.random.default_rng(1)
    times = list(np.cumsum(rng.exponential(0.1, size=20)) + 5.0)
    metrics = RequestMetrics(arrival_time=4.0)
    for t in times:
        metrics.record_token(float(t))
    assert np.allclose(metrics.itl, np.diff(times))
    assert metrics.tpot == pytest.approx(float(np.mean(np.diff(times))))
    assert metrics.ttft == pytest.approx(times[0] - 4.0)


def test_outputs():
    logprobs = [{5: Logprob(-0.1, rank=1, decoded_token="a")}, {7: Logprob(-2.0, 3, "b"), 6: Logprob(-0.5, 1)}]
    running = CompletionOutput(0, "ab", [5, 7], -2.1, logprobs)
    assert not running.finished() and running.stop_reason is None
    done = CompletionOutput(1, "ab", [5, 7, 2], None, None, finish_reason="stop", stop_reason=2)
    assert done.finished()
    output = RequestOutput("r1", "hi", [1, 2], [running, done], finished=False, metrics=RequestMetrics(0.0))
    assert output.outputs[1].stop_reason == 2 and output.metrics.arrival_time == 0.0
    with pytest.raises(ValueError, match="finish_reason.*'eos'"):
        CompletionOutput(0, "", [], None, None, finish_reason="eos")


def test_stop_lists_are_capped_and_deduplicated():
    with pytest.raises(ValueError, match=f"stop has {MAX_STOP_STRINGS + 1} strings, more than the limit of"):
        SamplingParams(stop=[str(i) for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(ValueError, match=f"{MAX_STOP_STRING_CHARS + 1} characters exceeds the limit of "
                                         f"{MAX_STOP_STRING_CHARS}"):
        SamplingParams(stop=["ok", "x" * (MAX_STOP_STRING_CHARS + 1)])
    with pytest.raises(ValueError, match=f"stop_token_ids has {MAX_STOP_TOKEN_IDS + 1} entries, more than the "
                                         f"limit of {MAX_STOP_TOKEN_IDS}"):
        SamplingParams(stop_token_ids=[7] * (MAX_STOP_TOKEN_IDS + 1))
    at_caps = SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] + [str(i) for i in range(MAX_STOP_STRINGS - 1)],
                             stop_token_ids=list(range(MAX_STOP_TOKEN_IDS)))
    assert len(at_caps.stop) == MAX_STOP_STRINGS and len(at_caps.stop_token_ids) == MAX_STOP_TOKEN_IDS
    dup = SamplingParams(stop=["b", "a", "b"], stop_token_ids=[5, 3, 5, 5, np.int64(3)])
    assert dup.stop == ["b", "a"] and dup.stop_token_ids == [5, 3]
