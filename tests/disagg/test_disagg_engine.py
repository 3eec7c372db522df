"""The disaggregated engine's logic over in-process mock workers (fast): phases planned apart, requests handed
from prefill to decode by block table, split/aggregate decisions, aborts while a step executes.

The mock workers share one MockExecutor, which checks on every step that each chunk's cached prefix is really in
the slots its block table names; so a block handed over too early, or freed and reused while a step still
held it, raises instead of passing. Results are folded back in a random order to interleave the phases.
"""

import collections
import time

import pytest

from nexus_jax import EngineConfig, SamplingParams
from nexus_jax.core.block_manager import BlockManager
from nexus_jax.disagg.cost_model import CostModel
from nexus_jax.disagg.engine import DisaggEngine
from nexus_jax.disagg.ladder import AGGREGATE, SmLadder, decode_worker, prefill_worker
from nexus_jax.disagg.partition import PartitionController, Slo
from nexus_jax.disagg.phase_scheduler import PhaseScheduler
from nexus_jax.testing.engines import VOCAB, expected
from nexus_jax.testing.latency import force_split
from nexus_jax.testing.mock_pool import MockPool
from nexus_jax.testing.runs import run_all, staggered
from runner.model.config import ModelConfig


def make_engine(ladder=(30, 50), tbt=0.05, seed=0, num_blocks=256, restart_pool=None, **cfg):
    config = EngineConfig(block_size=4, sm_ladder=ladder, max_num_batched_tokens=64, **cfg)
    model = ModelConfig.preset("llama-3.1-8b")
    # a TTFT nothing misses: the predicted TTFT counts wall-clock waiting, which a loaded box would let decide
    workers = SmLadder(ladder, config.split_prefill_share)
    controller = PartitionController(CostModel.analytic(model, 989e12, 3.35e12), workers,
                                     Slo(ttft=3600.0, tbt=tbt))
    force_split(controller, tbt < 1)  # nothing meets a 1 ns TBT, but the goodput controller would aggregate then
    return DisaggEngine(config, MockPool(workers, num_blocks, 4, seed), controller, None, max_model_len=512,
                        vocab_size=VOCAB, restart_pool=restart_pool)


def fail_once(handle):
    """The handle's next result() raises as a failed step would; later ones are real."""
    original = handle.result

    def broken():
        handle.result = original
        handle.drop_result()
        raise RuntimeError("worker died")
    handle.result = broken


def run_checked(engine, seed):
    """Runs the staggered arrivals of `seed`; every request's tokens follow the mock model's rule."""
    arrivals = staggered(seed)
    done = run_all(engine, arrivals)
    for reqs in arrivals.values():
        for rid, prompt, n in reqs:
            assert done[rid].outputs[0].token_ids == expected(prompt, n), rid
    return done


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("tbt", [1e-9, 10.0])
def test_outputs_follow_the_rule_under_split_and_aggregate(seed, tbt, steps):
    """steps 1: the pipelined decode loop; 4: multi-step decode plans, pipelined too (the look-ahead)."""
    engine = make_engine(tbt=tbt, seed=seed, num_scheduler_steps=steps)
    run_checked(engine, seed)
    modes = engine.controller.stats()["modes"]
    if tbt < 1:  # the mixed step never fits: every step with both phases splits
        assert modes.get("split", 0) > 0 and engine.phase_steps["mixed"] == 0
    else:        # everything meets 10 s: both phases together run as one mixed step
        assert modes.get("aggregate", 0) > 0 and engine.phase_steps["mixed"] > 0
    assert engine.pipelined_steps > 0
    assert engine.block_manager.usage == 0.0
    assert not engine.scheduler.busy
    assert all(r.num_inflight == 0 and r.num_pending == 0 for r in engine.scheduler.waiting)


@pytest.mark.parametrize("seed", range(3))
def test_a_pipelined_decode_stops_without_an_extra_token(seed):
    """The step after a stop token is already on the worker when the stop is seen: its sample is dropped, and
    the request's blocks wait for it to land."""
    engine = make_engine(tbt=1e-9, seed=seed)
    engine.add_request("stops", {"prompt_token_ids": [5, 6]}, SamplingParams(max_tokens=30, stop_token_ids=[12]))
    engine.add_request("runs", {"prompt_token_ids": [20, 21]}, SamplingParams(max_tokens=12))
    done = run_all(engine)
    assert done["stops"].outputs[0].token_ids == [7, 8, 9, 10, 11, 12]
    assert done["stops"].outputs[0].finish_reason == "stop"
    assert done["runs"].outputs[0].token_ids == expected([20, 21], 12)
    assert engine.pipelined_steps > 0 and engine.block_manager.usage == 0.0


def test_split_runs_decode_and_prefill_on_their_ladder_workers():
    engine = make_engine(ladder=(30,), tbt=1e-9)
    run_all(engine, staggered(7))
    pool = engine.pool
    assert pool.workers[decode_worker(30)].calls > 0
    assert pool.workers[prefill_worker(30)].calls > 0


@pytest.mark.parametrize("share,prefill_on", [(100, AGGREGATE), (80, "prefill-80")])
@pytest.mark.parametrize("seed", range(2))
def test_a_split_prefill_runs_on_the_prefill_share_the_config_sets(seed, share, prefill_on):
    # decode on 50% beside prefill on 80% or on all SMs (the aggregate worker): shares that overlap under MPS
    engine = make_engine(tbt=1e-9, seed=seed, split_prefill_share=share, aggregate_when_safe=False)
    assert sorted(w.name for w in engine.ladder.workers if w.role == "prefill") == ([] if share == 100 else
                                                                                   [prefill_on])
    prefills, both = collections.Counter(), collections.Counter()
    for name, handle in engine.pool.workers.items():
        def submit(message, name=name, submit=handle.submit):
            prefills[name] += bool(message.step.prefills)
            both[name] += bool(message.step.prefills) and bool(message.step.decodes)
            submit(message)
        handle.submit = submit
    run_checked(engine, seed)
    # (a prefill with no decode running goes to the aggregate worker: this controller may aggregate)
    assert prefills[prefill_on] > 0 and sum(both.values()) == 0  # never a mixed step
    assert engine.pool.workers[decode_worker(50)].calls > 0
    splits = {e["choice"] for e in engine.controller.log if e["choice"].startswith("split")}
    assert splits and all(label.endswith(f"/p{share}") for label in splits)


@pytest.mark.parametrize("private, alone_on", [((), "aggregate"), (("aggregate", "decode-50"), "aggregate"),
                                               (("decode-50",), "decode-50")])
def test_decode_alone_runs_on_all_sms_unless_only_a_decode_worker_has_its_own_weights(private, alone_on):
    # On an 80 GB GPU only decode-50 gets a copy of the weights: decode alone then runs there, not on the aggregate
    # worker's shared weights (1.6-1.8x slower to decode, RESULTS.md 2026-12-07).
    engine = make_engine(tbt=1.0)  # every rung and the mixed step meet TBT: decode alone between prefills
    engine.pool.shared.private_workers = private
    assert engine.ladder.decode_alone(private, aggregate=True) == alone_on
    ran: dict[str, int] = collections.Counter()  # (worker, decode-only steps) as the workers receive them
    for name, handle in engine.pool.workers.items():
        def submit(message, name=name, submit=handle.submit):
            ran[name] += bool(message.step.decodes) and not message.step.prefills
            submit(message)
        handle.submit = submit
    run_all(engine, staggered(7))
    # (a split's decode steps are decode-only too: they run on the rungs' decode workers either way)
    assert ran[alone_on] > 0 and (ran["aggregate"] > 0) == (alone_on == "aggregate")


def test_abort_while_a_step_executes_defers_freeing_its_blocks():
    engine = make_engine(tbt=1e-9)
    engine.add_request("long", {"prompt_token_ids": list(range(1, 60))}, SamplingParams(max_tokens=50))
    engine.step()  # the prefill is dispatched (and may be folded)
    engine.step()
    engine.add_request("other", {"prompt_token_ids": [3, 4, 5]}, SamplingParams(max_tokens=5))
    engine._dispatch()  # both phases in flight now
    held = set(engine.scheduler.busy)
    assert "long" in held
    table = engine.block_manager.block_table("long")
    assert engine.abort_request("long")
    # Still held by the executing step: not free, not reusable.
    assert engine.block_manager.block_table("long") == table
    done = run_all(engine)
    assert done["long"].outputs[0].finish_reason == "abort"
    assert done["other"].outputs[0].token_ids == expected([3, 4, 5], 5)
    assert engine.block_manager.usage == 0.0


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on():
    engine = make_engine(tbt=1e-9)
    fail_once(engine.pool.workers[AGGREGATE])
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    done = run_all(engine)
    assert done["a"].outputs[0].finish_reason == "error" and "worker died" in done["a"].error
    done = run_all(engine, {0: [("b", [7, 8], 3)]})
    assert done["b"].outputs[0].token_ids == expected([7, 8], 3)
    assert engine.block_manager.usage == 0.0


class DeadMps:
    def alive(self):
        return False

    def stop(self):
        pass


@pytest.mark.parametrize("seed", range(3))
def test_a_lost_mps_daemon_restarts_the_pool_and_no_request_is_lost(seed):
    """A step fails while the MPS daemon is gone: every running request is recomputed on a new pool whose KV
    pool starts empty (the mock checks each chunk's cached prefix against the new pool's slots)."""
    pools, results = [], [0]

    def restart(mps):
        pools.append(MockPool((30, 50), 256, 4, seed))
        return pools[-1], None  # the new pool, under no daemon
    engine = make_engine(tbt=1e-9, seed=seed, restart_pool=restart)

    def failing(handle, original):
        def result():
            results[0] += 1
            if results[0] == 12:  # a dozen steps in: decodes and prefills are running
                handle.drop_result()
                engine.mps = DeadMps()
                raise RuntimeError("CUDA error: the MPS server died")
            return original()
        return result
    for h in engine.pool.workers.values():
        h.result = failing(h, h.result)
    arrivals = staggered(seed)
    done = run_all(engine, arrivals)
    assert len(pools) == 1 and engine.pool is pools[0]
    faults = engine.stats()["faults"]
    assert faults["pool_restarts"] == 1 and faults["requeued_requests"] > 0
    for items in arrivals.values():
        for rid, prompt, n in items:
            assert done[rid].error is None and done[rid].outputs[0].token_ids == expected(prompt, n)
    assert engine.block_manager.usage == 0.0


def test_a_pool_that_cannot_restart_raises_out_of_step():
    engine = make_engine(tbt=1e-9)
    handle = engine.pool.workers[AGGREGATE]

    def broken():
        handle.drop_result()
        engine.mps = DeadMps()
        raise RuntimeError("CUDA error")
    handle.result = broken
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    with pytest.raises(RuntimeError, match="cannot restart"):
        run_all(engine)


def test_prefill_order_is_shortest_first_with_aging():
    bm = BlockManager(64, 4)
    sched = PhaseScheduler(bm, max_num_seqs=8, max_num_batched_tokens=8, prefill_aging=15.0)
    from nexus_jax.core.request import Request
    from nexus_jax.core.stop import StopChecker

    def req(rid, n, arrival):
        params = SamplingParams(max_tokens=2)
        from nexus_jax.core.outputs import RequestMetrics
        return Request(rid, list(range(1, n + 1)), params, params.to_row(0),
                       StopChecker(params, None, ()), RequestMetrics(arrival))
    import time
    now = time.monotonic()
    old_long, short = req("old-long", 100, now - 10.0), req("short", 5, now)
    sched.add(old_long)
    sched.add(short)
    # Remaining 100 - 15 * 10 s = -50 beats 5 - 0: the long prompt has waited long enough to go first.
    plan = sched.schedule_prefill()
    assert [c.request.request_id for c in plan.prefills][0] == "old-long"
    young_long = req("young-long", 100, now)
    sched2 = PhaseScheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8)
    sched2.add(young_long)
    sched2.add(req("short2", 5, now))
    assert sched2.schedule_prefill().prefills[0].request.request_id == "short2"


def test_a_plan_never_takes_a_request_that_is_executing():
    engine = make_engine(tbt=1e-9)
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=8))
    plan = engine.scheduler.schedule_prefill()
    assert [c.request.request_id for c in plan.chunks] == ["a"]
    assert engine.scheduler.schedule_prefill().chunks == []
    assert engine.scheduler.schedule_decode().chunks == []
    with pytest.raises(RuntimeError, match="executing"):
        engine.scheduler.schedule()


def test_prefill_plans_respect_the_prefill_slot_count_even_for_one_token_remainders():
    engine = make_engine(tbt=10.0, max_prefill_seqs=4)
    for i in range(10):  # one-token prompts: each is a one-token prefill chunk
        engine.add_request(f"one{i}", {"prompt_token_ids": [i + 1]}, SamplingParams(max_tokens=2))
    plan = engine.scheduler.schedule_prefill()
    assert len(plan.prefills) == 4 and not plan.decodes
    engine.scheduler.release(plan)
    done = run_all(engine)
    assert all(done[f"one{i}"].outputs[0].token_ids == expected([i + 1], 2) for i in range(10))


def test_partition_decisions_are_exported_as_metrics():
    from nexus_jax.server.metrics import EngineMetrics
    engine = make_engine(tbt=1e-9)
    run_all(engine, staggered(2))
    from prometheus_client import generate_latest
    text = generate_latest(EngineMetrics(engine).registry).decode()
    switches = engine.controller.stats()["switches"]
    assert f"nexus_partition_switches_total {float(switches)}" in text
    assert 'nexus_partition_decisions_total{mode="split"}' in text
    assert f'nexus_sm_split{{split="{engine.controller.stats()["current"]}"}} 1.0' in text
    assert "nexus_worker_replacements_total 0.0" in text and "nexus_pool_restarts_total 0.0" in text
    # Every decision is in the engine's stats (a bounded log), with each candidate's predictions.
    controller = engine.stats()["controller"]
    assert 0 < len(controller["log"]) <= engine.controller.log.maxlen
    assert any(entry["load"]["waiting"] > 0 for entry in controller["log"])   # the engine passes its queue
    assert any(entry["candidates"] for entry in controller["log"])
    for candidate in controller["last"]["candidates"]:  # none when the last step ran one phase alone
        labels = f'replica="0",candidate="{candidate["candidate"]}"'
        assert f"nexus_partition_predicted_goodput{{{labels}}} {float(candidate['goodput'])}" in text
        assert f"nexus_partition_predicted_tbt_seconds{{{labels}}}" in text
        assert f"nexus_partition_predicted_ttft_seconds{{{labels}}}" in text
    assert engine.stats()["partition"]["goodput"] == engine.controller.current.goodput


def test_a_step_that_fails_after_one_of_its_requests_was_aborted_fails_only_the_others():
    engine = make_engine(tbt=1e-9)
    engine.add_request("gone", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4))
    engine.add_request("kept", {"prompt_token_ids": [4, 5, 6]}, SamplingParams(max_tokens=4))
    engine._dispatch()
    (name, (flight,)), = engine.flights.items()
    assert {c.request.request_id for c in flight.plan.chunks} == {"gone", "kept"}
    fail_once(engine.pool.workers[name])
    assert engine.abort_request("gone")
    done = run_all(engine)
    assert done["gone"].outputs[0].finish_reason == "abort"
    assert done["kept"].outputs[0].finish_reason == "error"
    assert engine.block_manager.usage == 0.0


def test_the_controller_sees_the_prompts_waiting_for_their_first_token():
    engine = make_engine(tbt=10.0)
    engine.add_request("long", {"prompt_token_ids": list(range(1, 41))}, SamplingParams(max_tokens=2))
    engine.add_request("short", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=2))
    waiting = engine.scheduler.waiting_prompts(time.monotonic())
    assert [n for n, _ in waiting] == [3, 40]   # prefill order: shortest prompt first
    assert all(0 <= waited < 60 for _, waited in waiting)
    done = run_all(engine)
    assert done["long"].outputs[0].token_ids == expected(list(range(1, 41)), 2)
    assert engine.scheduler.waiting_prompts(time.monotonic()) == []


@pytest.mark.parametrize("seed", range(3))
def test_a_mixed_step_is_planned_at_the_aggregate_budget(seed):
    """The split plans prompts at max_num_batched_tokens (64); a mixed step takes at most aggregate_budget (12)
    tokens, decodes included, like the chunked-prefill engine it is measured against (a prefill with no decodes
    running has no TBT to keep: it runs at the full budget)."""
    engine = make_engine(tbt=10.0, seed=seed, aggregate_budget=12)  # everything meets TBT: always aggregate
    engine.pool.shared.private_workers = ("decode-50",)  # as on an 80 GB GPU: decode alone runs on decode-50
    sizes, beside_decode = [], []
    handle = engine.pool.workers[AGGREGATE]

    def submit(message, submit=handle.submit):
        if message.step.decodes and message.step.prefills:
            sizes.append(len(message.step.decodes) + sum(len(c.token_ids) for c in message.step.prefills))
        # prompts never run on all SMs beside a decode step: the mixed step waits for it (RESULTS.md, 2026-12-08)
        beside_decode.append(bool(message.step.prefills) and any(
            f.phase == "decode" for flights in engine.flights.values() for f in flights))
        submit(message)
    handle.submit = submit
    run_checked(engine, seed)
    assert sizes and max(sizes) <= 12 and not any(beside_decode)
    assert engine.block_manager.usage == 0.0 and not engine.scheduler.busy


@pytest.mark.parametrize("kwargs, message", [
    ({"aggregate_budget": 0}, "aggregate_budget must be a positive integer"),
    ({"aggregate_budget": 4096, "max_num_batched_tokens": 2048}, "aggregate_budget 4096 exceeds max_num_batched"),
    ({"split_prefill_share": 0}, "split_prefill_share must be an integer percentage within 1..100"),
    ({"split_prefill_share": 101}, "split_prefill_share must be an integer percentage within 1..100"),
    ({"split_prefill_share": "all"}, "split_prefill_share must be an integer percentage within 1..100"),
])
def test_a_bad_aggregate_budget_or_prefill_share_is_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**kwargs)
    with pytest.raises(ValueError, match="prefill share must be an integer percentage"):
        SmLadder((50,), 0)


def test_prompts_wait_for_the_decode_in_flight_to_run_as_a_mixed_step():
    """Aggregating while a decode step is in flight on a decode worker: the prompt waits for it to land and runs
    in a mixed step, never on all SMs beside it (on an H100 that stretched decode gaps to 50-70 ms)."""
    engine = make_engine(tbt=10.0, aggregate_budget=12)
    engine.pool.shared.private_workers = ("decode-50",)  # decode alone runs on decode-50
    engine.add_request("long", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=40))
    while not engine.flights.get("decode-50"):
        engine.step()
    wait, held = engine.pool.wait, [True]
    engine.pool.wait = lambda handles, timeout=None: [] if held[0] else wait(handles, timeout)  # nothing lands
    prefills_beside = []
    handle = engine.pool.workers[AGGREGATE]

    def submit(message, submit=handle.submit):
        prefills_beside.append(bool(message.step.prefills) and bool(engine.flights.get("decode-50")))
        submit(message)
    handle.submit = submit
    engine.add_request("new", {"prompt_token_ids": list(range(5, 25))}, SamplingParams(max_tokens=3))
    engine.step()  # the controller aggregates (every step meets 10 s), with decode-50's step still in flight
    assert engine.last_decision.mode == "aggregate" and engine.flights["decode-50"]
    assert not engine.flights.get(AGGREGATE)  # nothing sent: the prompt waits
    held[0] = False
    done = run_all(engine)
    assert done["new"].outputs[0].token_ids == expected(list(range(5, 25)), 3)
    assert done["long"].outputs[0].token_ids == expected([1, 2, 3], 40)
    assert prefills_beside and not any(prefills_beside) and engine.phase_steps["mixed"] > 0
