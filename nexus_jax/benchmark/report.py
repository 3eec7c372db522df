"""Serving metrics from request records, and the results they make: JSON, a Markdown table, PNG plots.

Definitions (vLLM's): TTFT = first token - sent; TPOT = (last token - first token) / (tokens - 1) per request
with two tokens or more; ITL = every gap between consecutive tokens of every request, pooled; E2E = finished -
sent. Throughputs count completed requests over the run's duration (first send to last finish). Goodput counts
only the completed requests that meet every per-request SLO (ttft, tpot, itl = the request's largest gap, e2e).
Program workloads add, over the programs whose every call completed: program latency = last call finished -
program arrived (think and tool delays included) and Autellix's program-level token latency = program latency /
tokens the program generated, and program throughput = completed programs / duration.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from nexus_jax.benchmark.programs_driver import ProgramRunResult
from nexus_jax.benchmark.serve import RequestRecord, RunResult

METRICS = ("ttft", "tpot", "itl", "e2e")
STATS = ("mean", "median", "p90", "p99")
ALIASES = {"tbt": "itl", "e2el": "e2e"}  # time between tokens = ITL; vLLM's name for end-to-end latency


def distribution(values: Iterable[float]) -> dict[str, float | None]:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {s: None for s in STATS}
    return {"mean": float(v.mean()), "median": float(np.median(v)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99))}


def request_latencies(r: RequestRecord) -> dict[str, float | None]:
    """One request's TTFT, TPOT, largest ITL and E2E (None where it has too few tokens)."""
    t = r.token_times
    gaps = np.diff(t)
    return {"ttft": t[0] - r.start if t else None,
            "tpot": (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
            "itl": float(gaps.max()) if gaps.size else None, "e2e": r.end - r.start}


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    """A completed request meets an SLO it has no value for (TPOT of a one-token request)."""
    if not r.success:
        return False
    lat = request_latencies(r)
    return all(lat[k] is None or lat[k] <= limit for k, limit in slos.items())


def summarize(run: RunResult, slos: dict[str, float] | None = None) -> dict[str, Any]:
    done = [r for r in run.records if r.success]
    duration = max(run.duration, 1e-9)
    lat = [request_latencies(r) for r in done]
    summary: dict[str, Any] = {
        "completed": len(done), "failed": len(run.records) - len(done), "duration_s": run.duration,
        "total_input_tokens": sum(r.prompt_len for r in done),
        "total_output_tokens": sum(len(r.token_times) for r in done)}
    summary["request_throughput"] = len(done) / duration
    summary["input_throughput"] = summary["total_input_tokens"] / duration
    summary["output_throughput"] = summary["total_output_tokens"] / duration
    summary["total_token_throughput"] = summary["input_throughput"] + summary["output_throughput"]
    for name in ("ttft", "tpot", "e2e"):
        summary[name] = distribution(x[name] for x in lat if x[name] is not None)
    summary["itl"] = distribution(g for r in done for g in np.diff(r.token_times))
    # What an SLO on TBT judges (each request's largest gap), and the gap from the first token to the second: a
    # disaggregated engine's handoff from the prefill to the decode worker lands there.
    summary["max_gap"] = distribution(x["itl"] for x in lat if x["itl"] is not None)
    summary["first_gap"] = distribution(r.token_times[1] - r.token_times[0] for r in done if len(r.token_times) > 1)
    if slos:
        good = sum(meets_slos(r, slos) for r in done)
        summary["good_requests"] = good
        summary["goodput"] = good / duration
        # Which SLO a completed request missed: a goodput that flips between runs usually sits on one limit's edge
        # (the aggregated engine's largest gaps at 28-29.5 ms against a 30 ms TBT, RESULTS.md 2026-12-07).
        summary["slo_misses"] = {k: int(sum(x[k] is not None and x[k] > limit for x in lat))
                                 for k, limit in slos.items()}
    if isinstance(run, ProgramRunResult):
        summary["programs"] = summarize_programs(run)
    return summary


def summarize_programs(run: ProgramRunResult) -> dict[str, Any]:
    done = [p for p in run.programs if p.success]
    duration = max(run.duration, 1e-9)
    return {"completed": len(done), "failed": len(run.programs) - len(done),
            "program_throughput": len(done) / duration,
            "calls_per_program": float(np.mean([p.num_calls for p in done])) if done else None,
            "output_tokens_per_program": float(np.mean([p.output_tokens for p in done])) if done else None,
            "program_latency": distribution(p.end - p.start for p in done),
            "token_latency": distribution((p.end - p.start) / p.output_tokens for p in done if p.output_tokens)}


def parse_limits(items: Iterable[str], with_stat: bool) -> dict[str, float]:
    """"ttft=2.0" (with_stat False: per-request SLOs) or "p90_ttft=2.0" (with_stat True: percentile targets),
    seconds; names may use tbt for itl."""
    limits = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            limit = float(value)
        except ValueError:
            limit = math.nan
        if not sep or not limit > 0:
            raise ValueError(f"{item!r}: expected NAME=SECONDS with a positive number")
        stat, _, metric = key.rpartition("_") if with_stat else ("", "", key)
        metric = ALIASES.get(metric, metric)
        if metric not in METRICS or (with_stat and stat not in STATS):
            form = f"STAT_METRIC with STAT in {STATS}" if with_stat else "METRIC"
            raise ValueError(f"{item!r}: name must be {form}, METRIC in {METRICS} (or tbt)")
        limits[f"{stat}_{metric}" if with_stat else metric] = limit
    return limits


def meets_targets(summary: dict[str, Any], targets: dict[str, float]) -> bool:
    """Every percentile target met, and no request failed."""
    if summary["failed"] or not summary["completed"]:
        return False
    for key, limit in targets.items():
        stat, metric = key.split("_", 1)
        value = summary[metric][stat]
        if value is not None and value > limit:
            return False
    return True


def run_to_json(run: RunResult, summary: dict[str, Any]) -> dict[str, Any]:
    doc = {"request_rate": _rate_out(run.request_rate), "burstiness": run.burstiness,
           "max_concurrency": run.max_concurrency, "summary": summary,
           "records": [dataclasses.asdict(r) for r in run.records]}
    if isinstance(run, ProgramRunResult):
        doc["programs"] = [dataclasses.asdict(p) for p in run.programs]
    return doc


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False))


def load_json(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"results file {path} does not exist")
    # Raw results kept in the repository are gzipped (they are most of its bytes, and the device tool carries it).
    doc = json.loads(gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_text())
    if not isinstance(doc, dict) or "runs" not in doc:
        raise ValueError(f"{path} is not a bench serve results file (no 'runs')")
    return doc


def _rate_out(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _ms(d: dict[str, float | None], scale: float = 1e3, digits: int = 1) -> str:
    return " / ".join("-" if d[s] is None else f"{d[s] * scale:.{digits}f}" for s in STATS)


def markdown_table(docs: list[dict[str, Any]]) -> str:
    """One row per run of every results document; latencies as mean / median / P90 / P99 in milliseconds.
    Runs of program workloads get a second table of program metrics (their rate is programs/s)."""
    lines = ["| label | rate (req/s) | max conc. | done / failed | req/s | input tok/s | output tok/s | goodput "
             "(req/s) | TTFT ms | TPOT ms | ITL ms | E2E ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for doc in docs:
        for run in doc["runs"]:
            s = run["summary"]
            goodput = f"{s['goodput']:.2f}" if "goodput" in s else "-"
            if s.get("slo_misses"):
                goodput += " (over: " + ", ".join(f"{k} {n}" for k, n in s["slo_misses"].items()) + ")"
            lines.append(f"| {doc.get('label', '')} | {run['request_rate']} | {run['max_concurrency'] or '-'} | "
                         f"{s['completed']} / {s['failed']} | {s['request_throughput']:.2f} | "
                         f"{s['input_throughput']:.0f} | {s['output_throughput']:.0f} | {goodput} | "
                         f"{_ms(s['ttft'])} | {_ms(s['tpot'])} | {_ms(s['itl'])} | {_ms(s['e2e'])} |")
    lines.append("\nlatency columns: mean / median / P90 / P99")
    programs = program_table(docs)
    return "\n".join(lines) + (f"\n\n{programs}" if programs else "")


def program_table(docs: list[dict[str, Any]]) -> str:
    """The program metrics of every program run ("" when there is none)."""
    rows = []
    for doc in docs:
        for run in doc["runs"]:
            p = run["summary"].get("programs")
            if p is None:
                continue
            per_program = "-" if p["calls_per_program"] is None else (
                f"{p['calls_per_program']:.1f} / {p['output_tokens_per_program']:.0f}")
            rows.append(f"| {doc.get('label', '')} | {run['request_rate']} | {run['max_concurrency'] or '-'} | "
                        f"{p['completed']} / {p['failed']} | {p['program_throughput']:.3f} | {per_program} | "
                        f"{_ms(p['token_latency'])} | {_ms(p['program_latency'], 1.0, 2)} |")
    if not rows:
        return ""
    return "\n".join(["| label | rate (programs/s) | max conc. | programs done / failed | programs/s | calls / "
                      "output tokens per program | token latency ms/token | program latency s |",
                      "|---|---|---|---|---|---|---|---|", *rows,
                      "\nprogram columns: mean / median / P90 / P99; token latency = program latency / its tokens"])


def plot_runs(docs: list[dict[str, Any]], out: str | Path) -> None:
    """Latency against offered request rate, one line per label (median solid, P99 dashed); a run at an
    infinite rate is placed at the request throughput it achieved."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric in zip(axes.flat, METRICS):
        for k, doc in enumerate(docs):
            label = doc.get("label") or f"run {k}"
            # Keyed on x alone: the search may repeat a sweep rate, and two points at one x must not compare stats.
            points = sorted(((_x(run), run["summary"][metric]) for run in doc["runs"]), key=lambda p: p[0])
            xs = [x for x, _ in points]
            for stat, style in (("median", "-"), ("p99", "--")):
                ys = [np.nan if d[stat] is None else d[stat] * 1e3 for _, d in points]
                color = f"C{k}" if len(docs) <= 10 else plt.cm.tab20(k % 20)  # 10 colors of the cycle, then 20
                ax.plot(xs, ys, style, marker="o", color=color, label=f"{label} {stat}")
        ax.set_title(f"{metric.upper()} (median solid, P99 dashed)")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _x(run: dict[str, Any]) -> float:
    rate = run["request_rate"]
    return run["summary"]["request_throughput"] if rate == "inf" else float(rate)
