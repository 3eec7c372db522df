"""prompt_logprobs on the default model (vLLM's semantics): per prompt position the log-prob of its token given the
tokens before it, plus the top ones; the first position None. They must agree with the log-probs the same model
reports for sampled tokens, and stay complete and equal through chunked prefill, a prefix-cache hit (such a
request computes its whole prompt) and the synchronous loop."""

import numpy as np
import pytest

from nexus_jax import LLM, SamplingParams

PROMPT = {"prompt_token_ids": [1] + list(range(60, 99))}  # 40 tokens


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32")


def _values(prompt_logprobs):
    return [None if p is None else {t: round(lp.logprob, 4) for t, lp in p.items()} for p in prompt_logprobs]


def test_prompt_logprobs_match_the_sampled_tokens_logprobs(llm):
    (first,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=5, logprobs=3), use_tqdm=False)
    generated = first.outputs[0].token_ids
    extended = {"prompt_token_ids": PROMPT["prompt_token_ids"] + generated}
    (second,) = llm.generate([extended], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=3),
                             use_tqdm=False)
    prompt_logprobs = second.prompt_logprobs
    assert len(prompt_logprobs) == len(extended["prompt_token_ids"]) and prompt_logprobs[0] is None
    for position, token in enumerate(extended["prompt_token_ids"][1:], start=1):
        entry = prompt_logprobs[position]
        assert token in entry and len([lp for lp in entry.values() if lp.rank is not None and lp.rank <= 3]) == 3
        # the prompt token's own rank in the whole vocabulary, as vLLM reports it
        rank = entry[token].rank
        assert rank >= 1 and (rank <= 3) == (len(entry) == 3)
        assert rank == 1 + sum(lp.logprob > entry[token].logprob for t, lp in entry.items() if t != token) or rank > 3
    for j, token in enumerate(generated):
        ours, theirs = prompt_logprobs[len(PROMPT["prompt_token_ids"]) + j], first.outputs[0].logprobs[j]
        assert set(ours) == set(theirs)
        for t in ours:
            np.testing.assert_allclose(ours[t].logprob, theirs[t].logprob, atol=1e-4)
            assert ours[t].rank == theirs[t].rank and ours[t].decoded_token == theirs[t].decoded_token
    assert first.prompt_logprobs is None


def test_chunked_prefill_a_cache_hit_and_n_give_the_same_prompt_logprobs(llm):
    params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
    (whole,) = llm.generate([PROMPT], params, use_tqdm=False)
    # The prompt is in the prefix cache now: a request with prompt_logprobs must still compute every position.
    (again,) = llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1, n=2),
                            use_tqdm=False)
    chunked = LLM(dtype="float32", max_num_batched_tokens=16, async_scheduling=False)
    (pieces,) = chunked.generate([PROMPT], params, use_tqdm=False)
    expected = _values(whole.prompt_logprobs)
    assert len(expected) == 40 and all(p is not None for p in expected[1:])
    for out in (again, pieces):
        got = _values(out.prompt_logprobs)
        assert len(got) == 40 and got[0] is None
        for ours, theirs in zip(got[1:], expected[1:]):
            assert set(ours) == set(theirs)
            np.testing.assert_allclose([ours[t] for t in theirs], list(theirs.values()), atol=2e-3)
    assert pieces.outputs[0].token_ids == whole.outputs[0].token_ids
    assert [o.token_ids for o in again.outputs] == [whole.outputs[0].token_ids] * 2
