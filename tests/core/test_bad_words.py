"""bad_words (vLLM's semantics) on the engine: tokenized with and without a leading space, one-token words banned at
every step, longer words' last token banned right after the rest; the overlapped loop holds such a request until
its sample in flight is known (late limits; the disaggregated engine holds such a request a step), and gives the
synchronous loop's tokens."""

import pytest

from nexus_jax import SamplingParams
from nexus_jax.core.bad_words import BadWords
from nexus_jax.testing.engines import make_engine
from nexus_jax.testing.runs import ids, run_all


def test_words_are_tokenized_both_ways_and_checked(tokenizer):
    words = BadWords(["the", "ab"], tokenizer, 512)
    assert tokenizer.encode("ab", add_special_tokens=False) == [104, 105]
    assert words.always == [403, 268] and words.tails == [((104,), 105), ((264,), 105)]
    assert words.needs_history
    assert words.banned([7, 104]) == [403, 268, 105] and words.banned([104, 7]) == [403, 268]
    assert not BadWords(["the"], tokenizer, 512).needs_history
    with pytest.raises(ValueError, match="outside the vocabulary"):
        BadWords(["the"], tokenizer, 300)
    with pytest.raises(ValueError, match="bad_words need a tokenizer"):
        make_engine().add_request("r", ids([1]), SamplingParams(bad_words=["the"]))


def _run(tokenizer, async_scheduling: bool):
    engine = make_engine(tokenizer=tokenizer, async_scheduling=async_scheduling)
    steps = []
    dispatch = engine.executor.dispatch
    engine.executor.dispatch = lambda step: steps.append(step) or dispatch(step)
    greedy = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("multi", ids([5, 103]), SamplingParams(bad_words=["ab"], **greedy))
    engine.add_request("single", ids([5, 402]), SamplingParams(bad_words=["the"], **greedy))
    engine.add_request("plain", ids([5, 200]), SamplingParams(**greedy))
    outputs = run_all(engine)
    return {rid: out.outputs[0].token_ids for rid, out in outputs.items()}, steps


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_the_engine_bans_what_the_words_spell(tokenizer, async_scheduling):
    tokens, _ = _run(tokenizer, async_scheduling)
    assert tokens["multi"] == [104, 106, 107, 108, 109, 110]  # 105 follows 104 in "ab"
    assert tokens["single"] == [404, 405, 406, 407, 408, 409]  # 403 is "the"
    assert tokens["plain"] == [201, 202, 203, 204, 205, 206]


def test_the_overlapped_loop_runs_the_request_that_needs_its_last_token_every_step(tokenizer):
    tokens, steps = _run(tokenizer, async_scheduling=True)
    assert tokens == _run(tokenizer, async_scheduling=False)[0]
    # Every request in every step, as in the synchronous loop: the multi-token word's ban depends on the sample
    # in flight, so those steps take their banned ids late (StepInput.late), after that sample has landed.
    assert [len(s.decodes) + len(s.prefills) for s in steps] == [3] * 6
    assert steps[0].late is None and all(s.late is not None for s in steps[1:])


def test_the_disaggregated_engine_waits_for_the_last_token_too(tokenizer):
    from nexus_jax import EngineConfig
    from nexus_jax.disagg.cost_model import CostModel
    from nexus_jax.disagg.engine import DisaggEngine
    from nexus_jax.disagg.partition import PartitionController, Slo
    from nexus_jax.testing.engines import VOCAB
    from nexus_jax.testing.latency import force_split
    from nexus_jax.testing.mock_pool import MockPool
    from runner.model.config import ModelConfig

    ladder = (30, 50)
    controller = PartitionController(CostModel.analytic(ModelConfig.preset("llama-3.1-8b"), 989e12, 3.35e12), ladder,
                                     Slo(tbt=1e-9))
    force_split(controller)  # split steps, pipelined decodes
    engine = DisaggEngine(EngineConfig(block_size=4, sm_ladder=ladder, max_num_batched_tokens=64),
                          MockPool(ladder, 256, 4, 0), controller, tokenizer, max_model_len=512, vocab_size=VOCAB)
    greedy = dict(temperature=0.0, max_tokens=6, ignore_eos=True)
    engine.add_request("multi", ids([5, 101]), SamplingParams(bad_words=["ab"], **greedy))
    engine.add_request("plain", ids([5, 200]), SamplingParams(**greedy))
    tokens = {rid: out.outputs[0].token_ids for rid, out in run_all(engine).items()}
    assert tokens == {"multi": [102, 103, 104, 106, 107, 108], "plain": [201, 202, 203, 204, 205, 206]}
    assert engine.pipelined_steps > 0
