"""The engine's side of a decode worker that runs its own loop (EngineConfig decode_loop "worker"; the loop itself
is runner.workers.decode_loop): the engine no longer plans decode steps, it admits, extends and releases rows.

- Admit: a request whose prompt's K/V is in the shared pool (its last prefill step was folded: the prefill worker
  replied after that step completed) goes to the loop with `reserve` positions of blocks allocated ahead; the
  scheduler counts it busy while the loop holds it, so no plan takes it and its blocks are not freed under it.
- Tokens: each step the loop completed is folded as one single-step decode plan through the engine's own fold,
  so stop conditions, streaming and metrics are those of the engine loop. A token of a row already finished or
  being released is dropped: never emitted.
- Extend: a row whose reserved room runs low (by the tokens folded so far) gets more blocks; a row at its limit
  pauses in the loop until then. When the pool is short and a row is paused, the lowest-priority row is preempted:
  released from the loop, and recomputed once the loop acknowledged.
- Release: a finished, aborted or preempted row; its blocks are freed (or reused) only after the loop's
  `Released`, which comes once no step that may write them is still running.

Wasted work after a stop: the loop runs a row until its Release reaches it, at most to its limit, so a stop
costs at most `reserve` steps of that row (typically the few steps between the token's event and the engine's
next sync); those tokens are dropped.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Hashable, Protocol

import numpy as np

from nexus_jax.core.block_manager import BlockManager
from nexus_jax.core.outputs import RequestOutput
from nexus_jax.core.request import Request, RequestGroup
from nexus_jax.core.scheduler import ScheduledChunk, Scheduler, SchedulerOutput
from runner.sampling import SampleResult
from runner.workers.messages import Admit, Expect, Extend, LoopFailed, LoopRow, Release, Released, Tokens
from runner.workers.pool import WorkerError

RESERVE_STEPS = 32  # positions of blocks reserved ahead per row: how far the loop runs without the engine


class LoopEngine(Protocol):
    """What of the DisaggEngine the loop's bookkeeping uses."""
    scheduler: Scheduler
    block_manager: BlockManager
    pool: Any  # runner.workers.pool.WorkerPool (replaced when the pool restarts)

    def _fold(self, plan: SchedulerOutput, result: Any, started: float) -> list[RequestOutput]: ...


@dataclasses.dataclass
class _Held:
    request: Request
    key: Hashable       # the loop's seq_id: (request id, preemption count), new for each admission
    limit: int          # the loop may write positions below it
    releasing: str | None = None  # "finish" or "preempt" once a Release was sent


class WorkerLoop:
    """The rows that decode worker `worker` holds, and what the engine still owes it."""

    def __init__(self, engine: LoopEngine, worker: str, reserve: int = RESERVE_STEPS):
        if reserve < 1:
            raise ValueError(f"reserve must be >= 1, got {reserve}")
        self.engine, self.worker, self.reserve = engine, worker, reserve
        self.held: dict[str, _Held] = {}
        self.by_key: dict[Hashable, _Held] = {}
        self.last_event = time.monotonic()
        self.expecting = False  # what the loop was last told of a prefill that will join (Expect)
        self.counts = {"admitted": 0, "messages": 0, "loop_steps": 0, "dropped_tokens": 0, "extends": 0,
                       "releases": 0, "preempted": 0}

    # ---- the engine's step

    def sync(self) -> list[RequestOutput]:
        """Folds the loop's events, then releases finished rows, admits ready requests and extends rows running
        short. Raises WorkerError when the worker died or its loop failed (the caller recovers)."""
        outputs: list[RequestOutput] = []
        handle = self.engine.pool.workers[self.worker]
        if self.held:
            for event in handle.events():
                outputs += self._on(event)
        self._release_finished()
        self._admit()
        self._extend()
        return outputs

    def expect(self, joining: bool) -> None:
        """Tells the loop whether a prefill that will join it is in flight, when that changed: the loop then
        plans its queued step late, for the Admit to join it (runner.workers.handoff)."""
        if joining != self.expecting:
            self._post(Expect(joining))
            self.expecting = joining

    def _post(self, message: Any) -> None:
        self.engine.pool.workers[self.worker].post(message)
        self.counts["messages"] += 1

    def _on(self, event: Any) -> list[RequestOutput]:
        if isinstance(event, Tokens):
            return self._fold(event)
        if isinstance(event, Released):
            for key in event.seq_ids:
                held = self.by_key.pop(key, None)
                if held is not None:
                    self._forget(held)
            return []
        if isinstance(event, LoopFailed):
            raise WorkerError(f"the decode loop of {self.worker} failed: {event.error}")
        raise TypeError(f"unexpected decode loop event {event!r}")

    def _fold(self, event: Tokens) -> list[RequestOutput]:
        self.counts["loop_steps"] += 1
        chunks, tokens, kept = [], [], []
        for i, (key, token) in enumerate(zip(event.seq_ids, event.tokens)):
            held = self.by_key.get(key)
            if held is None or held.releasing is not None or held.request.is_finished:
                self.counts["dropped_tokens"] += 1
                continue
            req = held.request
            chunks.append(ScheduledChunk(req, req.num_tokens - 1, 1))  # its last token in, its next one out
            tokens.append(token)
            kept.append(i)
        started, self.last_event = self.last_event, time.monotonic()
        if not chunks:
            return []
        result: Any = np.asarray(tokens, np.int64)
        if event.logprobs is not None:
            result = SampleResult(result, *(np.asarray(a)[kept] for a in event.logprobs))
        return self.engine._fold(SchedulerOutput(chunks, [], []), result, started)

    def _forget(self, held: _Held) -> None:
        """The loop acknowledged a release: nothing of it writes the row's blocks any more."""
        req = held.request
        del self.held[req.request_id]
        sched = self.engine.scheduler
        # Unmarks the request as busy; frees the blocks of one that finished meanwhile.
        sched.release(SchedulerOutput([ScheduledChunk(req, req.num_computed_tokens, 1)], [], []))
        if held.releasing == "preempt" and not req.is_finished:
            self._preempt(req)

    def _preempt(self, req: Request) -> None:
        """Back to waiting, recomputed later with its generated tokens kept; no step may hold it."""
        self.engine.scheduler.requeue(req)
        req.num_preemptions += 1
        self.engine.scheduler.num_preemptions += 1
        self.counts["preempted"] += 1

    # ---- rows in and out

    def _release_finished(self) -> None:
        done = [h for h in self.held.values() if h.releasing is None and h.request.is_finished]
        for held in done:
            held.releasing = "finish"
        if done:
            self._post(Release([h.key for h in done]))
            self.counts["releases"] += len(done)

    def _admit(self) -> None:
        sched, bm = self.engine.scheduler, self.engine.block_manager
        ready = sorted((r for r in sched.running if not r.in_prefill and r.request_id not in sched.busy
                        and not r.is_finished and r.remaining_tokens > 0), key=sched.policy)
        rows = []
        for req in ready:
            position = req.num_tokens - 1
            table = (bm.allocate(req.request_id, min(position + self.reserve, self._end(req)))
                     or bm.allocate(req.request_id, position + 1))
            if table is None:
                if not self.held and not rows:
                    # Nothing in the loop gives blocks back: the idle requests holding them would wait forever.
                    self._preempt(ready[-1])
                break  # no room: later ones wait too, so the policy order is kept
            limit = min(len(table) * bm.block_size, self._end(req))
            held = _Held(req, (req.request_id, req.num_preemptions), limit)
            self.held[req.request_id] = self.by_key[held.key] = held
            sched.busy[req.request_id] += 1
            # logprobs=0 still wants the sampled token's log-prob, which the executor returns only when asked for 1+
            wanted = req.params.logprobs
            rows.append(LoopRow(held.key, req.all_token_ids[position], position, table, limit, req.sampling_row,
                                len(req.output_token_ids), 0 if wanted is None else max(wanted, 1)))
        if rows:
            self._post(Admit(rows))
            self.expecting = False  # an Admit ends what the loop waited for
            self.counts["admitted"] += len(rows)

    @staticmethod
    def _end(req: Request) -> int:
        """The position after the last one the request may still need written: its last sample's input."""
        return req.num_tokens - 1 + req.remaining_tokens

    def _extend(self) -> None:
        bm = self.engine.block_manager
        paused = []
        for held in list(self.held.values()):
            req = held.request
            position, end = req.num_tokens - 1, self._end(req)
            if held.releasing is not None or held.limit >= end or held.limit - position > self.reserve // 2:
                continue
            table = bm.allocate(req.request_id, min(held.limit + self.reserve, end))
            if table is None:
                if position >= held.limit:  # the loop has paused it: it runs again only with blocks
                    paused.append(held)
                continue
            held.limit = min(len(table) * bm.block_size, end)
            self._post(Extend(held.key, table, held.limit))
            self.counts["extends"] += 1
        if paused and not any(h.releasing == "preempt" for h in self.held.values()):
            # One victim at a time: its blocks come back only with the loop's acknowledgement.
            victim = max((h for h in self.held.values() if h.releasing is None),
                         key=lambda h: self.engine.scheduler.policy(h.request))
            victim.releasing = "preempt"
            self._post(Release([victim.key]))
            self.counts["releases"] += 1

    # ---- faults

    def lost(self) -> list[Request]:
        """The worker died (or the pool restarted): nothing of the loop writes any more. Returns the rows'
        unfinished requests, for the caller to recompute; finished ones free their blocks."""
        unfinished = []
        for held in list(self.held.values()):
            req = held.request
            if req.is_finished:
                self.engine.scheduler.release(SchedulerOutput([ScheduledChunk(req, req.num_computed_tokens, 1)],
                                                              [], []))
            else:
                unfinished.append(req)
        self.held.clear()
        self.by_key.clear()
        return unfinished

    def stats(self) -> dict[str, Any]:
        return {"worker": self.worker, "rows": len(self.held), "reserve": self.reserve, **self.counts}


def check_loop_params(group: RequestGroup) -> None:
    """The decode loop samples every row from its sampling row alone; what needs the host between steps (or
    per-step inputs the loop does not send) is refused rather than silently ignored."""
    params = group.seqs[0].params
    refused = [name for name, on in (
        ("logit_bias", bool(params.logit_bias)),
        ("penalties", params.has_penalties), ("allowed_token_ids", params.allowed_token_ids is not None),
        ("min_tokens", params.min_tokens > 0), ("bad_words", bool(params.bad_words)),
        ("structured_outputs", params.structured_outputs is not None)) if on]
    if refused:
        raise ValueError(f"decode_loop='worker' runs decode steps without the engine, which {', '.join(refused)} "
                         "need every step (host limits or per-step inputs): use decode_loop='engine'")
