"""A worker's per-message timeline, for profiling the disaggregated loop (off unless asked for).

With `NEXUS_WORKER_TIMELINE=<dir>` in the engine's environment, every worker appends one JSON line per message to
`<dir>/<worker name>.jsonl` when it stops: when the message was read, when its work was dispatched, when the reply
was ready (the step's samples on the host) and when it was sent, on the host's monotonic clock (shared by the
engine and the workers of one machine, so the engine's own timestamps line up with these).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

TIMELINE_ENV = "NEXUS_WORKER_TIMELINE"


class Timeline:
    def __init__(self, name: str, directory: str | None = None):
        directory = directory if directory is not None else os.environ.get(TIMELINE_ENV)
        self.path = Path(directory, f"{name}.jsonl") if directory else None
        self.records: list[dict[str, Any]] = []

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
            record.update(decodes=len(step.decodes), prefills=len(step.prefills), fed=len(step.feed),
                          tokens=sum(len(c.token_ids) for c in (*step.decodes, *step.prefills)))
        self.records.append(record)
        return record

    @staticmethod
    def stamp(record: dict[str, Any] | None, moment: str) -> None:
        if record is not None:
            record[moment] = time.monotonic()

    def write(self) -> None:
        if self.path is None or not self.records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            for record in self.records:
                f.write(json.dumps(record) + "\n")
        self.records = []
