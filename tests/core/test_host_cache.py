"""The host tier of the prefix cache (nexus_jax/core/host_cache.py): cached blocks evicted from a small device pool
come back from host memory on the next call of their program.

Over the mock executor every step checks that each chunk's cached prefix holds exactly the request's tokens, so a
copy that is lost, misplaced, read before it was written or overwritten fails the step that reads it. Every test
runs under the overlapped loop (the default) and the synchronous one.
"""

import random

import pytest
from prometheus_client import generate_latest

from nexus_jax import EngineConfig, LLMEngine
from nexus_jax.core.block_manager import BlockManager
from nexus_jax.core.host_cache import HostCache, run_blocks
from nexus_jax.server.metrics import EngineMetrics
from nexus_jax.testing import engines
from nexus_jax.testing.engines import VOCAB, expected
from nexus_jax.testing.runs import greedy, run_all
from runner.model.loader import load_model
from runner.model_runner import ModelRunner
from runner.step_batch import StepShapes

BLOCK = 4
MOCK_BLOCK_GIB = 16 * BLOCK / 2**30  # one mock block in GiB: host_cache_gib = k * this gives k host blocks
ASYNC = pytest.mark.parametrize("overlap", [True, False], ids=["async", "sync"])


def make_engine(overlap, num_blocks=16, host_blocks=64, **cfg):
    engine = engines.make_engine(num_blocks, BLOCK, max_model_len=256, async_scheduling=overlap,
                                 host_cache_gib=host_blocks * MOCK_BLOCK_GIB, **cfg)
    step_input = engine._step_input

    def checked(plan, *previous):  # runs after the plan's copies, right before its step
        step = step_input(plan, *previous)
        for chunk, sc in zip(plan.chunks, [*step.decodes, *step.prefills]):
            # Under the overlapped loop the tokens of the step in flight have K/V but are not on the host yet.
            context, known = engine.executor.context(sc), chunk.request.all_token_ids[:chunk.start]
            assert len(context) == chunk.start and context[:len(known)] == known, chunk.request.request_id
        cache = engine.scheduler.host_cache
        if cache is not None:
            assert cache.num_used_blocks <= cache.num_blocks
        return step
    engine._step_input = checked
    return engine


def prompt(seed, length):
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def flood_and_return(engine, context, others=6, n=4, **params):
    """Program "a" runs a call, programs "b0".. flood the pool with contexts of their own, then "a" calls again
    with its context, its answer and a new turn; returns the outputs of every call."""
    done = {}
    engine.add_request("a0", {"prompt_token_ids": context}, greedy(n, **params), program_id="a")
    done.update(run_all(engine))
    for i in range(others):
        engine.add_request(f"b{i}", {"prompt_token_ids": prompt(100 + i, len(context))}, greedy(n, **params),
                           program_id=f"b{i}")
        done.update(run_all(engine))
    second = context + done["a0"].outputs[0].token_ids + [7, 8, 9]
    engine.add_request("a1", {"prompt_token_ids": second}, greedy(n, **params), program_id="a")
    done.update(run_all(engine))
    return done, second


@ASYNC
def test_a_flooded_context_comes_back_from_the_host_tier(overlap):
    context = prompt(1, 33)  # 8 full blocks: half the device pool
    baseline, _ = flood_and_return(make_engine(overlap, host_blocks=0), context)
    engine = make_engine(overlap)
    done, second = flood_and_return(engine, context)
    assert {rid: out.outputs[0].token_ids for rid, out in done.items()} == \
        {rid: out.outputs[0].token_ids for rid, out in baseline.items()}
    assert done["a1"].outputs[0].token_ids == expected(second, 4)
    # Without the tier the flood evicted every block of "a"; with it, "a"'s context is served from host memory.
    assert baseline["a1"].num_cached_tokens == 0
    assert done["a1"].num_cached_tokens >= 32
    stats = engine.stats()
    assert stats["prefix_cache_host_hit_tokens"] >= 32 and stats["host_cache_hit_blocks"] >= 8
    assert stats["num_host_cache_stores"] > 0 and stats["num_host_cache_dropped"] == 0
    text = generate_latest(EngineMetrics(engine).registry).decode()
    assert f"nexus_prefix_cache_host_hit_tokens_total {float(stats['prefix_cache_host_hit_tokens'])}" in text
    assert "nexus_prefix_cache_device_hit_tokens_total" in text
    assert engine.block_manager.usage == 0.0


@ASYNC
def test_device_hits_count_apart_from_host_hits(overlap):
    engine = make_engine(overlap, num_blocks=64)  # room for everything: no eviction
    context = prompt(2, 17)
    for rid in ("x", "y"):
        engine.add_request(rid, {"prompt_token_ids": context}, greedy(3))
        done = run_all(engine)
    assert done["y"].num_cached_tokens == 16
    stats = engine.stats()
    assert stats["prefix_cache_device_hit_tokens"] == 16 and stats["prefix_cache_host_hit_tokens"] == 0
    assert stats["num_host_cache_stores"] == 0


@ASYNC
@pytest.mark.parametrize("host_blocks", [1, 3])
def test_a_full_host_tier_drops_its_oldest_and_loses_no_request(overlap, host_blocks):
    engine = make_engine(overlap, num_blocks=14, host_blocks=host_blocks, max_num_seqs=4)
    prompts = [prompt(10 + i, 9 + 3 * (i % 4)) for i in range(12)]
    for round_ in range(2):  # the second round hits what the first left on the device or host
        for i, p in enumerate(prompts):
            engine.add_request(f"r{round_}.{i}", {"prompt_token_ids": p}, greedy(6 + i % 3))
        done = run_all(engine)
        for i, p in enumerate(prompts):
            out = done[f"r{round_}.{i}"].outputs[0]
            assert out.finish_reason == "length" and out.token_ids == expected(p, 6 + i % 3)
    stats = engine.stats()
    assert stats["host_cache_blocks"] <= host_blocks == stats["host_cache_total_blocks"]
    assert stats["num_host_cache_evictions"] > 0
    assert engine.block_manager.usage == 0.0


@ASYNC
def test_many_programs_with_shared_prefixes_under_a_small_pool_match_a_roomy_one(overlap):
    system = prompt(3, 12)
    rng = random.Random(4)
    turns = {f"p{i}": system + prompt(20 + i, rng.randint(2, 9)) for i in range(6)}
    results = {}
    for host_blocks, num_blocks in ((32, 14), (0, 14), (0, 512)):
        engine = make_engine(overlap, num_blocks=num_blocks, host_blocks=host_blocks, max_num_seqs=3,
                             scheduling_policy="plas")
        history = dict(turns)
        outputs = []
        for turn in range(3):
            for pid, ctx in history.items():
                engine.add_request(f"{pid}.{turn}", {"prompt_token_ids": ctx}, greedy(5), program_id=pid)
            done = run_all(engine)
            for pid in history:
                tokens = done[f"{pid}.{turn}"].outputs[0].token_ids
                assert tokens == expected(history[pid], 5)
                history[pid] = history[pid] + tokens + [turn + 1]
                outputs.append(tokens)
        results[host_blocks, num_blocks] = outputs, engine.stats()
    assert results[32, 14][0] == results[0, 14][0] == results[0, 512][0]
    # Host hits and preemptions (under KV pressure, with steps in flight in the overlapped loop) in one run.
    assert results[32, 14][1]["prefix_cache_host_hit_tokens"] > 0 and results[32, 14][1]["num_preemptions"] > 0


def test_host_cache_bookkeeping():
    cache = HostCache(2, first_block=5)
    cache.store(0, b"k0")
    cache.store(1, b"k1")
    assert not cache.readable(b"k0")  # pending: the plan being built copies it out
    assert cache.flush() == ([(0, 5), (1, 6)], [])
    assert cache.readable(b"k0") and cache.readable(b"k1")
    cache.store(2, b"k2")  # full: the least recent entry goes
    assert cache.flush() == ([(2, 5)], []) and not cache.readable(b"k0")
    cache.store(3, b"k3")
    cache.store(4, b"k4")
    cache.store(5, b"k5")  # evicts k3, stored by this plan: its copy-out is cancelled, its host block reused
    assert cache.flush() == ([(4, 5), (5, 6)], [])
    assert cache.stats()["num_host_cache_evictions"] == 4
    taken = cache.take([b"k4", b"k5"])
    cache.store(6, b"k6")  # every host block is being copied in: the incoming block is dropped
    assert cache.stats()["num_host_cache_dropped"] == 1
    cache.restore(taken, [8, 9])
    assert cache.flush() == ([], [(5, 8), (6, 9)]) and cache.num_used_blocks == 0
    cache.store(7, b"k7")
    cache.clear()
    assert cache.num_used_blocks == 0 and cache.flush() == ([], [])


def test_a_plan_fills_whole_runs_whose_blocks_leave_together():
    cache = HostCache(10, first_block=2, run=4)  # runs 2-5 and 6-9; 10, 11 a tail, block by block
    for i in range(6):
        cache.store(i, b"a%d" % i)
    assert cache.flush() == ([(i, 2 + i) for i in range(6)], [])  # run 0 whole; run 1 loose (2 of 4 written)
    for i in range(4):
        cache.store(10 + i, b"b%d" % i)
    assert cache.flush()[0] == [(10, 10), (11, 11), (12, 8), (13, 9)]  # the tail, then run 1's rest
    assert cache.num_used_blocks == 10
    cache.store(20, b"c")  # full: the least recent entry, a0, is in a whole run, so a0..a3 all go
    assert cache.stats()["num_host_cache_evictions"] == 4 and not cache.readable(b"a3")
    assert cache.readable(b"a4") and cache.flush()[0] == [(20, 2)]
    assert cache.num_used_blocks == 7


def test_blocks_copied_back_from_a_whole_run_are_reused_only_with_the_rest_of_it():
    cache = HostCache(8, run=4)
    for i in range(8):
        cache.store(i, b"k%d" % i)
    cache.flush()
    taken = cache.take([b"k0", b"k1"])
    cache.restore(taken, [30, 31])
    assert cache.flush() == ([], [(0, 30), (1, 31)]) and cache.num_used_blocks == 6
    cache.store(9, b"n")  # blocks 0 and 1 are free, but run 0 is one array until k2, k3 leave too
    assert cache.flush()[0] == [(9, 0)] and not cache.readable(b"k2") and cache.readable(b"k4")
    assert cache.stats()["num_host_cache_evictions"] == 2


@pytest.mark.parametrize("block_bytes, device_blocks, run", [
    (2 * 2**20, 1024, 32), (2 * 2**20, 64, 16), (8 * 2**20, 1024, 8), (64, 16, 4), (64, 7, 1), (2**30, 4096, 1)])
def test_runs_are_as_long_as_a_few_tens_of_mib_and_a_quarter_of_the_pool(block_bytes, device_blocks, run):
    assert run_blocks(block_bytes, device_blocks) == run


def test_the_host_match_continues_the_device_prefix_with_the_same_salt():
    bm = BlockManager(8, 4)
    bm.host = HostCache(4)
    tokens = list(range(13))
    bm.allocate("s", 13)
    bm.commit("s", tokens, 13)
    bm.free("s")  # 3 cached blocks
    bm.allocate("t", 32)  # the whole pool: the 3 cached blocks are evicted to the host tier
    assert bm.host.flush()[0] == [(2, 0), (1, 1), (0, 2)]  # released tail first, so evicted tail first
    bm.free("t")
    assert bm.match_prefix(tokens) == [] and len(bm.match_host(tokens, [])) == 3
    assert bm.match_host(tokens, [], salt="tenant") == []
    assert bm.match_host(tokens[:8], []) == bm.match_host(tokens, [])[:1]  # the last token is left out


def test_a_full_host_tier_evicts_the_lowest_ranked_program_first():
    ranks = {"light": (1, -1.0), "heavy": (1, -9.0), None: (0, 0.0)}
    cache = HostCache(2)
    cache.order.set_rank(ranks.get)
    cache.store(0, b"light", "light")
    cache.store(1, b"heavy", "heavy")
    cache.flush()
    cache.store(2, b"ended", None)  # ranks below everything held: not stored
    assert cache.stats()["num_host_cache_dropped"] == 1
    cache.store(3, b"light2", "light")  # the program with the most service gives up its block
    assert cache.flush() == ([(3, 1)], []) and cache.stats()["num_host_cache_evictions"] == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"host_cache_gib": -1.0}, "host_cache_gib must be a non-negative"),
    ({"host_cache_gib": True}, "host_cache_gib must be a non-negative"),
    ({"host_cache_gib": 1.0, "disaggregation": "on"}, "host cache tier is for the aggregated mode"),
])
def test_bad_host_cache_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_a_host_tier_smaller_than_a_block_is_refused():
    with pytest.raises(ValueError, match="host_cache_gib .* holds no KV block"):
        engines.make_engine(16, BLOCK, host_cache_gib=MOCK_BLOCK_GIB / 2)


@ASYNC
def test_the_model_runner_restores_a_flooded_context_with_outputs_unchanged(overlap):
    loaded = load_model(None, dtype="float32")
    results = {}
    for host_gib in (1e-2, 0.0):
        config = EngineConfig(dtype="float32", block_size=BLOCK, max_num_seqs=4, max_num_batched_tokens=64,
                              max_prefill_seqs=4, host_cache_gib=host_gib, async_scheduling=overlap)
        runner = ModelRunner(loaded.config, loaded.params, num_blocks=16, block_size=BLOCK,
                             shapes=StepShapes(prefill_seqs=4, min_table_blocks=16))
        engine = LLMEngine(config, runner, None, max_model_len=96, vocab_size=loaded.config.vocab_size)
        done, _ = flood_and_return(engine, prompt(1, 33), others=3, ignore_eos=True)
        results[host_gib] = {rid: out.outputs[0].token_ids for rid, out in done.items()}, done["a1"], engine
    (with_tier, a1, engine), (without, plain, _) = results[1e-2], results[0.0]
    assert with_tier == without
    host = engine.executor.host_blocks  # runs of 4 blocks (a quarter of the pool) came back as one array each
    assert host.run == 4 and host._runs
    assert len(host._runs) * host.run + sum(b is not None for b in host._blocks) <= host.num_blocks
    assert a1.num_cached_tokens >= 32 and plain.num_cached_tokens == 0
    assert engine.stats()["prefix_cache_host_hit_tokens"] >= 32
