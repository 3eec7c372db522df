"""The decode worker's queued step waits for a prefill in flight (HandoffTimer): a finished prefill joins the very
next decode step instead of one a whole step later (the split's TBT misses on the H200, RESULTS.md)."""

import pytest

from nexus_jax.testing.engines import expected
from nexus_jax.testing.runs import greedy, run_all, staggered
from runner.workers.handoff import HandoffTimer
from tests.disagg.test_disagg_engine import make_engine


class Clock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def timer_with_steps(clock: Clock, step: float = 0.010) -> HandoffTimer:
    timer = HandoffTimer(clock=clock)
    start = timer.sent(queued=False)
    clock.t += step
    timer.landed(start)
    return timer


def test_no_join_coming_or_no_measured_step_plans_at_once():
    clock = Clock()
    assert HandoffTimer(clock=clock).plan_at(clock(), join_coming=True) == 0.0  # no step measured yet
    timer = timer_with_steps(clock)
    assert timer.plan_at(clock(), join_coming=False) == 0.0
    assert timer.plan_at(None, join_coming=True) == 0.0  # the running step's start unknown
    assert timer.counts["deferred"] == 0 and timer.wait_timeout(0.005) == 0.005


def test_a_join_coming_defers_to_lead_before_the_predicted_end():
    clock = Clock()
    timer = timer_with_steps(clock)
    running = clock()  # the queued step started as the measured one landed
    at = timer.plan_at(running, join_coming=True)
    assert abs(at - (running + 0.010 - 0.3 * 0.010)) < 1e-9
    assert timer.counts["deferred"] == 1 and 0 < timer.wait_timeout(0.005) <= 0.005
    clock.t += 0.002
    assert timer.plan_at(running, join_coming=True) == at and timer.counts["deferred"] == 1  # same deferral
    assert abs(timer.wait_timeout(0.1) - 0.005) < 1e-9  # wakes at the deadline, not after the poll
    clock.t = at
    assert timer.plan_at(running, join_coming=True) == 0.0  # in time: plan now, the lead shrinks a little
    assert timer.lead < 0.3 and timer.counts["late"] == 0


def test_a_step_that_lands_before_the_deadline_grows_the_lead():
    clock = Clock()
    timer = timer_with_steps(clock)
    running = clock()
    timer.plan_at(running, join_coming=True)
    clock.t += 0.004  # landed early: the device would have idled until the deadline
    timer.landed(running)
    assert timer.counts["late"] == 1 and timer.lead > 0.3 and timer.deadline is None
    assert timer.step_time < 0.010  # the short step counts in the median


def test_a_step_that_compiled_does_not_hold_the_next_ones_back():
    clock = Clock()
    timer = timer_with_steps(clock, step=3.0)  # the first step compiled
    for _ in range(2):
        start = timer.sent(queued=False)
        clock.t += 0.010
        timer.landed(start)
    assert timer.step_time == pytest.approx(0.010)


def test_a_prefill_in_flight_joins_the_step_queued_behind_the_running_decode():
    engine = make_engine(ladder=(50,), tbt=1e-9)  # every step with both phases splits
    engine.controller.allow_aggregate = False  # and decode alone stays on the decode worker: it never moves
    clock = Clock()
    engine.handoff.clock = clock
    lands: set[str] = set(engine.pool.workers)  # the workers whose finished step the engine's wait returns
    engine.pool.wait = lambda handles, timeout=None: [h for h in handles if h.name in lands and (h.busy or h.unread)]
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3, 4]}, greedy(60), stream=True)
    while not any(o.outputs[0].token_ids for o in engine.step()):  # a's prefill, then its first token
        pass
    lands.clear()
    engine.step()
    engine.step()  # a's first decode step runs, the next queued behind it (no join coming)
    (decode_worker, flights), = [(n, fl) for n, fl in engine.flights.items() if fl]
    assert [f.phase for f in flights] == ["decode", "decode"]
    clock.t += 0.010
    lands.add(decode_worker)
    engine.step()  # the first lands after 10 ms: the measured step
    assert engine.handoff.step_time == pytest.approx(0.010)
    lands.clear()
    engine.add_request("b", {"prompt_token_ids": [5, 6, 7]}, greedy(5))
    engine.step()  # b's prefill goes out (the queued decode step is planned before it, at once)
    prefill_worker = next(n for n, fl in engine.flights.items() if fl and fl[0].phase == "prefill")
    assert len(engine.flights[decode_worker]) == 2
    clock.t += 0.010
    lands.add(decode_worker)
    engine.step()  # a decode step lands; the one behind it runs from now
    lands.clear()
    engine.step()
    engine.step()
    assert len(engine.flights[decode_worker]) == 1  # the next step waits for b's first token
    assert engine.handoff.counts["deferred"] == 1 and engine.handoff.deadline == pytest.approx(clock.t + 0.007)
    lands.add(prefill_worker)
    engine.step()  # b's prefill lands
    lands.clear()
    engine.step()  # the queued step is planned at once, b in it
    queued = engine.flights[decode_worker][-1].plan
    assert "b" in {c.request.request_id for c in queued.decodes}
    assert engine.handoff.deadline is None
    lands.update(engine.pool.workers)
    done = run_all(engine)
    assert done["a"].outputs[0].token_ids == expected([1, 2, 3, 4], 60)
    assert done["b"].outputs[0].token_ids == expected([5, 6, 7], 5)


def test_outputs_are_unchanged_when_deferrals_happen():
    engine = make_engine(tbt=1e-9, seed=3)
    clock = Clock()
    engine.handoff.clock = clock
    engine.handoff.durations.append(0.010)
    arrivals = staggered(3)
    done = run_all(engine, arrivals, before_step=lambda k: setattr(clock, "t", clock.t + 0.004))
    for reqs in arrivals.values():
        for rid, prompt, n in reqs:
            assert done[rid].outputs[0].token_ids == expected(prompt, n), rid
    assert engine.handoff.counts["deferred"] > 0
    assert engine.block_manager.usage == 0.0


def test_a_join_that_comes_ends_the_deferral_without_counting_it_late():
    clock = Clock()
    timer = timer_with_steps(clock)
    running = clock()
    timer.plan_at(running, join_coming=True)
    clock.t += 0.002
    assert timer.plan_at(running, join_coming=False) == 0.0  # the prefill landed: plan now
    clock.t += 0.008
    timer.landed(running)  # even if nothing was sent after all
    assert timer.counts["late"] == 0 and timer.lead == pytest.approx(0.3)
