"""Does running as an MPS client cost a constant per kernel? (The split's decode worker takes 13-14 ms per 8B decode
step at every SM share, where the in-process engine takes 7.8 ms; a step is ~700 kernels.)

  PYTHONPATH=. python3 benchmarks/probe_mps_kernels.py [--out DIR]

Starts a private MPS daemon (runner/workers/mps.py), then times the same two programs in a fresh process each:
without MPS, and as an MPS client capped at 100%, 90% and 50% of the SMs. `tiny`: a chain of --kernels small
elementwise kernels (an optimization barrier between them keeps XLA from fusing them), so its time is per-kernel
cost; `stream`: one pass over 4 GiB, so its time is bandwidth; `gemm`: the decode step's largest GEMM, compiled (and
autotuned) inside each process, so a slower time under MPS with fewer SMs seen means XLA tuned for the cap.
Medians of 20 calls, ms. A per-kernel MPS cost shows
as `tiny` slower under MPS at every cap while `stream` is not.
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

CHILD = "--child"


def child(kernels: int) -> dict:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def tiny(x):
        for _ in range(kernels):
            x = jax.lax.optimization_barrier(jnp.sin(x) * 1.0001)
        return x

    @jax.jit
    def stream(x):
        return x * 1.0001

    @jax.jit
    def gemm(w):  # the 8B decode step's largest GEMM (batch 32 x the MLP's gate/up), compiled in this process
        return jnp.ones((32, 4096), w.dtype) @ w

    small = jnp.ones((32, 4096), jnp.float32)
    big = jnp.ones((1 << 30,), jnp.float32)  # 4 GiB
    weight = jnp.ones((4096, 28672), jnp.bfloat16)
    out = {"core_count": getattr(jax.devices()[0], "core_count", None)}
    for name, fn, arg in (("tiny", tiny, small), ("stream", stream, big), ("gemm", gemm, weight)):
        fn(arg).block_until_ready()
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn(arg).block_until_ready()
            times.append(1e3 * (time.perf_counter() - t))
        out[f"{name}_ms"] = statistics.median(times)
    return out


def main() -> None:
    if CHILD in sys.argv:
        print(json.dumps(child(int(sys.argv[-1]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", type=int, default=700)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from runner.workers.mps import try_start_mps

    base = {k: v for k, v in os.environ.items() if not k.startswith("CUDA_MPS_")}
    base["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    runs = {"no MPS": base}
    mps = try_start_mps()
    if mps is not None:
        for share in (100, 90, 50):
            runs[f"MPS {share}%"] = {**base, **mps.client_env(share)}
    rows = {}
    try:
        for name, env in runs.items():
            done = subprocess.run([sys.executable, __file__, CHILD, str(args.kernels)], env=env, capture_output=True,
                                  text=True, timeout=300)
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            rows[name] = json.loads(lines[-1]) if lines else {"error": done.stderr[-500:]}
            print(name, rows[name], flush=True)
    finally:
        if mps is not None:
            mps.stop()
    print("| run | SMs seen | tiny chain ms (us per kernel) | 4 GiB stream ms | 32x4096x28672 GEMM ms |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        if "tiny_ms" in r:
            print(f"| {name} | {r['core_count']} | {r['tiny_ms']:.2f} ({1e3 * r['tiny_ms'] / args.kernels:.1f}) "
                  f"| {r['stream_ms']:.2f} | {r['gemm_ms']:.3f} |")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "mps_kernels.json").write_text(json.dumps({"kernels": args.kernels, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
