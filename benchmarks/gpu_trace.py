"""GPU idle time between steps, from a JAX profiler trace (Perfetto JSON, which jaxlib writes itself).

  with gpu_trace.capture(directory) as trace:
      ...run some steps...
  report = gpu_trace.idle_gaps(trace.events(), num_steps)

Every kernel and copy the GPU ran in the window is an interval; their union is the time the GPU was busy. Between
two steps the GPU idles until the host queues the next step's first kernel, and those are the widest gaps of the
window (inside a step, kernels follow each other within microseconds), so the `num_steps` widest gaps are taken as
the gaps between steps.
"""

from __future__ import annotations

import contextlib
import gzip
import json
from pathlib import Path

import jax
import numpy as np


class Trace:
    def __init__(self, directory: Path):
        self.directory = directory

    def events(self) -> list[dict]:
        """The complete ('X') events of the GPU's streams."""
        files = sorted(self.directory.rglob("*.trace.json.gz")) + sorted(self.directory.rglob("perfetto_trace.json.gz"))
        if not files:
            raise FileNotFoundError(f"no trace under {self.directory}")
        with gzip.open(files[-1], "rt") as f:
            doc = json.load(f)
        events = doc["traceEvents"] if isinstance(doc, dict) else doc
        gpu_pids = {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
                    and "GPU" in str(e.get("args", {}).get("name", "")).upper()}
        return [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids and "dur" in e]


@contextlib.contextmanager
def capture(directory: str | Path):
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trace = Trace(directory)
    # Without the Python tracer (on by default), which slows every Python call of the loop several-fold and so
    # opens gaps on the GPU that an untraced run does not have.
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    options.host_tracer_level = 1
    jax.profiler.start_trace(str(directory), create_perfetto_trace=True, profiler_options=options)
    try:
        yield trace
    finally:
        jax.profiler.stop_trace()


def idle_gaps(events: list[dict], num_steps: int) -> dict:
    """Busy fraction of the window and the gaps between steps (microseconds), from the GPU events."""
    if not events:
        return {"error": "no GPU events in the trace"}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    merged = [list(spans[0])]
    for start, end in spans[1:]:
        if start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    gaps = np.array([b[0] - a[1] for a, b in zip(merged, merged[1:])])
    window = merged[-1][1] - merged[0][0]
    busy = sum(end - start for start, end in merged)
    between = np.sort(gaps)[::-1][:max(num_steps - 1, 1)] if len(gaps) else np.zeros(1)
    return {"kernels": len(events), "window_ms": window / 1e3, "busy_fraction": busy / window,
            "idle_ms": (window - busy) / 1e3, "steps": num_steps,
            "step_gap_median_us": float(np.median(between)), "step_gap_p90_us": float(np.percentile(between, 90)),
            "step_gap_max_us": float(between.max()), "idle_per_step_us": (window - busy) / max(num_steps, 1)}


def kernel_totals(events: list[dict], num_steps: int, top: int = 25) -> list[dict]:
    """The kernels that took the most GPU time in the window: name, calls and milliseconds per step."""
    totals: dict[str, list[float]] = {}
    for e in events:
        entry = totals.setdefault(str(e.get("name", "?"))[:120], [0, 0.0])
        entry[0] += 1
        entry[1] += float(e["dur"])
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][1])[:top]
    return [{"kernel": name, "calls_per_step": calls / num_steps, "ms_per_step": us / 1e3 / num_steps}
            for name, (calls, us) in ranked]
