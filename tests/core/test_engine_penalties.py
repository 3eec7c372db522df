"""Penalties end to end: the default model's greedy completions under penalties equal transformers' generate with
the same penalties, through the overlapped loop (the token in flight counts), the synchronous loop and multi-step
decoding (which penalized requests leave for single steps)."""

import numpy as np
import pytest

from nexus_jax import LLM, SamplingParams
from runner.model.default_model import default_model_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 60, 61, 62, 60], [1, 300, 7, 7, 7, 9]]
NEW = 12


class OpenAIPenalties(transformers.LogitsProcessor):
    """frequency * count + presence for each token the output holds (no transformers processor has them)."""

    def __init__(self, prompt_len: int, frequency: float, presence: float):
        self.prompt_len, self.frequency, self.presence = prompt_len, frequency, presence

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            for token in set(ids):
                scores[row, token] -= self.frequency * ids.count(token) + self.presence
        return scores


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


def hf_greedy(model, prompt, repetition, frequency, presence):
    processors = transformers.LogitsProcessorList([OpenAIPenalties(len(prompt), frequency, presence)])
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             repetition_penalty=repetition, logits_processor=processors)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("engine", [{}, {"async_scheduling": False, "num_scheduler_steps": 4}])
def test_greedy_under_penalties_matches_transformers(hf_model, engine):
    llm = LLM(dtype="float32", **engine)
    try:
        for repetition, frequency, presence in ((1.8, 0.0, 0.0), (1.0, 1.5, 0.5), (1.3, 0.4, -0.3)):
            params = SamplingParams(temperature=0.0, max_tokens=NEW, min_tokens=NEW, repetition_penalty=repetition,
                                    frequency_penalty=frequency, presence_penalty=presence)
            outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
            for prompt, out in zip(PROMPTS, outs):
                assert out.outputs[0].token_ids == hf_greedy(hf_model, prompt, repetition, frequency, presence)
        plain = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(temperature=0.0, max_tokens=NEW,
                                                                                 min_tokens=NEW), use_tqdm=False)
        penalized = llm.generate([{"prompt_token_ids": PROMPTS[1]}], SamplingParams(
            temperature=0.0, max_tokens=NEW, min_tokens=NEW, frequency_penalty=2.0), use_tqdm=False)
        # the penalty changes what a random model repeats: fewer repeats of its most repeated token
        most = max(np.bincount(plain[0].outputs[0].token_ids))
        assert max(np.bincount(penalized[0].outputs[0].token_ids)) < most
    finally:
        llm.shutdown()


def test_penalty_values_are_checked():
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0.0),
                         ("repetition_penalty", -1.0), ("presence_penalty", "1")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
    assert not SamplingParams(repetition_penalty=1, presence_penalty=0).has_penalties
    assert SamplingParams(frequency_penalty=0.1).has_penalties
