"""The disaggregated engine: prefill and decode steps run at the same time in separate worker processes, each on
its own share of the SMs, over one shared KV pool (Nexus, DuetServe).

Each call of `step()` dispatches work to the idle phases and then folds back whatever finished first:
- the partition controller sees the next prefill plan, the decode batch and the prompts waiting for their first
  token, predicts each candidate's TTFT and TBT against both SLOs, and picks "aggregate" (one mixed step of
  aggregate_budget tokens on all SMs, unless a split is predicted to beat it; only while nothing is executing),
  "split" (a decode worker and a prefill worker from the ladder of warm SM shares), or one phase alone;
- decode is pipelined (async_scheduling): the next decode step goes to the decode worker while its current one
  runs, fed on the device from that step's samples, so the device never waits for the engine's round trip; a
  stopped request costs at most that extra step, its token dropped. With num_scheduler_steps = k > 1 a decode plan
  runs k steps (the look-ahead): a round trip per k tokens, up to 2k - 1 steps after a stop. A split's decode never
  waits for a prefill; a mixed step waits for the decode step in flight;
- a request moves from prefill to decode by its block table only: the prefill worker replied after its step
  completed, so the K/V it wrote is in the shared pool before any decode worker reads it.

With decode_loop "worker" the engine plans no decode step: the decode worker of the ladder's widest rung keeps its
batch and runs steps back to back (runner.workers.decode_loop), the engine admitting and releasing rows and folding
the tokens streamed back (nexus_jax.disagg.worker_loop); prefill runs on that rung's prefill worker: a fixed split.

A worker that dies mid-step costs no request: the step's requests go back to waiting and are recomputed (their
generated tokens kept), and a new process replaces the worker. If the holder died (the shared memory with it) or
the replacement does not start (the MPS daemon died, for one), the whole pool restarts through `restart_pool`
(which starts a dead MPS daemon again) and every running request is recomputed.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Callable

from nexus_jax.core.config import EngineConfig
from nexus_jax.core.engine import LLMEngine, program_config
from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.request import RequestGroup
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.scheduler import SchedulerOutput
from nexus_jax.disagg.goodput import LoadState, within_budget
from nexus_jax.disagg.ladder import AGGREGATE
from nexus_jax.disagg.pacing import FirstTokenPacer
from nexus_jax.disagg.partition import Decision, PartitionController
from nexus_jax.disagg.phase_scheduler import PhaseScheduler
from nexus_jax.disagg.worker_loop import WorkerLoop, check_loop_params
from runner.executor import Executor
from runner.workers.handoff import HandoffTimer
from runner.workers.messages import Execute
from runner.workers.mps import MpsControl
from runner.workers.pool import PoolView, WorkerError, WorkerHandle, WorkerPool

log = logging.getLogger(__name__)

# Starts a new pool under the given MPS daemon (or a new daemon where that one died): (the pool, its daemon).
RestartPool = Callable[[MpsControl | None], tuple[WorkerPool, MpsControl | None]]


@dataclasses.dataclass
class _Flight:
    plan: SchedulerOutput
    phase: str           # "decode", "prefill" or "mixed"
    started: float
    device_start: float | None = None  # a decode step's predicted start on the device (see HandoffTimer)


class DisaggEngine(LLMEngine):
    overlaps = False  # its phases dispatch and fold on their own (see step)
    auto_prefill_order = "spf"  # Nexus
    def __init__(self, config: EngineConfig, pool: WorkerPool, controller: PartitionController, tokenizer: Any,
                 *, max_model_len: int, vocab_size: int, eos_token_ids=(), mps: MpsControl | None = None,
                 device_kind: str | None = None, restart_pool: RestartPool | None = None):
        """mps: the daemon that enforces the workers' SM shares (None: shares not enforced); device_kind: the
        workers' device; restart_pool: how to start the pool again after a fault (None: it cannot restart)."""
        super().__init__(config, PoolView(pool, config.block_size), tokenizer, max_model_len=max_model_len,
                         vocab_size=vocab_size, eos_token_ids=eos_token_ids)
        self.pool = pool
        self.controller = controller
        self.ladder = controller.ladder  # the workers the controller's decisions name
        self.mps = mps
        self.sm_enforced = mps is not None
        self.device_kind = device_kind
        self.restart_pool = restart_pool
        self.flights: dict[str, list[_Flight]] = {}   # worker name -> the plans it is executing, oldest first
        self.pipelined = config.async_scheduling
        self.aggregate_budget = config.aggregate_budget or config.max_num_batched_tokens
        self.last_decision: Decision | None = None
        self.phase_steps = {"decode": 0, "prefill": 0, "mixed": 0}
        self.pipelined_steps = 0  # decode steps sent while the worker still ran the one before
        self.poll_interval = 0.005
        self.handoff = HandoffTimer()
        # The decode worker's own loop reports no step starts: its first tokens go out as they come.
        self.pacer = FirstTokenPacer(config.pace_first_token and config.decode_loop == "engine")
        self.faults = {"worker_replacements": 0, "pool_restarts": 0, "requeued_requests": 0}
        self.loop: WorkerLoop | None = None
        if config.decode_loop == "worker":
            share = max(self.ladder.shares)
            self.loop = WorkerLoop(self, self.ladder.worker("decode", share))
            self.loop_prefill = self.ladder.worker("prefill", share)

    def _make_scheduler(self, config: EngineConfig, executor: Executor) -> PhaseScheduler:
        return PhaseScheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                              max_num_batched_tokens=config.max_num_batched_tokens, policy=config.scheduling_policy,
                              num_scheduler_steps=config.num_scheduler_steps, program_config=program_config(config),
                              max_prefill_seqs=config.max_prefill_seqs, prefill_order=self.prefill_order(config),
                              prefill_aging=config.spf_aging(self.max_model_len))

    def has_unfinished_requests(self) -> bool:
        return (super().has_unfinished_requests() or any(self.flights.values())
                or (self.loop is not None and bool(self.loop.held)))

    def prepare_request(self, request_id: str, prompt: str | dict[str, Any], params: SamplingParams | None = None,
                        **kwargs: Any) -> RequestGroup:
        group = super().prepare_request(request_id, prompt, params, **kwargs)
        if self.loop is not None:
            check_loop_params(group)
        return group

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        outputs += self._dispatch()
        if self.pacer.expire(self.output, time.monotonic()):
            outputs += self.output.flush()
        if self.loop is not None:
            outputs += self._sync_loop()
        executing = [name for name, flights in self.flights.items() if flights]
        if self.loop is not None and self.loop.held:
            executing.append(self.loop.worker)
        if not executing:
            return outputs
        # A short wait: the caller queues new arrivals (dispatched to an idle phase) while a long step runs.
        ready = self.pool.wait([self.pool.workers[name] for name in executing],
                               timeout=self.handoff.wait_timeout(self.poll_interval))
        for handle in ready:
            if self.pool.workers.get(handle.name) is not handle:  # restarted since
                continue
            if self.flights.get(handle.name):
                outputs += self._collect(handle)
            elif self.loop is not None and handle.name == self.loop.worker:
                outputs += self._sync_loop()
        return outputs

    def _sync_loop(self) -> list[RequestOutput]:
        try:
            outputs = self.loop.sync()
            self.loop.expect(self._join_coming())
            return outputs
        except WorkerError as e:
            return self._recover(self.loop.worker, e)

    # ---- dispatch

    def _dispatch(self) -> list[RequestOutput]:
        if self.loop is not None:
            return self._dispatch_prefill()
        busy_phases = {f.phase for flights in self.flights.values() for f in flights}
        if "mixed" in busy_phases:
            return []
        sched = self.scheduler
        prefill = sched.schedule_prefill() if "prefill" not in busy_phases else None
        # The decode worker holds at most one step when the next is planned: the one it runs.
        decode_at = next((n for n, flights in self.flights.items() if flights and flights[-1].phase == "decode"),
                         None)
        ahead = None
        if decode_at is None:
            decode = sched.schedule_decode()
        elif self.pipelined and len(self.flights[decode_at]) == 1 and not self._defer_ahead(decode_at):
            ahead = self.flights[decode_at][-1]
            decode = sched.schedule_decode(ahead.plan)
        else:
            decode = None
        has_prefill = prefill is not None and bool(prefill.chunks)
        has_decode = decode is not None and bool(decode.chunks)
        if not (has_prefill or has_decode):
            self._unhold(prefill, decode)
            return []
        running_decodes = [r for r in sched.running if not r.in_prefill]
        chunks = [(c.num_tokens, c.start) for c in prefill.prefills] if has_prefill else []
        room = self.aggregate_budget - (len(decode.decodes) if has_decode else 0)  # a mixed step's prompt tokens
        state = LoadState(decode_batch=len(running_decodes),
                          decode_sum_kv=sum(r.num_tokens for r in running_decodes), prefill_chunks=chunks,
                          kv_usage=self.block_manager.usage, waiting=sched.waiting_prompts(time.monotonic()),
                          aggregate_chunks=within_budget(chunks, room))
        self.last_decision = decision = self.controller.decide(state)
        outputs: list[RequestOutput] = []
        if decision.mode == AGGREGATE and has_prefill and (decode_at is not None or busy_phases):
            # wait for the decode in flight: prompts beside it on all SMs made 50-70 ms gaps (RESULTS.md, 12-08)
            self._unhold(prefill, decode)
            return outputs
        if decision.mode == AGGREGATE and has_prefill and has_decode:
            preempted = decode.preempted + prefill.preempted
            if sum(n for n, _ in chunks) > room:  # planned at the split's prefill budget: again at the mixed step's
                self._unhold(prefill)
                prefill = sched.schedule_prefill(max(room, 0))
                preempted += prefill.preempted
            if prefill.chunks:
                return self._submit(AGGREGATE, SchedulerOutput(decode.decodes, prefill.prefills, preempted), "mixed")
            has_prefill = False  # no prompt fits beside the decodes: they run alone
        # A phase alone runs on all SMs; without aggregation it stays on the ladder's widest worker of its phase.
        split, alone = decision.mode == "split", self.controller.allow_aggregate
        restarts = self.faults["pool_restarts"]
        if has_decode:
            name = (self.ladder.worker("decode", decision.decode_share) if split else
                    self.ladder.decode_alone(self.pool.shared.private_workers, alone))
            if ahead is None:
                outputs += self._submit(self._free_worker(name, "decode"), decode, "decode")
            elif name == decode_at or not split:
                # Decode alone stays on the worker it runs on, whatever its share: memory-bound, it loses little
                # on fewer SMs (~10% at half the GPU), where moving costs a round trip with the device idle.
                outputs += self._submit(decode_at, decode, "decode", ahead)
            else:  # its input tokens are on the other worker's device: move once that step has landed
                self._unhold(decode)
        elif decode is not None:
            self._unhold(decode)
        if self.faults["pool_restarts"] != restarts:  # the restart requeued the prefill plan's requests too
            self._unhold(prefill)
        elif has_prefill:
            name = self._free_worker(self.ladder.worker("prefill", decision.decode_share) if split else
                                     AGGREGATE if alone else (self.ladder.phase_workers("prefill") or [AGGREGATE])[-1],
                                     "prefill")
            outputs += self._submit(name, prefill, "prefill") if name else self._unhold(prefill) or []
        elif prefill is not None:
            self._unhold(prefill)
        return outputs

    def _dispatch_prefill(self) -> list[RequestOutput]:
        """With the decode loop on the worker, the engine plans prefills only, for its rung's prefill worker."""
        if self.flights.get(self.loop_prefill):
            return []
        prefill = self.scheduler.schedule_prefill()
        if not prefill.chunks:
            self._unhold(prefill)
            return []
        return self._submit(self.loop_prefill, prefill, "prefill")

    def _defer_ahead(self, decode_at: str) -> bool:
        """Whether the step to queue behind decode_at's running one waits, for a prefill in flight to join it."""
        return self.handoff.plan_at(self.flights[decode_at][0].device_start, self._join_coming()) > 0.0

    def _join_coming(self) -> bool:
        """Whether a prefill in flight samples a prompt's first token: its request joins decode when it lands."""
        return any(f.phase == "prefill" and any(c.samples for c in f.plan.prefills)
                   for flights in self.flights.values() for f in flights)

    def _free_worker(self, wanted: str, phase: str) -> str | None:
        """The wanted worker or, while the other phase holds it, this phase's free worker with the fewest SMs (None:
        none is free; a prefill on the aggregate worker has no other)."""
        if not self.flights.get(wanted):
            return wanted
        return next((n for n in self.ladder.phase_workers(phase) if not self.flights.get(n)), None)

    def _submit(self, name: str, plan: SchedulerOutput, phase: str, ahead: _Flight | None = None
                ) -> list[RequestOutput]:
        """Sends `plan` to worker `name`; `ahead`: that worker's step in flight, whose samples feed this one."""
        handle = self.pool.workers[name]
        try:
            handle.submit(Execute(self._step_input(plan, ahead)))
        except Exception as e:  # noqa: BLE001 - the plan's requests end with an error, the engine goes on
            if not handle.alive() or self._mps_lost():
                return self._recover(name, e, plan)
            log.exception("dispatch to %s failed", name)
            message = f"{type(e).__name__}: {e}"
            return self._end_flight(plan, lambda: self._fail(plan, message), dispatched=False)
        self.scheduler.dispatched(plan)
        self.pipelined_steps += ahead is not None
        flights = self.flights.setdefault(name, [])
        start = self.handoff.sent(queued=bool(flights)) if phase == "decode" else None
        flights.append(_Flight(plan, phase, time.monotonic(), start))
        return self._paced_start(plan) if phase == "decode" and len(flights) == 1 else []

    def _unhold(self, *plans: SchedulerOutput | None) -> None:
        for plan in plans:
            if plan is not None:
                self.scheduler.release(plan)

    # ---- results

    def _collect(self, handle: WorkerHandle) -> list[RequestOutput]:
        flight = self.flights[handle.name].pop(0)
        try:
            result = handle.result()
        except Exception as e:  # noqa: BLE001
            if not handle.alive() or self._mps_lost():
                self.flights[handle.name].insert(0, flight)
                return self._recover(handle.name, e)
            log.error("%s step on %s failed: %s", flight.phase, handle.name, e)
            message = f"{type(e).__name__}: {e}"
            return self._end_flight(flight.plan, lambda: self._fail(flight.plan, message))
        self.phase_steps[flight.phase] += 1
        outputs = []
        if flight.phase == "decode":
            landed = self.handoff.landed(flight.device_start)
            if self.flights[handle.name]:  # queued behind it: starts now
                self.flights[handle.name][0].device_start = landed
                outputs = self._paced_start(self.flights[handle.name][0].plan)
        elif flight.phase == "prefill":
            firsts = {c.request.group_id for c in flight.plan.prefills if c.samples and not c.request.output_token_ids}
            self.pacer.hold(self.output, filter(None, map(self.groups.get, firsts)), time.monotonic())
        outputs += self._end_flight(flight.plan, lambda: self._fold(flight.plan, result, flight.started))
        self.pacer.folded()
        return outputs

    def _paced_start(self, plan: SchedulerOutput) -> list[RequestOutput]:
        """`plan`'s decode step starts on the device: the first tokens withheld for it go out."""
        groups = {self.groups.get(c.request.group_id) for c in plan.decodes}
        return self.output.flush() if self.pacer.start(self.output, groups, time.monotonic()) else []

    def _end_flight(self, plan: SchedulerOutput, fold, dispatched: bool = True) -> list[RequestOutput]:
        # Fold first (requests that finish defer their blocks while busy), then release the blocks.
        try:
            return fold()
        finally:
            self._drop(plan, dispatched)

    def _drop(self, plan: SchedulerOutput, dispatched: bool = True) -> None:
        """The plan no longer executes: its in-flight counts go, and blocks that waited for it are freed."""
        if dispatched:
            self.scheduler.landed(plan)
        self.scheduler.release(plan)

    # ---- faults

    def _recover(self, name: str, error: Exception, undispatched: SchedulerOutput | None = None
                 ) -> list[RequestOutput]:
        """Worker `name` died with its plans in flight (and `undispatched`, which it never took): requeue their
        requests, then replace the worker, or restart the pool when the holder is gone too or the replacement
        fails."""
        log.error("worker %s died (%s); its requests will be recomputed", name, error)
        plans = [f.plan for f in self.flights.pop(name, [])]
        self.handoff.forget()
        for plan in plans:
            self._drop(plan)
        if undispatched is not None:
            self._drop(undispatched, dispatched=False)
            plans.append(undispatched)
        self._requeue(c.request for plan in plans for c in plan.chunks)
        if self.loop is not None and name == self.loop.worker:
            self._requeue(self.loop.lost())
        if self.pool.workers[self.pool.holder_name].alive() and not self._mps_lost():
            try:
                start = time.monotonic()
                self.pool.replace(name)
                self.faults["worker_replacements"] += 1
                log.warning("worker %s replaced in %.1f s", name, time.monotonic() - start)
                return []
            except WorkerError as e:
                log.error("worker %s could not be replaced (%s)", name, e)
        self._restart()
        return []

    def _mps_lost(self) -> bool:  # without its daemon every MPS client's CUDA context is broken
        return self.mps is not None and not self.mps.alive()

    def _restart(self) -> None:
        """A new pool (new shared weights and KV pool): every running request is recomputed. Raises when the
        pool cannot restart; the caller (LLM, AsyncLLM) then ends every request with that error."""
        if self.restart_pool is None:
            raise WorkerError("the worker pool is lost and this engine cannot restart it")
        for flights in self.flights.values():
            for flight in flights:
                self._drop(flight.plan)
        self.flights.clear()
        if self.loop is not None:
            self.loop.lost()  # its requests are running: requeued with the others
        self._requeue(list(self.scheduler.running))
        self.block_manager.reset_prefix_cache()  # the cached blocks' K/V went with the old pool
        self.pool.close()
        start = time.monotonic()
        self.pool, self.mps = self.restart_pool(self.mps)
        self.executor.pool = self.pool
        self.faults["pool_restarts"] += 1
        log.warning("worker pool restarted in %.1f s", time.monotonic() - start)

    def _requeue(self, requests) -> None:
        for req in dict.fromkeys(requests):  # a plan may list a request twice (decode steps of one sequence)
            if not req.is_finished and req in self.scheduler.running:
                self.scheduler.requeue(req)
                self.faults["requeued_requests"] += 1

    def compiled_programs(self) -> int:
        """The step programs every worker compiled so far (a round trip to each: call it on the engine thread)."""
        return sum(handle.info()["compiled"] for handle in self.pool.workers.values())

    def stats(self) -> dict[str, Any]:
        d = self.last_decision
        return {**super().stats(), "mode": "disaggregated", "sm_isolation": self.sm_enforced,
                "phase_steps": dict(self.phase_steps), "pipelined_steps": self.pipelined_steps,
                "in_flight": sorted(n for n, flights in self.flights.items() if flights),
                "partition": None if d is None else dict(
                    mode=d.mode, decode_share=d.decode_share, prefill_share=d.prefill_share, objective=d.objective,
                    predicted_tbt=d.predicted_decode, predicted_ttft=d.predicted_ttft, goodput=d.goodput),
                "controller": self.controller.stats(), "worker_startup_s": dict(self.pool.startup_seconds),
                "private_weights": sorted(self.pool.shared.private_workers),
                "faults": dict(self.faults), "handoff": self.handoff.stats(), "pacing": self.pacer.stats(),
                "decode_loop": None if self.loop is None else self.loop.stats()}

    def close(self) -> None:
        self.pool.close()
        if self.mps is not None:
            self.mps.stop()

