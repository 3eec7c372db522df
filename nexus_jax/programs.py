"""Program-aware scheduling (Autellix): a process table of agentic programs and the policies that rank calls.

A program is a session of dependent LLM calls; parallel calls of one program carry different thread ids. The
process table keeps per-program service (seconds a call of it spent inside executed steps), waiting time, call
and thread counts and the last arrival/completion; an entry is created at session start or at the program's
first call and dropped at session end (once its calls are done) or after `idle_timeout` seconds without a call.

Policies rank calls with `priority(call_id) -> tuple` (smaller runs first), which is what `Scheduler` sorts by:
- fcfs:  call arrival order.
- mlfq:  per-call multi-level feedback: every call enters the top queue, is demoted when it exhausts its quantum.
- plas:  mlfq whose entry queue is the bin of the program's completed service (program-level least attained).
- atlas: as plas with the program's critical-path service, `max(service, service_at_arrival + call_time)`, so
         parallel threads do not add up.
Within a queue calls run in arrival order. Anti-starvation moves a call to the top queue when
`(W_program + W_call) / (T_program + T_call) >= beta` (waiting over service, completed calls plus this one).
The unit of service is seconds of executed steps (documented with the defaults in docs/programs.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from typing import Callable, Iterator


@dataclasses.dataclass(frozen=True)
class ProgramConfig:
    bins: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # queue boundaries in seconds: K = len + 1
    quanta: tuple[float, ...] | None = None  # seconds a call may run in each queue; default: the bin widths
    beta: float = 8.0                        # anti-starvation threshold on waiting / service
    idle_timeout: float = 600.0              # seconds after a program's last event before its entry is dropped
    max_programs: int = 100_000              # entries kept; past it the longest-idle ones without a session go

    def __post_init__(self) -> None:
        if any(b <= 0 for b in self.bins) or list(self.bins) != sorted(set(self.bins)):
            raise ValueError(f"bins must be positive and strictly increasing, got {self.bins}")
        if self.quanta is not None and (len(self.quanta) != self.num_queues or any(q <= 0 for q in self.quanta)):
            raise ValueError(f"quanta must be {self.num_queues} positive numbers (one per queue), got {self.quanta}")
        if self.beta <= 0 or self.idle_timeout <= 0:
            raise ValueError(f"beta and idle_timeout must be positive, got {self.beta} and {self.idle_timeout}")
        if not isinstance(self.max_programs, int) or isinstance(self.max_programs, bool) or self.max_programs < 1:
            raise ValueError(f"max_programs must be a positive integer, got {self.max_programs!r}")

    @property
    def num_queues(self) -> int:
        return len(self.bins) + 1

    def quantum(self, queue: int) -> float:
        if self.quanta is not None:
            return self.quanta[queue]
        edges = (0.0, *self.bins, math.inf)
        return edges[queue + 1] - edges[queue]  # the bottom queue never demotes

    def queue_of(self, service: float) -> int:
        return sum(service >= b for b in self.bins)


@dataclasses.dataclass
class Call:
    """What a policy knows about one LLM call; `service` and `tokens_generated` grow through on_scheduled."""
    call_id: str
    program_id: str | None       # None: a one-call program of its own
    arrival: float
    prompt_tokens: int
    thread_id: str = ""
    tokens_generated: int = 0
    service: float = 0.0


@dataclasses.dataclass
class Program:
    program_id: str
    created: float
    service: float = 0.0        # total service of completed calls (PLAS, anti-starvation)
    critical: float = 0.0       # critical-path service (ATLAS)
    waiting: float = 0.0        # total waiting of completed calls
    calls: int = 0
    active: int = 0             # calls arrived and not finished
    threads: set[str] = dataclasses.field(default_factory=set)
    last_arrival: float | None = None
    last_completion: float | None = None
    ended: bool = False         # its session ended while calls were in flight: dropped with the last one
    session: bool = False       # started by a session, which only its end (or idle expiry) drops
    implicit: bool = False      # made for a call without a program: dropped with that call

    def last_event(self) -> float:
        return max(self.created, self.last_arrival or -math.inf, self.last_completion or -math.inf)


class ProcessTable:
    """Program records by id. Bounded: a client that sends a fresh program id with every call would otherwise grow
    it by its call rate times idle_timeout. Past `max_programs`, records with no call in flight and no open
    session are dropped, longest idle first (those programs start afresh, with no attained service, if they
    call again); sessions are bounded by whoever opens them (the server's max_sessions)."""

    def __init__(self, idle_timeout: float = 600.0, max_programs: int = 100_000):
        self.idle_timeout = idle_timeout
        self.max_programs = max_programs
        self.programs: dict[str, Program] = {}
        self.num_evicted = 0  # records dropped for room (not by idle expiry or session end)

    def start(self, program_id: str, now: float) -> Program:
        if program_id in self.programs:
            raise ValueError(f"program {program_id!r} already has a session")
        self._make_room()
        prog = self.programs[program_id] = Program(program_id, now, session=True)
        return prog

    def end(self, program_id: str) -> None:
        prog = self.programs.get(program_id)
        if prog is None:
            raise ValueError(f"program {program_id!r} has no session")
        prog.ended = True
        if prog.active == 0:
            del self.programs[program_id]

    def get_or_create(self, program_id: str, now: float, implicit: bool = False) -> Program:
        prog = self.programs.get(program_id)
        if prog is None:
            self._make_room()
            prog = self.programs[program_id] = Program(program_id, now, implicit=implicit)
        return prog

    def expire(self, now: float) -> list[str]:
        """Drops programs with no call in flight and no event for idle_timeout seconds (sessions never ended)."""
        dead = [pid for pid, p in self.programs.items()
                if p.active == 0 and now - p.last_event() >= self.idle_timeout]
        for pid in dead:
            del self.programs[pid]
        return dead

    def _make_room(self) -> None:
        """Called before adding a record: when full, drops the longest-idle tenth of the droppable records at
        once, so the O(n log n) sort is paid once per n/10 additions."""
        if len(self.programs) < self.max_programs:
            return
        idle = sorted((p for p in self.programs.values() if p.active == 0 and not p.session),
                      key=Program.last_event)
        for prog in idle[:max(1, self.max_programs // 10)]:
            del self.programs[prog.program_id]
            self.num_evicted += 1


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
        return self.config.queue_of(program.service)


class ATLAS(MLFQ):
    name = "atlas"

    def entry_queue(self, program: Program) -> int:
        return self.config.queue_of(program.critical)


PROGRAM_POLICIES: dict[str, type[ProgramPolicy]] = {p.name: p for p in (ProgramPolicy, MLFQ, PLAS, ATLAS)}


def make_policy(name: str, config: ProgramConfig | None = None,
                clock: Callable[[], float] = time.monotonic) -> ProgramPolicy:
    if name not in PROGRAM_POLICIES:
        raise ValueError(f"program policy must be one of {', '.join(PROGRAM_POLICIES)}, got {name!r}")
    return PROGRAM_POLICIES[name](config, clock)
