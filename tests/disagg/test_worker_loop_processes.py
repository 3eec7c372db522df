"""decode_loop="worker" on real worker processes (the CPU form: each loop step's K/V copied into shared memory
before its tokens go back): outputs equal the aggregated engine's, greedy and seeded, and a killed decode worker
costs no request."""

import random

import pytest

from nexus_jax import LLM, SamplingParams
from nexus_jax.testing.runs import one_by_one

PROMPT_RNG = random.Random(4)
PROMPTS = [[PROMPT_RNG.randrange(3, 500) for _ in range(PROMPT_RNG.randint(2, 60))] for _ in range(8)]
MAX_TOKENS = [PROMPT_RNG.randint(1, 24) for _ in PROMPTS]


def params(i: int) -> SamplingParams:
    """Even requests greedy, odd ones seeded at temperature 0.8; two of them want log-probs."""
    logprobs = 2 if i in (1, 2) else None
    if i % 2 == 0:
        return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[i], logprobs=logprobs)
    return SamplingParams(temperature=0.8, seed=1000 + i, max_tokens=MAX_TOKENS[i], logprobs=logprobs)


@pytest.fixture(scope="module")
def reference():
    llm = LLM(None, max_num_batched_tokens=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], [params(i) for i in range(len(PROMPTS))],
                        use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm():
    llm = LLM(None, disaggregation="on", sm_ladder=(50,), max_num_batched_tokens=64, decode_loop="worker",
              aggregate_when_safe=False)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def engine_loop():
    llm = LLM(None, disaggregation="on", sm_ladder=(50,), max_num_batched_tokens=64, aggregate_when_safe=False)
    yield llm
    llm.shutdown()


def staggered_run(engine, seed, fault=None, outputs=False):
    """PROMPTS arriving one by one; fault(), if given, runs before each step until it returns True."""
    arrivals = one_by_one(PROMPTS, MAX_TOKENS, seed, prefix=f"s{seed}-")
    done, k = {}, 0
    while engine.has_unfinished_requests() or any(i >= k for i in arrivals):
        for rid, prompt, _ in arrivals.get(k, []):
            engine.add_request(rid, {"prompt_token_ids": prompt}, params(int(rid.rsplit("-", 1)[1])))
        if fault is not None and fault():
            fault = None
        done.update({o.request_id: o for o in engine.step() if o.finished})
        k += 1
    outs = [done[f"s{seed}-{i}"].outputs[0] for i in range(len(PROMPTS))]
    return outs if outputs else [o.token_ids for o in outs]


def test_outputs_equal_the_aggregated_engine_and_decode_runs_without_plans(llm, reference):
    engine = llm.llm_engine
    before = dict(engine.loop.counts)
    assert staggered_run(engine, seed=1) == reference
    counts = engine.loop.counts
    assert engine.phase_steps["decode"] == 0 and counts["loop_steps"] > before["loop_steps"]
    assert counts["messages"] - before["messages"] < counts["loop_steps"] - before["loop_steps"]
    assert engine.block_manager.usage == 0.0 and not engine.loop.held


def test_outputs_equal_the_engine_loop_on_the_same_workers(llm, engine_loop):
    """The two loops side by side on the same staggered run, greedy and seeded."""
    worker_loop = staggered_run(llm.llm_engine, seed=3, outputs=True)
    engine_loop_outs = staggered_run(engine_loop.llm_engine, seed=3, outputs=True)
    assert [o.token_ids for o in engine_loop_outs] == [o.token_ids for o in worker_loop]
    for a, b in zip(engine_loop_outs, worker_loop):
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or (), b.logprobs or ()):  # batches differ between the loops: float noise only
            assert x.keys() == y.keys()
            assert all(x[t].logprob == pytest.approx(y[t].logprob, abs=1e-4) for t in x)
    assert engine_loop.llm_engine.phase_steps["decode"] > 0 and engine_loop.llm_engine.loop is None


def test_a_killed_decode_worker_is_replaced_and_its_rows_recomputed(llm, reference):
    engine = llm.llm_engine
    victim = engine.loop.worker
    old_pid = engine.pool.workers[victim].process.pid
    before = dict(engine.faults)
    killed = []

    def kill() -> bool:
        if len(engine.loop.held) < 2 or not engine.loop.counts["loop_steps"]:
            return False
        killed.append(len(engine.loop.held))
        engine.pool.workers[victim].process.kill()
        return True
    assert staggered_run(engine, seed=2, fault=kill) == reference
    assert killed and engine.pool.workers[victim].process.pid != old_pid
    assert engine.faults["requeued_requests"] >= before["requeued_requests"] + 2
    assert engine.faults["worker_replacements"] == before["worker_replacements"] + 1
    assert engine.block_manager.usage == 0.0 and not engine.loop.held
