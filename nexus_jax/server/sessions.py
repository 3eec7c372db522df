"""gRPC sessions over the engines' process tables: StartSession opens a program's record, EndSession ends it.

A session holds the engine's own `session(program_id)` context manager open between the two RPCs, so its record
is the one the library's `with llm.session(...)` makes and the program-aware policies rank by. Over several
replicas the session opens that record on every live replica: each replica's scheduler ranks the calls routed to
it by its own table, and a program's calls may go to any replica. GenerateRequest has no session field: clients
send the program_id StartSession returns. A session never ended expires with its records: a process table drops a
program idle for the engine's program_idle_timeout, and `sweep` drops (and ends everywhere) sessions whose record
is gone or idle that long on every live replica, so neither the tables nor this registry grow without end.

Each process table belongs to its engine thread, which sweeps it for idle programs: every table access runs there
(`AsyncLLM.run_on_engine`), never on the server's event loop, which owns this registry. An asyncio lock makes
start, end and sweep whole (they await the engine threads in between), so `limit` counts sessions exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import time
import uuid
from typing import Any, Sequence

from nexus_jax.core.engine import LLMEngine
from nexus_jax.entrypoints.async_llm import EngineDeadError
from nexus_jax.programs.table import Program


class SessionLimitError(RuntimeError):
    """As many sessions are open as the server allows."""


@dataclasses.dataclass
class _Record:
    record: Program                                   # the process-table entry the session opened on one replica
    scope: contextlib.AbstractContextManager          # the engine's session; exiting it ends the program there


@dataclasses.dataclass
class _Session:
    program_id: str
    records: dict[int, _Record]                       # by replica index


class Sessions:
    def __init__(self, replicas: Sequence[Any], limit: int):
        """`replicas`: the AsyncLLMs whose process tables hold the sessions (one for a plain AsyncLLM)."""
        self.replicas = list(replicas)
        self.limit = limit
        self.open: dict[str, _Session] = {}
        self.idle_timeout = min(r.engine.scheduler.programs.config.idle_timeout for r in self.replicas)
        self._lock = asyncio.Lock()
        self._last_sweep = -math.inf

    async def start(self, program_id: str = "") -> tuple[str, str]:
        """Opens a session; returns (session_id, program_id), picking a program id when none is given. Raises
        ValueError when the program already has a record on a replica (an open session, or calls of it in
        flight), SessionLimitError when `limit` sessions are open and EngineDeadError when no replica is alive."""
        async with self._lock:
            if len(self.open) >= self.limit:
                await self._sweep(force=True)
                if len(self.open) >= self.limit:
                    raise SessionLimitError(f"{len(self.open)} sessions are open, the server's limit (max_sessions)")
            await self._sweep()
            program_id = program_id or f"program-{uuid.uuid4().hex}"
            session = _Session(program_id, {})
            try:  # in replica order, so that of two starts of one program the first one wins everywhere
                for i, replica in self._live():
                    with contextlib.suppress(EngineDeadError):  # died since: it holds no calls to rank
                        opened = replica.run_on_engine(lambda e=replica.engine: _open(e, program_id))
                        session.records[i] = await opened
            except BaseException:
                await self._close(session)
                raise
            if not session.records:
                raise EngineDeadError("every engine has stopped")
            session_id = f"session-{uuid.uuid4().hex}"
            self.open[session_id] = session
            return session_id, program_id

    async def end(self, session_id: str) -> str | None:
        """Ends a session and its program on every replica (dropped at once, or with its last call in flight);
        returns its program id, or None when the session is unknown or expired."""
        async with self._lock:
            await self._sweep()
            session = self.open.pop(session_id, None)
            if session is None:
                return None
            await self._close(session)
            return session.program_id

    async def count(self) -> int:
        """Sessions open, as of a sweep at most a second old: a sweep is O(sessions) on every engine thread, and
        GetServerInfo, which any client may call at any rate, must not run one per call."""
        async with self._lock:
            await self._sweep()
            return len(self.open)

    async def _sweep(self, force: bool = False) -> None:
        """Ends the sessions whose records the live replicas' tables dropped or that sat idle for the idle timeout
        on every one. Without force it runs at most once a second (it is O(sessions) on every replica)."""
        live, now = self._live(), time.monotonic()
        if not self.open or (not force and now - self._last_sweep < min(1.0, self.idle_timeout)):
            return
        self._last_sweep = now
        sessions = dict(self.open)
        kept: set[str] = set()
        answered = False
        for i, replica in live:
            mine = {sid: s.records[i] for sid, s in sessions.items() if i in s.records}
            with contextlib.suppress(EngineDeadError):
                kept |= await replica.run_on_engine(lambda e=replica.engine, mine=mine: _in_use(e, mine))
                answered = True
        if not answered:
            raise EngineDeadError("every engine has stopped")
        for sid in sessions.keys() - kept:
            await self._close(self.open.pop(sid))

    async def _close(self, session: _Session) -> None:
        """Ends the session's records on the replicas still alive (a dead one's table serves nothing more)."""
        for i, opened in session.records.items():
            if self.replicas[i].dead_error is None:
                with contextlib.suppress(EngineDeadError):
                    await self.replicas[i].run_on_engine(lambda scope=opened.scope: scope.__exit__(None, None, None))

    def _live(self) -> list[tuple[int, Any]]:
        """(index, replica) of the replicas alive; EngineDeadError when none is."""
        live = [(i, r) for i, r in enumerate(self.replicas) if r.dead_error is None]
        if not live:
            raise EngineDeadError("every engine has stopped")
        return live


def _open(engine: LLMEngine, program_id: str) -> _Record:
    """On the engine thread: the program's session record in the engine's table."""
    scope = engine.session(program_id)
    return _Record(scope.__enter__(), scope)


def _in_use(engine: LLMEngine, records: dict[str, _Record]) -> set[str]:
    """On the engine thread: the sessions whose record is still in the table and not idle past the timeout."""
    policy = engine.scheduler.programs
    now, idle, table = policy.clock(), policy.config.idle_timeout, policy.table.programs
    return {sid for sid, r in records.items() if table.get(r.record.program_id) is r.record
            and (r.record.active > 0 or now - r.record.last_event() < idle)}
