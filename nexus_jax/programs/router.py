"""Routing LLM calls across engine replicas: which replica a call goes to, decided on the host from load alone.

Policies:
- locality (Autellix): a call of at most `locality_threshold` prompt tokens goes to the least-loaded replica (its
  prefill is cheap to redo); a longer call goes to the replica its program's previous call went to, whose prefix
  cache holds the program's context. The program's replica is remembered until the program ends (`end_program`)
  or has had no call in flight for `idle_timeout` seconds, through the same process table as the schedulers'.
- round_robin: replicas in turn, whatever the load.
- least_loaded: the replica with the least load.

Load of a replica = tokens of the calls routed to it and not finished: prompt tokens plus the tokens generated
so far (`progress`), i.e. the KV its calls need, whether they wait or run. The router sees no engine state, so
it works the same over in-process engines, worker processes or remote servers. Ties go to the replica with
fewer calls in flight, then the lowest index. Replicas marked dead are never chosen; programs remembered there
are routed afresh.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable

from nexus_jax.programs.table import ProcessTable

ROUTING_POLICIES = ("locality", "round_robin", "least_loaded")


@dataclasses.dataclass(frozen=True)
class RouterConfig:
    policy: str = "locality"
    locality_threshold: int = 2048   # prompt tokens up to which a call goes to the least-loaded replica
    idle_timeout: float = 600.0      # seconds without a call in flight before a program's replica is forgotten
    max_programs: int = 100_000      # programs remembered; past it the longest-idle ones are forgotten

    def __post_init__(self) -> None:
        if self.policy not in ROUTING_POLICIES:
            raise ValueError(f"routing policy must be one of {', '.join(ROUTING_POLICIES)}, got {self.policy!r}")
        if self.locality_threshold < 0 or not self.idle_timeout > 0:
            raise ValueError(f"locality_threshold must be >= 0 and idle_timeout > 0, got "
                             f"{self.locality_threshold} and {self.idle_timeout}")
        if not isinstance(self.max_programs, int) or isinstance(self.max_programs, bool) or self.max_programs < 1:
            raise ValueError(f"max_programs must be a positive integer, got {self.max_programs!r}")


@dataclasses.dataclass
class _Routed:
    replica: int
    program_id: str | None
    prompt_tokens: int
    generated: int = 0

    @property
    def tokens(self) -> int:   # what the call adds to its replica's load
        return self.prompt_tokens + self.generated


class Router:
    def __init__(self, num_replicas: int, config: RouterConfig | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.config = config or RouterConfig()
        self.clock = clock
        self.load = [0] * num_replicas          # tokens in flight per replica
        self.in_flight = [0] * num_replicas     # calls in flight per replica
        self.dead: set[int] = set()
        self.table = ProcessTable(self.config.idle_timeout, self.config.max_programs)
        self.program_replica: dict[str, int] = {}
        self.calls: dict[str, _Routed] = {}
        self._turn = itertools.count()
        self._last_sweep = -math.inf

    @property
    def num_replicas(self) -> int:
        return len(self.load)

    def route(self, call_id: str, program_id: str | None, prompt_tokens: int) -> int:
        """Chooses the call's replica and counts the call there until `finish(call_id)`."""
        if call_id in self.calls:
            raise ValueError(f"call {call_id!r} is already routed")
        if prompt_tokens < 1:
            raise ValueError(f"prompt_tokens must be >= 1, got {prompt_tokens}")
        live = [r for r in range(self.num_replicas) if r not in self.dead]
        if not live:
            raise RuntimeError("every replica is dead")
        now = self.clock()
        if now - self._last_sweep >= min(1.0, self.config.idle_timeout):  # O(programs): not on every call
            self._last_sweep = now
            for pid in self.table.expire(now):
                self.program_replica.pop(pid, None)
        policy = self.config.policy
        if policy == "round_robin":
            replica = live[next(self._turn) % len(live)]
        else:
            replica = min(live, key=lambda r: (self.load[r], self.in_flight[r], r))
            home = self.program_replica.get(program_id) if program_id is not None else None
            if policy == "locality" and prompt_tokens > self.config.locality_threshold and home is not None:
                replica = home
        if program_id is not None:
            evicted = self.table.num_evicted
            prog = self.table.get_or_create(program_id, now)
            if self.table.num_evicted != evicted:  # the table made room: forget those programs' replicas too
                self.program_replica = {p: r for p, r in self.program_replica.items() if p in self.table.programs}
            prog.active += 1
            prog.last_arrival = now
            self.program_replica[program_id] = replica  # its newest context is now there
        self.calls[call_id] = _Routed(replica, program_id, prompt_tokens)
        self.load[replica] += prompt_tokens
        self.in_flight[replica] += 1
        return replica

    def replica_of(self, call_id: str) -> int | None:
        routed = self.calls.get(call_id)
        return None if routed is None else routed.replica

    def progress(self, call_id: str, generated: int) -> None:
        """The call has generated `generated` tokens in all; they add to its replica's load."""
        routed = self._routed(call_id)
        if generated < routed.generated:
            raise ValueError(f"call {call_id!r} reports {generated} tokens generated, fewer than {routed.generated}")
        self.load[routed.replica] += generated - routed.generated
        routed.generated = generated

    def finish(self, call_id: str) -> None:
        """The call ended (finished, aborted or failed): its tokens leave its replica's load."""
        routed = self.calls.pop(call_id, None)
        if routed is None:
            raise ValueError(f"unknown call {call_id!r}")
        self.load[routed.replica] -= routed.tokens
        self.in_flight[routed.replica] -= 1
        prog = self.table.programs.get(routed.program_id) if routed.program_id is not None else None
        if prog is not None:
            prog.active -= 1
            prog.last_completion = self.clock()
            if prog.active == 0 and prog.ended:
                self._drop(prog.program_id)

    def end_program(self, program_id: str) -> None:
        """The program ended: its replica is forgotten (now, or with its last call in flight)."""
        if program_id in self.table.programs:
            self.table.end(program_id)
            if program_id not in self.table.programs:
                self.program_replica.pop(program_id, None)

    def mark_dead(self, replica: int) -> None:
        """The replica can serve nothing more: it is never chosen again, and its programs are routed afresh."""
        if not 0 <= replica < self.num_replicas:
            raise ValueError(f"replica {replica} out of range [0, {self.num_replicas})")
        self.dead.add(replica)
        for pid in [p for p, r in self.program_replica.items() if r == replica]:
            del self.program_replica[pid]

    def _drop(self, program_id: str) -> None:
        self.table.programs.pop(program_id, None)
        self.program_replica.pop(program_id, None)

    def _routed(self, call_id: str) -> _Routed:
        routed = self.calls.get(call_id)
        if routed is None:
            raise ValueError(f"unknown call {call_id!r}")
        return routed
