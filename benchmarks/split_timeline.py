"""Where a disaggregated decode step's time goes: the engine's side (wrapped methods) and the workers' timelines
(`runner.workers.timeline`), both on the host's monotonic clock.

`EngineTimeline.attach(engine)` wraps the disaggregated engine's submit and collect; `summary(...)` reads the
workers' files and reports, for decode steps inside a window, medians of:
- period: between consecutive decode replies becoming ready on the worker (the ITL the worker delivers);
- worker_dispatch: from the message read (unpickled) to its step dispatched (batch building, the jitted calls);
- late: how long after the previous step's samples were ready the next step was dispatched (> 0: the device
  may have idled waiting for the host);
- to_engine: from a reply sent by the worker to the engine starting to collect it;
- engine_collect / engine_submit: the engine's fold of a result, its planning + pickling + sending of a step.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any


class EngineTimeline:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        submit, collect = engine._submit, engine._collect

        def timed_submit(name, plan, phase, ahead=None):
            t = time.monotonic()
            out = submit(name, plan, phase, ahead)
            self.records.append({"what": "submit", "worker": name, "phase": phase, "start": t,
                                 "end": time.monotonic(), "chunks": len(plan.chunks), "ahead": ahead is not None})
            return out

        def timed_collect(handle):
            t = time.monotonic()
            phase = engine.flights[handle.name][0].phase if engine.flights.get(handle.name) else None
            out = collect(handle)
            self.records.append({"what": "collect", "worker": handle.name, "phase": phase, "start": t,
                                 "end": time.monotonic()})
            return out

        engine._submit, engine._collect = timed_submit, timed_collect


def _median_ms(values: list[float]) -> float | None:
    return round(1e3 * statistics.median(values), 3) if values else None


def summary(engine_records: list[dict[str, Any]], worker_dir: str | Path, t0: float, t1: float) -> dict[str, Any]:
    """Medians (ms) for decode steps read by a worker inside [t0, t1], per worker."""
    out: dict[str, Any] = {}
    for path in sorted(Path(worker_dir).glob("*.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        steps = [r for r in rows if r.get("kind") == "Execute" and "ready" in r]
        decode = [r for r in steps if r["decodes"] and not r["prefills"] and t0 <= r["read"] <= t1]
        if not decode:
            continue
        index = {id(r): i for i, r in enumerate(steps)}
        prev = [steps[index[id(r)] - 1] if index[id(r)] else None for r in decode]
        name = path.stem
        collects = sorted(r["start"] for r in engine_records if r["what"] == "collect" and r["worker"] == name)
        to_engine = []
        for r in decode:
            later = [c for c in collects if c >= r["sent"]]
            if later:
                to_engine.append(min(later) - r["sent"])
        eng = [r for r in engine_records if r["worker"] == name and t0 <= r["start"] <= t1 and r["phase"] == "decode"]
        out[name] = {
            "steps": len(decode),
            "batch_median": statistics.median(r["decodes"] for r in decode),
            "fed_share": sum(1 for r in decode if r["fed"]) / len(decode),
            "period": _median_ms([b["ready"] - a["ready"] for a, b in zip(decode, decode[1:])]),
            "worker_dispatch": _median_ms([r["dispatched"] - r["read"] for r in decode]),
            "late": _median_ms([max(0.0, r["dispatched"] - p["ready"]) for r, p in zip(decode, prev) if p]),
            "late_share": sum(1 for r, p in zip(decode, prev) if p and r["dispatched"] > p["ready"]) / len(decode),
            "ready_to_sent": _median_ms([r["sent"] - r["ready"] for r in decode]),
            "to_engine": _median_ms(to_engine),
            "engine_submit": _median_ms([r["end"] - r["start"] for r in eng if r["what"] == "submit"]),
            "engine_collect": _median_ms([r["end"] - r["start"] for r in eng if r["what"] == "collect"]),
        }
    return out
