"""The scheduling policies: how the scheduler orders calls, by request or by the program they belong to (Autellix).

Policies rank calls with `priority(call_id) -> tuple` (smaller runs first), which is what `Scheduler` sorts by:
- fcfs:  call arrival order.
- priority: the request's priority, then arrival (vLLM's "priority").
- mlfq:  per-call multi-level feedback: every call enters the top queue, is demoted when it exhausts its quantum.
- plas:  mlfq whose entry queue is the bin of the program's completed service (program-level least attained).
- atlas: as plas with the program's critical-path service, `max(service, service_at_arrival + call_time)`, so
         parallel threads do not add up.
Within a queue calls run in arrival order. Anti-starvation moves a call to the top queue when
`(W_program + W_call) / (T_program + T_call) >= beta` (waiting over service, completed calls plus this one).
The unit of service is seconds of executed steps (documented with the defaults in docs/programs.md). Every
policy keeps the process table (`nexus_jax.programs.table`), so sessions work whatever the order.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Hashable, Iterator

from nexus_jax.programs.table import Call, ProcessTable, Program, ProgramConfig


@dataclasses.dataclass
class _CallState:
    call: Call
    program: Program
    order: int                  # arrival tie-break
    queue: int = 0
    quantum_left: float = math.inf
    service_at_arrival: float = 0.0


class ProgramPolicy:
    """FCFS over calls; the base of the program-aware policies, which share its process-table accounting."""
    name = "fcfs"

    def __init__(self, config: ProgramConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or ProgramConfig()
        self.clock = clock
        self.table = ProcessTable(self.config.idle_timeout, self.config.max_programs)
        self.calls: dict[str, _CallState] = {}
        self._order = itertools.count()
        self._last_sweep = -math.inf

    @contextlib.contextmanager
    def session(self, program_id: str) -> Iterator[Program]:
        prog = self.table.start(program_id, self.clock())
        try:
            yield prog
        finally:
            if self.table.programs.get(program_id) is prog:  # else it expired while idle: nothing to end
                self.table.end(program_id)

    def on_arrival(self, call: Call) -> None:
        if call.call_id in self.calls:
            raise ValueError(f"call {call.call_id!r} has already arrived")
        now = self.clock()
        if now - self._last_sweep >= min(1.0, self.config.idle_timeout):  # sweeps are O(programs): not per call
            self._last_sweep = now
            self.table.expire(now)
        implicit = call.program_id is None
        prog = self.table.get_or_create(call.call_id if implicit else call.program_id, now, implicit)
        prog.calls += 1
        prog.active += 1
        prog.threads.add(call.thread_id)
        prog.last_arrival = now
        state = _CallState(call, prog, next(self._order), service_at_arrival=prog.critical)
        state.queue = self.entry_queue(prog)
        state.quantum_left = self.config.quantum(state.queue)
        self.calls[call.call_id] = state

    def on_scheduled(self, call_id: str, seconds: float, tokens: int = 0) -> None:
        """The call took part in an executed step of `seconds`, and generated `tokens` tokens in it."""
        state = self._state(call_id)
        state.call.service += seconds
        state.call.tokens_generated += tokens
        state.quantum_left -= seconds
        while state.quantum_left <= 0 and state.queue < self.config.num_queues - 1:
            state.queue += 1  # demotion: the call used up its queue's quantum
            state.quantum_left += self.config.quantum(state.queue)

    def on_finish(self, call_id: str) -> None:
        state = self.calls.pop(call_id, None)
        if state is None:
            raise ValueError(f"unknown call {call_id!r}")
        now = self.clock()
        prog, call = state.program, state.call
        prog.service += call.service
        prog.critical = max(prog.critical, state.service_at_arrival + call.service)
        prog.waiting += max(now - call.arrival - call.service, 0.0)
        prog.active -= 1
        prog.last_completion = now
        if prog.active == 0 and (prog.implicit or prog.ended):
            self.table.programs.pop(prog.program_id, None)

    def entry_queue(self, program: Program) -> int:
        return 0

    def attained(self, program: Program) -> float:
        """The program's attained service, as this policy ranks it."""
        return program.service

    def retention(self, program_id: Hashable) -> tuple:
        """Rank of the cached blocks a program's calls left (higher: kept longer). A program with no entry (its
        session ended, it expired, a one-call request) ranks lowest, as does one with no call in flight for longer
        than the retention window (done, though its session never ended); then more attained service ranks lower."""
        prog = self.table.programs.get(program_id) if program_id is not None else None
        if prog is None or prog.ended or prog.implicit:
            return (0, 0.0)
        if prog.active == 0 and self.clock() - prog.last_event() > self.config.retention_window:
            return (0, 0.0)
        return (1, -self.attained(prog))

    def priority(self, call_id: str) -> tuple:
        state = self._state(call_id)
        return (state.call.arrival, state.order)

    def _state(self, call_id: str) -> _CallState:
        state = self.calls.get(call_id)
        if state is None:
            raise ValueError(f"unknown call {call_id!r}")
        return state


class MLFQ(ProgramPolicy):
    name = "mlfq"

    def priority(self, call_id: str) -> tuple:
        state = self._state(call_id)
        if state.queue > 0 and self.starving(state):
            state.queue = 0  # promotion; the call demotes again as it uses the top quantum
            state.quantum_left = self.config.quantum(0)
        return (state.queue, state.call.arrival, state.order)

    def starving(self, state: _CallState) -> bool:
        prog, call = state.program, state.call
        waited = prog.waiting + max(self.clock() - call.arrival - call.service, 0.0)
        served = prog.service + call.service
        return waited >= self.config.beta * served


class PLAS(MLFQ):
    name = "plas"

    def entry_queue(self, program: Program) -> int:
        return self.config.queue_of(self.attained(program))


class ATLAS(MLFQ):
    name = "atlas"

    def entry_queue(self, program: Program) -> int:
        return self.config.queue_of(self.attained(program))

    def attained(self, program: Program) -> float:
        return program.critical


PROGRAM_POLICIES: dict[str, type[ProgramPolicy]] = {p.name: p for p in (ProgramPolicy, MLFQ, PLAS, ATLAS)}

# Orders by a request's own fields (its arrival time and user priority), with the process table kept by FCFS's
# ProgramPolicy. Any object with `arrival_time` and `priority` will do.
REQUEST_ORDERS: dict[str, Callable[[Any], tuple]] = {
    "fcfs": lambda r: (r.arrival_time,),
    "priority": lambda r: (r.priority, r.arrival_time),
}
SCHEDULING_POLICIES = (*REQUEST_ORDERS, *(name for name in PROGRAM_POLICIES if name not in REQUEST_ORDERS))


def make_policy(name: str, config: ProgramConfig | None = None,
                clock: Callable[[], float] = time.monotonic) -> ProgramPolicy:
    if name not in PROGRAM_POLICIES:
        raise ValueError(f"program policy must be one of {', '.join(PROGRAM_POLICIES)}, got {name!r}")
    return PROGRAM_POLICIES[name](config, clock)
