"""Async scheduling (EngineConfig.async_scheduling): step n+1 is planned and dispatched while step n runs, its
decode inputs being step n's samples still on the device; the host reads step n's tokens afterwards.

Each comparison runs one workload twice, synchronously then overlapped (`both`), and requires the same outputs.
The overlap may only cost steps: a request that stops on a token it sampled is seen one step late, so it may ride
in one more (wasted) step, whose token is never emitted, finally or streamed. Every run ends with each accepted
request ended and the KV pool empty (`drive`). Faults (aborts, failing steps) are in test_async_faults.py.
"""

from __future__ import annotations

import functools
import math
import random
import time
from typing import Any, Callable

import pytest

from nexus_jax import LLM, EngineConfig, SamplingParams
from nexus_jax.core.engine import LLMEngine
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.testing.engines import VOCAB, expected, make_engine
from nexus_jax.testing.mock_executor import MockExecutor
from nexus_jax.testing.runs import (
    Run,
    Workload,
    assert_same_outputs,
    both,
    drive,
    exact_fields,
    float_fields,
    greedy,
    ids,
    staggered,
)
from runner.executor import StepInput
from runner.sampling import SamplingRow
from runner.step_batch import SeqChunk

BYTE0 = 7  # the default tokenizer's byte tokens: id = 7 + byte value
MOCK_BLOCK_GIB = 16 * 4 / 2**30  # one mock block (block_size 4) in GiB


def at_once(*requests: tuple[str, Any, SamplingParams]) -> Workload:
    return {0: list(requests)}


def compare(make: Callable[..., LLMEngine], workload: Workload, rel: float = 0.0) -> tuple[Run, Run]:
    """Runs the workload off then on; the outputs must be the same."""
    sync, overlapped = both(make, workload)
    assert_same_outputs(sync, overlapped, rel=rel)
    return sync, overlapped


def swap_engine(**cfg) -> LLMEngine:
    return make_engine(14, 4, max_model_len=256, preemption_mode="swap", swap_space_gib=64 * MOCK_BLOCK_GIB, **cfg)


def from_staggered(seed: int) -> Workload:
    return {k: [(rid, ids(p), greedy(n)) for rid, p, n in reqs] for k, reqs in staggered(seed).items()}


SHARED = list(range(200, 216))
RNG = random.Random(5)
SWAP_PROMPTS = [[RNG.randrange(VOCAB) for _ in range(RNG.randint(3, 14))] for _ in range(8)]

# name: (engine maker, arrivals, a check both runs must pass, showing the workload does what its name says)
MOCK_WORKLOADS = {
    "greedy_to_max_tokens": (make_engine, at_once(
        ("a", ids([5, 6, 7]), greedy(6)), ("b", ids([100]), greedy(9)), ("c", ids(range(40, 90)), greedy(4))),
        lambda run: {o.outputs[0].finish_reason for o in run.final.values()} == {"length"}),
    "seeded_sampling": (make_engine, at_once(
        ("s", ids([3, 4]), SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=3, max_tokens=10)),
        ("t", ids([9]), SamplingParams(temperature=1.0, max_tokens=7))), None),
    "eos_stop_ids_ignore_eos_min_tokens": (functools.partial(make_engine, eos=(15,)), at_once(
        ("eos", ids([10]), greedy(20)), ("ignore", ids([10]), greedy(8, ignore_eos=True)),
        ("stopid", ids([20]), greedy(20, stop_token_ids=[23])),
        ("min", ids([10]), greedy(20, min_tokens=10, stop_token_ids=[21])),
        ("min_eos", ids([12]), greedy(20, min_tokens=2))),
        lambda run: run.final["stopid"].outputs[0].stop_reason == 23 and len(run.final["min"].outputs[0].token_ids)
        == 20 and run.final["eos"].outputs[0].token_ids == [11, 12, 13, 14, 15]),
    "n_completions": (make_engine, at_once(
        ("seeded", ids(range(300, 321)), SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=4)),
        ("unseeded", ids([7]), SamplingParams(n=2, temperature=0.8, max_tokens=5)),
        ("greedy_n", ids([40, 41]), SamplingParams(n=2, temperature=0.0, max_tokens=6, stop_token_ids=[45]))),
        lambda run: len(run.final["seeded"].outputs) == 3),
    "logprobs": (make_engine, at_once(
        ("lp", ids([1, 2]), greedy(4, logprobs=2)), ("lp0", ids([8]), greedy(3, logprobs=0)),
        ("plain", ids([20]), greedy(5)), ("n_lp", ids([30]), SamplingParams(n=2, max_tokens=3, logprobs=1))),
        lambda run: run.final["lp"].outputs[0].cumulative_logprob == pytest.approx(4 * math.log(0.5))),
    "recompute_preemption": (functools.partial(make_engine, num_blocks=12, max_num_batched_tokens=64), at_once(
        *[(f"r{i}", ids([10 * i + j for j in range(6)]), greedy(20)) for i in range(5)]),
        lambda run: run.engine.scheduler.num_preemptions > 0),
    "swap_preemption": (swap_engine, at_once(
        *[(f"r{i}", ids(p), greedy(12 + 3 * i)) for i, p in enumerate(SWAP_PROMPTS)]),
        lambda run: run.engine.stats()["num_swap_outs"] > 0),
    "prefix_cache_hits": (make_engine, {
        0: [("first", ids(SHARED + [1, 2]), greedy(3))],
        6: [("again", ids(SHARED + [1, 2]), greedy(5)), ("sharer", ids(SHARED + [3, 4, 5]), greedy(3))]},
        lambda run: run.engine.block_manager.stats()["prefix_hits"] >= 2),
    "chunked_prefill": (functools.partial(make_engine, max_num_batched_tokens=8), at_once(
        *[(f"r{i}", ids(range(i, i + 30)), greedy(5)) for i in range(4)]), None),
    "staggered_arrivals": (functools.partial(make_engine, eos=(7, 300)), from_staggered(3), None),
    "staggered_few_seats": (functools.partial(make_engine, num_blocks=40, max_num_seqs=3), from_staggered(8), None),
    # num_scheduler_steps > 1: the look-ahead, multi-step decodes fed from the step in flight
    "multi_step": (functools.partial(make_engine, num_scheduler_steps=4, eos=(15,)), at_once(
        ("a", ids([10]), greedy(20)), ("b", ids([50]), greedy(13)), ("c", ids([70, 71]), greedy(9))),
        lambda run: run.engine.executor.num_dispatches < run.steps),
    "multi_step_staggered_seeded_n": (functools.partial(make_engine, num_scheduler_steps=3, eos=(7, 300)), {
        **from_staggered(4),
        2: [("seeded", ids([3, 4]), SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=17)),
            ("n", ids([40, 41]), SamplingParams(n=2, temperature=0.0, max_tokens=11, stop_token_ids=[47]))]},
        lambda run: run.engine.executor.num_dispatches < run.steps),
    "multi_step_recompute_preemption": (functools.partial(make_engine, num_scheduler_steps=4, num_blocks=12,
                                                          max_num_batched_tokens=64), at_once(
        *[(f"r{i}", ids([10 * i + j for j in range(6)]), greedy(20)) for i in range(5)]),
        lambda run: run.engine.scheduler.num_preemptions > 0),
    "multi_step_swap_preemption": (functools.partial(swap_engine, num_scheduler_steps=4), at_once(
        *[(f"r{i}", ids(p), greedy(12 + 3 * i)) for i, p in enumerate(SWAP_PROMPTS)]),
        lambda run: run.engine.stats()["num_swap_outs"] > 0),
}


@pytest.mark.parametrize("name", list(MOCK_WORKLOADS))
def test_outputs_are_the_same_with_and_without_overlap(name):
    make, arrivals, check = MOCK_WORKLOADS[name]
    sync, overlapped = compare(make, arrivals)
    if check is not None:
        assert check(sync) and check(overlapped)


def test_stop_strings_are_the_same_and_cost_at_most_one_step(tokenizer):
    start = BYTE0 + ord("a")
    make = functools.partial(make_engine, tokenizer=tokenizer, eos=tokenizer.eos_token_ids)
    sync, overlapped = compare(make, at_once(
        ("s", ids([start]), greedy(20, stop=["efg"])),
        ("inc", ids([start]), greedy(20, stop=["efg"], include_stop_str_in_output=True)),
        ("text", "hello", greedy(6, stop=["zz"]))))
    assert sync.final["s"].outputs[0].text == "bcd" and sync.final["inc"].outputs[0].text == "bcdefg"
    assert sync.final["s"].outputs[0].stop_reason == "efg"
    # All three run six steps, side by side; the two stopped by a string may ride in one more, no further
    assert sync.steps <= overlapped.steps <= sync.steps + 1


@pytest.mark.parametrize("params, eos", [(greedy(20), (15,)), (greedy(20, stop_token_ids=[15]), ()),
                                         (SamplingParams(n=2, max_tokens=20, seed=4), (15,))])
def test_a_stop_costs_at_most_one_extra_step_and_its_token_is_never_emitted(params, eos):
    sync, overlapped = compare(functools.partial(make_engine, eos=eos), at_once(("r", ids([10]), params)))
    assert [c.token_ids for c in sync.final["r"].outputs] == [[11, 12, 13, 14, 15]] * params.n
    # The prompt's step, then four decodes; a second sequence starts a step later, on the first's prompt blocks.
    assert sync.steps == 5 + (params.n > 1)
    # The host sees token 15 only after the step feeding it back was dispatched: one step, never its token. With
    # n = 2 the second sequence also starts one step later than in the synchronous loop: it waits for the first's
    # prompt K/V to be folded into the prefix cache, which happens one step after its dispatch.
    assert sync.steps <= overlapped.steps <= sync.steps + 1 + (params.n > 1)
    assert all(len(c.token_ids) <= 5 for out in overlapped.streamed.get("r", []) for c in out.outputs)


@pytest.mark.parametrize("k", [2, 4])
def test_a_stop_inside_a_look_ahead_costs_at_most_two_runs_and_is_never_passed(k):
    # The look-ahead (num_scheduler_steps = k): the host learns of a stop when its k-step run lands, after it
    # dispatched the next run, so the request's row computes up to 2k - 1 tokens past the stop, never emitted.
    make = functools.partial(make_engine, eos=(15,), num_scheduler_steps=k)
    sync, overlapped = compare(make, at_once(("r", ids([3]), greedy(30)), ("s", ids([100]), greedy(30))))
    assert sync.final["r"].outputs[0].token_ids == list(range(4, 16))
    assert overlapped.engine.executor.num_steps - sync.engine.executor.num_steps <= 2 * k - 1
    assert all(len(c.token_ids) <= 12 for out in overlapped.streamed.get("r", []) for c in out.outputs)


def test_many_stops_in_one_batch_cost_one_step_in_all():
    # All admitted in the first step and running to their ends side by side: the run lasts as long as its longest
    # request, which the one-step lag stretches by one step at most, however many requests stop on the way.
    requests = [(f"e{i}", ids([15 - 2 - i]), greedy(20)) for i in range(6)]  # EOS after 2..7 tokens
    requests += [(f"s{i}", ids([100 + i]), greedy(20, stop_token_ids=[104 + 2 * i])) for i in range(4)]
    requests += [("long", ids([300]), greedy(9))]
    sync, overlapped = compare(functools.partial(make_engine, eos=(15,)), at_once(*requests))
    assert {o.outputs[0].finish_reason for o in sync.final.values()} == {"stop", "length"}
    assert sync.steps <= overlapped.steps <= sync.steps + 1


def test_stops_with_few_seats_cost_at_most_one_step_each():
    # With two seats, a finish frees a seat the host learns of one step late, so the admission it allows may come
    # one step later: each finish (stop or length) can delay the rest of the run by one step, no more.
    requests = [(f"r{i}", ids([15 - 1 - i % 5]), greedy(3 + i % 4)) for i in range(8)]
    sync, overlapped = compare(functools.partial(make_engine, eos=(15,), max_num_seqs=2), at_once(*requests))
    assert sum(o.outputs[0].finish_reason == "stop" for o in sync.final.values()) >= 3
    assert sync.steps <= overlapped.steps <= sync.steps + len(requests)


def test_mock_dispatch_runs_steps_back_to_back_while_the_host_works():
    device = 0.1
    executor = MockExecutor(VOCAB, 16, 4, step_seconds=device)
    row = SamplingRow(0.0, 0, 1.0, 0.0, 0, 0)
    started = time.monotonic()
    first = executor.dispatch(StepInput([], [SeqChunk([5, 6], 0, [0])], [row]))
    second = executor.dispatch(StepInput([], [SeqChunk([9], 0, [1])], [row]))
    assert time.monotonic() - started < device  # dispatching does not wait for the device
    time.sleep(device)  # host work, overlapping the first step
    assert [int(t) for t in first.result()] == [7]
    assert [int(t) for t in second.result()] == [10]
    # The second step started when the first ended; the host's sleep hid under the first: 2, not 3, steps' time.
    assert 2 * device <= time.monotonic() - started < 2.5 * device
    assert executor.num_steps == 2


def test_host_work_overlaps_device_time():
    device, host, k = 0.03, 0.03, 12
    seconds = {}
    for flag in (False, True):
        engine = make_engine(step_seconds=device, async_scheduling=flag)
        schedule = engine.scheduler.schedule

        def slow_schedule(*args, **kwargs):  # host work per step: planning takes `host` seconds
            time.sleep(host)
            return schedule(*args, **kwargs)
        engine.scheduler.schedule = slow_schedule
        started = time.monotonic()
        run = drive(engine, at_once(("r", ids([1]), greedy(k)), ("q", ids([200]), greedy(k))))
        seconds[flag] = time.monotonic() - started
        assert run.final["r"].outputs[0].token_ids == expected([1], k)
    # Synchronous: every step pays planning then device time, k * (host + device) at least. Overlapped: about
    # k * max(host, device), plus one step to fill the pipeline.
    assert seconds[False] >= k * (host + device)
    assert seconds[True] < 0.8 * seconds[False], seconds


# ---- the embedded tiny model (float32 on CPU): real sampling, real tokenizer, device-side token feeding

def real_engine(**cfg) -> LLMEngine:
    return build_engine(EngineConfig(dtype="float32", max_num_batched_tokens=32, cpu_kv_cache_tokens=4096, **cfg))


CAPITALS = "The capital of France is Paris, and the capital of Italy is"  # 33 tokens: two full blocks
REAL_WORKLOAD: Workload = {
    0: [("greedy", CAPITALS, greedy(10)),
        ("sampled", "Once upon a time", SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7, max_tokens=12,
                                                       logprobs=3)),
        ("stop_str", "the quick brown fox", greedy(16, stop=["li"]))],
    1: [("n_seeded", "hello", SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8)),
        ("n_drawn", "hi there", SamplingParams(n=2, temperature=0.8, max_tokens=6, logprobs=0))],
    3: [("long", "word " * 60, greedy(6)),  # chunked over the 32-token budget
        ("stop_id", "the quick brown fox", greedy(16, stop_token_ids=[332], min_tokens=3))],
    5: [("again", CAPITALS, greedy(10))],  # a prefix-cache hit
}


def test_tiny_model_outputs_are_the_same_with_and_without_overlap():
    sync, overlapped = compare(real_engine, REAL_WORKLOAD, rel=1e-5)
    reasons = {o.outputs[0].finish_reason for o in sync.final.values()}
    assert reasons == {"stop", "length"}, reasons  # the stop paths were taken, not only max_tokens
    assert sync.final["stop_id"].outputs[0].stop_reason == 332
    assert len(sync.final["stop_id"].outputs[0].token_ids) >= 3
    assert overlapped.engine.block_manager.stats()["prefix_hits"] >= 1


def test_tiny_model_look_ahead_is_the_same_with_and_without_overlap():
    # Multi-step decodes whose first tokens are fed on the device from the run in flight (its last step's samples)
    workload = {0: [("a", CAPITALS, greedy(13)), ("b", "the quick brown fox", greedy(11, stop=["li"]))],
                2: [("c", "Once upon a time", SamplingParams(temperature=0.9, seed=7, max_tokens=9))]}
    def make(**cfg) -> LLMEngine:
        engine = real_engine(num_scheduler_steps=4, **cfg)
        real, engine.dispatched = engine.executor.dispatch, []
        engine.executor.dispatch = lambda step: engine.dispatched.append(step) or real(step)
        return engine

    sync, overlapped = compare(make, workload, rel=1e-5)
    assert any(s.num_steps > 1 and s.feed for s in overlapped.engine.dispatched)  # look-ahead fed on the device
    single, _ = both(real_engine, workload)
    assert_same_outputs(single, overlapped, rel=1e-5)  # and the same as one step per dispatch


def test_llm_generate_is_the_same_with_and_without_overlap():
    prompts = ["The capital of France is", "the quick brown fox", "Once upon a time", "a b c d e f g"]
    params = [greedy(8), greedy(12, stop=["li"]), SamplingParams(temperature=0.7, top_k=50, seed=11, max_tokens=9,
                                                                  logprobs=2),
              SamplingParams(n=2, temperature=1.0, max_tokens=7, stop_token_ids=[21])]
    results = [LLM(dtype="float32", cpu_kv_cache_tokens=4096, async_scheduling=flag).generate(
        prompts, params, use_tqdm=False) for flag in (False, True)]
    for a, b in zip(*results):
        assert exact_fields(b) == exact_fields(a)
        assert float_fields(b) == pytest.approx(float_fields(a), rel=1e-5, abs=0.0)


def test_pool_programs_count_grows_only_with_a_new_program():
    # The disaggregated worker reads its pool's address (which waits for the step) only when this count grows.
    from runner.programs import pool_programs

    def run(steps: int) -> None:
        prompt = {"prompt_token_ids": list(range(5, 25))}
        drive(real_engine(num_scheduler_steps=steps), {0: [("a", prompt, greedy(12))]})

    run(1)
    compiled = pool_programs()
    run(1)
    assert pool_programs() == compiled  # the same shapes again: nothing to check
    run(9)  # a multi-step decode program bounded at 16 steps is new to this process
    assert pool_programs() > compiled


def test_a_warmed_up_look_ahead_compiles_nothing_while_serving():
    # Requests near their max_tokens shorten a look-ahead of 4 steps per dispatch (to 2 or 3), and they sample in
    # every mode. Each multi-step decode used to run a program of its own
    # step count and sampling mode, compiled while serving (seconds each on an 8B), where the warm-up had compiled
    # one count in one mode.
    from runner import programs

    engine = build_engine(EngineConfig(dtype="float32", max_num_batched_tokens=32, cpu_kv_cache_tokens=4096,
                                       num_scheduler_steps=4, warmup=True, max_model_len=64, max_num_seqs=8))
    real, counts = engine.executor.dispatch, []
    engine.executor.dispatch = lambda step: counts.append(step.num_steps) or real(step)
    made = [fn._cache_size() for fn in (programs.forward, programs.decode_steps, programs.sample_step)]
    drive(engine, {0: [("greedy", {"prompt_token_ids": list(range(5, 25))}, greedy(9)),
                       ("random", {"prompt_token_ids": list(range(9, 20))},
                        SamplingParams(temperature=0.8, seed=3, max_tokens=10)),
                       ("filtered", {"prompt_token_ids": list(range(30, 41))},
                        SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=10))]})
    assert 4 in counts and {2, 3} & set(counts), counts
    assert [fn._cache_size() for fn in (programs.forward, programs.decode_steps, programs.sample_step)] == made
