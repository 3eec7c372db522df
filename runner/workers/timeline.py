"""A worker's per-message timeline, for profiling the disaggregated loop (off unless asked for).

With `NEXUS_WORKER_TIMELINE=<dir>` in the engine's environment, every worker appends one JSON line per message to
`<dir>/<worker name>.jsonl` when it stops: when the message was read, when its work was dispatched, when the reply
was ready (the step's samples on the host) and when it was sent, on the host's monotonic clock (shared by the
engine and the workers of one machine, so the engine's own timestamps line up with these).

With `NEXUS_WORKER_TRACE=<first>:<count>` as well, each worker also records a JAX profiler trace (the GPU's
kernels) of its step messages first .. first + count - 1 into `<dir>/trace_<worker name>/`: what a step spends
its device time on (benchmarks/gpu_trace.py reads it).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

TIMELINE_ENV = "NEXUS_WORKER_TIMELINE"
TRACE_ENV = "NEXUS_WORKER_TRACE"


class Timeline:
    def __init__(self, name: str, directory: str | None = None):
        directory = directory if directory is not None else os.environ.get(TIMELINE_ENV)
        self.path = Path(directory, f"{name}.jsonl") if directory else None
        self.records: list[dict[str, Any]] = []
        first, _, count = os.environ.get(TRACE_ENV, "").partition(":")
        self._trace = (int(first), int(first) + int(count)) if self.path is not None and count else None
        self._steps = 0
        self._tracing = False

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def read(self, message: Any) -> dict[str, Any] | None:
        """A record for a message just read (None when off); the caller stamps its later moments."""
        if self.path is None:
            return None
        step = getattr(message, "step", None)
        record = {"kind": type(message).__name__, "read": time.monotonic()}
        if step is not None:
            self._trace_step()
            record.update(decodes=len(step.decodes), prefills=len(step.prefills), fed=len(step.feed),
                          tokens=sum(len(c.token_ids) for c in (*step.decodes, *step.prefills)))
        self.records.append(record)
        return record

    @staticmethod
    def stamp(record: dict[str, Any] | None, moment: str) -> None:
        if record is not None:
            record[moment] = time.monotonic()

    def _trace_step(self) -> None:
        """Starts or stops the profiler trace at the step messages TRACE_ENV names."""
        if self._trace is None:
            return
        import jax

        if self._steps == self._trace[0]:
            options = jax.profiler.ProfileOptions()
            options.python_tracer_level = 0  # the Python tracer slows the loop and opens gaps on the GPU
            jax.profiler.start_trace(str(self.path.parent / f"trace_{self.path.stem}"), create_perfetto_trace=True,
                                     profiler_options=options)
            self._tracing = True
        elif self._steps == self._trace[1] and self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
        self._steps += 1

    def write(self) -> None:
        if self._tracing:
            import jax
            jax.profiler.stop_trace()
            self._tracing = False
        if self.path is None or not self.records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")
        self.records = []
