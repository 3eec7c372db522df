"""The disaggregated mode's real multi-process path on CPU (the CPU form): a holder worker owning the weights
and KV pool in shared memory, a decode and a prefill worker mapping them, steps of the two phases in flight at
once. Greedy outputs must equal the aggregated engine's, under forced splits and under aggregation, with the aggregate
and decode workers on their own copies of the weights (decode_weights="private").

What differs from the GPU: no MPS (SM shares are not enforced) and XLA on CPU does not write a donated external
buffer in place, so workers copy the slots a step wrote back into shared memory (runner/workers/worker.py).
"""

import random

import pytest

from nexus_jax import LLM, SamplingParams
from nexus_jax.disagg.partition import Slo
from nexus_jax.testing.latency import force_split
from nexus_jax.testing.runs import one_by_one, run_all
from runner.workers.pool import WorkerError

PROMPT_RNG = random.Random(3)
PROMPTS = [[PROMPT_RNG.randrange(3, 500) for _ in range(PROMPT_RNG.randint(2, 70))] for _ in range(10)]
MAX_TOKENS = [PROMPT_RNG.randint(1, 16) for _ in PROMPTS]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(None, max_num_batched_tokens=64)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        [SamplingParams(temperature=0.0, max_tokens=n) for n in MAX_TOKENS], use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def llm():
    # private weights: the decode-bound workers compute on copies (on a GPU, XLA's memory instead of the arena's)
    llm = LLM(None, disaggregation="on", sm_ladder=(50,), max_num_batched_tokens=64, decode_weights="private")
    yield llm
    llm.shutdown()


def staggered_run(engine, seed, fault=None, fault_step=0):
    """The final outputs of PROMPTS arriving staggered; fault(), if given, runs once `fault_step` steps ran."""
    def before_step(k):
        if fault is not None and k == fault_step:
            fault()
    done = run_all(engine, one_by_one(PROMPTS, MAX_TOKENS, seed, prefix=f"s{seed}-"), before_step)
    return [done[f"s{seed}-{i}"] for i in range(len(PROMPTS))]


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("tbt", [1e-9, 10.0])
def test_greedy_outputs_equal_the_aggregated_engine(llm, reference, tbt):
    engine = llm.llm_engine
    # TTFT counts the seconds a prompt has waited: on a loaded 2-core box prompts can wait past 2 s, every mode
    # then misses it and the split wins on a smaller miss; a TTFT nothing misses keeps the test on the TBT.
    engine.controller.slo = Slo(ttft=3600.0, tbt=tbt)
    force_split(engine.controller, tbt < 1)
    before, pipelined = dict(engine.phase_steps), engine.pipelined_steps
    assert tokens(staggered_run(engine, seed=int(tbt > 1))) == reference
    steps = {k: engine.phase_steps[k] - before[k] for k in before}
    if tbt < 1:
        assert steps["mixed"] == 0 and steps["decode"] > 0 and steps["prefill"] > 0
        # decode steps went to the worker while it still held the step whose samples they take
        assert engine.pipelined_steps > pipelined
    else:
        assert steps["mixed"] > 0
    assert engine.block_manager.usage == 0.0


def test_workers_share_one_pool_and_report_their_roles(llm):
    engine = llm.llm_engine
    infos = {name: h.info() for name, h in engine.pool.workers.items()}
    assert set(infos) == {"holder", "aggregate", "decode-50", "prefill-50"}
    assert len({i["pid"] for i in infos.values()}) == 4
    assert [n for n, i in infos.items() if i["holder"]] == ["holder"]
    assert {i["num_blocks"] for i in infos.values()} == {engine.block_manager.num_blocks}
    assert not any(i["in_place"] for i in infos.values())  # the CPU form copies written slots back
    assert [n for n, i in infos.items() if i["private_weights"]] == ["aggregate", "decode-50"]
    assert {i["memory"] for i in infos.values()} == {None}  # XLA keeps no allocator stats on CPU
    assert engine.stats()["sm_isolation"] is False
    assert engine.stats()["private_weights"] == ["aggregate", "decode-50"]


def test_a_worker_answers_a_message_it_does_not_take_with_an_error(llm):
    handle = llm.llm_engine.pool.workers["decode-50"]
    with pytest.raises(WorkerError, match="does not take a str message"):
        handle.call("info")  # the former protocol named operations by string
    assert handle.alive() and handle.info()["name"] == "decode-50"  # and it keeps serving


def run_killing(engine, seed, victim: str, after_steps: int):
    """A staggered run in which worker `victim` is killed (SIGKILL) once `after_steps` steps have run."""
    return staggered_run(engine, seed, lambda: engine.pool.workers[victim].process.kill(), after_steps)


@pytest.mark.parametrize("victim, after_steps", [("aggregate", 0), ("decode-50", 6), ("prefill-50", 2)])
def test_a_killed_worker_is_replaced_and_its_requests_recomputed(llm, reference, victim, after_steps):
    engine = llm.llm_engine
    engine.controller.slo = Slo(tbt=1e-9)
    force_split(engine.controller)  # splits: both phase workers get steps
    old_pid = engine.pool.workers[victim].process.pid
    before = dict(engine.stats()["faults"])
    outs = run_killing(engine, seed=5, victim=victim, after_steps=after_steps)
    assert tokens(outs) == reference  # nothing lost, nothing changed
    assert all(o.error is None for o in outs)
    faults = engine.stats()["faults"]
    assert engine.pool.workers[victim].process.pid != old_pid and engine.pool.workers[victim].alive()
    assert faults["worker_replacements"] == before["worker_replacements"] + 1
    assert faults["pool_restarts"] == before["pool_restarts"]


def test_a_killed_holder_restarts_the_pool_and_recomputes_everything(llm, reference):
    engine = llm.llm_engine
    engine.controller.slo = Slo(tbt=1e-9)
    force_split(engine.controller)
    old = engine.pool
    shm_names = [f"/dev/shm/{a.name}" for a in (old.shared.weights, old.shared.kv)]
    before = engine.stats()["faults"]["pool_restarts"]
    # The holder runs no steps, so its death shows when a worker dies with it: kill both.
    outs = run_killing(engine, seed=6, victim="holder", after_steps=4)
    if engine.stats()["faults"]["pool_restarts"] == before:  # the run ended before any step failed
        engine.pool.workers["decode-50"].process.kill()
        outs = run_killing(engine, seed=7, victim="prefill-50", after_steps=3)
    assert tokens(outs) == reference
    assert engine.stats()["faults"]["pool_restarts"] == before + 1 and engine.pool is not old
    assert not any(__import__("os").path.exists(n) for n in shm_names)  # the dead holder's segments unlinked
