"""The process table of agentic programs (Autellix) and the settings of the program-aware policies.

A program is a session of dependent LLM calls; parallel calls of one program carry different thread ids. The
process table keeps per-program service (seconds a call of it spent inside executed steps), waiting time, call
and thread counts and the last arrival/completion; an entry is created at session start or at the program's
first call and dropped at session end (once its calls are done) or after `idle_timeout` seconds without a call.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class ProgramConfig:
    bins: tuple[float, ...] = (2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # queue boundaries in seconds: K = len + 1
    quanta: tuple[float, ...] | None = None  # seconds a call may run in each queue; default: the bin widths
    beta: float = 8.0                        # anti-starvation threshold on waiting / service
    idle_timeout: float = 600.0              # seconds after a program's last event before its entry is dropped
    max_programs: int = 100_000              # entries kept; past it the longest-idle ones without a session go
    # Seconds a program with no call in flight keeps its cache rank (it thinks, or waits for a tool); after that,
    # as once its session ended, its cached context goes first. Ranks kept until expiry (infinity) made the
    # simulator slower than plain LRU on every workload (up to 2x): finished programs that never end a session rank
    # above the live ones with more service (docs/programs.md, 2026-12-08).
    retention_window: float = 5.0

    def __post_init__(self) -> None:
        if any(b <= 0 for b in self.bins) or list(self.bins) != sorted(set(self.bins)):
            raise ValueError(f"bins must be positive and strictly increasing, got {self.bins}")
        if self.quanta is not None and (len(self.quanta) != self.num_queues or any(q <= 0 for q in self.quanta)):
            raise ValueError(f"quanta must be {self.num_queues} positive numbers (one per queue), got {self.quanta}")
        if self.beta <= 0 or self.idle_timeout <= 0:
            raise ValueError(f"beta and idle_timeout must be positive, got {self.beta} and {self.idle_timeout}")
        if not self.retention_window >= 0:
            raise ValueError(f"retention_window must be >= 0 seconds, got {self.retention_window}")
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
