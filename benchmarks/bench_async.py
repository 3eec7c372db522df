"""The overlapped loop (async_scheduling) against the synchronous one, side by side on one engine's weights and pool.

  PYTHONPATH=. python3 benchmarks/bench_async.py --out $OUT [--preset llama-3.1-8b]

Two LLMEngines share one ModelRunner (the weights and KV pool are loaded once; prefix caching off, since each engine
would cache blocks the other overwrites), one with the overlapped loop and one without; each workload runs on both,
alternating, after a warm-up (every step shape compiled at start, then each case once on both loops):
1. light load: one request at a time (128-token prompt, 256 tokens out): inter-token latency against the floor of
   reading the weights once per token at the copy bandwidth measured in the same run;
2. a batch of 64 requests (1024-token prompts, 128 tokens out, all at once): ITL median;
3. offline throughput: 256 prompts x (512 in, 128 out), output tokens per second.
Writes async.json and prints a Markdown table.

--trace instead records a JAX profiler trace of both loops in three cases (one request decoding; 64 requests
decoding at context ~1024; 64 prompts of 1024 prefilled in chunks while the others decode) and reports the GPU's
idle gaps between steps (benchmarks/gpu_trace.py) beside the host time of each part of the loop.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from benchmarks import gpu_trace
from benchmarks.bench_model import hbm_copy_tbps
from nexus_jax import EngineConfig, LLMEngine, SamplingParams
from nexus_jax.entrypoints.build import build_engine
from runner import model_runner


def twin(engine: LLMEngine, overlap: bool) -> LLMEngine:
    """An engine over the same executor (weights, pool, compiled steps) with the other loop."""
    config = dataclasses.replace(engine.config, async_scheduling=overlap)
    return LLMEngine(config, engine.executor, engine.tokenizer, max_model_len=engine.max_model_len,
                     vocab_size=engine.vocab_size, eos_token_ids=engine.eos_token_ids)


def workload(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, *, trace: Path | None = None,
             decode_only: bool = False) -> dict:
    """Runs the prompts to the end. With `trace`, records a profiler trace from the first step on, or with
    decode_only from the first step after every prompt has its first token."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, params)
    outs = {}
    if trace is not None:
        while decode_only and any(r.in_prefill or not r.output_token_ids for r in engine.scheduler.running
                                  + engine.scheduler.waiting):
            outs.update((o.request_id, o) for o in engine.step() if o.finished)
        with host_timeline(engine) as spans, gpu_trace.capture(trace) as recorded:
            while engine.has_unfinished_requests():
                outs.update((o.request_id, o) for o in engine.step() if o.finished)
        parts = {k: {"calls": len(v), "median_ms": 1e3 * statistics.median(v), "total_s": sum(v)}
                 for k, v in spans.items()}
        return {"gpu": gpu_trace.idle_gaps(recorded.events(), len(spans["dispatch"])), "host": parts,
                "seconds": time.perf_counter() - start}
    while engine.has_unfinished_requests():
        outs.update((o.request_id, o) for o in engine.step() if o.finished)
    elapsed = time.perf_counter() - start
    itl = [x for o in outs.values() for x in o.metrics.itl]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs.values())
    return {"itl_median_ms": 1e3 * statistics.median(itl), "itl_p90_ms": 1e3 * float(np.percentile(itl, 90)),
            "tok_per_s": tokens / elapsed, "seconds": elapsed}


@contextlib.contextmanager
def host_timeline(engine: LLMEngine, extra: list[tuple[object, str]] = ()):
    """Wall time of each part of the loop per call, on the host: planning, the executor's dispatch (returns at once
    unless something waits for the device), waiting for the samples (result), folding them in; and of the `extra`
    (object, method name) pairs."""
    spans: dict[str, list[float]] = collections.defaultdict(list)
    patched = [(engine.scheduler, "schedule"), (engine.executor, "dispatch"), (engine, "_fold"),
               (model_runner.PendingStep, "result"), *extra]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name in patched]

    def wrap(obj, name):
        real = getattr(obj, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real(*args, **kwargs)
            finally:
                spans[name].append(time.perf_counter() - start)
        return timed
    for obj, name in patched:  # a plain function set on the class becomes a method: self comes first
        setattr(obj, name, wrap(obj, name))
    try:
        yield spans
    finally:
        for obj, name, old in saved:
            if old is None:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--out", default=".")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory-utilization", type=float, default=0.9, help="EngineConfig.gpu_memory_utilization")
    ap.add_argument("--kernel-impl", default=None, choices=["pallas", "xla"], help="EngineConfig.kernel_impl")
    ap.add_argument("--timeline", action="store_true", help="only the batch case, with the host timeline per part")
    ap.add_argument("--compilation-cache", default=None, help="EngineConfig.compilation_cache_dir")
    ap.add_argument("--trace", default=None, help="directory for profiler traces: GPU idle gaps per loop and case")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    copy = hbm_copy_tbps()
    base = build_engine(EngineConfig(model=args.preset, max_model_len=2048, max_num_batched_tokens=2048,
                                     min_table_blocks=128, async_scheduling=True, warmup=True,
                                     gpu_memory_utilization=args.memory_utilization, kernel_impl=args.kernel_impl,
                                     compilation_cache_dir=args.compilation_cache,
                                     enable_prefix_caching=False))  # the two engines share one pool
    engines = {"sync": twin(base, False), "async": base}
    weights = sum(x.nbytes for x in jax.tree.leaves(base.executor.state))
    floor_ms = 1e3 * weights / (copy * 1e12)
    vocab = base.vocab_size
    prompts = lambda n, length: [rng.integers(10, vocab - 10, length).tolist() for _ in range(n)]  # noqa: E731
    cases = {"light load (1 x 128 -> 256)": (prompts(1, 128), 256),
             "batch 64 x (1024 -> 128)": (prompts(64, 1024), 128),
             "offline 256 x (512 -> 128)": (prompts(256, 512), 128)}
    results: dict = {"device": jax.devices()[0].device_kind, "copy_tbps": copy,
                     "weights_gb": weights / 1e9, "weight_floor_ms": floor_ms, "cases": {}}
    if args.trace:
        traced = {"light load decode": (prompts(1, 128), 64, True), "batch 64 decode": (prompts(64, 1024), 32, True),
                  "batch 64 prefill + decode": (prompts(64, 1024), 16, False)}
        for name, (ps, out, decode_only) in traced.items():
            for mode, engine in engines.items():
                workload(engine, ps[:8], 4)
                r = workload(engine, ps, out, trace=Path(args.trace) / f"{mode}-{len(results['cases'])}",
                             decode_only=decode_only)
                print(name, mode, json.dumps(r, indent=1), flush=True)
                results["cases"][f"trace {name} {mode}"] = r
        cases = {}
    if args.timeline:
        ps, out = cases["batch 64 x (1024 -> 128)"]
        for mode, engine in engines.items():
            workload(engine, ps[:8], 4)
            with host_timeline(engine) as spans:
                measured = workload(engine, ps, out)
            parts = {k: {"calls": len(v), "mean_ms": 1e3 * statistics.mean(v), "median_ms": 1e3 * statistics.median(v),
                         "total_s": sum(v)} for k, v in spans.items()}
            print(mode, measured, json.dumps(parts, indent=1), flush=True)
            results["cases"][f"timeline {mode}"] = {"run": measured, "parts": parts}
        cases = {}
    for name, (ps, out) in cases.items():
        for mode, engine in engines.items():  # warm-up: every shape of the case compiled, both loops
            workload(engine, ps[:8], 4)
        runs: dict = {m: [] for m in engines}
        for _ in range(args.repeats):
            for mode, engine in engines.items():
                runs[mode].append(workload(engine, ps, out))
                print(name, mode, runs[mode][-1], flush=True)
        results["cases"][name] = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    lines = [f"device {results['device']}; copy {copy:.2f} TB/s; weights {weights / 1e9:.2f} GB; "
             f"weight-read floor {floor_ms:.2f} ms/token", "",
             "| case | sync ITL median (ms) | async ITL median (ms) | sync tok/s | async tok/s | async/sync tok/s |",
             "|---|---|---|---|---|---|"]
    for name, r in results["cases"].items():
        if "sync" not in r:
            continue  # a timeline
        s, a = r["sync"], r["async"]
        lines.append(f"| {name} | {s['itl_median_ms']:.2f} | {a['itl_median_ms']:.2f} | {s['tok_per_s']:.0f} | "
                     f"{a['tok_per_s']:.0f} | {a['tok_per_s'] / s['tok_per_s']:.2f}x |")
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "async.json").write_text(json.dumps(results, indent=2))
    (out / "async.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
