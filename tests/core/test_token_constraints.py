"""logit_bias and allowed_token_ids: checked in SamplingParams, carried to the sampler on every step of the request,
applied on the device (the sampler's own tests compare logit_bias with transformers' SequenceBiasLogitsProcessor)."""

import pytest

from nexus_jax import LLM, SamplingParams
from nexus_jax.testing.engines import make_engine
from nexus_jax.testing.runs import run_all


def test_logit_bias_is_checked_and_normalized():
    assert SamplingParams(logit_bias={5: 1, 7: -100}).logit_bias == {5: 1.0, 7: -100.0}
    assert SamplingParams(logit_bias={}).logit_bias is None
    for bias, message in (({5: 100.5}, "in \\[-100, 100\\]"), ({-1: 1.0}, "token id must be >= 0"),
                          ({"5": 1.0}, "token id must be an integer"), ({5: True}, "numbers"),
                          ([5], "mapping"), ({i: 1.0 for i in range(1025)}, "limit of 1024")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(logit_bias=bias)


def test_allowed_token_ids_are_checked_and_deduplicated():
    assert SamplingParams(allowed_token_ids=[5, 3, 5]).allowed_token_ids == [5, 3]
    for allowed, message in (([], "must not be empty"), ([-2], "must be >= 0"), ("5", "must be a list"),
                             ([1.5], "must be an integer")):
        with pytest.raises(ValueError, match=message):
            SamplingParams(allowed_token_ids=allowed)
    with pytest.raises(ValueError, match="allowed_token_ids names token ids outside the vocabulary"):
        make_engine().add_request("bad", {"prompt_token_ids": [1]}, SamplingParams(allowed_token_ids=[10**6]))


def test_every_step_of_a_biased_request_carries_its_bias_in_single_steps():
    engine = make_engine(num_scheduler_steps=4)
    steps = []
    name = "dispatch" if engine.overlap else "execute"
    real = getattr(engine.executor, name)
    setattr(engine.executor, name, lambda step: steps.append(step) or real(step))
    bias = {9: 2.5}
    engine.add_request("biased", {"prompt_token_ids": [30]}, SamplingParams(max_tokens=6, logit_bias=bias))
    engine.add_request("plain", {"prompt_token_ids": [50]}, SamplingParams(max_tokens=6))
    run_all(engine)
    assert len(steps) >= 6 and all(step.num_steps == 1 for step in steps)
    assert all(step.bias is not None and sorted(step.bias, key=bool) == [None, bias] for step in steps)
    with pytest.raises(ValueError, match="logit_bias names token ids outside the vocabulary"):
        engine.add_request("bad", {"prompt_token_ids": [1]}, SamplingParams(logit_bias={10**6: 1.0}))


def test_the_default_model_samples_what_the_bias_and_allowed_ids_force_or_forbid():
    llm = LLM(dtype="float32")
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompt = {"prompt_token_ids": [1, 60, 61, 62]}
    (plain,) = llm.generate([prompt], greedy, use_tqdm=False)
    first = plain.outputs[0].token_ids[0]
    forced, forbidden, allowed, sampled = llm.generate([prompt] * 4, [
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={77: 100.0}),
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logit_bias={first: -100.0}),
        SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, allowed_token_ids=[first, 300]),
        SamplingParams(temperature=1.5, seed=3, max_tokens=30, ignore_eos=True, allowed_token_ids=[9, 10, 11])],
        use_tqdm=False)
    assert forced.outputs[0].token_ids == [77] * 6
    assert forbidden.outputs[0].token_ids[0] != first and first not in forbidden.outputs[0].token_ids
    assert allowed.outputs[0].token_ids[0] == first and set(allowed.outputs[0].token_ids) <= {first, 300}
    assert set(sampled.outputs[0].token_ids) <= {9, 10, 11} and len(set(sampled.outputs[0].token_ids)) > 1
    llm.shutdown()
