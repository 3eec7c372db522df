"""Async scheduling under faults: an abort while the request's step is in flight, and a step that fails.

With the overlap, step() returns while a step is still running on the device, so an abort between two step()
calls meets a request whose step is in flight: its blocks may be freed only once that step is done (here the
mock executor, which checks every block table against what it stored, raises if they are reused too early).
A failing step fails only its own requests: those not in it, including those of the step dispatched right after
it, finish with exactly the outputs the mock's rule gives.
"""

from __future__ import annotations

import itertools

import pytest

from nexus_jax import SamplingParams
from nexus_jax.testing.engines import expected, make_engine
from nexus_jax.testing.runs import assert_same_outputs, both, drive, greedy, ids


def record_plans(engine) -> list[set[str]]:
    """Makes the engine record the request ids (groups) of every plan it will run, in order; returns the list."""
    plans: list[set[str]] = []
    schedule = engine.scheduler.schedule

    def recording(*args, **kwargs):
        plan = schedule(*args, **kwargs)
        if plan.chunks:
            plans.append({c.request.group_id for c in plan.chunks})
        return plan
    engine.scheduler.schedule = recording
    return plans


class _Lost:
    """The handle of a step whose device failed: the error surfaces when its samples are read, as on a GPU."""

    def result(self):
        raise RuntimeError("device lost")


def fail_step(engine, index: int) -> None:
    """Makes the engine's (mock) executor fail its step number `index` (0-based), wherever it runs it: every
    single step goes through dispatch (the synchronous step() too), and the failure shows at result()."""
    real, calls = engine.executor.dispatch, itertools.count()

    def flaky(step):
        handle = real(step)
        return _Lost() if next(calls) == index else handle
    engine.executor.dispatch = flaky


@pytest.mark.parametrize("abort_at", [1, 2, 5])
def test_abort_while_its_step_is_in_flight(abort_at):
    # A small pool (24 blocks of 4), so the victim's blocks are soon handed to the late arrivals: reused before
    # the in-flight step that writes them is done, the mock would find a wrong block table and raise.
    prompts = {f"r{i}": [20 * i + j for j in range(9)] for i in range(4)}
    workload = {0: [(rid, ids(p), greedy(24)) for rid, p in prompts.items()]
                + [("victim", ids(range(100, 112)), SamplingParams(n=2, max_tokens=30))],
                abort_at + 1: [("late0", ids(range(150, 163)), greedy(10)), ("late1", ids([7]), greedy(12))]}
    aborted, plans = [], {}

    def make(**cfg):
        engine = make_engine(num_blocks=24, max_model_len=256, **cfg)
        plans[engine] = record_plans(engine)
        return engine

    def abort(engine, k):
        if k == abort_at:
            assert "victim" in plans[engine][-1]  # in the step last dispatched: with the overlap, still running
            aborted.append(engine.abort_request("victim"))
    sync, overlapped = both(make, workload, abort)
    assert aborted == [True, True]
    others = [rid for rid in sync.final if rid != "victim"]
    assert_same_outputs(sync, overlapped, others)
    for run in (sync, overlapped):
        victim = run.final["victim"]
        assert [c.finish_reason for c in victim.outputs] == ["abort", "abort"]
        for c in victim.outputs:  # what it had produced when aborted, never more
            assert c.token_ids == expected(list(range(100, 112)), len(c.token_ids))
        for rid in others:
            out = run.final[rid].outputs[0]
            assert out.finish_reason == "length"
            assert out.token_ids == expected(run.final[rid].prompt_token_ids, len(out.token_ids))
        assert not run.engine.has_unfinished_requests()
        # The engine serves on, on the blocks the victim gave back.
        after = drive(run.engine, {0: [("after", ids([3]), greedy(4))]})
        assert after.final["after"].outputs[0].token_ids == [4, 5, 6, 7]


def test_abort_of_every_request_in_flight_leaves_the_engine_idle():
    workload = {0: [(f"r{i}", ids([10 * i + 1]), greedy(50)) for i in range(3)]}

    def abort_all(engine, k):
        if k == 3:
            assert all(engine.abort_request(f"r{i}") for i in range(3))
    sync, overlapped = both(make_engine, workload, abort_all)
    for run in (sync, overlapped):
        assert {o.outputs[0].finish_reason for o in run.final.values()} == {"abort"}
        assert max(run.finished_at.values()) <= 4  # the aborts are reported by the next step()


FAIL_AT = 3  # the executor step that fails (0-based)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failing_step_fails_only_its_requests(overlap):
    engine = make_engine(async_scheduling=overlap)
    plans = record_plans(engine)
    fail_step(engine, FAIL_AT)
    # One request arrives every step, so the steps right after the failed one start requests not in it.
    prompts = {f"r{k}": [10 * k + 1] for k in range(8)}
    run = drive(engine, {k: [(f"r{k}", ids(prompts[f"r{k}"]), greedy(8))] for k in range(8)})
    failed = plans[FAIL_AT]
    assert failed and failed < set(run.final), failed
    for rid, out in run.final.items():
        if rid in failed:
            assert out.outputs[0].finish_reason == "error" and "device lost" in out.error, rid
        else:  # not in the failed step, so never fed anything it sampled
            assert out.error is None and out.outputs[0].finish_reason == "length", rid
            assert out.outputs[0].token_ids == expected(prompts[rid], 8), rid
    assert any(rid not in failed for rid in plans[FAIL_AT + 1])  # the step after it did run other requests
    # The engine serves on.
    after = drive(engine, {0: [("after", ids([3]), greedy(4)), ("n", ids([9]), SamplingParams(n=2, max_tokens=3))]})
    assert after.final["after"].outputs[0].token_ids == [4, 5, 6, 7]
    assert [c.token_ids for c in after.final["n"].outputs] == [[10, 11, 12]] * 2


def test_a_failing_step_with_streams_and_stops_fails_only_its_requests():
    # EOS stops around the failure: a request that stopped just before it is not in the failed step, or was
    # already finished; either way it keeps its output.
    engine = make_engine(eos=(15,), async_scheduling=True)
    plans = record_plans(engine)
    fail_step(engine, 2)
    workload = {0: [("stops_early", ids([13]), greedy(20)), ("long", ids([40]), greedy(10))],
                1: [("second", ids([60]), greedy(6))], 3: [("third", ids([80]), greedy(6))]}
    run = drive(engine, workload)
    failed = plans[2]
    for rid, out in run.final.items():
        if rid in failed and rid != "stops_early":
            assert out.outputs[0].finish_reason == "error", rid
        elif rid not in failed:
            assert out.error is None and out.outputs[0].finish_reason in ("stop", "length"), rid
    # "stops_early" samples EOS (15) at step 1: it either finished cleanly or was still in the failed step
    early = run.final["stops_early"].outputs[0]
    assert early.token_ids == [14, 15] or early.finish_reason == "error"
    assert early.token_ids == [14, 15][:len(early.token_ids)]
    assert run.final["third"].outputs[0].token_ids == expected([80], 6)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_step_that_lost_the_pool_recomputes_every_other_request(overlap):
    # An executor with recover() (the real runner) says after a failure whether its KV pool was lost. Then the
    # step dispatched on top of the failed one is dropped, and every running request is recomputed from its
    # tokens: none but the failed step's ends with an error, and none notices in its output.
    engine = make_engine(async_scheduling=overlap)
    plans = record_plans(engine)
    fail_step(engine, FAIL_AT)
    lost = []
    engine.executor.recover = lambda: lost.append(True) or True
    prompts = {f"r{k}": [10 * k + 1] for k in range(8)}
    run = drive(engine, {k: [(f"r{k}", ids(prompts[f"r{k}"]), greedy(8))] for k in range(8)})
    failed = plans[FAIL_AT]
    assert lost == [True]
    for rid, out in run.final.items():
        if rid in failed:
            assert out.outputs[0].finish_reason == "error", rid
        else:
            assert out.error is None and out.outputs[0].token_ids == expected(prompts[rid], 8), rid
    stats = engine.recoveries
    assert stats["pool_losses"] == 1 and stats["dropped_steps"] == int(overlap), stats
    if overlap:  # the step in flight beside the failed one ran requests not in it: they were recomputed
        assert stats["requeued_requests"] >= len(set(plans[FAIL_AT + 1]) - failed) > 0, stats
