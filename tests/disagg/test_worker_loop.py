"""decode_loop="worker" over the mock pool: the decode worker runs the real loop (runner.workers.decode_loop) on the
shared MockExecutor, which checks on every step that each row's cached prefix is in the slots its table names, so a
block freed while the loop may still write it, or handed over before its K/V was written, raises (and the loop
reports the failure, which these tests count as a fault)."""

import pytest

from nexus_jax import EngineConfig, SamplingParams
from nexus_jax.disagg.cost_model import CostModel
from nexus_jax.disagg.engine import DisaggEngine
from nexus_jax.disagg.ladder import decode_worker
from nexus_jax.disagg.partition import PartitionController, Slo
from nexus_jax.testing.engines import VOCAB, expected
from nexus_jax.testing.latency import force_split
from nexus_jax.testing.mock_pool import MockPool
from nexus_jax.testing.runs import run_all, staggered
from runner.model.config import ModelConfig
from runner.workers.messages import Admit, Expect

LOOP = dict(disaggregation="on", decode_loop="worker", aggregate_when_safe=False)


def make_engine(decode_loop="worker", seed=0, num_blocks=256, reserve=None, ladder=(30, 50), **cfg):
    loop = LOOP if decode_loop == "worker" else {}
    config = EngineConfig(block_size=4, sm_ladder=ladder, max_num_batched_tokens=64, **loop, **cfg)
    model = ModelConfig.preset("llama-3.1-8b")
    controller = PartitionController(CostModel.analytic(model, 989e12, 3.35e12), ladder, Slo(tbt=1e-9))
    force_split(controller)
    engine = DisaggEngine(config, MockPool(ladder, num_blocks, 4, seed), controller, None, max_model_len=512,
                          vocab_size=VOCAB)
    if reserve is not None:
        engine.loop.reserve = reserve
    return engine


def loop_handle(engine):
    return engine.pool.workers[engine.loop.worker]


def assert_clean(engine):
    assert engine.faults == {"worker_replacements": 0, "pool_restarts": 0, "requeued_requests": 0}
    assert engine.block_manager.usage == 0.0 and not engine.scheduler.busy and not engine.loop.held


@pytest.mark.parametrize("seed", range(4))
def test_greedy_outputs_follow_the_rule_and_decode_never_goes_through_a_plan(seed):
    engine = make_engine(seed=seed)
    arrivals = staggered(seed)
    done = run_all(engine, arrivals)
    for reqs in arrivals.values():
        for rid, prompt, n in reqs:
            assert done[rid].outputs[0].token_ids == expected(prompt, n), rid
    assert engine.phase_steps["decode"] == engine.phase_steps["mixed"] == 0
    assert engine.loop.counts["loop_steps"] > 0
    assert_clean(engine)


def sampled_run(engine, seed):
    """Staggered requests, half greedy and half seeded at temperature 1, of different lengths and stops."""
    arrivals = staggered(seed, count=10)
    params = {}
    for k, reqs in arrivals.items():
        for j, (rid, prompt, n) in enumerate(reqs):
            params[rid] = SamplingParams(temperature=0.0 if j % 2 else 1.0, seed=None if j % 2 else 100 + k,
                                         max_tokens=n, stop_token_ids=[(prompt[-1] + 4) % VOCAB])
    done = {}
    k = 0
    while engine.has_unfinished_requests() or any(i >= k for i in arrivals):
        for rid, prompt, n in arrivals.get(k, []):
            engine.add_request(rid, {"prompt_token_ids": prompt}, params[rid])
        done.update({o.request_id: o for o in engine.step() if o.finished})
        k += 1
    return {rid: (o.outputs[0].token_ids, o.outputs[0].finish_reason) for rid, o in done.items()}


@pytest.mark.parametrize("seed", range(3))
def test_outputs_equal_the_engine_loop(seed):
    """The mock ignores sampling rows, so this checks the fold (stops, lengths); the seeded equality of real
    samples is in test_disagg_processes.py."""
    assert sampled_run(make_engine("engine", seed=seed), seed) == sampled_run(make_engine(seed=seed), seed)


def logprobs_run(engine):
    engine.add_request("lp", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=12, logprobs=2))
    engine.add_request("lp0", {"prompt_token_ids": [9, 10, 11]}, SamplingParams(max_tokens=7, logprobs=0))
    engine.add_request("plain", {"prompt_token_ids": [30, 31]}, SamplingParams(max_tokens=9))
    done = run_all(engine)
    return {rid: (o.outputs[0].token_ids, o.outputs[0].logprobs, o.outputs[0].cumulative_logprob)
            for rid, o in done.items()}


def test_logprobs_come_back_with_the_streamed_tokens_as_in_the_engine_loop():
    worker = logprobs_run(make_engine())
    assert worker == logprobs_run(make_engine("engine"))
    assert len(worker["lp"][1]) == 12 and all(len(p) == 2 for p in worker["lp"][1])
    assert worker["plain"][1] is None


@pytest.mark.parametrize("seed", range(3))
def test_a_stop_mid_loop_emits_nothing_after_it_and_frees_the_blocks(seed):
    engine = make_engine(seed=seed)
    engine.add_request("stops", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=100, stop_token_ids=[12]))
    engine.add_request("runs", {"prompt_token_ids": [20, 21]}, SamplingParams(max_tokens=40))
    streamed = []
    engine.add_request("streams", {"prompt_token_ids": [40, 41]},
                       SamplingParams(max_tokens=100, stop_token_ids=[45]), stream=True)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == "streams":
                streamed.append(list(out.outputs[0].token_ids))
            if out.finished:
                done[out.request_id] = out
    assert done["stops"].outputs[0].token_ids == [7, 8, 9, 10, 11, 12]
    assert done["streams"].outputs[0].token_ids == [42, 43, 44, 45] == streamed[-1]
    assert all(s == streamed[-1][:len(s)] for s in streamed)
    assert done["runs"].outputs[0].token_ids == expected([20, 21], 40)
    assert_clean(engine)


def test_abort_mid_loop_frees_the_blocks_only_once_the_loop_released_them():
    engine = make_engine()
    engine.add_request("a", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=200))
    engine.add_request("b", {"prompt_token_ids": [50, 51]}, SamplingParams(max_tokens=20))
    while not engine.loop.counts["loop_steps"]:
        engine.step()
    assert engine.abort_request("a")
    assert engine.block_manager.holds("a")  # the loop may be writing them
    loop, key = loop_handle(engine).loop, engine.loop.held["a"].key
    done = {}
    while engine.block_manager.holds("a"):
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert key not in loop.rows and all(key not in [r.seq_id for r in f.rows] for f in loop.flights)
    done.update(run_all(engine))
    assert done["a"].outputs[0].finish_reason == "abort"
    assert done["b"].outputs[0].token_ids == expected([50, 51], 20)
    assert_clean(engine)


def test_a_row_out_of_room_pauses_and_runs_again_once_extended():
    engine = make_engine(reserve=2)
    engine.add_request("long", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=60))
    done = run_all(engine)
    assert done["long"].outputs[0].token_ids == expected([7], 60)
    assert engine.loop.counts["extends"] >= 60 // 4 - 1  # 4-token blocks: at most a block per extension
    assert_clean(engine)


def test_the_engine_sends_far_fewer_messages_than_the_loop_runs_steps():
    engine = make_engine(reserve=64)
    for i in range(4):
        engine.add_request(f"r{i}", {"prompt_token_ids": [10 * i + 1, 10 * i + 2]}, SamplingParams(max_tokens=60))
    done = run_all(engine)
    assert all(done[f"r{i}"].outputs[0].token_ids == expected([10 * i + 2], 60) for i in range(4))
    handle, counts = loop_handle(engine), engine.loop.counts
    assert handle.calls == 0  # no Execute: no plan, no per-step round trip
    assert counts["loop_steps"] >= 59 and handle.posted == counts["messages"] <= 8, counts
    assert_clean(engine)


def test_kv_pressure_preempts_a_row_through_the_loop_and_recomputes_it():
    """12 blocks of 4 tokens: two 30-token requests cannot both hold their room; the lower-priority one is
    released from the loop, its blocks freed only on the loop's acknowledgement, then recomputed."""
    engine = make_engine(num_blocks=12, reserve=4)
    engine.add_request("first", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=28))
    engine.add_request("second", {"prompt_token_ids": [100, 101]}, SamplingParams(max_tokens=28))
    done = run_all(engine)
    assert done["first"].outputs[0].token_ids == expected([6], 28)
    assert done["second"].outputs[0].token_ids == expected([101], 28)
    assert engine.loop.counts["preempted"] > 0 and engine.scheduler.num_preemptions > 0
    assert engine.block_manager.usage == 0.0 and not engine.scheduler.busy and not engine.loop.held


@pytest.mark.parametrize("seed", range(3))
def test_a_dead_loop_worker_costs_no_request(seed):
    engine = make_engine(seed=seed)
    arrivals = staggered(seed)
    killed = []

    def kill(k):
        if not killed and engine.loop.counts["loop_steps"] >= 3 and len(engine.loop.held) >= 2:
            loop_handle(engine).kill()
            killed.append(k)
    done = run_all(engine, arrivals, kill)
    for reqs in arrivals.values():
        for rid, prompt, n in reqs:
            assert done[rid].outputs[0].token_ids == expected(prompt, n), rid
    assert killed and engine.faults["worker_replacements"] == 1 and engine.faults["requeued_requests"] > 0
    assert engine.pool.workers[decode_worker(50)].alive()
    assert engine.block_manager.usage == 0.0 and not engine.scheduler.busy and not engine.loop.held


@pytest.mark.parametrize("cfg, why", [
    (dict(disaggregation="off"), "disaggregation"),
    (dict(disaggregation="on", async_scheduling=False), "async_scheduling"),
    (dict(disaggregation="on"), "aggregate_when_safe"),
    (dict(disaggregation="on", aggregate_when_safe=False, num_scheduler_steps=4), "num_scheduler_steps"),
    (dict(disaggregation="on", aggregate_when_safe=False, decode_loop="device"), "decode_loop must be"),
])
def test_configurations_the_loop_cannot_apply_to_are_refused(cfg, why):
    with pytest.raises(ValueError, match=why):
        EngineConfig(**{"decode_loop": "worker", **cfg})


@pytest.mark.parametrize("params, named", [
    (dict(logit_bias={3: 1.0}), "logit_bias"),
    (dict(presence_penalty=0.5), "penalties"), (dict(min_tokens=3), "min_tokens"),
    (dict(allowed_token_ids=[1, 2]), "allowed_token_ids"),
])
def test_per_step_host_features_are_refused_with_their_name(params, named):
    engine = make_engine()
    with pytest.raises(ValueError, match=named):
        engine.add_request("x", {"prompt_token_ids": [1, 2]}, SamplingParams(max_tokens=4, **params))
    assert not engine.has_unfinished_requests()


def test_the_loop_is_told_when_a_prefill_that_joins_it_is_in_flight():
    engine = make_engine(seed=1)
    posted = []
    handle = loop_handle(engine)
    post = handle.post
    handle.post = lambda message: (posted.append(message), post(message))[1]
    arrivals = staggered(1)
    done = run_all(engine, arrivals)
    for reqs in arrivals.values():
        for rid, prompt, n in reqs:
            assert done[rid].outputs[0].token_ids == expected(prompt, n), rid
    expects = [m.joining for m in posted if isinstance(m, Expect)]
    assert expects and expects[0] is True
    # Told only of changes: after an Expect(True), the next word is an Admit (which ends it) or an Expect(False).
    kinds = [type(m).__name__ if not isinstance(m, Expect) else f"Expect({m.joining})" for m in posted
             if isinstance(m, (Admit, Expect))]
    for a, b in zip(kinds, kinds[1:]):
        assert not (a == "Expect(True)" and b == "Expect(True)"), kinds
    assert_clean(engine)
