"""Routing decisions across replicas: policies, load accounting, program memory, expiry and dead replicas."""

import random

import pytest

from nexus_jax.programs.router import Router, RouterConfig


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def router(n, policy="locality", **cfg):
    clock = Clock()
    return Router(n, RouterConfig(policy, **cfg), clock), clock


def test_round_robin_takes_turns_whatever_the_load():
    r, _ = router(3, "round_robin")
    assert [r.route(f"c{i}", None, 10_000 if i == 0 else 1) for i in range(6)] == [0, 1, 2, 0, 1, 2]
    r.mark_dead(1)
    assert [r.route(f"d{i}", None, 1) for i in range(4)] == [0, 2, 0, 2]


def test_least_loaded_counts_prompt_and_generated_tokens():
    r, _ = router(3, "least_loaded")
    assert r.route("a", None, 100) == 0
    assert r.route("b", None, 50) == 1
    assert r.route("c", None, 80) == 2
    assert r.route("d", None, 10) == 1            # loads 100, 50, 80
    assert r.load == [100, 60, 80] and r.in_flight == [1, 2, 1]
    r.progress("c", 30)                            # 80 + 30 generated
    r.progress("c", 45)
    assert r.load[2] == 125
    r.finish("a")
    assert r.load == [0, 60, 125] and r.route("e", None, 5) == 0
    r.finish("e")
    r.finish("b")
    r.finish("d")
    assert r.load == [0, 0, 125]
    assert r.route("f", None, 1) == 0              # tie on load 0: fewer calls in flight, then the lowest index


def test_locality_keeps_long_calls_on_their_programs_replica():
    r, _ = router(2, locality_threshold=2048)
    assert r.route("p1", "P", 3000) == 0           # first long call: least loaded, remembered
    r.finish("p1")
    assert r.route("x", None, 5000) == 0           # replica 0 is now the busier one
    assert r.route("p2", "P", 3100) == 0           # long: follows the program despite the load
    assert r.route("q1", "Q", 2048) == 1           # at the threshold: least loaded
    assert r.route("p3", "P", 2000) == 1           # short: least loaded, and P's newest context is there now
    r.finish("p3")
    assert r.route("p4", "P", 4000) == 1
    lb, _ = router(2, "least_loaded")
    lb.route("p1", "P", 3000)
    lb.finish("p1")
    lb.route("x", None, 5000)
    assert lb.route("p2", "P", 3100) == 1          # least_loaded ignores the program


def test_programs_are_forgotten_when_they_end_or_idle():
    r, clock = router(2, idle_timeout=60.0, locality_threshold=0)
    r.route("a1", "A", 10)
    r.end_program("A")                             # a call in flight: forgotten with it
    assert r.program_replica == {"A": 0}
    r.finish("a1")
    assert "A" not in r.program_replica and "A" not in r.table.programs
    r.end_program("never-seen")                    # ending an unknown program is harmless
    r.route("b1", "B", 10)
    r.finish("b1")                                 # last event at t = 0
    clock.now = 59.0
    r.route("c1", "C", 10)
    assert "B" in r.program_replica
    clock.now = 60.5
    r.route("c2", "C", 10)                         # the sweep on arrival drops the idle B, not C (in flight)
    assert set(r.program_replica) == {"C"}


def test_the_program_memory_is_bounded():
    r, clock = router(2, max_programs=10, locality_threshold=0)
    r.route("busy", "B", 10)
    for i in range(30):
        clock.now = float(i)
        r.route(f"c{i}", f"P{i}", 10)
        r.finish(f"c{i}")
        assert len(r.table.programs) <= 10 and set(r.program_replica) <= set(r.table.programs)
    assert {"B", "P29"} <= set(r.program_replica)
    with pytest.raises(ValueError, match="max_programs"):
        RouterConfig(max_programs=-1)


def test_a_dead_replica_is_never_chosen_and_its_programs_move():
    r, _ = router(2, locality_threshold=0)
    assert r.route("a1", "A", 10) == 0
    r.mark_dead(0)
    assert "A" not in r.program_replica
    assert r.route("a2", "A", 10) == 1
    r.finish("a1")                                 # calls of the dead replica still end normally
    assert r.load[0] == 0
    r.mark_dead(1)
    with pytest.raises(RuntimeError, match="every replica is dead"):
        r.route("a3", "A", 10)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="routing policy"):
        RouterConfig("random")
    with pytest.raises(ValueError, match="locality_threshold"):
        RouterConfig(locality_threshold=-1)
    with pytest.raises(ValueError, match="num_replicas"):
        Router(0)
    r, _ = router(2)
    r.route("a", None, 5)
    with pytest.raises(ValueError, match="already routed"):
        r.route("a", None, 5)
    with pytest.raises(ValueError, match="prompt_tokens"):
        r.route("b", None, 0)
    with pytest.raises(ValueError, match="unknown call"):
        r.finish("b")
    r.progress("a", 3)
    with pytest.raises(ValueError, match="fewer than"):
        r.progress("a", 2)
    with pytest.raises(ValueError, match="out of range"):
        r.mark_dead(2)


@pytest.mark.parametrize("policy", ["locality", "round_robin", "least_loaded"])
@pytest.mark.parametrize("seed", range(3))
def test_load_always_equals_the_tokens_in_flight(policy, seed):
    rnd = random.Random(seed)
    r, clock = router(4, policy, locality_threshold=500)
    live: dict[str, tuple[int, int, int]] = {}   # call -> (replica, prompt, generated)
    for i in range(400):
        clock.now += rnd.uniform(0, 0.5)
        op = rnd.random()
        if op < 0.4 or not live:
            prompt = rnd.randint(1, 1000)
            program = rnd.choice([None, "P0", "P1", "P2", "P3"])
            home = r.program_replica.get(program)
            replica = r.route(f"c{i}", program, prompt)
            if policy == "locality" and prompt > 500 and home is not None:
                assert replica == home
            live[f"c{i}"] = (replica, prompt, 0)
        elif op < 0.8:
            call = rnd.choice(sorted(live))
            replica, prompt, generated = live[call]
            generated += rnd.randint(0, 20)
            r.progress(call, generated)
            live[call] = (replica, prompt, generated)
        else:
            call = rnd.choice(sorted(live))
            r.finish(call)
            del live[call]
        for k in range(4):
            assert r.load[k] == sum(p + g for rep, p, g in live.values() if rep == k)
            assert r.in_flight[k] == sum(rep == k for rep, _, _ in live.values())
