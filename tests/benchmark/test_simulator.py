"""Cost-model simulator and agentic workloads: hand-computed timings, prefix caching, replicas and routing,
workload statistics, and the issue's CI assertions that PLAS and ATLAS beat FCFS on program latency when queues
form and that locality-aware routing beats round-robin."""

import numpy as np
import pytest

from nexus_jax.benchmark.sim_config import H100_KV_TOKENS, EstimatedCost, ProfiledCost, SimConfig, h100_config
from nexus_jax.benchmark.simulator import Simulator, simulate, sustainable_rate
from nexus_jax.benchmark.workloads import CallSpec, ProgramSpec, Stage, generate
from nexus_jax.programs.router import RouterConfig
from nexus_jax.programs.table import ProgramConfig

POLICIES = ("fcfs", "mlfq", "plas", "atlas")
COST = EstimatedCost()


def step(prefill=(), decodes=0, context=0, cost=COST):
    return cost.step_time(list(prefill), decodes, context)


def test_estimated_cost_matches_the_h100_llama_8b_shape():
    assert 0.015 <= step((), 256, 256 * 640) <= 0.017
    assert 0.18 <= step([(8192, 0)]) <= 0.22


def test_one_call_by_hand():
    prog = ProgramSpec("p", 1.5, (Stage(0.0, (CallSpec(100, 3),)),))
    res = simulate([prog], "fcfs")
    expected = step([(100, 0)]) + step((), 1, 101) + step((), 1, 102)
    assert res.program_latency["p"] == pytest.approx(expected)
    assert res.program_tokens["p"] == 3 and res.num_steps == 3
    assert res.mean_token_latency == pytest.approx(expected / 3)


def test_profiled_cost_is_the_tables_mixed_step():
    cost = ProfiledCost.load()
    model = cost.model
    assert cost.step_time([(300, 64)], 5, 700) == pytest.approx(model.predict_mixed(5, 700, [(300, 64)]))
    config = h100_config()
    assert config.kv_capacity_tokens == H100_KV_TOKENS == 16791 * 16
    res = simulate([ProgramSpec("p", 0.0, (Stage(0.0, (CallSpec(100, 2),)),))], "fcfs", config)
    assert res.program_latency["p"] == pytest.approx(model.predict_prefill(100, [(100, 0)])
                                                     + model.predict_decode(100, 1, 101))


def test_stages_wait_for_all_threads_and_the_delay():
    two = Stage(0.0, (CallSpec(10, 1, "a"), CallSpec(10, 2, "b")))
    prog = ProgramSpec("p", 0.0, (two, Stage(5.0, (CallSpec(20, 1),))))
    res = simulate([prog], "atlas")
    first = step([(10, 0), (10, 0)]) + step((), 1, 11)  # both prompts in one step, then b decodes
    assert res.program_latency["p"] == pytest.approx(first + 5.0 + step([(20, 0)]))
    assert res.program_tokens["p"] == 4


def test_chunked_prefill_respects_the_budget():
    prog = ProgramSpec("p", 0.0, (Stage(0.0, (CallSpec(1000, 1),)),))
    res = simulate([prog], "fcfs", SimConfig(max_num_batched_tokens=256))
    assert res.num_steps == 4  # 256 + 256 + 256 + 232


def two_turns(prefix, arrival=0.0, name="p"):
    return ProgramSpec(name, arrival, (Stage(0.0, (CallSpec(100, 3),)), Stage(1.0, (CallSpec(130, 2, prefix=prefix),))))


def test_a_cached_context_is_not_prefilled_again():
    first = step([(100, 0)]) + step((), 1, 101) + step((), 1, 102)
    # The first turn computed 102 tokens (its last sampled token is not yet in the cache): 6 full blocks of 16.
    res = simulate([two_turns(102)], "fcfs")
    assert res.program_latency["p"] == pytest.approx(first + 1.0 + step([(34, 96)]) + step((), 1, 131))
    assert (res.cached_tokens, res.prefill_tokens) == (96, 100 + 34)
    for miss in (simulate([two_turns(102)], "fcfs", SimConfig(prefix_caching=False)),
                 simulate([two_turns(0)], "fcfs")):  # caching off, or a prompt cut to fit: a new context
        assert miss.program_latency["p"] == pytest.approx(first + 1.0 + step([(130, 0)]) + step((), 1, 131))
        assert miss.cached_tokens == 0


def test_cached_contexts_are_evicted_for_running_calls():
    other = ProgramSpec("q", 0.5, (Stage(0.0, (CallSpec(150, 2),)),))
    roomy = simulate([two_turns(102), other], "fcfs", SimConfig(kv_capacity_tokens=1000))
    tight = simulate([two_turns(102), other], "fcfs", SimConfig(kv_capacity_tokens=200))
    assert roomy.cached_tokens == 96 and tight.cached_tokens == 0  # q needed the room of p's idle context
    assert tight.program_latency["q"] == pytest.approx(roomy.program_latency["q"])


def test_an_evicted_context_comes_back_from_the_host_tier_at_its_copy_cost():
    other = ProgramSpec("q", 0.5, (Stage(0.0, (CallSpec(150, 2),)),))
    tier = dict(kv_capacity_tokens=200, host_restore_per_token=1e-4)
    res = simulate([two_turns(102), other], "fcfs", SimConfig(host_capacity_tokens=96, **tier))
    assert res.cached_tokens == res.host_hit_tokens == 96
    first = step([(100, 0)]) + step((), 1, 101) + step((), 1, 102)
    assert res.program_latency["p"] == pytest.approx(first + 1.0 + step([(34, 96)]) + 96e-4 + step((), 1, 131))
    small = simulate([two_turns(102), other], "fcfs", SimConfig(host_capacity_tokens=95, **tier))
    assert small.cached_tokens == small.host_hit_tokens == 0  # a context larger than the host tier is dropped


def test_a_restore_hides_behind_the_step_before_it():
    # p's context (96 tokens) goes to the host tier for q; p's second turn restores it at ~1.02 s. With z decoding
    # then, the step before the restore covers a copy shorter than itself; after an idle replica it is all exposed.
    def p_latency(per_token, busy):
        progs = [two_turns(102), ProgramSpec("q", 0.5, (Stage(0.0, (CallSpec(300, 2),)),))]
        if busy:
            progs.append(ProgramSpec("z", 1.0, (Stage(0.0, (CallSpec(10, 100),)),)))
        config = SimConfig(kv_capacity_tokens=390, host_capacity_tokens=96, host_restore_per_token=per_token)
        res = simulate(progs, "fcfs", config)
        assert res.host_hit_tokens == 96
        return res.program_latency["p"]
    copy = 96 * 1e-5  # 0.96 ms, under a decode step (~5 ms)
    assert p_latency(1e-5, busy=True) == pytest.approx(p_latency(0.0, busy=True))
    assert p_latency(1e-5, busy=False) == pytest.approx(p_latency(0.0, busy=False) + copy)


def test_ranks_of_idle_programs_expire_after_the_retention_window():
    # p (3 steps of service) leaves 96 cached tokens at ~0.02 s, q (5 steps) 144 at ~0.53 s; r's prompt at 0.7 s
    # needs room for one of them. Within the window they rank by service, so q's goes; past it, by recency (p's).
    def cached_after(window):
        progs = [ProgramSpec("p", 0.0, (Stage(0.0, (CallSpec(100, 3),)),)),
                 ProgramSpec("q", 0.5, (Stage(0.0, (CallSpec(150, 5),)),)),
                 ProgramSpec("r", 0.7, (Stage(0.0, (CallSpec(100, 1),)),))]
        sim = Simulator("plas", SimConfig(kv_capacity_tokens=320), ProgramConfig(retention_window=window))
        sim.run(progs)
        return set(sim.replicas[0].kv.device.entries)
    assert cached_after(10.0) == {"p", "r"}
    assert cached_after(0.0) == {"q", "r"}


def test_replicas_run_in_parallel_and_routing_spreads_calls():
    calls = [ProgramSpec(f"p{i}", 0.0, (Stage(0.0, (CallSpec(100, 3),)),)) for i in range(2)]
    alone = step([(100, 0)]) + step((), 1, 101) + step((), 1, 102)
    for routing in ("round_robin", "least_loaded", "locality"):
        res = simulate(calls, "fcfs", SimConfig(num_replicas=2, routing=RouterConfig(routing)))
        assert res.program_latency == pytest.approx({"p0": alone, "p1": alone}), routing
    shared = simulate(calls, "fcfs")
    assert shared.program_latency["p0"] > alone


@pytest.mark.parametrize("policy", POLICIES)
def test_every_program_finishes_with_all_its_tokens_under_kv_pressure(policy):
    programs = generate("mixed", 30, 5.0, seed=3)
    res = simulate(programs, policy, SimConfig(max_num_seqs=16, kv_capacity_tokens=10_000))
    assert set(res.program_latency) == {p.program_id for p in programs}
    for p in programs:
        assert res.program_tokens[p.program_id] == sum(c.output_tokens for s in p.stages for c in s.calls)
        assert res.program_latency[p.program_id] >= sum(s.delay for s in p.stages)
    assert res.num_preemptions > 0  # recompute when KV runs out


@pytest.mark.parametrize("seed", range(3))
def test_kv_accounting_holds_at_every_step(seed):
    class Checked(Simulator):
        def _plan_step(self, rep):
            kv = rep.kv
            assert kv.own == sum(c.computed - c.hit for c in rep.running)
            for tier in (kv.device, kv.host):
                assert tier.tokens == sum(e.tokens for e in tier.entries.values()) <= tier.capacity
            assert kv.own + kv.cached_tokens <= self.config.kv_capacity_tokens
            for pid, entry in kv.device.entries.items():  # a context read by running calls is pinned
                assert entry.readers == sum(c.hit > 0 and c.program.spec.program_id == pid for c in rep.running)
            assert all(c.program.spec.program_id in kv.device.entries for c in rep.running if c.hit)
            assert not set(kv.device.entries) & set(kv.host.entries)  # a context lives in one tier
            super()._plan_step(rep)
    programs = generate("mixed", 40, 6.0, seed=seed)
    config = SimConfig(max_num_seqs=12, kv_capacity_tokens=12_000, num_replicas=2, preempt=seed == 2,
                       host_capacity_tokens=20_000 * (seed > 0))
    res = Checked("plas", config).run(programs)
    assert len(res.program_latency) == 40 and res.cached_tokens > 0 and res.num_preemptions > 0
    assert (res.host_hit_tokens > 0) == (seed > 0)


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


def test_prefixes_repeat_the_previous_context_unless_a_prompt_was_cut():
    programs = generate("mixed", 600, 4.0, seed=4)
    cut = 0
    for p in programs:
        for k, stage in enumerate(p.stages):
            for c in stage.calls:
                assert 0 <= c.prefix <= c.prompt_tokens and (k > 0 or c.prefix == 0)
                if k == 0 or len(stage.calls) > 1 or len(p.stages[k - 1].calls) > 1:
                    continue
                before = p.stages[k - 1].calls[0]
                cut += c.prefix == 0
                # chatbot: history = previous prompt + output; react: the same, then a new observation
                assert c.prefix in (0, before.prompt_tokens + before.output_tokens)
    assert 0 < cut < 0.1 * sum(p.num_calls for p in programs)  # long programs outgrow the 8192-token context


# Locality saves recomputing a program's context on a replica that does not hold it; it matters most when the
# contexts of all programs do not fit in one replica's KV (as on H100s: docs/programs.md), here 100k tokens per
# replica. Seeds 0-4: locality 0.84-0.88 x round-robin (0.92-0.93 with 400k tokens and 200 programs).
def test_locality_beats_round_robin_on_a_prefix_heavy_workload():
    programs = generate("react", 150, 12.0, seed=0)
    res = {r: simulate(programs, "fcfs", SimConfig(num_replicas=4, kv_capacity_tokens=100_000,
                                                   routing=RouterConfig(r)))
           for r in ("locality", "round_robin", "least_loaded")}
    assert res["locality"].mean_program_latency <= 0.92 * res["round_robin"].mean_program_latency
    assert res["locality"].mean_program_latency <= 0.92 * res["least_loaded"].mean_program_latency
    assert res["locality"].cached_tokens > 1.5 * res["round_robin"].cached_tokens


# The CI assertion: a small engine (8 sequences) so that queues form below capacity with a few hundred
# programs (on an H100-sized engine nothing queues below capacity: docs/programs.md); fixed seed 0, bounds with a
# margin on seed 0. Sequential programs (chatbot, ReAct) gain on token latency only: reordering their calls
# leaves the total waiting nearly unchanged (seeds 0-4, PLAS and ATLAS / FCFS: program latency 1.00-1.01 and
# 0.96-1.03, token latency 0.91-0.95 and 0.70-0.83); trees and the mix also gain on program latency (0.78-1.00
# and 0.75-0.92, token latency 0.42-0.69 and 0.45-0.76).
@pytest.mark.parametrize("kind,num,rate,latency_bound,token_bound", [
    ("chatbot", 200, 8.0, 1.01, 0.95),
    ("react", 150, 4.0, 1.01, 0.85),
    ("tree", 150, 1.0, 0.9, 0.7),
    ("mixed", 150, 1.5, 0.92, 0.85),
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
    # At 25 ms of program-level token latency FCFS sustains 1.0 programs/s on this engine, PLAS and ATLAS 2.0
    # (seed 1: FCFS 0.75, PLAS 1.0, ATLAS 1.0; seed 2: 1.0, 1.5 and 1.0).
    rates = [0.5, 0.75, 1.0, 1.5, 2.0, 3.0]
    kw = dict(num_programs=150, seed=0, config=SimConfig(max_num_seqs=8))
    fcfs = sustainable_rate("mixed", "fcfs", 0.025, rates, **kw)
    assert fcfs >= 0.75
    for policy in ("plas", "atlas"):
        assert sustainable_rate("mixed", policy, 0.025, rates, **kw) >= 1.5 * fcfs, policy
