"""Why the split's decode worker reads its weights slowly: the decode GEMMs over the same bytes in four places.

  PYTHONPATH=. python3 benchmarks/probe_arena_read.py [--out DIR] [--layers 16]

The split's decode worker decodes at 12.9 ms per 8B step on the shared arena's weights and at 8.1 ms on its own
copy (RESULTS.md, `gpu_calls.sh copy`), so the arena's memory is the cause; this says which part of it. A chain of
`--layers` gate/up GEMMs (batch 32, [4096, 28672] bf16 weights stacked as the model stacks them, 235 MB a layer)
is timed on: (a) weights JAX allocated, (b) a view of a `SharedArena` (cupy cudaMalloc, DLPack) in the process
that allocated it, (c) the same arena mapped over CUDA IPC in a second process, (d) that process's own JAX copy of
(c). Slow (b) puts the cause in the allocation or the DLPack import; (b) fast and (c) slow, in the IPC mapping.
Medians of 20 calls, ms, and the bandwidth they imply.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from runner.workers.shared_arena import SharedArena

SHAPE = (4096, 28672)


def chain(x, w):
    def layer(h, wl):
        y = jnp.dot(h, wl, preferred_element_type=jnp.float32)
        return (y[:, :SHAPE[0]] * 1e-3).astype(h.dtype), None
    return jax.lax.scan(layer, x, w)[0]


def timed(w: jax.Array) -> dict:
    fn = jax.jit(chain)
    x = jnp.ones((32, SHAPE[0]), jnp.bfloat16)
    fn(x, w).block_until_ready()
    times = []
    for _ in range(20):
        t = time.perf_counter()
        fn(x, w).block_until_ready()
        times.append(1e3 * (time.perf_counter() - t))
    ms = statistics.median(times)
    return {"ms": ms, "tb_per_s": w.nbytes / ms / 1e9, "pointer_mod_2mib": w.unsafe_buffer_pointer() % (2 << 20)}


def child() -> None:
    handle, layers = pickle.loads(sys.stdin.buffer.read())
    arena = SharedArena.open(handle)
    view = arena.jax_array(0, (layers, *SHAPE), jnp.bfloat16)
    out = {"c_ipc_view": timed(view), "d_own_copy": timed(jnp.array(view, copy=True))}
    print(json.dumps(out))


def main() -> None:
    if "--child" in sys.argv:
        child()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--kind", default="cuda", help="arena kind; 'shm' runs the probe on CPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    shape = (args.layers, *SHAPE)
    own = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    rows = {"a_jax_owned": timed(own)}
    arena = SharedArena.create(own.nbytes, args.kind)
    arena.write(0, own)
    rows["b_arena_owner"] = timed(arena.jax_array(0, shape, jnp.bfloat16))
    done = subprocess.run([sys.executable, __file__, "--child"], input=pickle.dumps((arena.handle, args.layers)),
                          capture_output=True, timeout=300)
    lines = [line for line in done.stdout.decode().splitlines() if line.startswith("{")]
    rows |= json.loads(lines[-1]) if lines else {"child_error": done.stderr.decode()[-800:]}
    for name, r in rows.items():
        print(name, r, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "arena_read.json").write_text(json.dumps({"layers": args.layers, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
