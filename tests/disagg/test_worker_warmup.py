"""After warm-up, serving compiles nothing in any worker (the multi-process CPU form): a program compiled on first
use stalls its worker's whole batch (3 s per program on the 8B shape, RESULTS.md, where the decode worker's first
pipelined step of each size recompiled because warm-up fed it an uncommitted array)."""

import random

import pytest

from nexus_jax import LLM
from nexus_jax.testing.latency import force_split
from nexus_jax.testing.runs import one_by_one, run_all

RNG = random.Random(3)
PROMPTS = [[RNG.randrange(3, 500) for _ in range(RNG.randint(2, 60))] for _ in range(16)]
MAX_TOKENS = [RNG.randint(1, 30) for _ in PROMPTS]


@pytest.mark.parametrize("split", [True, False])  # forced split; the controller's choice (mixed steps included)
def test_serving_after_warmup_compiles_nothing(split):
    llm = LLM(None, disaggregation="on", sm_ladder=(50,), max_num_batched_tokens=64, max_num_seqs=8,
              max_model_len=128, warmup=True, aggregate_when_safe=not split, decode_weights="private")
    try:
        engine = llm.llm_engine
        force_split(engine.controller, split)

        def compiled():
            return {name: handle.info()["compiled"] for name, handle in engine.pool.workers.items()}

        warm = compiled()
        assert warm["decode-50"] > 0 and warm["prefill-50"] > 0 and (split or warm["aggregate"] > 0)
        done = run_all(engine, one_by_one(PROMPTS, MAX_TOKENS, int(split), prefix="w-"), lambda k: None)
        assert len(done) == len(PROMPTS)
        assert engine.phase_steps["decode" if split else "mixed"] > 0
        assert compiled() == warm
        assert engine.compiled_programs() == sum(warm.values())  # what `bench serve` counts around each run
    finally:
        llm.shutdown()
