"""Disaggregated mode on the GPU: correctness against the aggregated engine, and what the extra workers cost.

  PYTHONPATH=. python3 benchmarks/bench_disagg.py --out $OUT [--check-model llama-3.2-1b] [--model llama-3.1-8b]

1. Greedy tokens of the disaggregated engine (holder + decode/prefill workers under MPS, shared weights and KV
   pool through CUDA IPC) equal the aggregated engine's, in float32, with splits forced and with aggregation.
2. Start-up of the 8B-shaped engine: seconds per worker (the first compiles, later ones hit the shared
   persistent compilation cache), device memory per process (nvidia-smi), and a short mixed run.
Writes disagg.json and prints a Markdown table.
"""

from __future__ import annotations

import os

# This process runs the aggregated reference engine too: it must not grab 75% of the GPU before the workers start.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import logging
import random
import subprocess
import time
from pathlib import Path

from nexus_jax import LLM, SamplingParams
from nexus_jax.disagg.partition import Slo


def gpu_processes() -> list[dict]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return []
    rows = [line.split(",") for line in out.strip().splitlines() if line.strip()]
    return [{"pid": int(p), "used_mib": int(m)} for p, m in rows]


def staggered(engine, prompts, max_tokens, seed):
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    done = {}
    while order or engine.has_unfinished_requests():
        if order and rng.random() < 0.5:
            i = order.pop()
            engine.add_request(f"q{seed}-{i}", {"prompt_token_ids": prompts[i]},
                               SamplingParams(temperature=0.0, max_tokens=max_tokens[i]))
        for out in engine.step():
            if out.finished:
                done[int(out.request_id.split("-")[1])] = out.outputs[0].token_ids
    return [done[i] for i in range(len(prompts))]


def check_equality(model: str) -> dict:
    """The disaggregated engine first, then the aggregated reference in this process (whose device memory then
    stays with this process)."""
    rng = random.Random(0)
    prompts = [[rng.randrange(10, 30000) for _ in range(rng.randint(5, 600))] for _ in range(24)]
    max_tokens = [rng.randint(4, 48) for _ in prompts]
    common = dict(dtype="float32", max_num_batched_tokens=512, num_kv_blocks=4096)
    llm = LLM(model, disaggregation="auto", sm_ladder=(40,), **common)  # decode pipelined on its worker
    engine = llm.llm_engine
    if not hasattr(engine, "pool"):
        raise SystemExit("the engine fell back to the aggregated mode (see the log)")
    result = {"mode": engine.stats()["mode"], "sm_isolation": engine.stats()["sm_isolation"]}
    got = {}
    for label, tbt in (("split", 1e-9), ("aggregate", 10.0)):
        engine.controller.slo = Slo(tbt=tbt)
        got[label] = staggered(engine, prompts, max_tokens, seed=int(tbt > 1))
        result[label] = {"phase_steps": dict(engine.phase_steps), "pipelined_steps": engine.pipelined_steps}
    llm.shutdown()
    ref_llm = LLM(model, **common)
    ref = [o.outputs[0].token_ids for o in ref_llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [SamplingParams(temperature=0.0, max_tokens=n) for n in max_tokens], use_tqdm=False)]
    # The noise floor: the aggregated engine against itself, with staggered arrivals batching and chunking the
    # same prompts differently. Float32 reductions over differently shaped steps may flip near-tied argmaxes.
    got["aggregated-restaggered"] = staggered(ref_llm.llm_engine, prompts, max_tokens, seed=7)
    result["aggregated-restaggered"] = {}
    ref_llm.shutdown()
    for label in got:
        result[label]["equal"] = sum(g == r for g, r in zip(got[label], ref))
        result[label]["of"] = len(ref)
        # Where each divergent sequence first differs, and its length: late divergences are near-ties.
        result[label]["first_divergence"] = [
            (next(i for i, (a, b) in enumerate(zip(g + [-1], r + [-2])) if a != b), len(r))
            for g, r in zip(got[label], ref) if g != r]
    return result


def startup(model: str, ladder: tuple[int, ...]) -> dict:
    t0 = time.monotonic()
    llm = LLM(model, disaggregation="auto", sm_ladder=ladder, num_scheduler_steps=8, max_num_batched_tokens=2048,
              gpu_memory_utilization=0.8)
    total = time.monotonic() - t0
    engine = llm.llm_engine
    if not hasattr(engine, "pool"):
        raise SystemExit("the engine fell back to the aggregated mode (see the log)")
    stats = engine.stats()
    pids = {name: h.info()["pid"] for name, h in engine.pool.workers.items()}
    mem = {p["pid"]: p["used_mib"] for p in gpu_processes()}
    rng = random.Random(1)
    prompts = [{"prompt_token_ids": [rng.randrange(10, 30000) for _ in range(rng.choice([256, 1024, 6000]))]}
               for _ in range(48)]
    t1 = time.monotonic()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True), use_tqdm=False)
    run_s = time.monotonic() - t1
    # JAX's allocator keeps what it grew to, so memory after the run is each process's peak under this load.
    after = {p["pid"]: p["used_mib"] for p in gpu_processes()}
    result = {"total_start_s": total, "worker_start_s": stats["worker_startup_s"],
              "worker_mem_mib": {n: mem.get(p) for n, p in pids.items()},
              "worker_mem_after_load_mib": {n: after.get(p) for n, p in pids.items()},
              "num_blocks": stats["num_free"],
              "run_48_requests_s": run_s, "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
              "phase_steps": engine.stats()["phase_steps"], "controller": engine.stats()["controller"]}
    llm.shutdown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--check-model", default="llama-3.2-1b")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--ladder", default="30,50")
    ap.add_argument("--skip", default="", help="comma list of: equality,startup")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("nexus_jax.disagg.partition").setLevel(logging.WARNING)
    skip = set(filter(None, args.skip.split(",")))
    doc = {"date": time.strftime("%Y-%m-%d %H:%M")}
    # The 8B start-up first: the equality check leaves the reference engine's memory in this process.
    if "startup" not in skip:
        doc["startup"] = startup(args.model, tuple(int(s) for s in args.ladder.split(",")))
        print(json.dumps(doc["startup"]), flush=True)
    if "equality" not in skip:
        doc["equality"] = check_equality(args.check_model)
        print(json.dumps(doc["equality"]), flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "disagg.json").write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
