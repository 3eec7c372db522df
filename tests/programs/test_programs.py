"""Process table and program-aware policies over hand-made event sequences with a controlled clock."""

import random

import pytest

from nexus_jax.programs.policies import make_policy
from nexus_jax.programs.table import Call, ProgramConfig


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def policy(name, **cfg):
    clock = Clock()
    return make_policy(name, ProgramConfig(**cfg), clock), clock


def arrive(pol, clock, call_id, program_id, at, thread=""):
    clock.now = at
    pol.on_arrival(Call(call_id, program_id, at, 10, thread))


def run_call(pol, clock, call_id, seconds, finish=True):
    pol.on_scheduled(call_id, seconds, tokens=1)
    clock.now += seconds
    if finish:
        pol.on_finish(call_id)


def test_fcfs_orders_by_arrival():
    pol, clock = policy("fcfs")
    for i, t in enumerate([3.0, 1.0, 2.0]):
        arrive(pol, clock, f"c{i}", None, t)
    assert sorted(["c0", "c1", "c2"], key=pol.priority) == ["c1", "c2", "c0"]


def test_plas_enters_the_queue_of_the_programs_completed_service():
    pol, clock = policy("plas", beta=1e9)
    arrive(pol, clock, "a1", "A", 0.0)
    run_call(pol, clock, "a1", 5.0)                 # A has 5 s of completed service: queue 2 (bins 2, 4, 8, ...)
    arrive(pol, clock, "a2", "A", 6.0)
    arrive(pol, clock, "b1", "B", 7.0)              # a new program enters the top queue
    assert pol.priority("a2")[0] == 2 and pol.priority("b1")[0] == 0
    assert sorted(["a2", "b1"], key=pol.priority) == ["b1", "a2"]
    prog = pol.table.programs["A"]
    assert (prog.service, prog.calls, prog.active, prog.last_arrival, prog.last_completion) == (5.0, 2, 1, 6.0, 5.0)


def test_atlas_counts_the_critical_path_of_parallel_threads():
    plas, pc = policy("plas", beta=1e9)
    atlas, ac = policy("atlas", beta=1e9)
    for pol, clock in ((plas, pc), (atlas, ac)):
        arrive(pol, clock, "t0", "P", 0.0, "t0")
        arrive(pol, clock, "t1", "P", 0.0, "t1")
        pol.on_scheduled("t0", 3.0)
        pol.on_scheduled("t1", 3.0)
        clock.now = 3.0
        pol.on_finish("t0")
        pol.on_finish("t1")
        arrive(pol, clock, "next", "P", 3.0)
    assert plas.table.programs["P"].service == 6.0 and plas.priority("next")[0] == 2
    assert atlas.table.programs["P"].critical == 3.0 and atlas.priority("next")[0] == 1
    assert atlas.table.programs["P"].threads == {"t0", "t1", ""}
    # A sequential call adds to the path: service_at_arrival (3) + its own 2 s.
    atlas.on_scheduled("next", 2.0)
    ac.now = 5.0
    atlas.on_finish("next")
    assert atlas.table.programs["P"].critical == 5.0


def test_demotion_when_a_quantum_is_used_up():
    pol, clock = policy("mlfq", beta=1e9)
    arrive(pol, clock, "c", None, 0.0)
    pol.on_scheduled("c", 1.5)
    assert pol.priority("c")[0] == 0
    pol.on_scheduled("c", 0.5)                      # 2 s: the top quantum (0..2 s) is used up
    assert pol.priority("c")[0] == 1
    pol.on_scheduled("c", 7.0)                      # 2 s in queue 1, 4 s in queue 2, 1 s into queue 3
    assert pol.priority("c")[0] == 3
    pol.on_scheduled("c", 1e6)                      # the bottom queue keeps it
    assert pol.priority("c")[0] == 6


def test_explicit_quanta():
    pol, clock = policy("mlfq", bins=(1.0,), quanta=(0.25, 10.0), beta=1e9)
    arrive(pol, clock, "c", None, 0.0)
    pol.on_scheduled("c", 0.25)
    assert pol.priority("c")[0] == 1


def test_anti_starvation_promotes_exactly_at_beta():
    pol, clock = policy("plas", beta=8.0)
    arrive(pol, clock, "a1", "A", 0.0)
    run_call(pol, clock, "a1", 10.0)                # T_program = 10, W_program = 0: queue 3
    arrive(pol, clock, "a2", "A", 100.0)
    clock.now = 179.0                               # W_call = 79 < 8 * 10
    assert pol.priority("a2")[0] == 3
    clock.now = 180.0                               # W_call = 80 = beta * T
    assert pol.priority("a2")[0] == 0
    pol.on_scheduled("a2", 2.0)                     # promoted calls still use the top quantum
    clock.now = 182.0
    assert pol.priority("a2")[0] == 1


def test_waiting_time_of_completed_calls_counts_for_starvation():
    pol, clock = policy("plas", beta=2.0)
    arrive(pol, clock, "a1", "A", 0.0)
    clock.now = 30.0                                # the call waits 30 s, then runs 10 s
    run_call(pol, clock, "a1", 10.0)
    assert pol.table.programs["A"].waiting == pytest.approx(30.0)
    arrive(pol, clock, "a2", "A", 40.0)             # (30 + 0) / 10 >= 2 at once
    assert pol.priority("a2")[0] == 0


def test_sessions_and_expiry():
    pol, clock = policy("plas", idle_timeout=60.0)
    with pol.session("S"):
        arrive(pol, clock, "s1", "S", 1.0)
        run_call(pol, clock, "s1", 1.0)
        assert "S" in pol.table.programs           # kept between calls of a session
        arrive(pol, clock, "s2", "S", 5.0)
    assert "S" in pol.table.programs               # ended with a call in flight: dropped with that call
    run_call(pol, clock, "s2", 1.0)
    assert "S" not in pol.table.programs
    arrive(pol, clock, "x", None, 10.0)             # a call without a program is a one-call program
    assert len(pol.table.programs) == 1
    run_call(pol, clock, "x", 1.0)
    assert not pol.table.programs
    arrive(pol, clock, "p1", "P", 20.0)             # a program never ended expires when idle
    run_call(pol, clock, "p1", 1.0)                # last event at 21
    assert pol.table.expire(80.9) == [] and pol.table.expire(81.0) == ["P"]
    with pol.session("E"):
        clock.now = 200.0
        arrive(pol, clock, "e1", "other", 200.0)    # the sweep drops the idle session E
        assert "E" not in pol.table.programs
    run_call(pol, clock, "e1", 1.0)
    arrive(pol, clock, "q1", "Q", 210.0)
    run_call(pol, clock, "q1", 1.0)
    arrive(pol, clock, "r1", "R", 300.0)            # arrivals sweep the table
    assert set(pol.table.programs) == {"R"}


def test_the_table_is_bounded_and_drops_the_longest_idle_programs_without_a_session():
    pol, clock = policy("plas", max_programs=20)
    with pol.session("S"):                          # a session is never dropped for room
        arrive(pol, clock, "busy", "B", 0.0)         # nor a program with a call in flight
        for i in range(40):                         # a client sending a fresh program id with every call
            arrive(pol, clock, f"c{i}", f"P{i}", 1.0 + i)
            run_call(pol, clock, f"c{i}", 0.5)
            assert len(pol.table.programs) <= 20
        assert {"S", "B", "P39"} <= set(pol.table.programs)
        kept = sorted(int(p[1:]) for p in pol.table.programs if p.startswith("P"))
        assert kept == list(range(40 - len(kept), 40))  # the newest ones, none older than one dropped
        assert pol.table.num_evicted == 40 - len(kept)
    with pytest.raises(ValueError, match="max_programs"):
        ProgramConfig(max_programs=0)


def test_bad_input_raises():
    pol, clock = policy("plas")
    arrive(pol, clock, "c", None, 0.0)
    with pytest.raises(ValueError, match="already arrived"):
        arrive(pol, clock, "c", None, 0.0)
    with pytest.raises(ValueError, match="unknown call"):
        pol.priority("nope")
    with pytest.raises(ValueError, match="unknown call"):
        pol.on_finish("nope")
    with pytest.raises(ValueError, match="no session"):
        pol.table.end("nope")
    with pytest.raises(ValueError, match="program policy"):
        make_policy("lifo")
    with pytest.raises(ValueError, match="bins"):
        ProgramConfig(bins=(4.0, 2.0))
    with pytest.raises(ValueError, match="quanta"):
        ProgramConfig(bins=(1.0,), quanta=(1.0,))
    with pytest.raises(ValueError, match="beta"):
        ProgramConfig(beta=0.0)


@pytest.mark.parametrize("seed", range(5))
def test_plas_order_follows_program_service_bins(seed):
    rnd = random.Random(seed)
    pol, clock = policy("plas", beta=1e9)
    service = {}
    for p in range(20):
        service[p] = rnd.uniform(0, 100)
        arrive(pol, clock, f"{p}.0", f"P{p}", 0.0)
        run_call(pol, clock, f"{p}.0", service[p])
    order = list(range(20))
    rnd.shuffle(order)
    for p in order:
        arrive(pol, clock, f"{p}.1", f"P{p}", clock.now + rnd.uniform(0, 1))
    ranked = sorted((f"{p}.1" for p in range(20)), key=pol.priority)
    queues = [pol.config.queue_of(service[int(c.split(".")[0])]) for c in ranked]
    assert queues == sorted(queues)
    for a, b in zip(ranked, ranked[1:]):            # FCFS inside a queue
        if pol.priority(a)[0] == pol.priority(b)[0]:
            assert pol.calls[a].call.arrival <= pol.calls[b].call.arrival
