"""gRPC sessions over the engine's process table: StartSession opens a program's record, EndSession ends it.

A session holds the engine's own `session(program_id)` context manager open between the two RPCs, so its record
is the one the library's `with llm.session(...)` makes and the program-aware policies rank by. GenerateRequest
has no session field: clients send the program_id StartSession returns. A session never ended expires with its
record: the process table drops a program idle for the engine's program_idle_timeout, and `sweep` drops (and
ends) sessions whose record is gone or idle that long, so neither the table nor this registry grows without end.

The process table belongs to the engine thread, which sweeps it for idle programs: the server calls these
methods there (`AsyncLLM.run_on_engine`), never from its event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import uuid

from nexus_jax.engine import LLMEngine
from nexus_jax.programs import Program


class SessionLimitError(RuntimeError):
    """As many sessions are open as the server allows."""


@dataclasses.dataclass
class _Session:
    program_id: str
    record: Program                                   # the process-table entry the session opened
    scope: contextlib.AbstractContextManager          # the engine's session; exiting it ends the program


class Sessions:
    def __init__(self, engine: LLMEngine, limit: int):
        self.engine = engine
        self.limit = limit
        self.open: dict[str, _Session] = {}
        self._last_sweep = -math.inf

    def start(self, program_id: str = "") -> tuple[str, str]:
        """Opens a session; returns (session_id, program_id), picking a program id when none is given. Raises
        ValueError when the program already has a record (an open session, or calls of it in flight) and
        SessionLimitError when `limit` sessions are open."""
        if len(self.open) >= self.limit:
            self.sweep(force=True)
            if len(self.open) >= self.limit:
                raise SessionLimitError(f"{len(self.open)} sessions are open, the server's limit (max_sessions)")
        self.sweep()
        program_id = program_id or f"program-{uuid.uuid4().hex}"
        scope = self.engine.session(program_id)
        record = scope.__enter__()
        session_id = f"session-{uuid.uuid4().hex}"
        self.open[session_id] = _Session(program_id, record, scope)
        return session_id, program_id

    def end(self, session_id: str) -> bool:
        """Ends a session and its program (dropped at once, or with its last call in flight); False when unknown
        or expired."""
        self.sweep()
        session = self.open.pop(session_id, None)
        if session is None:
            return False
        session.scope.__exit__(None, None, None)
        return True

    def count(self) -> int:
        """Sessions open and not expired."""
        self.sweep(force=True)
        return len(self.open)

    def sweep(self, force: bool = False) -> None:
        """Ends sessions whose record the table dropped or that sat idle for the idle timeout. Without force it
        runs at most once a second (it is O(sessions))."""
        policy = self.engine.scheduler.programs
        now, idle = policy.clock(), policy.config.idle_timeout
        if not force and now - self._last_sweep < min(1.0, idle):
            return
        self._last_sweep = now
        table = policy.table.programs
        dead = [sid for sid, s in self.open.items() if table.get(s.program_id) is not s.record
                or (s.record.active == 0 and now - s.record.last_event() >= idle)]
        for sid in dead:
            self.open.pop(sid).scope.__exit__(None, None, None)  # a no-op when the table already dropped it
