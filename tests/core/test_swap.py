"""Swap preemption: KV blocks of preempted requests go to host memory and come back (nexus_jax/core/swap_space.py, the
scheduler's swap plans, the executors' swap_blocks).

Over the mock executor every step also checks that each chunk's cached prefix holds exactly the request's tokens,
so a swap that loses, misplaces or overwrites a block fails the step that reads it.
"""

import random

import jax
import numpy as np
import pytest
from prometheus_client import generate_latest

from nexus_jax import EngineConfig, LLMEngine, SamplingParams
from nexus_jax.core.swap_space import SwapSpace
from nexus_jax.core.tokenizer import load_tokenizer
from nexus_jax.server.metrics import EngineMetrics
from nexus_jax.testing import engines
from nexus_jax.testing.engines import VOCAB, expected
from nexus_jax.testing.runs import greedy, run_all
from runner.model.loader import load_model
from runner.model_runner import ModelRunner
from runner.step_batch import StepShapes

BLOCK = 4
MOCK_BLOCK_GIB = 16 * BLOCK / 2**30  # one mock block in GiB, so swap_space_gib = k * this gives k host blocks


def make_engine(num_blocks=12, swap_blocks=64, mode="swap", **cfg):
    engine = engines.make_engine(num_blocks, BLOCK, max_model_len=256, preemption_mode=mode,
                                 swap_space_gib=swap_blocks * MOCK_BLOCK_GIB, **cfg)
    engine.computed_tokens = 0
    step_input = engine._step_input

    def checked(plan, *previous):  # runs after the plan's swaps, right before the step
        step = step_input(plan, *previous)
        for chunk, sc in zip(plan.chunks, [*step.decodes, *step.prefills]):
            # Under async look-ahead the tokens of the run in flight have K/V but have not landed on the host yet.
            context, known = engine.executor.context(sc), chunk.request.all_token_ids[:chunk.start]
            assert len(context) == chunk.start and context[:len(known)] == known, chunk.request.request_id
        engine.computed_tokens += plan.num_tokens + (plan.num_steps - 1) * len(plan.decodes)
        return step
    engine._step_input = checked
    return engine



def random_prompts(seed, count, lo=3, hi=14):
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(lo, hi))] for _ in range(count)]


def assert_all_released(engine):
    stats = engine.stats()
    assert engine.block_manager.usage == 0.0
    assert stats["swap_free_blocks"] == stats["swap_total_blocks"]


@pytest.mark.parametrize("steps, policy", [(1, "fcfs"), (4, "priority")])
def test_swap_outputs_equal_recompute_and_no_preemption(steps, policy):
    prompts = random_prompts(steps, 8)
    lengths = [12 + 3 * i for i in range(len(prompts))]
    results = {}
    for mode, num_blocks in (("recompute", 14), ("swap", 14), ("recompute", 512)):
        engine = make_engine(num_blocks=num_blocks, mode=mode, num_scheduler_steps=steps, scheduling_policy=policy)
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(n), priority=i % 3)
        done = run_all(engine)
        results[mode, num_blocks] = [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))], engine
    outputs = {key: value[0] for key, value in results.items()}
    assert outputs["swap", 14] == outputs["recompute", 14] == outputs["recompute", 512]
    assert outputs["swap", 14] == [expected(p, n) for p, n in zip(prompts, lengths)]
    swap, recompute, roomy = results["swap", 14][1], results["recompute", 14][1], results["recompute", 512][1]
    stats = swap.stats()
    assert roomy.stats()["num_preemptions"] == 0 and recompute.stats()["num_preemptions"] > 0
    assert stats["num_preemptions"] == stats["num_swap_outs"] > 0 and stats["num_swap_fallbacks"] == 0
    assert stats["num_swap_ins"] == stats["num_swap_outs"]
    text = generate_latest(EngineMetrics(swap).registry).decode()
    assert f"nexus_swap_outs_total {float(stats['num_swap_outs'])}" in text
    assert 0 < stats["num_swapped_in_blocks"] <= stats["num_swapped_out_blocks"]
    # Swapped requests resume where they were: only the roomy engine computes fewer tokens.
    assert roomy.computed_tokens == swap.computed_tokens < recompute.computed_tokens
    assert_all_released(swap)


def test_full_swap_space_falls_back_to_recompute():
    prompts = random_prompts(7, 6, lo=9, hi=12)  # 3 blocks each at least, more than the swap space holds
    engine = make_engine(num_blocks=12, swap_blocks=2)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(16))
    done = run_all(engine)
    stats = engine.stats()
    assert stats["num_swap_fallbacks"] == stats["num_preemptions"] > 0 and stats["num_swap_outs"] == 0
    for i, p in enumerate(prompts):
        assert done[f"r{i}"].outputs[0].token_ids == expected(p, 16)
    assert_all_released(engine)


def test_some_swap_and_some_recompute_when_the_space_is_tight():
    prompts = random_prompts(11, 8, lo=2, hi=14)
    engine = make_engine(num_blocks=14, swap_blocks=6)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(14 + i))
    done = run_all(engine)
    stats = engine.stats()
    assert stats["num_swap_outs"] > 0 and stats["num_swap_fallbacks"] > 0
    assert stats["num_preemptions"] == stats["num_swap_outs"] + stats["num_swap_fallbacks"]
    for i, p in enumerate(prompts):
        assert done[f"r{i}"].outputs[0].token_ids == expected(p, 14 + i)
    assert_all_released(engine)


def step_until(engine, condition, limit=200):
    for _ in range(limit):
        if condition():
            return
        engine.step()
    raise AssertionError("condition never held")


def test_aborting_a_swapped_request_frees_its_host_blocks():
    engine = make_engine(num_blocks=10, scheduling_policy="priority")
    engine.add_request("high", {"prompt_token_ids": [1, 2, 3]}, greedy(30), priority=0)
    engine.add_request("low", {"prompt_token_ids": [50, 51, 52, 53, 54]}, greedy(30), priority=1)
    space = engine.scheduler.swap_space
    step_until(engine, lambda: space.holds("low"))
    held = space.num_held("low")
    assert held >= 2 and space.num_free_blocks == space.num_blocks - held
    assert engine.abort_request("low")
    assert space.num_free_blocks == space.num_blocks and not space.holds("low")
    done = run_all(engine)
    assert done["low"].outputs[0].finish_reason == "abort"
    assert done["high"].outputs[0].token_ids == expected([1, 2, 3], 30)
    assert engine.stats()["num_swap_ins"] == 0
    assert_all_released(engine)


def test_swapped_sequence_with_a_shared_prefix_keeps_the_sharer_intact():
    engine = make_engine(num_blocks=14, scheduling_policy="priority")
    bm, space = engine.block_manager, engine.scheduler.swap_space
    shared = list(range(100, 116))  # four full blocks
    engine.add_request("first", {"prompt_token_ids": shared + [7]}, greedy(26), priority=0)
    step_until(engine, lambda: any(r.num_computed_tokens >= 17 for r in engine.scheduler.running))  # prompt landed
    engine.add_request("second", {"prompt_token_ids": shared + [9, 10]}, greedy(26), priority=1)
    step_until(engine, lambda: "second" in bm._tables)
    head = bm.block_table("first")[:4]
    assert bm.block_table("second")[:4] == head  # a prefix-cache hit: the blocks are shared, not copied
    step_until(engine, lambda: space.holds("second"))
    # Swapped out: its copy of the shared blocks went to the host, the blocks stay with the sharer.
    assert bm.block_table("first")[:4] == head
    assert [bm._ref_counts[b] for b in head] == [1, 1, 1, 1]
    done = run_all(engine)
    assert done["first"].outputs[0].token_ids == expected(shared + [7], 26)
    assert done["second"].outputs[0].token_ids == expected(shared + [9, 10], 26)
    stats = engine.stats()
    # The shared head was still cached when "second" resumed, so it came back without a copy.
    assert stats["num_swapped_in_blocks"] <= stats["num_swapped_out_blocks"] - 4
    assert stats["prefix_hits"] >= 2
    assert_all_released(engine)


def test_n_completions_with_swap():
    engine = make_engine(num_blocks=12)
    prompt = list(range(300, 309))
    engine.add_request("n", {"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=0.0, max_tokens=18))
    engine.add_request("x", {"prompt_token_ids": [5, 6]}, greedy(18))
    done = run_all(engine)
    assert [o.token_ids for o in done["n"].outputs] == [expected(prompt, 18)] * 3
    assert done["x"].outputs[0].token_ids == expected([5, 6], 18)
    assert engine.stats()["num_swap_outs"] > 0
    assert_all_released(engine)


def test_a_failed_swap_ends_the_swapped_and_stepped_requests_and_serving_goes_on():
    engine = make_engine(num_blocks=10, scheduling_policy="priority")
    engine.add_request("high", {"prompt_token_ids": [1, 2, 3]}, greedy(30), priority=0)
    engine.add_request("low", {"prompt_token_ids": [50, 51, 52, 53, 54]}, greedy(30), priority=1)

    def broken(swap_out, swap_in):
        raise RuntimeError("transfer failed")
    engine.executor.swap_blocks = broken
    done = run_all(engine)
    assert done["low"].outputs[0].finish_reason == "error" and "transfer failed" in done["low"].error
    assert done["high"].outputs[0].finish_reason == "error"
    assert_all_released(engine)
    engine.add_request("after", {"prompt_token_ids": [8]}, greedy(3))
    assert run_all(engine)["after"].outputs[0].token_ids == [9, 10, 11]


@pytest.mark.parametrize("kwargs, message", [
    ({"preemption_mode": "offload"}, "preemption_mode"),
    ({"swap_space_gib": 0}, "swap_space_gib"),
    ({"swap_space_gib": -1.0}, "swap_space_gib"),
    ({"swap_space_gib": float("inf")}, "swap_space_gib"),
    ({"swap_space_gib": True}, "swap_space_gib"),
    ({"swap_space_gib": "4"}, "swap_space_gib"),
    ({"preemption_mode": "swap", "disaggregation": "on"}, "aggregated mode"),
    ({"preemption_mode": "swap", "disaggregation": "auto"}, "aggregated mode"),
])
def test_bad_swap_config_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)


def test_a_swap_space_smaller_than_a_block_is_refused():
    with pytest.raises(ValueError, match="holds no KV block"):
        make_engine(swap_blocks=0.5)


def test_swap_space_bookkeeping():
    space = SwapSpace(4)
    assert space.swap_out("a", [7, 3]) == [(7, 0), (3, 1)]
    assert space.swap_out("b", [1, 2, 5]) is None and space.num_fallbacks == 1  # all or nothing
    assert space.swap_out("b", [9, 8]) == [(9, 2), (8, 3)]
    with pytest.raises(ValueError, match="already swapped"):
        space.swap_out("a", [1])
    with pytest.raises(ValueError, match="cannot restore"):
        space.swap_in("a", [4])
    assert space.swap_in("a", [6], skip=1) == [(1, 6)]  # host block 0 stays unread: cached on the device
    assert space.num_free_blocks == 2 and not space.holds("a")
    with pytest.raises(KeyError, match="not swapped"):
        space.swap_in("a", [])
    space.release("b")
    space.release("never")
    assert space.num_free_blocks == 4
    with pytest.raises(ValueError, match="positive"):
        SwapSpace(0)


# ---- the real model runner

@pytest.fixture(scope="module")
def tiny():
    loaded = load_model(None, dtype="float32")
    runner = ModelRunner(loaded.config, loaded.params, num_blocks=24, block_size=BLOCK,
                         shapes=StepShapes(prefill_seqs=4, min_table_blocks=16))
    return loaded, runner


def fresh_runner(tiny):
    loaded, runner = tiny
    return ModelRunner(loaded.config, None, model=(runner.graphdef, runner.state), num_blocks=24,
                       block_size=BLOCK, shapes=runner.shapes)


def test_runner_swap_round_trip_in_place(tiny):
    runner = fresh_runner(tiny)
    before = np.random.default_rng(0).standard_normal(runner.kv_pool.shape, np.float32)
    # A computed array: no host view of it exists (on CPU one would make the runtime copy instead of donating).
    runner.kv_pool = jax.numpy.asarray(before) + 0
    runner.allocate_swap_space(6)
    runner.swap_blocks([(3, 0), (5, 4), (9, 2)], [])
    np.testing.assert_array_equal(runner.host_kv[:, :, [0, 4, 2]], before[:, :, [3, 5, 9]])
    # One call: device block 3 goes out to host 1 while host 0 comes back into it, and host block 2 comes back
    # to device 7 while device 11 goes out into it.
    old_pool = runner.kv_pool
    runner.swap_blocks([(3, 1), (11, 2)], [(0, 3), (2, 7)])
    assert old_pool.is_deleted()  # the scatter took the pool by donation
    after = np.asarray(runner.kv_pool)
    np.testing.assert_array_equal(runner.host_kv[:, :, [1, 2]], before[:, :, [3, 11]])
    np.testing.assert_array_equal(after[:, :, [3, 7]], before[:, :, [3, 9]])
    untouched = [b for b in range(24) if b not in (3, 7)]
    np.testing.assert_array_equal(after[:, :, untouched], before[:, :, untouched])
    assert runner.warmup_swap(20) == 6  # buckets of 8, 16 and 32 blocks


def test_model_greedy_outputs_equal_with_swap_recompute_and_no_preemption(tiny):
    loaded, _ = tiny
    rng = random.Random(3)
    prompts = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(5, 14))] for _ in range(5)]
    params = greedy(14, ignore_eos=True)
    results = {}
    for mode, max_seqs in (("swap", 8), ("recompute", 8), ("recompute", 1)):
        config = EngineConfig(dtype="float32", block_size=BLOCK, max_num_seqs=max_seqs, max_num_batched_tokens=32,
                              max_prefill_seqs=4, preemption_mode=mode, swap_space_gib=1e-3)
        engine = LLMEngine(config, fresh_runner(tiny), load_tokenizer(loaded), max_model_len=96,
                           vocab_size=loaded.config.vocab_size)
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
        done = run_all(engine)
        results[mode, max_seqs] = [done[f"r{i}"].outputs[0].token_ids for i in range(len(prompts))], engine.stats()
    assert results["swap", 8][0] == results["recompute", 8][0] == results["recompute", 1][0]
    assert results["recompute", 1][1]["num_preemptions"] == 0  # one at a time fits the pool
    assert results["recompute", 8][1]["num_preemptions"] > 0
    stats = results["swap", 8][1]
    assert stats["num_swap_outs"] > 0 and stats["num_swap_ins"] == stats["num_swap_outs"]
    assert stats["num_swapped_in_blocks"] > 0
