"""The decode worker's own loop: it keeps its batch and runs decode steps back to back, with no engine round trip.

The engine admits rows (a sequence whose prompt's K/V is in the shared pool, with blocks reserved ahead), extends
them and releases them through `Admit`, `Extend` and `Release` (runner.workers.messages); the loop applies them
at step boundaries, in the order they came. Each step decodes every row that has room (position < limit); a row
at its limit pauses, keeping its place, until an Extend gives it more. Each completed step's samples go back as
a `Tokens` event: the engine folds them as they arrive, and the loop never waits for it.

With `depth` 2 (the GPU, whose steps write the shared pool in place) the next step is dispatched before the
current one is read back, its input tokens fed on the device from the current one's samples. With depth 1 (the
CPU form, which copies each step's K/V into shared memory once it completed) steps run one at a time.

While the engine says a prefill that will join is in flight (`Expect`), the step to queue behind the running one
waits for that prefill's Admit or until the running step is about to end (runner.workers.handoff), so the new row
joins the next step rather than the one after.

Ordering: a step's `Tokens` go out only after `publish` made its K/V visible to the other workers, and a
`Released` only after every step dispatched before the release completed, so the engine frees a released row's
blocks only once nothing of this loop will write them.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
from typing import Any, Callable, Hashable, Sequence

from runner.executor import StepHandle, StepInput
from runner.sampling import SampleResult, SamplingRow
from runner.step_batch import SeqChunk
from runner.workers.handoff import HandoffTimer
from runner.workers.messages import (
    Admit,
    Expect,
    Extend,
    LoopFailed,
    LoopMessage,
    Release,
    Released,
    Tokens,
)

# How often a loop that waits for a join checks whether its running step already finished (seconds).
JOIN_POLL = 0.001


@dataclasses.dataclass
class _Row:
    seq_id: Hashable
    token: int | None  # the next input; None while it is the sample of a step in flight (fed on the device)
    position: int
    table: list[int]
    limit: int
    sampling: SamplingRow
    step: int
    num_logprobs: int
    source: tuple[int, int] | None = None  # (step number, chunk index) whose sample is the next input


@dataclasses.dataclass
class _Flight:
    number: int
    handle: StepHandle
    rows: list[_Row]
    chunks: list[SeqChunk]
    start: float | None  # predicted start on the device (HandoffTimer)


class DecodeLoop:
    """The loop over an executor with `dispatch` (a ModelRunner in a worker; a MockExecutor in tests).

    publish(chunks) runs after a step completed, before its tokens are reported (the CPU form copies the K/V the
    chunks wrote into shared memory); dispatched() after each dispatch; emit(event) sends an event to the engine."""

    def __init__(self, executor: Any, emit: Callable[[Any], None], *, depth: int = 2,
                 publish: Callable[[Sequence[SeqChunk]], None] = lambda chunks: None,
                 dispatched: Callable[[], None] = lambda: None):
        if depth not in (1, 2):
            raise ValueError(f"depth must be 1 or 2, got {depth}")
        self.executor, self.emit, self.depth = executor, emit, depth
        self.publish, self.dispatched = publish, dispatched
        self.rows: dict[Hashable, _Row] = {}
        self.inbox: queue.Queue[LoopMessage | None] = queue.Queue()
        self.flights: collections.deque[_Flight] = collections.deque()
        self.acks: list[tuple[int, list[Hashable]]] = []  # (last step dispatched before the release, its rows)
        self.num_steps = 0
        self.failed = False
        self.handoff = HandoffTimer()
        self.joining = False  # a prefill that will be admitted is in flight (Expect)

    def post(self, message: LoopMessage) -> None:
        """Queues a message for the next step boundary (any thread)."""
        self.inbox.put(message)

    @property
    def busy(self) -> bool:
        """Whether a step is in flight or a row has room to run one."""
        return bool(self.flights) or any(r.position < r.limit for r in self.rows.values())

    def advance(self, block: bool = False) -> bool:
        """One step boundary: applies queued messages (with block, waits for one while there is nothing to run),
        dispatches a step of the rows with room, and lands the oldest step once `depth` are in flight or nothing
        more runs. Returns False once a None was posted (the loop is to stop)."""
        if not self._apply(block and not self.busy):
            return False
        if self.failed:
            return True
        try:
            if self.joining and len(self.flights) == 1 and not self._wait_for_join():
                return False
            runnable = [r for r in self.rows.values() if r.position < r.limit]
            if runnable:
                self._dispatch(runnable)
            if self.flights and (len(self.flights) >= self.depth or not runnable):
                self._land(self.flights.popleft())
        except Exception as e:  # noqa: BLE001 - the engine recomputes the rows; the worker stays up
            self._fail(e)
        return True

    def run(self) -> None:
        """Runs until a None is posted (the worker's loop thread)."""
        while self.advance(block=True):
            pass

    def _wait_for_join(self) -> bool:
        """Holds the step to queue behind the running one until the expected rows are admitted or the running step
        is about to end (HandoffTimer), applying what comes meanwhile. False once a None came (stop)."""
        running = self.flights[0]
        done = getattr(running.handle, "ready", None)  # ModelRunner's steps say when they finished
        while self.joining:
            at = self.handoff.plan_at(running.start, join_coming=True)
            if at <= 0.0 or (done is not None and done()):  # the latter: planned late, the device idles
                return True
            try:
                message = self.inbox.get(timeout=min(JOIN_POLL, max(0.0, at - self.handoff.clock())))
            except queue.Empty:
                continue
            if not self._apply_one(message):
                return False
        self.handoff.forget()
        return True

    def _apply(self, block: bool) -> bool:
        while True:
            try:
                message = self.inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if not self._apply_one(message):
                return False

    def _apply_one(self, message: LoopMessage | None) -> bool:
        """Applies one message; False for None (the loop is to stop)."""
        if message is None:
            return False
        if isinstance(message, Admit):
            for r in message.rows:
                self.rows[r.seq_id] = _Row(r.seq_id, r.token, r.position, list(r.block_table), r.limit,
                                           r.sampling, r.step, r.num_logprobs)
            self.joining = False  # what was expected has come
        elif isinstance(message, Expect):
            self.joining = message.joining
        elif isinstance(message, Extend):
            row = self.rows.get(message.seq_id)
            if row is not None:  # else released meanwhile
                row.table, row.limit = list(message.block_table), message.limit
        elif isinstance(message, Release):
            for seq_id in message.seq_ids:
                self.rows.pop(seq_id, None)
            self.acks.append((self.num_steps, list(message.seq_ids)))
        else:
            raise TypeError(f"the decode loop does not take a {type(message).__name__}")
        if not self.flights:
            self._ack(self.num_steps)
        return True

    def _dispatch(self, rows: list[_Row]) -> None:
        last = self.flights[-1].number if self.flights else None
        chunks, feed, samplings = [], [], []
        for i, row in enumerate(rows):
            if row.token is None:  # a sample of the step just dispatched: always in flight (see _land)
                assert row.source is not None and row.source[0] == last, (row.seq_id, row.source, last)
                feed.append((i, row.source[1]))
            chunks.append(SeqChunk([row.token or 0], row.position, row.table, row.seq_id))
            samplings.append(row.sampling.at_step(row.step))
        num_logprobs = max(r.num_logprobs for r in rows)
        start = self.handoff.sent(queued=bool(self.flights))
        handle = self.executor.dispatch(StepInput(chunks, [], samplings, num_logprobs, feed=feed))
        self.num_steps += 1
        self.dispatched()
        for i, row in enumerate(rows):
            row.token, row.source = None, (self.num_steps, i)
            row.position += 1
            row.step += 1
        self.flights.append(_Flight(self.num_steps, handle, rows, chunks, start))

    def _land(self, flight: _Flight) -> None:
        out = flight.handle.result()
        landed = self.handoff.landed(flight.start)
        if self.flights:  # queued behind it: runs from now
            self.flights[0].start = landed
        logprobs = None
        if isinstance(out, SampleResult):
            out, logprobs = out.tokens, (out.token_logprobs, out.top_ids, out.top_logprobs)
        tokens = [int(t) for t in out]
        self.publish(flight.chunks)
        for i, row in enumerate(flight.rows):
            if row.source == (flight.number, i):  # not dispatched again since: the host holds its next input
                row.token, row.source = tokens[i], None
        self.emit(Tokens([r.seq_id for r in flight.rows], tokens, logprobs))
        self._ack(flight.number)

    def _ack(self, landed: int) -> None:
        """Acknowledges the releases whose last possible step has landed."""
        done = [ids for at, ids in self.acks if at <= landed]
        self.acks = [(at, ids) for at, ids in self.acks if at > landed]
        for ids in done:
            self.emit(Released(ids))

    def _fail(self, error: Exception) -> None:
        """Stops running: what may still be on the device is waited for, so a LoopFailed, like a Released,
        means nothing of this loop writes the rows' blocks any more."""
        for flight in self.flights:
            try:
                flight.handle.result()
            except Exception:  # noqa: BLE001,S110 - the failure is reported below
                pass
        self.flights.clear()
        self.rows.clear()
        self.acks.clear()
        self.failed = True
        self.emit(LoopFailed(f"{type(error).__name__}: {error}"))


def start_thread(loop: DecodeLoop) -> threading.Thread:
    thread = threading.Thread(target=loop.run, name="decode-loop", daemon=True)
    thread.start()
    return thread
