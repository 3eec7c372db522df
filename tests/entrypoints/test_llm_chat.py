"""LLM.chat renders conversations with the chat template; logprobs carry each token's text."""

import jinja2
import pytest

from nexus_jax import LLM, SamplingParams
from nexus_jax.testing.engines import expected, make_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_chat_one_conversation_or_several_matches_the_templated_prompt(tokenizer):
    llm = LLM.from_engine(make_engine(tokenizer=tokenizer))
    first = [{"role": "user", "content": "Hello!"}]
    second = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    (one,) = llm.chat(first, GREEDY, use_tqdm=False)
    ids = tokenizer.apply_chat_template(first, tokenize=True)
    assert one.prompt_token_ids == ids and ids[0] == tokenizer.bos_token_id and ids.count(ids[0]) == 1
    assert one.outputs[0].token_ids == expected(ids, 4)
    both = llm.chat([first, second], GREEDY, use_tqdm=False)
    assert [o.prompt_token_ids for o in both] == [ids, tokenizer.apply_chat_template(second, tokenize=True)]
    with pytest.raises(jinja2.TemplateError, match="unknown role"):
        llm.chat([{"role": "robot", "content": "x"}], GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="no tokenizer"):
        LLM.from_engine(make_engine()).chat(first, GREEDY)


def test_logprobs_carry_the_decoded_token_text(tokenizer):
    llm = LLM.from_engine(make_engine(tokenizer=tokenizer))
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=2, ignore_eos=True)
    (out,) = llm.generate([{"prompt_token_ids": [40, 41]}], params, use_tqdm=False)
    for position in out.outputs[0].logprobs:
        assert len(position) == 2
        assert all(lp.decoded_token == tokenizer.decode([t], skip_special_tokens=False) for t, lp in position.items())
    (plain,) = LLM.from_engine(make_engine()).generate([{"prompt_token_ids": [40]}], params, use_tqdm=False)
    assert all(lp.decoded_token is None for position in plain.outputs[0].logprobs for lp in position.values())
