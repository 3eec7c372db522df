"""Engine, scheduler and library API end to end over the hand-computable mock executor (milliseconds on CPU).

The mock's rule: next token = (last token + 1) % vocab. It also checks every block table it is given against
the positions it stored, so scheduling, prefix-cache or preemption bugs raise instead of passing.
"""

import math

import pytest

from nexus_jax import LLM, EngineConfig, SamplingParams
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.testing.engines import VOCAB, expected, make_engine
from nexus_jax.testing.runs import finish_order, greedy, run_all
from runner.executor import StepInput
from runner.sampling import SamplingRow

BYTE0 = 7  # the default tokenizer's byte tokens: id = 7 + byte value


def test_outputs_follow_the_rule_and_finish_by_length():
    engine = make_engine()
    prompts = {"a": [5, 6, 7], "b": [100], "c": list(range(40, 90))}
    for rid, p in prompts.items():
        engine.add_request(rid, {"prompt_token_ids": p}, greedy(6))
    done = run_all(engine)
    for rid, p in prompts.items():
        assert done[rid].outputs[0].token_ids == expected(p, 6)
        assert done[rid].outputs[0].finish_reason == "length"
    assert engine.block_manager.usage == 0.0


def test_chunked_prefill_respects_the_token_budget():
    engine = make_engine(max_num_batched_tokens=8)
    steps = []
    original = engine.scheduler.schedule

    def spy():
        plan = original()
        steps.append(plan.num_tokens)
        return plan
    engine.scheduler.schedule = spy
    for i in range(4):
        engine.add_request(f"r{i}", {"prompt_token_ids": list(range(i, i + 30))}, greedy(5))
    done = run_all(engine)
    assert max(steps) <= 8
    for i in range(4):
        assert done[f"r{i}"].outputs[0].token_ids == expected(list(range(i, i + 30)), 5)


def test_preemption_by_recompute_keeps_outputs_exact():
    engine = make_engine(num_blocks=12, block_size=4, max_num_batched_tokens=64)
    prompts = [[10 * i + j for j in range(6)] for i in range(5)]
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, greedy(20))
    done = run_all(engine)
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert done[f"r{i}"].outputs[0].token_ids == expected(p, 20)
    assert engine.block_manager.usage == 0.0


def test_prefix_cache_hit_skips_the_shared_blocks():
    engine = make_engine(block_size=4)
    shared = list(range(200, 216))
    engine.add_request("first", {"prompt_token_ids": shared + [1, 2]}, greedy(3))
    run_all(engine)
    computed = []
    original = engine.scheduler.update

    def spy(plan):
        computed.extend(c.num_tokens for c in plan.chunks if c.request.request_id == "second")
        original(plan)
    engine.scheduler.update = spy
    engine.add_request("second", {"prompt_token_ids": shared + [3, 4, 5]}, greedy(3))
    done = run_all(engine)
    assert done["second"].outputs[0].token_ids == expected([5], 3)
    assert computed[0] == 3  # 16 shared tokens came from the cache
    assert engine.block_manager.stats()["prefix_hits"] >= 1


def test_eos_stop_ids_ignore_eos_and_min_tokens():
    engine = make_engine(eos=(15,))
    engine.add_request("eos", {"prompt_token_ids": [10]}, greedy(20))
    engine.add_request("ignore", {"prompt_token_ids": [10]}, greedy(8, ignore_eos=True))
    engine.add_request("stopid", {"prompt_token_ids": [20]}, greedy(20, stop_token_ids=[23]))
    engine.add_request("min", {"prompt_token_ids": [10]}, greedy(20, min_tokens=10, stop_token_ids=[21]))
    done = run_all(engine)
    assert done["eos"].outputs[0].token_ids == [11, 12, 13, 14, 15]
    assert (done["eos"].outputs[0].finish_reason, done["eos"].outputs[0].stop_reason) == ("stop", None)
    assert done["ignore"].outputs[0].token_ids == expected([10], 8)
    assert done["ignore"].outputs[0].finish_reason == "length"
    assert done["stopid"].outputs[0].token_ids == [21, 22, 23]
    assert done["stopid"].outputs[0].stop_reason == 23
    # min_tokens=10: EOS (15) and the stop id (21) are never sampled during the first 10 tokens, so the mock skips
    # them; afterwards neither comes round again before max_tokens
    assert done["min"].outputs[0].token_ids == [11, 12, 13, 14, 16, 17, 18, 19, 20, 22] + list(range(23, 33))
    assert done["min"].outputs[0].finish_reason == "length"


def test_stop_string_spanning_tokens(tokenizer):
    engine = make_engine(tokenizer=tokenizer, eos=tokenizer.eos_token_ids)
    start = BYTE0 + ord("a")
    engine.add_request("s", {"prompt_token_ids": [start]}, greedy(20, stop=["efg"]))
    engine.add_request("inc", {"prompt_token_ids": [start]}, greedy(20, stop=["efg"], include_stop_str_in_output=True))
    done = run_all(engine)
    assert done["s"].outputs[0].text == "bcd"
    assert done["s"].outputs[0].stop_reason == "efg"
    assert done["inc"].outputs[0].text == "bcdefg"


def test_n_completions_share_the_prompt_blocks():
    engine = make_engine(block_size=4)
    prompt = list(range(300, 321))
    engine.add_request("n", {"prompt_token_ids": prompt}, SamplingParams(n=3, temperature=0.8, seed=1, max_tokens=4))
    done = run_all(engine)
    outs = done["n"].outputs
    assert [o.index for o in outs] == [0, 1, 2]
    assert all(o.token_ids == expected(prompt, 4) for o in outs)
    assert engine.block_manager.stats()["prefix_hits"] >= 2


def test_logprobs():
    engine = make_engine()
    engine.add_request("lp", {"prompt_token_ids": [1, 2]}, greedy(4, logprobs=2))
    out = run_all(engine)["lp"].outputs[0]
    assert len(out.logprobs) == 4
    for tok, pos in zip(out.token_ids, out.logprobs):
        assert pos[tok].logprob == pytest.approx(math.log(0.5))
        assert sorted(r.rank for r in pos.values()) == [1, 2]
    assert out.cumulative_logprob == pytest.approx(4 * math.log(0.5))


def test_abort_frees_blocks_and_reports():
    engine = make_engine()
    engine.add_request("x", {"prompt_token_ids": list(range(30))}, greedy(100))
    engine.step()
    assert engine.abort_request("x")
    assert not engine.abort_request("x")
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"]
    assert engine.block_manager.usage == 0.0
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("prompt, message", [
    ({"prompt_token_ids": []}, "empty"),
    ({"prompt_token_ids": [1, VOCAB]}, "vocabulary"),
    ({"prompt_token_ids": [1, -1]}, "vocabulary"),
    ({"prompt_token_ids": list(range(1, 100)) * 6}, "context"),
    ({"prompt_token_ids": [1.5]}, "integers"),
    ("text without a tokenizer", "tokenizer"),
    (42, "prompt"),
])
def test_bad_prompts_raise_and_the_engine_keeps_serving(prompt, message):
    engine = make_engine()
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", prompt, greedy(4))
    engine.add_request("good", {"prompt_token_ids": [3]}, greedy(2))
    assert run_all(engine)["good"].outputs[0].token_ids == [4, 5]


def test_bad_request_arguments():
    engine = make_engine()
    engine.add_request("dup", {"prompt_token_ids": [3]}, greedy(2))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", {"prompt_token_ids": [3]}, greedy(2))
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("long", {"prompt_token_ids": [3] * 500}, greedy(100))
    with pytest.raises(TypeError):
        engine.add_request("t", {"prompt_token_ids": [3]}, {"max_tokens": 3})


def test_executor_failure_ends_requests_with_an_error_and_serving_goes_on():
    engine = make_engine()
    real = engine.executor.dispatch  # every single step goes through it, in either loop
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real(*a, **k)
    engine.executor.dispatch = flaky
    engine.add_request("a", {"prompt_token_ids": [1]}, greedy(5))
    done = run_all(engine)
    assert done["a"].outputs[0].finish_reason == "error"
    assert "device lost" in done["a"].error
    assert engine.block_manager.usage == 0.0
    engine.add_request("b", {"prompt_token_ids": [1]}, greedy(3))
    assert run_all(engine)["b"].outputs[0].token_ids == [2, 3, 4]


def test_priority_policy_admits_the_most_urgent_first():
    engine = make_engine(max_num_seqs=1, scheduling_policy="priority")
    engine.add_request("low", {"prompt_token_ids": [1]}, greedy(2), priority=5)
    engine.add_request("high", {"prompt_token_ids": [50]}, greedy(2), priority=-1)
    order = finish_order(engine)
    assert order == ["high", "low"]


def test_llm_generate_keeps_input_order_and_reports_metrics():
    llm = LLM.from_engine(make_engine())
    prompts = [{"prompt_token_ids": [i * 10 + 1] * (20 - i)} for i in range(5)]
    params = [greedy(3 + i) for i in range(5)]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for i, out in enumerate(outs):
        assert out.prompt_token_ids == prompts[i]["prompt_token_ids"]
        assert out.outputs[0].token_ids == expected(prompts[i]["prompt_token_ids"], 3 + i)
        assert out.metrics.ttft is not None and out.metrics.ttft >= 0
        assert len(out.metrics.token_times) == 3 + i
    with pytest.raises(ValueError, match="2 sampling params for 5 prompts"):
        llm.generate(prompts, params[:2], use_tqdm=False)
    with pytest.raises(ValueError, match="prompt 1: .*empty"):
        llm.generate([prompts[0], {"prompt_token_ids": []}], use_tqdm=False)
    assert not llm.llm_engine.has_unfinished_requests()  # the good prompt of the failed call was withdrawn
    assert llm.generate(prompts[:1], greedy(2), use_tqdm=False)[0].outputs[0].token_ids == [2, 3]


@pytest.mark.parametrize("overlap", [False, True])
def test_multi_step_decode_matches_single_steps_and_stops_exactly(overlap):
    engine = make_engine(num_scheduler_steps=4, eos=(40,), async_scheduling=overlap)
    calls = {"multi": 0}
    real = engine.executor.dispatch

    def counting(step):
        calls["multi"] += step.num_steps > 1
        return real(step)
    engine.executor.dispatch = counting
    engine.add_request("len", {"prompt_token_ids": list(range(50, 60))}, greedy(21))
    engine.add_request("eos", {"prompt_token_ids": [30]}, greedy(30))
    engine.add_request("stopid", {"prompt_token_ids": [100]}, greedy(30, stop_token_ids=[106]))
    done = run_all(engine)
    # 21 tokens: 1 from the prefill step, then 4 + 4 + ... : every token of a multi-step run is kept; the
    # overlapped loop sees a stop one dispatch late, which may cost another multi-step run
    assert engine.executor.num_steps <= 1 + 2 + (20 + 3) // 4 * 4 + 4 * overlap
    assert done["len"].outputs[0].token_ids == expected([59], 21)
    assert done["eos"].outputs[0].token_ids == list(range(31, 41))
    assert done["stopid"].outputs[0].token_ids == list(range(101, 107))
    assert calls["multi"] > 0
    assert engine.block_manager.usage == 0.0


@pytest.mark.parametrize("overlap", [False, True])
def test_each_plan_reaches_the_executor_as_one_typed_step(overlap):
    engine = make_engine(num_scheduler_steps=4, eos=(40,), async_scheduling=overlap)
    steps = []
    real = engine.executor.dispatch
    engine.executor.dispatch = lambda step: steps.append(step) or real(step)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=12, min_tokens=3, stop_token_ids=[33])
    engine.add_request("seeded", {"prompt_token_ids": [30]}, params)
    assert run_all(engine)["seeded"].outputs[0].token_ids == [31, 32, 34, 35, 36, 37, 38, 39, 40]  # 33 banned
    generated = 0
    for step in steps:  # the row built once, at the step of the tokens generated so far
        assert type(step) is StepInput and step.rows == [SamplingRow(0.8, 0, 1.0, 0.0, 5, generated)]
        assert step.banned == ([[40, 33]] if generated < 3 else None)  # EOS and stop ids until min_tokens
        generated += step.num_steps
    assert any(step.num_steps > 1 for step in steps)


def test_banned_ids_are_built_once_per_request_without_duplicates():
    """The rows of ids banned until min_tokens: one list per sequence, not one per sequence per step."""
    engine = make_engine(eos=(40,))
    steps = []
    real = engine.executor.dispatch
    engine.executor.dispatch = lambda step: steps.append(step) or real(step)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=8, min_tokens=5, stop_token_ids=[33, 40, 33, 7])
    engine.add_request("r", {"prompt_token_ids": [30]}, params)
    run_all(engine)
    rows = [row for step in steps for row in step.banned or () if row]
    assert len(rows) >= 8 and all(row == [40, 33, 7] for row in rows)
    assert len({id(row) for row in rows}) == 1  # both completions share the request's list


def test_multi_step_waits_while_requests_could_be_admitted():
    engine = make_engine(num_scheduler_steps=8, max_num_seqs=4)
    steps = []
    original = engine.scheduler.schedule

    def spy():
        plan = original()
        steps.append((plan.num_steps, len(engine.scheduler.waiting), len(engine.scheduler.running)))
        return plan
    engine.scheduler.schedule = spy
    for i in range(6):
        engine.add_request(f"r{i}", {"prompt_token_ids": [i * 50]}, greedy(12 + i))
    done = run_all(engine)
    for i in range(6):
        assert done[f"r{i}"].outputs[0].token_ids == expected([i * 50], 12 + i)
    assert any(k > 1 for k, _, _ in steps)
    assert all(k == 1 for k, waiting, running in steps if waiting and running < 4)


def test_plas_runs_a_fresh_program_before_one_with_attained_service():
    from nexus_jax.programs.policies import make_policy
    from nexus_jax.programs.table import ProgramConfig
    engine = make_engine(max_num_seqs=1, scheduling_policy="plas")
    # Bins far below the mock's step times, so one finished call is enough to demote its program; anti-starvation
    # off (beta huge): with microsecond steps, host time between steps counts as waiting and could promote old-2.
    engine.scheduler.programs = make_policy("plas", ProgramConfig(bins=(1e-9, 1.0), beta=1e12))
    with engine.session("old"), engine.session("new"):
        engine.add_request("old-1", {"prompt_token_ids": [1]}, greedy(3), program_id="old")
        run_all(engine)
        engine.add_request("old-2", {"prompt_token_ids": [1]}, greedy(3), program_id="old")
        engine.add_request("new-1", {"prompt_token_ids": [9]}, greedy(3), program_id="new")
        order = finish_order(engine)
    assert order == ["new-1", "old-2"]


def test_fcfs_keeps_arrival_order_for_programs():
    engine = make_engine(max_num_seqs=1)
    with engine.session("old"):
        engine.add_request("old-1", {"prompt_token_ids": [1]}, greedy(3), program_id="old")
        run_all(engine)
        engine.add_request("old-2", {"prompt_token_ids": [1]}, greedy(3), program_id="old")
        engine.add_request("new-1", {"prompt_token_ids": [9]}, greedy(3), program_id="new")
        order = finish_order(engine)
    assert order == ["old-2", "new-1"]
    with pytest.raises(ValueError, match="program_id"):
        engine.add_request("bad", {"prompt_token_ids": [1]}, greedy(3), program_id="")


def test_set_policy_between_runs_keeps_the_process_table():
    from nexus_jax.programs.policies import make_policy
    from nexus_jax.programs.table import ProgramConfig
    engine = make_engine(max_num_seqs=1)
    engine.scheduler.programs = make_policy("fcfs", ProgramConfig(bins=(1e-9, 1.0), beta=1e12))  # as above
    with engine.session("old"):
        engine.add_request("old-1", {"prompt_token_ids": [1]}, greedy(3), program_id="old")
        with pytest.raises(RuntimeError, match="cannot change the scheduling policy"):
            engine.scheduler.set_policy("plas")
        run_all(engine)
        engine.scheduler.set_policy("plas")  # old's attained service, earned under FCFS, now ranks it last
        with pytest.raises(ValueError, match="scheduling policy"):
            engine.scheduler.set_policy("lifo")
        engine.add_request("old-2", {"prompt_token_ids": [1]}, greedy(3), program_id="old")
        engine.add_request("new-1", {"prompt_token_ids": [9]}, greedy(3), program_id="new")
        order = finish_order(engine)
    assert order == ["new-1", "old-2"] and engine.scheduler.policy_name == "plas"


def test_compilation_cache_dir_is_used_by_the_aggregated_engine(tmp_path):
    import subprocess
    import sys
    # A subprocess: the cache directory is a process-wide JAX setting that must not leak into other tests.
    script = ("from nexus_jax import LLM\n"
              f"LLM(None, compilation_cache_dir={str(tmp_path)!r}, warmup=True, max_num_seqs=2, "
              "max_num_batched_tokens=32, max_prefill_seqs=2, cpu_kv_cache_tokens=512)\n")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    assert len(list(tmp_path.iterdir())) >= 2  # one file per compiled step program at least


def test_warmup_warns_when_many_block_table_widths_multiply_the_programs(caplog, monkeypatch):
    from runner.model_runner import ModelRunner
    compiled = []
    monkeypatch.setattr(ModelRunner, "warmup", lambda self, *a, **kw: compiled.append(a) or 0)  # no compiling
    with caplog.at_level("WARNING", logger="nexus_jax.entrypoints.build"):
        build_engine(EngineConfig(warmup=True, cpu_kv_cache_tokens=512, min_table_blocks=8))
    assert compiled and "3 block-table widths (8, 16, 32 blocks)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="nexus_jax.entrypoints.build"):
        build_engine(EngineConfig(warmup=True, cpu_kv_cache_tokens=512, min_table_blocks=32))
    assert "block-table widths" not in caplog.text


def test_an_empty_text_prompt_raises_like_an_empty_token_list(tokenizer):
    """The tokenizer adds BOS, so "" would otherwise reach the engine as a prompt of one token."""
    engine = make_engine(tokenizer=tokenizer)
    for prompt in ("", {"prompt": ""}, {"prompt_token_ids": []}):
        with pytest.raises(ValueError, match="prompt is empty"):
            engine.add_request("empty", prompt, greedy(2))
    assert not engine.groups
    with pytest.raises(ValueError, match="prompt 0: .*empty"):
        LLM.from_engine(engine).generate([""], greedy(2), use_tqdm=False)
