"""The engine loop: admit requests, plan a step, run it on the executor, fold the results back.

Every accepted request ends with output (finish_reason "stop"/"length"), an abort, or an error: an executor
failure finishes the requests of the failed step with finish_reason "error" and the engine keeps serving.
The fold decides token-level stops; the text, stop strings and outputs are the output processor's
(nexus_jax.core.output_processor), which runs in step() unless a caller (AsyncLLM) gives it a thread.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import random
import time
from typing import Any, Sequence

from nexus_jax.core.block_manager import BlockManager
from nexus_jax.core.config import EngineConfig
from nexus_jax.core.constraints import ConstraintFactory
from nexus_jax.core.host_cache import host_memory
from nexus_jax.core.logprobs import prompt_targets, record_prompt_logprobs
from nexus_jax.core.new_request import build_group
from nexus_jax.core.output_processor import OutputProcessor
from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.request import Request, RequestGroup, check_id_length
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.scheduler import Scheduler, SchedulerOutput
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.programs.table import ProgramConfig
from runner import programs
from runner.executor import Executor, ReadyStep, StepHandle, StepInput
from runner.sampling import SampleResult
from runner.step_batch import SeqChunk

log = logging.getLogger(__name__)


def program_config(config: EngineConfig) -> ProgramConfig:
    """The process table's settings among the engine's."""
    return ProgramConfig(beta=config.program_beta, idle_timeout=config.program_idle_timeout,
                         max_programs=config.max_programs, retention_window=config.program_retention_window)


@dataclasses.dataclass
class _Flight:
    """A dispatched step: its plan, the executor's handle on it, and when it was dispatched."""
    plan: SchedulerOutput
    handle: StepHandle
    started: float
    outputs: list[RequestOutput] | None = None  # set once folded early, by the next step's late inputs


class LLMEngine:
    overlaps = True  # the disaggregated engine runs its own loop
    auto_prefill_order = "arrival"  # what EngineConfig.prefill_order "auto" means here

    def __init__(self, config: EngineConfig, executor: Executor, tokenizer: Tokenizer | None, *,
                 max_model_len: int, vocab_size: int, eos_token_ids: Sequence[int] = ()):
        self.config = config
        self.executor = executor
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self.constraints = ConstraintFactory(tokenizer, vocab_size, self.eos_token_ids)
        self.block_manager = BlockManager(executor.num_blocks, executor.block_size, config.enable_prefix_caching)
        self.scheduler = self._make_scheduler(config, executor)
        self.groups: dict[str, RequestGroup] = {}
        self.seed_rng = random.Random(config.seed)  # draws the seeds of requests that give none
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self.output = OutputProcessor(tokenizer)  # AsyncLLM swaps in a ThreadedOutputProcessor
        # The overlapped loop (async_scheduling): step n + 1 is planned and dispatched before step n is read back
        # (with num_scheduler_steps > 1, either may be a multi-step decode: the look-ahead).
        self.overlap = self.overlaps and config.async_scheduling
        if self.overlap and not callable(getattr(executor, "dispatch", None)):
            raise ValueError(f"async_scheduling needs an executor with dispatch(); {type(executor).__name__} has "
                             "none: set async_scheduling=False")
        self._flight: _Flight | None = None  # the step dispatched and not yet folded
        self._failed = False  # a step failed: the device state it left is checked at the end of step()
        self.recoveries = {"dropped_steps": 0, "pool_losses": 0, "requeued_requests": 0}

    def _make_scheduler(self, config: EngineConfig, executor: Executor) -> Scheduler:
        """One scheduler plans every step (the disaggregated engine plans its phases apart instead)."""
        swap_space, host_cache = host_memory(config, executor)
        scheduler = Scheduler(self.block_manager, max_num_seqs=config.max_num_seqs,
                         max_num_batched_tokens=config.max_num_batched_tokens, policy=config.scheduling_policy,
                         num_scheduler_steps=config.num_scheduler_steps, max_prefill_seqs=config.max_prefill_seqs,
                         swap_space=swap_space, program_config=program_config(config), host_cache=host_cache,
                         prefill_order=self.prefill_order(config), prefill_aging=config.spf_aging(self.max_model_len))
        scheduler.late_limits = getattr(executor, "takes_late_limits", False)
        return scheduler

    def prefill_order(self, config: EngineConfig) -> str:
        return self.auto_prefill_order if config.prefill_order == "auto" else config.prefill_order

    # ---- requests in

    def add_request(self, request_id: str, prompt: str | dict[str, Any], params: SamplingParams | None = None, *,
                    priority: int = 0, arrival_time: float | None = None, stream: bool = False,
                    program_id: str | None = None, thread_id: str = "") -> None:
        """Validates and queues a request; raises ValueError (or TypeError) without side effects on bad input.
        With stream=True, step() reports the request's progress every step; otherwise only its final output."""
        self.add_prepared(self.prepare_request(request_id, prompt, params, priority=priority,
                                               arrival_time=arrival_time, stream=stream, program_id=program_id,
                                               thread_id=thread_id))

    def add_prepared(self, group: RequestGroup) -> None:
        """Queues a request made by prepare_request (split so that callers on other threads can validate
        without holding the engine)."""
        if group.request_id in self.groups:
            raise ValueError(f"request_id {group.request_id!r} is already in use")
        self.groups[group.request_id] = group
        for seq in group.seqs:
            self.scheduler.add(seq)

    def prepare_request(self, request_id: str, prompt: str | dict[str, Any], params: SamplingParams | None = None,
                        *, priority: int = 0, arrival_time: float | None = None, stream: bool = False,
                        program_id: str | None = None, thread_id: str = "") -> RequestGroup:
        """Validates a request and builds its sequences; touches no engine state but the seed generator."""
        return build_group(self, request_id, prompt, params, priority=priority, arrival_time=arrival_time,
                           stream=stream, program_id=program_id, thread_id=thread_id)

    def abort_request(self, request_id: str) -> bool:
        """Aborts a request that has not finished; its final output (finish_reason "abort") comes from the next
        step(). Returns False for an unknown or already finished request."""
        group = self.groups.get(request_id)
        if group is None or group.finished:
            return False
        now = time.monotonic()
        for seq in group.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                seq.finish("abort", None, now)
        self._retire(group)
        self._pending += self.output.flush()
        return True

    def settle(self) -> list[RequestOutput]:
        """Lands what is still in flight once no request is left to run (the wasted step after a stop), so that a
        caller that stops stepping leaves no blocks held."""
        return self.step() if self.has_unfinished_requests() and not self.scheduler.has_work() else []

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_work() or bool(self._pending) or self.output.has_pending()
                or self._flight is not None)

    # ---- the loop

    def step(self) -> list[RequestOutput]:
        """Runs one step; returns the final output of every request that ended, and a progress output of every
        streamed request that made progress. With the overlapped loop, it plans and dispatches the next step, then
        folds the one dispatched by the previous call (the device runs one while the host prepares the other).
        With a ThreadedOutputProcessor as `output`, the outputs go out on its thread instead and this returns []."""
        outputs, self._pending = self._pending, []
        plan = self.scheduler.schedule()
        if plan.swap_out or plan.swap_in:
            try:
                self.executor.swap_blocks(plan.swap_out, plan.swap_in)
            except Exception as e:  # the swapped-out requests lost their K/V, the step's requests their room
                log.exception("swap failed; failing its requests and the step's")
                outputs += self._fail(plan, f"{type(e).__name__}: {e}", self.scheduler.swapped_out(plan))
                self.block_manager.reset_prefix_cache()  # what the copies were to move or restore is unknown
                plan = SchedulerOutput([], [], [])
        previous, self._flight = self._flight, None
        if plan.chunks:  # else nothing to run, though a request that preempted itself may have swapped out
            outputs += self._dispatch(plan, previous)
        if previous is not None:
            outputs += self._land(previous)
        if not self.overlap and self._flight is not None:
            flight, self._flight = self._flight, None
            outputs += self._land(flight)
        if self._failed:
            self._failed = False
            self._recover_device()
        return outputs

    def _dispatch(self, plan: SchedulerOutput, previous: _Flight | None) -> list[RequestOutput]:
        """Starts `plan` on the executor (the step in flight, `previous`, feeds its placeholder tokens)."""
        started = time.monotonic()
        try:
            step = self._step_input(plan, previous)
            handle = self.executor.dispatch(step) if self.overlap else ReadyStep(self.executor.execute(step))
        except Exception as e:  # a failed step must not lose its requests: they end with an error
            log.exception("step failed; failing its %d requests", len(plan.chunks))
            self._failed = True
            return self._fail(plan, f"{type(e).__name__}: {e}")
        self.scheduler.dispatched(plan)
        self._flight = _Flight(plan, handle, started)
        return []

    def _land(self, flight: _Flight) -> list[RequestOutput]:
        """Reads a dispatched step's samples back and folds them in, or fails its requests."""
        if flight.outputs is not None:
            return flight.outputs
        try:
            result = flight.handle.result()
        except Exception as e:
            log.exception("step failed; failing its %d requests", len(flight.plan.chunks))
            self.scheduler.landed(flight.plan)
            self._failed = True
            return self._fail(flight.plan, f"{type(e).__name__}: {e}")
        outputs = self._fold(flight.plan, result, flight.started)
        self.scheduler.landed(flight.plan)
        return outputs

    def _recover_device(self) -> None:
        """After a failed step, whose device outputs (samples, the pool it updated) every later step would read and
        fail on: the step dispatched on it is dropped and its requests recomputed; the executor replaces what is in
        error, and a lost pool sends every running request back to be recomputed."""
        recover = getattr(self.executor, "recover", None)
        if recover is None:
            return
        lost: list[Request] = []
        if self._flight is not None:
            flight, self._flight = self._flight, None
            self.scheduler.landed(flight.plan)
            self.recoveries["dropped_steps"] += 1
            lost = [c.request for c in flight.plan.chunks]
        pool_lost = recover()
        for req in dict.fromkeys(list(self.scheduler.running) if pool_lost else lost):  # a request may repeat
            if not req.is_finished and req in self.scheduler.running:
                self.scheduler.requeue(req)
                self.recoveries["requeued_requests"] += 1
        if pool_lost:  # after the requeues freed their blocks: none of the pool's cached blocks holds its K/V now
            self.recoveries["pool_losses"] += 1
            self.block_manager.reset_prefix_cache()

    def _fold(self, plan: SchedulerOutput, result: Any, started: float) -> list[RequestOutput]:
        """Folds an executed plan back: K/V now computed, sampled tokens appended, finished requests retired."""
        touched: dict[str, RequestGroup] = {}
        self.scheduler.update(plan)
        now = time.monotonic()
        self.scheduler.record_service(plan, now - started)  # before _append can finish requests
        sampled = result.tokens if isinstance(result, SampleResult) else result
        token_rows = sampled if plan.num_steps > 1 else [sampled]  # [num_steps, chunks]
        samples = [chunk.samples for chunk in plan.chunks]  # before appending changes the requests' lengths
        prompt = getattr(result, "prompt_logprobs", None) or [None] * len(plan.chunks)
        for table, chunk in zip(prompt, plan.chunks):
            if table is not None:
                record_prompt_logprobs(chunk.request, chunk.start, chunk.num_tokens, table, self.output.token_text)
        self._stop_matched()
        for k, tokens in enumerate(token_rows):
            for i, chunk in enumerate(plan.chunks):
                seq = chunk.request
                if not samples[i] or seq.is_finished:
                    continue
                if k:  # the token appended at step k - 1 was this step's input, so its K/V now exists
                    self.scheduler.advance(seq)
                group = touched[seq.group_id] = self.groups[seq.group_id]
                self._append(group, seq, int(tokens[i]), result, i, now)
        for group in touched.values():
            if group.finished:
                self._retire(group)
            elif group.stream:
                self.output.progress(group)
        return self.output.flush()

    def _stop_matched(self) -> None:
        """Ends the sequences whose stop string the output processor's thread matched (their outputs have ended
        there): a finish like any other, which frees their blocks."""
        for seq, stop, now in self.output.stopped():
            if seq.is_finished:
                continue
            self.scheduler.finish(seq)
            seq.finish("stop", stop, now)
            group = self.groups[seq.group_id]
            if group.finished:
                self._retire(group)

    def _step_input(self, plan: SchedulerOutput, previous: _Flight | None = None) -> StepInput:
        """What runs `plan`, for an executor here or a worker process. A decode whose input token the step in
        flight (`previous`) still samples carries a placeholder, fed on the device from that step's sample."""
        chunks = plan.chunks
        seq_chunks = [SeqChunk(c.request.all_token_ids[c.start:c.start + c.num_tokens] or [0], c.start,
                               self.block_manager.block_table(c.request.request_id),
                               # a resumed request's table is new: its preemption count keys a new runner row
                               (c.request.request_id, c.request.num_preemptions)) for c in chunks]
        # A request's step index counts its samples in flight: seeded draws and min_tokens do not lag.
        rows = [c.request.sampling_row.at_step(len(c.request.output_token_ids) + c.request.num_pending)
                for c in chunks]
        decodes, prefills = seq_chunks[:len(plan.decodes)], seq_chunks[len(plan.decodes):]
        feed: list[tuple[int, int]] = []
        if previous is not None:
            source = {id(c.request): r for r, c in enumerate(previous.plan.chunks) if c.samples}
            feed = [(i, source[id(c.request)]) for i, c in enumerate(plan.decodes)
                    if c.start >= c.request.num_tokens]
        if plan.num_steps > 1:
            return StepInput(decodes, prefills, rows, num_steps=plan.num_steps, feed=feed)
        prompt = [prompt_targets(c.request, c.start, c.num_tokens) for c in chunks]
        wanted = [c.request.params.logprobs for c in chunks if c.request.params.logprobs is not None]
        # logprobs=0 still wants the sampled token's log-prob, which the executor returns only when asked for 1+;
        # prompt log-probs come back in the SampleResult that log-probs make
        num_logprobs = max(max(wanted), 1) if wanted else 1 if any(prompt) else 0
        bias = [c.request.params.logit_bias for c in chunks]
        penalties = [c.request.penalty.row() if c.request.penalty else None for c in chunks]
        # A grammar or bad words need the sample in flight: the executor asks for them after the forward pass.
        late = previous is not None and any(c.request.num_pending and self.scheduler.needs_last_token(c.request)
                                            for c in chunks)
        banned, allowed = (None, None) if late else self._limits(plan)
        return StepInput(decodes, prefills, rows, num_logprobs, banned, feed=feed, bias=bias if any(bias) else None,
                         penalties=penalties if any(penalties) else None, allowed=allowed,
                         prompt_logprobs=prompt if any(prompt) else None,
                         late=functools.partial(self._late_limits, plan, previous) if late else None)

    def _limits(self, plan: SchedulerOutput) -> tuple[list | None, list | None]:
        banned, allowed = self.constraints.limits([c.request if c.samples and not c.request.is_finished else None
                                                   for c in plan.chunks])
        return banned if any(banned) else None, allowed if any(a is not None for a in allowed) else None

    def _late_limits(self, plan: SchedulerOutput, previous: _Flight) -> tuple[list | None, list | None]:
        """Folds the step in flight (its samples advance grammars and bad words), then limits the plan's rows."""
        previous.outputs = self._land(previous)
        return self._limits(plan)

    def _append(self, group: RequestGroup, seq: Request, token: int, result: Any, row: int, now: float) -> None:
        seq.append_token(token)
        logprobs = (None if seq.params.logprobs is None else
                    (result.token_logprobs[row], result.top_ids[row], result.top_logprobs[row]))
        res = seq.stop.step(token)
        matched = self.output.token(group, seq, token, logprobs, now, res)
        if matched is not None:
            self.scheduler.finish(seq)
            seq.finish("stop", matched, now)
        elif res.finished or (seq.constraints is not None and seq.constraints.finished):  # the grammar is complete
            self.scheduler.finish(seq)
            seq.finish(res.finish_reason or "stop", res.stop_reason, now)

    def _fail(self, plan: SchedulerOutput, message: str, also: Sequence[Request] = ()) -> list[RequestOutput]:
        """Ends with an error the groups of the plan's chunks and of the requests `also` names."""
        now = time.monotonic()
        # A group aborted while its step executed (disaggregated mode) has already ended and been reported.
        requests = [c.request for c in plan.chunks] + list(also)
        groups = {r.group_id: self.groups[r.group_id] for r in requests if r.group_id in self.groups}
        for group in groups.values():
            group.error = message
            for seq in group.seqs:
                if not seq.is_finished:
                    self.scheduler.finish(seq)
                    seq.finish("error", None, now)
            self._retire(group)
        return self.output.flush()

    def _retire(self, group: RequestGroup) -> None:
        """The group's final output (or, done already on the processor's thread, nothing) goes out at the next
        flush."""
        del self.groups[group.request_id]
        self.output.retire(group)

    def session(self, program_id: str):
        """A context manager around an agentic program's calls: its process-table record lives until it ends.
        Not thread-safe: AsyncLLM users go through the engine thread."""
        check_id_length("program_id", program_id)
        return self.scheduler.programs.session(program_id)

    def close(self) -> None:
        """Releases what the engine started (worker processes, MPS); nothing for the in-process engine."""

    def compiled_programs(self) -> int:
        """Step programs this engine's device code has compiled so far (this process's jit caches; a benchmark
        that sees the count grow while it measures timed compilation, not serving)."""
        return programs.compiled_programs()

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_usage": self.block_manager.usage, "num_preemptions": self.scheduler.num_preemptions,
                "recoveries": dict(self.recoveries), **self.block_manager.stats(),
                **self.scheduler.cache_stats()}
