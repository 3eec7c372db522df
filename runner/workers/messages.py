"""What the engine sends a worker process (`runner.workers.worker`), one pickled message at a time.

The worker matches each message by its type and replies ("ok", value) or ("error", message); a message of any
other type gets an error reply, and the worker keeps serving.
"""

from __future__ import annotations

import dataclasses

from runner.executor import StepInput


@dataclasses.dataclass(frozen=True)
class Execute:
    """Run one planned step; the reply is the executor's result (see runner.executor.Executor.execute), sent
    once the step's K/V is in the shared pool."""
    step: StepInput


@dataclasses.dataclass(frozen=True)
class Info:
    """Describe the worker: name, pid, device, SM share, pool size, whether it is the holder."""


@dataclasses.dataclass(frozen=True)
class Stop:
    """Exit (no reply)."""


Message = Execute | Info | Stop
