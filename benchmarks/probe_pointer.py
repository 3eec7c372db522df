"""Does reading a jitted output's device address wait for the computation? (The disaggregated worker checks its
KV pool's address right after dispatching each step.)

  PYTHONPATH=. python3 benchmarks/probe_pointer.py

Dispatches a step of ~10+ ms that also writes a donated buffer, then times `unsafe_buffer_pointer()` on that output
and the wait for the rest; medians of 10.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def main() -> None:
    n = 8192 if jax.devices()[0].platform == "gpu" else 1024
    a = jnp.ones((n, n), jnp.bfloat16)
    pool = jnp.zeros((64, 1 << 20), jnp.bfloat16)

    @jax.jit
    def work(x):
        for _ in range(8):
            x = (x @ x) * 1e-4
        return x

    step = jax.jit(lambda p, x: (p.at[0, 0].set(x[0, 0]), x), donate_argnums=0)
    for _ in range(2):
        pool, _ = step(pool, work(a))
        pool.block_until_ready()
    rows = []
    for _ in range(10):
        t = time.perf_counter()
        pool, out = step(pool, work(a))
        t1 = time.perf_counter()
        pool.unsafe_buffer_pointer()
        t2 = time.perf_counter()
        pool.block_until_ready()
        out.block_until_ready()
        t3 = time.perf_counter()
        rows.append((t1 - t, t2 - t1, t3 - t2))
    med = [1e3 * statistics.median(r[i] for r in rows) for i in range(3)]
    print(f"{jax.devices()[0].device_kind}: dispatch {med[0]:.2f} ms, unsafe_buffer_pointer {med[1]:.2f} ms, "
          f"rest of the step {med[2]:.2f} ms (pointer waits for the step if its time ~ the step's)")


if __name__ == "__main__":
    main()
