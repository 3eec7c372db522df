"""Decode with a prefill co-running: the split's decode ITL against the aggregated engine's decode-only ITL.

  PYTHONPATH=. python3 benchmarks/bench_split_decode.py MODE --out $OUT [--model llama-3.1-8b]

MODE: agg (the in-process aggregated engine, overlapped loop), split (disaggregated, a fixed split: decode on the
--ladder share, prefill on the rest, never aggregated), split-loop (split, the decode worker running its own loop:
decode_loop="worker"), dynamic (disaggregated, the partition controller decides). One engine per process, so run
the modes one after another (each writes split_decode_MODE.json under --out); `loop-compare` runs split and
split-loop so, each in a process of its own, and writes split_decode_loop-compare.json with both.

Each mode runs the scenario twice, the first time only to compile its step shapes (same buckets, fewer prefills):
1. `--batch` requests with `--context`-token prompts are prefilled; once all have their first token, a decode-only
   window runs for `--window` steps;
2. then `--prefills` prompts of `--prefill-len` tokens (one output token each) arrive at once, and the co-run window
   lasts until the last of them has its token; the decode requests are then aborted.
Reports, per window, the decode requests' ITL (median, p90, p99: gaps between consecutive tokens both inside the
window), decode tokens/s, and in the co-run window the prefill tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the disaggregated workers share the GPU

import numpy as np  # noqa: E402

from benchmarks import gpu_trace  # noqa: E402
from benchmarks.split_timeline import EngineTimeline, summary  # noqa: E402
from nexus_jax import LLM, SamplingParams  # noqa: E402
from runner.workers.timeline import TIMELINE_ENV, TRACE_ENV  # noqa: E402

TRACE_STEPS = 30  # --trace: decode steps in the GPU trace

MODES = {
    "agg": {},
    "split": {"disaggregation": "auto", "aggregate_when_safe": False},
    "split-loop": {"disaggregation": "auto", "aggregate_when_safe": False, "decode_loop": "worker"},
    "dynamic": {"disaggregation": "auto"},
}


def window_stats(seqs: list, t0: float, t1: float) -> dict:
    gaps = [b - a for s in seqs for a, b in zip(s.metrics.token_times, s.metrics.token_times[1:])
            if a >= t0 and b <= t1]
    tokens = sum(1 for s in seqs for t in s.metrics.token_times if t0 <= t <= t1)
    if not gaps:
        return {"steps": 0}
    return {"itl_median_ms": 1e3 * statistics.median(gaps), "itl_p90_ms": 1e3 * float(np.percentile(gaps, 90)),
            "itl_p99_ms": 1e3 * float(np.percentile(gaps, 99)), "decode_tok_per_s": tokens / (t1 - t0),
            "seconds": t1 - t0, "gaps": len(gaps)}


def scenario(engine, args, tag: str, num_prefills: int) -> dict:
    rng = np.random.default_rng(0)
    vocab = engine.vocab_size
    decode = SamplingParams(max_tokens=100_000 if args.context + 100_000 <= engine.max_model_len else
                            engine.max_model_len - args.context - 1, ignore_eos=True)
    seqs = []
    for i in range(args.batch):
        rid = f"{tag}-d{i}"
        engine.add_request(rid, {"prompt_token_ids": rng.integers(3, vocab, args.context).tolist()}, decode)
        seqs.append(engine.groups[rid].seqs[0])
    while not all(s.output_token_ids for s in seqs):
        engine.step()
    t0 = time.monotonic()
    start_tokens = sum(len(s.output_token_ids) for s in seqs)
    traced = None
    if args.trace and tag == "run" and not hasattr(engine, "pool"):  # the in-process engine: trace it here
        for _ in range(10):
            engine.step()
        with gpu_trace.capture(Path(args.out, f"trace_{args.mode}")) as trace:
            for _ in range(TRACE_STEPS):
                engine.step()
        traced = trace
    while sum(len(s.output_token_ids) for s in seqs) < start_tokens + args.window * args.batch:
        engine.step()
    t1 = time.monotonic()
    prefills = []
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for i in range(num_prefills):
        rid = f"{tag}-p{i}"
        engine.add_request(rid, {"prompt_token_ids": rng.integers(3, vocab, args.prefill_len).tolist()}, one)
        prefills.append(engine.groups[rid].seqs[0])
    while not all(p.is_finished for p in prefills):
        engine.step()
    t2 = time.monotonic()
    for s in seqs:
        engine.abort_request(s.group_id)
    while engine.has_unfinished_requests():
        engine.step()
    co_run = window_stats(seqs, t1, t2)
    co_run["prefill_tok_per_s"] = num_prefills * args.prefill_len / (t2 - t1)
    out = {"decode_only": window_stats(seqs, t0, t1), "co_run": co_run, "windows": [t0, t1, t2]}
    if traced is not None:
        out["trace"] = trace_report(traced)
    return out


def trace_report(trace: gpu_trace.Trace) -> dict:
    events = trace.events()
    return {"gaps": gpu_trace.idle_gaps(events, TRACE_STEPS), "kernels": gpu_trace.kernel_totals(events, TRACE_STEPS)}


COMPARED = ("split", "split-loop")


def compare(argv: list[str], out: str) -> None:
    """Runs each of COMPARED in a fresh process with the same arguments; their ITLs side by side."""
    results = {}
    for mode in COMPARED:
        subprocess.run([sys.executable, __file__, mode, *argv], check=True)
        results[mode] = json.loads(Path(out, f"split_decode_{mode}.json").read_text())
    ratio = {w: results["split"][w].get("itl_median_ms", float("nan"))
             / results["split-loop"][w].get("itl_median_ms", float("nan")) for w in ("decode_only", "co_run")}
    Path(out, "split_decode_loop-compare.json").write_text(json.dumps(
        {"engine_over_worker_itl": ratio, **{m: {w: r[w] for w in ("decode_only", "co_run")}
                                             for m, r in results.items()}}, indent=1, default=str))
    print(f"decode ITL, engine loop / worker loop: decode-only {ratio['decode_only']:.2f}x, with prefill "
          f"{ratio['co_run']:.2f}x", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=sorted([*MODES, "loop-compare"]))
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="llama-3.1-8b", help="preset, checkpoint, or 'tiny' (the embedded model)")
    ap.add_argument("--disaggregation", default="auto", help="of the split modes; 'on' runs workers without MPS")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--prefills", type=int, default=16)
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=2048, help="max_num_batched_tokens (chunk of a prefill step)")
    ap.add_argument("--ladder", default="50", help="decode SM shares of the disaggregated modes")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--decode-weights", default="auto", help="of the split modes: shared, private or auto")
    ap.add_argument("--cache", default="/tmp/nexus-jax-cc", help="compilation cache directory")
    ap.add_argument("--trace", action="store_true",
                    help=f"GPU trace of {TRACE_STEPS} decode-only steps: in-process (agg), or the workers' step "
                         "messages 80.. (split modes; the warm-up pass's decode window)")
    ap.add_argument("--timeline", action="store_true",
                    help="split modes: record the engine's and the workers' timelines (benchmarks/split_timeline.py)")
    args = ap.parse_args()
    if args.mode == "loop-compare":
        compare([a for a in sys.argv[1:] if a != "loop-compare"], args.out)
        return
    worker_dir = Path(args.out, f"timeline_{args.mode}")
    if args.timeline or args.trace:
        os.environ[TIMELINE_ENV] = str(worker_dir)
    if args.trace:
        os.environ[TRACE_ENV] = f"80:{TRACE_STEPS}"
    mode = {k: args.disaggregation if k == "disaggregation" else v for k, v in MODES[args.mode].items()}
    settings = dict(mode, max_num_batched_tokens=args.budget, max_num_seqs=max(64, args.batch),
                    gpu_memory_utilization=args.gpu_memory_utilization,
                    max_model_len=8192 if args.model != "tiny" else 2048, compilation_cache_dir=args.cache,
                    enable_prefix_caching=False, decode_weights=args.decode_weights,
                    sm_ladder=tuple(int(s) for s in args.ladder.split(",")))
    t = time.monotonic()
    llm = LLM(None if args.model == "tiny" else args.model, **settings)
    built = time.monotonic() - t
    engine = llm.llm_engine
    engine_timeline = EngineTimeline()
    if args.timeline and hasattr(engine, "pool"):
        engine_timeline.attach(engine)
    t = time.monotonic()
    scenario(engine, args, "warm", max(2, args.prefills // 4))
    warm = time.monotonic() - t
    result = {"mode": args.mode, "settings": {k: v for k, v in settings.items() if k != "compilation_cache_dir"},
              "args": vars(args), "build_s": built, "warm_s": warm, **scenario(engine, args, "run", args.prefills),
              "engine": {k: v for k, v in engine.stats().items() if k in ("phase_steps", "pipelined_steps",
                                                                           "controller", "sm_isolation",
                                                                           "decode_loop")}}
    if hasattr(engine, "pool"):  # a split mode that fell back to the aggregated engine has none
        infos = {n: h.info() for n, h in engine.pool.workers.items()}
        result["private_weights"] = {n: i["private_weights"] for n, i in infos.items()}
        result["worker_memory"] = {n: i["memory"] for n, i in infos.items()}  # XLA's heap per worker, peak included
    llm.shutdown()  # the workers write their timelines as they stop
    if args.trace and hasattr(engine, "pool"):
        result["trace"] = {d.name[len("trace_"):]: trace_report(gpu_trace.Trace(d))
                           for d in sorted(worker_dir.glob("trace_*")) if any(d.rglob("*.json.gz"))}
        print(json.dumps(result["trace"], indent=1), file=sys.stderr)
    if engine_timeline.records:
        t0, t1, t2 = result["windows"]
        result["timeline"] = {"decode_only": summary(engine_timeline.records, worker_dir, t0, t1),
                              "co_run": summary(engine_timeline.records, worker_dir, t1, t2)}
        print(json.dumps(result["timeline"], indent=1), file=sys.stderr)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"split_decode_{args.mode}.json").write_text(json.dumps(result, indent=1, default=str))
    d, c = result["decode_only"], result["co_run"]
    print(f"{args.mode}: decode-only ITL median {d.get('itl_median_ms', float('nan')):.2f} ms; with prefill "
          f"co-running {c.get('itl_median_ms', float('nan')):.2f} ms (p99 {c.get('itl_p99_ms', float('nan')):.1f}), "
          f"prefill {c['prefill_tok_per_s']:.0f} tok/s; built {built:.0f} s, warm-up {warm:.0f} s; private weights "
          f"{result.get('private_weights', 'none: aggregated engine')}", file=sys.stderr)


if __name__ == "__main__":
    main()
