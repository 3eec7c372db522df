"""A step that fails on the device leaves its outputs in error there: its samples, which the next step feeds on, and
the KV pool it updated. Every program that reads them fails the same way, so on a GPU one out-of-memory failed every
later step of the engine (`benchmarks/RESULTS.md`, 2026-12-07). These tests poison that state on the real runner
(CPU, the embedded model) with a program that fails at run time, as a device fault does, and check that only the
failed step's requests end with an error while the engine recovers: the rest, and everything after, complete with
the outputs of a run without the fault.
"""

from __future__ import annotations

import pytest

from nexus_jax import LLM
from nexus_jax.testing.runs import drive, greedy, ids

PROMPTS = {f"r{k}": [(37 * k + j) % 400 + 3 for j in range(5 + 3 * k)] for k in range(6)}
MAX_TOKENS = 6


def workload():
    # one request arrives per step: some run in the failed step, some only after it
    return {k: [(rid, ids(p), greedy(MAX_TOKENS))] for k, (rid, p) in enumerate(PROMPTS.items())}


@pytest.fixture(scope="module")
def llm():
    llm = LLM(None, max_num_batched_tokens=32, enable_prefix_caching=True)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def reference(llm):
    run = drive(llm.llm_engine, workload())
    return {rid: out.outputs[0].token_ids for rid, out in run.final.items()}


@pytest.mark.parametrize("what", ["pool", "samples"])
def test_the_engine_recovers_from_device_state_in_error(llm, reference, what):
    engine, runner = llm.llm_engine, llm.llm_engine.executor
    before = dict(engine.recoveries)

    def fault(engine, k):
        if k != 3:
            return
        if what == "pool":
            runner.kv_pool.delete()
        else:  # the samples of the step in flight, which the next step's decodes feed on
            assert runner._last_samples is not None
            runner._last_samples[0].delete()
    run = drive(engine, workload(), fault)
    errors = {rid for rid, out in run.final.items() if out.error is not None}
    assert errors, "the fault failed no step"
    for rid, out in run.final.items():
        if rid in errors:
            assert "deleted" in out.error and out.outputs[0].finish_reason == "error", rid
        else:  # recomputed where its K/V or its fed sample was lost: the same tokens
            assert out.outputs[0].token_ids == reference[rid], rid
    assert set(run.final) - errors, "no request outlived the fault"
    gained = {k: engine.recoveries[k] - before[k] for k in before}
    assert gained["pool_losses"] == (what == "pool"), gained
    # The engine serves on, as before the fault.
    after = drive(engine, workload())
    assert {rid: out.outputs[0].token_ids for rid, out in after.final.items()} == reference
