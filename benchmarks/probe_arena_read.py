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
import os
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


def chain(x, ws):
    # One argument per layer, as the engine's weights are: a scan over a stacked array slices by copy.
    for w in ws:
        y = jnp.dot(x, w, preferred_element_type=jnp.float32)
        x = (y[:, :SHAPE[0]] * 1e-3).astype(x.dtype)
    return x


def timed(ws: list[jax.Array]) -> dict:
    fn = jax.jit(chain)
    x = jnp.ones((32, SHAPE[0]), jnp.bfloat16)
    try:
        fn(x, ws).block_until_ready()
    except Exception as e:  # noqa: BLE001 - the failure is the finding
        return {"error": str(e)[:300]}
    times = []
    for _ in range(20):
        t = time.perf_counter()
        fn(x, ws).block_until_ready()
        times.append(1e3 * (time.perf_counter() - t))
    ms = statistics.median(times)
    nbytes = sum(w.nbytes for w in ws)
    return {"ms": ms, "tb_per_s": nbytes / ms / 1e9, "pointer_mod_2mib": ws[0].unsafe_buffer_pointer() % (2 << 20)}


def views(arena: SharedArena, layers: int) -> list[jax.Array]:
    size = 2 * SHAPE[0] * SHAPE[1]
    return [arena.jax_array(i * size, SHAPE, jnp.bfloat16) for i in range(layers)]


def child() -> None:
    handle, layers = pickle.loads(sys.stdin.buffer.read())
    arena = SharedArena.open(handle)
    ws = views(arena, layers)
    tag = "_graphs_off" if "command_buffer=" in os.environ.get("XLA_FLAGS", "") else ""
    out = {f"c_ipc_view{tag}": timed(ws), f"d_own_copy{tag}": timed([jnp.array(w, copy=True) for w in ws])}
    print(json.dumps(out))


def main() -> None:
    if "--child" in sys.argv:
        child()
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--kind", default="cuda", help="arena kind; 'shm' runs the probe on CPU")
    ap.add_argument("--out", default=None)
    ap.add_argument("--mps", type=int, default=None, metavar="SM_PERCENT",
                    help="run everything as clients of a private MPS daemon (as the split's workers run), the "
                         "second process capped at this share of the SMs")
    args = ap.parse_args()
    if args.mps is not None and "CUDA_MPS_PIPE_DIRECTORY" not in os.environ:
        from runner.workers.mps import MpsControl
        mps = MpsControl.start()
        env = {**os.environ, **mps.client_env(None), "NEXUS_PROBE_CHILD_SM": str(args.mps)}
        try:
            sys.exit(subprocess.run([sys.executable, *sys.argv], env=env).returncode)
        finally:
            mps.stop()
    own = [jax.random.normal(jax.random.key(i), SHAPE, jnp.bfloat16) for i in range(args.layers)]
    rows = {"a_jax_owned": timed(own)}
    arena = SharedArena.create(sum(w.nbytes for w in own), args.kind)
    for i, w in enumerate(own):
        arena.write(i * w.nbytes, w)
    rows["b_arena_owner"] = timed(views(arena, args.layers))
    # The second child runs without XLA's command buffers (CUDA graphs), in case IPC memory is what they reject.
    for flags in ("", "--xla_gpu_enable_command_buffer="):
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
        if "NEXUS_PROBE_CHILD_SM" in env:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = env["NEXUS_PROBE_CHILD_SM"]
        done = subprocess.run([sys.executable, __file__, "--child"], input=pickle.dumps((arena.handle, args.layers)),
                              capture_output=True, timeout=300, env=env)
        lines = [line for line in done.stdout.decode().splitlines() if line.startswith("{")]
        rows |= json.loads(lines[-1]) if lines else {f"child_error{flags[-1:]}": done.stderr.decode()[-800:]}
    for name, r in rows.items():
        print(name, r, flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        name = "arena_read.json" if args.mps is None else f"arena_read_mps{args.mps}.json"
        Path(args.out, name).write_text(json.dumps({"layers": args.layers, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
