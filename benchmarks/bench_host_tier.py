"""Restoring a context from the host tier against recomputing it (issue 20's target: >= 5x faster for 4K tokens).

  PYTHONPATH=. python3 benchmarks/bench_host_tier.py [--model llama-3.1-8b] [--context 4096] [--out DIR]
  PYTHONPATH=. python3 benchmarks/bench_host_tier.py --model tiny --context 256 --pool-tokens 1024   # CPU smoke

One engine with a small device pool (--pool-tokens) and a host tier. For each of --trials distinct prompts P of
--context tokens (one output token each, so the time is the prefill's, i.e. TTFT):
1. P cold: nothing cached, the whole context is computed (recompute);
2. P again: its blocks are in the device pool (device hit, for reference);
3. other prompts fill the pool until P's blocks were evicted to the host tier; then P again (host hit: the blocks
   are copied back and only the last partial block is computed).
Every phase is run once beforehand on throwaway prompts, so no timed request compiles. Reports the median time of
each phase, num_cached_tokens of the hits, and restore vs recompute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from nexus_jax import EngineConfig, SamplingParams
from nexus_jax.entrypoints.build import build_engine

ONE = SamplingParams(max_tokens=1, ignore_eos=True)


def timed(engine, rid: str, prompt: list[int]) -> tuple[float, int]:
    """Seconds from add_request to the request's end, and its num_cached_tokens."""
    t = time.perf_counter()
    engine.add_request(rid, {"prompt_token_ids": prompt}, ONE)
    while True:
        for out in engine.step():
            if out.request_id == rid and out.finished:
                engine.settle()
                return time.perf_counter() - t, out.num_cached_tokens


def trial(engine, rng, tag: str, args, vocab: int) -> dict:
    prompt = rng.integers(3, vocab, args.context).tolist()
    cold, _ = timed(engine, f"{tag}-cold", prompt)
    device, device_cached = timed(engine, f"{tag}-device", prompt)
    # Each flood prompt is as long as the pool holds in free blocks, so a few of them evict everything older.
    for i in range(max(2, 2 * args.pool_tokens // args.context)):
        timed(engine, f"{tag}-flood{i}", rng.integers(3, vocab, args.context).tolist())
    host, host_cached = timed(engine, f"{tag}-host", prompt)
    return {"recompute_s": cold, "device_hit_s": device, "device_cached": device_cached,
            "host_hit_s": host, "host_cached": host_cached}


def transfer_probe(engine, blocks: int) -> dict:
    """The copy a host hit makes, alone: `blocks` blocks' bytes to the device from pageable memory and from pinned
    memory (jax's pinned_host, where the host tier keeps its blocks: runner.host_blocks), as one array and as one
    array per block each way (what the host tier does: the difference is the per-array cost)."""
    import jax

    runner = engine.executor
    shape = runner.kv_pool_shape(runner.config, blocks, runner.block_size)
    source = np.ones(shape, runner.dtype)
    device = jax.devices()[0]
    out: dict = {"bytes": int(source.nbytes)}
    jax.device_put(source, device).block_until_ready()
    t = time.perf_counter()
    jax.device_put(source, device).block_until_ready()
    out["h2d_pageable_ms"] = 1e3 * (time.perf_counter() - t)
    pinned = jax.device_put(source, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
    pinned.block_until_ready()
    for _ in range(2):
        t = time.perf_counter()
        jax.device_put(pinned, jax.sharding.SingleDeviceSharding(device)).block_until_ready()
    out["h2d_pinned_ms"] = 1e3 * (time.perf_counter() - t)
    # The host tier moves one array per block: the same bytes as `blocks` arrays, each way (host time included).
    shape = runner.kv_pool_shape(runner.config, 1, runner.block_size)
    parts = jax.device_put([np.ones(shape[:2] + shape[3:], runner.dtype) for _ in range(blocks)], device)
    pinned_parts = jax.device_put(parts, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host"))
    jax.block_until_ready(pinned_parts)
    t = time.perf_counter()
    jax.block_until_ready(jax.device_put(parts, jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")))
    out["d2h_pinned_per_block_arrays_ms"] = 1e3 * (time.perf_counter() - t)
    t = time.perf_counter()
    jax.block_until_ready(jax.device_put(pinned_parts, jax.sharding.SingleDeviceSharding(device)))
    out["h2d_pinned_per_block_arrays_ms"] = 1e3 * (time.perf_counter() - t)
    out.update(in_program_moves(engine, parts, pinned_parts))
    return out


def in_program_moves(engine, parts: list, pinned_parts: list) -> dict:
    """The same per-block moves made by one program each way, with XLA's host memory kinds: a split of the pool
    whose outputs are placed in pinned host memory, and a stack whose inputs are read from there. Per move: ms until
    the call returns (host time) and until the arrays are ready; or the error, where this JAX or GPU refuses
    memory kinds in a program. What the host tier would gain by dropping its per-array transfers."""
    import jax
    import jax.numpy as jnp

    device = jax.devices()[0]
    host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    n, pool = len(parts), engine.executor.kv_pool
    idx = np.arange(n, dtype=np.int32)
    moves = {
        "d2h_one_program": (jax.jit(lambda kv, i: tuple(kv[:, :, i][:, :, j] for j in range(n)),
                                    out_shardings=(host,) * n), (pool, idx)),
        "h2d_one_program": (jax.jit(lambda *blocks: jnp.stack(blocks, axis=2), in_shardings=(host,) * n,
                                    out_shardings=jax.sharding.SingleDeviceSharding(device)), tuple(pinned_parts)),
    }
    out: dict = {}
    for name, (fn, args) in moves.items():
        try:
            jax.block_until_ready(fn(*args))  # compiles
            t = time.perf_counter()
            result = fn(*args)
            returned = time.perf_counter() - t
            jax.block_until_ready(result)
            out[f"{name}_call_ms"], out[f"{name}_ms"] = 1e3 * returned, 1e3 * (time.perf_counter() - t)
        except Exception as e:  # reported, not fatal: the probe's other figures stand
            out[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--pool-tokens", type=int, default=16384, help="device pool size in tokens (small, to evict)")
    ap.add_argument("--host-gib", type=float, default=8.0)
    ap.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens: the context in one step")
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--cache", default="/tmp/nexus-jax-cc", help="compilation cache directory")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    config = EngineConfig(model=None if args.model == "tiny" else args.model, num_kv_blocks=args.pool_tokens // 16,
                          host_cache_gib=args.host_gib, max_num_batched_tokens=args.budget,
                          max_model_len=args.context + 16, compilation_cache_dir=args.cache)
    engine = build_engine(config)
    # Every copy bucket compiled ahead, as warmup=True does: the warm trial alone left some for the timed requests
    # (a flood's evictions make block counts it did not; seen on this CPU, 2026-12-07).
    engine.executor.warmup_swap(engine.executor.num_blocks)
    rng = np.random.default_rng(0)
    vocab = engine.vocab_size
    trial(engine, rng, "warm", args, vocab)  # compiles every phase's shapes
    rows = [trial(engine, rng, f"t{i}", args, vocab) for i in range(args.trials)]
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    result = {"args": vars(args), "trials": rows, "median": med, "stats": engine.stats(),
              "restore_vs_recompute": med["recompute_s"] / med["host_hit_s"],
              "transfer": transfer_probe(engine, args.context // 16)}
    print(f"context {args.context}: recompute {1e3 * med['recompute_s']:.1f} ms, device hit "
          f"{1e3 * med['device_hit_s']:.1f} ms ({med['device_cached']:.0f} cached), host hit "
          f"{1e3 * med['host_hit_s']:.1f} ms ({med['host_cached']:.0f} cached); restore is "
          f"{result['restore_vs_recompute']:.2f}x faster than recompute")
    print("transfer probe:", json.dumps(result["transfer"]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "host_tier.json").write_text(json.dumps(result, indent=1, default=str))
    engine.close()


if __name__ == "__main__":
    main()
