"""Program-aware retention and preemption under KV pressure (nexus_jax/core/retention.py, the scheduler): cached
contexts of programs with less attained service are kept longer, ended sessions' go first, and under pressure the
running call of the program with the most service gives up its blocks."""

import random

import pytest

from nexus_jax.core.retention import EvictionOrder
from nexus_jax.testing import engines
from nexus_jax.testing.engines import VOCAB, expected
from nexus_jax.testing.runs import greedy, run_all

BLOCK = 4
MOCK_BLOCK_GIB = 16 * BLOCK / 2**30


def context(seed, length=17):  # 17 tokens: 4 full blocks cached once a call with max_tokens=1 ends
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def cached_blocks(engine, tokens):
    return len(engine.block_manager.match_prefix(tokens))


def leave_contexts(engine, services, first_seed=0):
    """Each program runs one call, in order, and is then given the attained service `services` names."""
    contexts = {}
    for i, (pid, service) in enumerate(services.items(), first_seed):
        contexts[pid] = context(i)
        engine.add_request(pid, {"prompt_token_ids": contexts[pid]}, greedy(1), program_id=pid)
        run_all(engine)
    for pid, service in services.items():
        engine.scheduler.programs.table.programs[pid].service = service
    return contexts


# Programs keep their rank for the retention window after their last call (default 5 s): the tests that check the
# order by service give them an hour, so that a slow machine cannot turn them into plain LRU.
HOUR = {"program_retention_window": 3600.0}


@pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])
@pytest.mark.parametrize("policy", ["plas", "atlas", "fcfs"])
def test_eviction_takes_the_most_served_program_first_and_keeps_the_least_served(policy, overlap):
    engine = engines.make_engine(16, BLOCK, scheduling_policy=policy, async_scheduling=overlap, **HOUR)
    contexts = leave_contexts(engine, {"light": 1.0, "heavy": 9.0, "middle": 5.0})
    if policy == "atlas":  # ATLAS ranks by critical-path service
        for pid, service in (("light", 1.0), ("heavy", 9.0), ("middle", 5.0)):
            engine.scheduler.programs.table.programs[pid].critical = service
    # 12 cached blocks and 4 free: a 25-token prompt (7 blocks) evicts 3, then a 41-token one (11 blocks) 4 more.
    engine.add_request("flood1", {"prompt_token_ids": context(50, 25)}, greedy(1))
    run_all(engine)
    left = {pid: cached_blocks(engine, tokens) for pid, tokens in contexts.items()}
    if policy == "fcfs":  # plain LRU: the oldest context goes first
        assert left == {"light": 1, "heavy": 4, "middle": 4}
    else:
        assert left == {"light": 4, "heavy": 1, "middle": 4}
    engine.add_request("flood2", {"prompt_token_ids": context(51, 41)}, greedy(1))
    run_all(engine)
    left = {pid: cached_blocks(engine, tokens) for pid, tokens in contexts.items()}
    if policy != "fcfs":
        assert left["light"] == 4 and left["heavy"] == 0 and left["middle"] < 4


@pytest.mark.parametrize("window,first_out", [(10.0, "light"), (60.0, "heavy")])
def test_a_program_idle_past_the_retention_window_loses_its_rank(window, first_out):
    engine = engines.make_engine(16, BLOCK, scheduling_policy="plas", program_retention_window=window)
    now = [100.0]
    engine.scheduler.programs.clock = lambda: now[0]
    contexts = leave_contexts(engine, {"light": 1.0})
    now[0] = 120.0
    contexts.update(leave_contexts(engine, {"heavy": 9.0, "middle": 5.0}, first_seed=1))
    now[0] = 125.0  # light has been idle 25 s, the others 5 s
    engine.add_request("flood", {"prompt_token_ids": context(50, 25)}, greedy(1))  # evicts 3 of 12 cached blocks
    run_all(engine)
    left = {pid: cached_blocks(engine, tokens) for pid, tokens in contexts.items()}
    assert left == {"light": 4, "heavy": 4, "middle": 4, first_out: 1}


def test_an_ended_session_gives_up_its_context_first():
    engine = engines.make_engine(16, BLOCK, scheduling_policy="plas", **HOUR)
    with engine.session("gone"):
        contexts = {"gone": context(9)}
        engine.add_request("g", {"prompt_token_ids": contexts["gone"]}, greedy(1), program_id="gone")
        run_all(engine)
    contexts.update(leave_contexts(engine, {"light": 1.0, "heavy": 9.0}))
    engine.add_request("flood", {"prompt_token_ids": context(50, 25)}, greedy(1))
    run_all(engine)
    # Released before the others and with no service, yet its session ended: it goes first.
    assert {pid: cached_blocks(engine, tokens) for pid, tokens in contexts.items()} == \
        {"gone": 1, "light": 4, "heavy": 4}


def test_retained_contexts_go_to_the_host_tier_in_rank_order():
    engine = engines.make_engine(16, BLOCK, scheduling_policy="plas", host_cache_gib=4 * MOCK_BLOCK_GIB, **HOUR)
    contexts = leave_contexts(engine, {"light": 1.0, "heavy": 9.0, "middle": 5.0})
    engine.add_request("flood", {"prompt_token_ids": context(50, 49)}, greedy(1))  # 13 blocks: evicts 9
    run_all(engine)
    # Evicted: heavy's 4, middle's 4, light's last; the host tier keeps those of the least-served programs.
    assert {pid: cached_blocks(engine, tokens) for pid, tokens in contexts.items()} == \
        {"light": 3, "heavy": 0, "middle": 0}
    engine.add_request("light.2", {"prompt_token_ids": contexts["light"] + [1, 2]}, greedy(2), program_id="light")
    done = run_all(engine)
    assert done["light.2"].num_cached_tokens == 16  # 3 blocks from the device, 1 from the host
    assert done["light.2"].outputs[0].token_ids == expected(contexts["light"] + [1, 2], 2)
    assert engine.stats()["prefix_cache_host_hit_tokens"] == 4


def test_eviction_order_ranks_groups_once_per_plan():
    calls = []
    ranks = {"a": (1, -1.0), "b": (1, -2.0)}

    def rank(owner):
        calls.append(owner)
        return ranks.get(owner, (0, 0.0))
    order = EvictionOrder(rank)
    for i, owner in enumerate(["a", "b", None, "a", "b"]):
        order.add(i, owner)
    assert [order.pop() for _ in range(3)] == [(2, None), (1, "b"), (4, "b")]
    assert len(calls) == 3  # one ranking for the three evictions
    ranks["a"] = (1, -5.0)
    order.add(5, "b")
    order.invalidate()
    assert order.pop() == (0, "a") and len(order) == 2
    order.set_rank(None)  # plain LRU over what is left
    assert [order.pop() for _ in range(2)] == [(3, None), (5, None)]


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_takes_the_running_call_of_the_most_served_program(mode):
    engine = engines.make_engine(12, BLOCK, scheduling_policy="plas", preemption_mode=mode,
                                 swap_space_gib=64 * MOCK_BLOCK_GIB, async_scheduling=False)
    programs = engine.scheduler.programs
    for pid, service in (("light", 0.5), ("heavy", 3.0)):  # heavy's calls enter a lower queue
        programs.table.get_or_create(pid, programs.clock()).service = service
    engine.add_request("heavy.1", {"prompt_token_ids": context(1, 5)}, greedy(30), program_id="heavy")
    engine.add_request("light.1", {"prompt_token_ids": context(2, 5)}, greedy(30), program_id="light")
    calls = {rid: engine.groups[rid].seqs[0] for rid in ("heavy.1", "light.1")}
    done = run_all(engine)  # 12 blocks for two calls of 35 tokens (9 blocks each)
    assert calls["heavy.1"].num_preemptions > 0 and calls["light.1"].num_preemptions == 0
    for rid, seed in (("heavy.1", 1), ("light.1", 2)):
        assert done[rid].outputs[0].token_ids == expected(context(seed, 5), 30)


def test_groups_of_equal_rank_go_by_their_least_recent_block():
    order = EvictionOrder(lambda owner: (0, 0.0))  # every owner ended
    for item, owner in ((0, "x"), (1, "y"), (2, "x")):
        order.add(item, owner)
    order.add(3, "y")
    order.remove(0)  # x's least recent block is now younger than y's
    assert [order.pop()[0] for _ in range(3)] == [1, 3, 2]  # y's group is ranked first, once for the plan
