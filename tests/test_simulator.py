"""Cost-model simulator and agentic workloads: hand-computed timings, workload statistics, and the issue's CI
assertion that PLAS and ATLAS beat FCFS on mean program latency when queues form."""

import numpy as np
import pytest

from nexus_jax.simulator import CostModel, SimConfig, simulate, sustainable_rate
from nexus_jax.workloads import CallSpec, ProgramSpec, Stage, generate

POLICIES = ("fcfs", "mlfq", "plas", "atlas")


def test_cost_model_defaults_match_the_h100_llama_8b_shape():
    cost = CostModel()
    assert 0.015 <= cost.step_time(0, 256, 256 * 640) <= 0.017
    assert 0.18 <= cost.step_time(8192, 0, 0) <= 0.22


def test_one_call_by_hand():
    cost = CostModel()
    prog = ProgramSpec("p", 1.5, (Stage(0.0, (CallSpec(100, 3),)),))
    res = simulate([prog], "fcfs")
    expected = cost.step_time(100, 0, 0) + cost.step_time(0, 1, 101) + cost.step_time(0, 1, 102)
    assert res.program_latency["p"] == pytest.approx(expected)
    assert res.program_tokens["p"] == 3 and res.num_steps == 3
    assert res.mean_token_latency == pytest.approx(expected / 3)


def test_stages_wait_for_all_threads_and_the_delay():
    cost = CostModel()
    two = Stage(0.0, (CallSpec(10, 1, "a"), CallSpec(10, 2, "b")))
    prog = ProgramSpec("p", 0.0, (two, Stage(5.0, (CallSpec(20, 1),))))
    res = simulate([prog], "atlas")
    first = cost.step_time(20, 0, 0) + cost.step_time(0, 1, 11)  # both prompts in one step, then b decodes
    assert res.program_latency["p"] == pytest.approx(first + 5.0 + cost.step_time(20, 0, 0))
    assert res.program_tokens["p"] == 4


def test_chunked_prefill_respects_the_budget():
    prog = ProgramSpec("p", 0.0, (Stage(0.0, (CallSpec(1000, 1),)),))
    res = simulate([prog], "fcfs", SimConfig(max_num_batched_tokens=256))
    assert res.num_steps == 4  # 256 + 256 + 256 + 232


@pytest.mark.parametrize("policy", POLICIES)
def test_every_program_finishes_with_all_its_tokens_under_kv_pressure(policy):
    programs = generate("mixed", 30, 5.0, seed=3)
    res = simulate(programs, policy, SimConfig(max_num_seqs=16, kv_capacity_tokens=10_000))
    assert set(res.program_latency) == {p.program_id for p in programs}
    for p in programs:
        assert res.program_tokens[p.program_id] == sum(c.output_tokens for s in p.stages for c in s.calls)
        assert res.program_latency[p.program_id] >= sum(s.delay for s in p.stages)
    assert res.num_preemptions > 0  # recompute when KV runs out


def test_priority_preemption_is_optional():
    programs = generate("chatbot", 60, 8.0, seed=0)
    small = dict(max_num_seqs=4)
    assert simulate(programs, "plas", SimConfig(**small)).num_preemptions == 0
    assert simulate(programs, "plas", SimConfig(preempt=True, **small)).num_preemptions > 0


def test_bad_input_raises():
    with pytest.raises(ValueError, match="workload"):
        generate("chess", 10, 1.0)
    with pytest.raises(ValueError, match="positive"):
        generate("react", 0, 1.0)
    too_long = ProgramSpec("p", 0.0, (Stage(0.0, (CallSpec(900, 200),)),))
    with pytest.raises(ValueError, match="KV capacity"):
        simulate([too_long], "fcfs", SimConfig(kv_capacity_tokens=1000))


@pytest.mark.parametrize("kind,mean_calls", [("chatbot", 6.7), ("react", 10.8)])
def test_calls_per_program(kind, mean_calls):
    programs = generate(kind, 4000, 1.0, seed=1)
    calls = np.array([p.num_calls for p in programs])
    assert abs(calls.mean() - mean_calls) <= 0.1 * mean_calls
    assert np.percentile(calls, 99) > 4 * mean_calls        # heavy tail
    assert all(len(s.calls) == 1 for p in programs for s in p.stages)


def test_poisson_arrivals_and_workload_shapes():
    programs = generate("mixed", 3000, 4.0, seed=2)
    gaps = np.diff([0.0] + [p.arrival for p in programs])
    assert abs(gaps.mean() - 0.25) < 0.02 and abs(gaps.std() - 0.25) < 0.03  # exponential: std = mean
    kinds = {k: [p for p in programs if p.program_id.startswith(k)] for k in ("chatbot", "react", "tree")}
    assert all(800 < len(v) < 1200 for v in kinds.values())

    def ratio(ps):  # prompt tokens per output token
        calls = [c for p in ps for s in p.stages for c in s.calls]
        return sum(c.prompt_tokens for c in calls) / sum(c.output_tokens for c in calls)
    assert ratio(kinds["react"]) > 2 * ratio(kinds["chatbot"]) and ratio(kinds["react"]) > 20  # prefill-heavy
    widths = [len(s.calls) for p in kinds["tree"] for s in p.stages]
    assert min(widths) >= 2 and np.mean(widths) >= 4
    assert all(len({c.thread_id for c in s.calls}) == len(s.calls) for p in kinds["tree"] for s in p.stages)
    assert np.mean([p.num_calls for p in kinds["tree"]]) > 10
    react_delays = [s.delay for p in kinds["react"] for s in p.stages[1:]]
    assert abs(np.mean(react_delays) - 1.0) < 0.1


# The CI assertion: a small engine (8 sequences) so that queues form with a few hundred programs; fixed
# seeds; bounds measured with a margin (seeds 0-4 all gave PLAS/ATLAS <= 0.98, 0.98, 0.95, 0.92 x FCFS).
@pytest.mark.parametrize("kind,num,rate,latency_bound,token_bound", [
    ("chatbot", 200, 4.0, 0.99, 0.95),
    ("react", 150, 2.0, 0.98, 0.8),
    ("tree", 150, 1.0, 0.95, 0.8),
    ("mixed", 150, 1.5, 0.9, 0.8),
])
def test_plas_and_atlas_beat_fcfs(kind, num, rate, latency_bound, token_bound):
    programs = generate(kind, num, rate, seed=0)
    config = SimConfig(max_num_seqs=8)
    fcfs = simulate(programs, "fcfs", config)
    assert fcfs.mean_program_latency > 1.1 * simulate(programs, "fcfs", SimConfig()).mean_program_latency
    for policy in ("plas", "atlas"):
        res = simulate(programs, policy, config)
        assert res.mean_program_latency <= latency_bound * fcfs.mean_program_latency, policy
        assert res.mean_token_latency <= token_bound * fcfs.mean_token_latency, policy


def test_plas_and_atlas_sustain_a_higher_program_rate_on_the_mixed_workload():
    # At 25 ms of program-level token latency FCFS sustains 0.75 programs/s on this engine, PLAS and ATLAS 1.5.
    rates = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    kw = dict(num_programs=150, seed=0, config=SimConfig(max_num_seqs=8))
    fcfs = sustainable_rate("mixed", "fcfs", 0.025, rates, **kw)
    assert fcfs >= 0.5
    for policy in ("plas", "atlas"):
        assert sustainable_rate("mixed", policy, 0.025, rates, **kw) >= 1.5 * fcfs, policy
