"""Why does the jitted step's dispatch block on the GPU? Host time of the call against the whole step, per variant.

  PYTHONPATH=. python3 benchmarks/probe_dispatch.py --out $OUT [--preset llama-3.1-8b]

Variants of one decode step (batch 64, context 1024, random weights), each timed as (host time until the jitted call
returns, time until its output is ready):
- step: the model and the sampler as ModelRunner runs them;
- step, select: the same with the sampler's lax.cond replaced by computing both branches and selecting (XLA on GPU
  copies a conditional's predicate to the host, which waits for everything queued before it);
- model: the model alone (logits), no sampler;
- numpy inputs against inputs already on the device.
Also the memory bandwidth by three ops (add, copy, sum) at two sizes, for the weight-read floor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from runner import sampling
from runner.model.checkpoint import random_params
from runner.model.config import ModelConfig
from runner.model_runner import ModelRunner
from runner.sampling import GREEDY_ROW, SamplingRow, SamplingTensors
from runner.step_batch import SeqChunk, build_step_batch


def bandwidth(n_bytes: int) -> dict:
    x = jax.random.normal(jax.random.key(0), (n_bytes // 2,), jnp.bfloat16)
    ops = {"add (r+w)": (jax.jit(lambda a: a + 1), 2), "copy (r+w)": (jax.jit(lambda a: a * 1), 2),
           "sum (r)": (jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), 1)}
    out = {}
    for name, (f, passes) in ops.items():
        f(x).block_until_ready()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            f(x).block_until_ready()
            times.append(time.perf_counter() - t)
        out[name] = passes * n_bytes / float(np.median(times)) / 1e12
    return out


class _SelectLax:
    """jax.lax with cond computing both branches and selecting: no predicate read on the host."""

    def __getattr__(self, name):
        return getattr(jax.lax, name)

    @staticmethod
    def cond(pred, true_fn, false_fn, *ops):
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(*ops), false_fn(*ops))


def step_fn(graphdef, state, kv_pool, batch, st):
    logits, kv_pool = nnx.merge(graphdef, state)(kv_pool, batch)
    return sampling.sample(logits, st), kv_pool


def model_fn(graphdef, state, kv_pool, batch):
    logits, kv_pool = nnx.merge(graphdef, state)(kv_pool, batch)
    return logits, kv_pool


def timeit(runner: ModelRunner, fn, args_fn, iters: int = 20) -> dict:
    """Median host time of the call, and of the call + block_until_ready, over back-to-back steps."""
    calls, totals = [], []
    for i in range(iters + 2):
        args = args_fn()
        t = time.perf_counter()
        out, runner.kv_pool = fn(runner.graphdef, runner.state, runner.kv_pool, *args)
        t1 = time.perf_counter()
        jax.block_until_ready(out)
        t2 = time.perf_counter()
        if i >= 2:
            calls.append(t1 - t)
            totals.append(t2 - t)
    return {"dispatch_ms": 1e3 * float(np.median(calls)), "total_ms": 1e3 * float(np.median(totals))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--out", default=None)
    ap.add_argument("--bw-gb", type=int, nargs="+", default=[2, 8])
    args = ap.parse_args()
    res: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
    res["bandwidth_tbps"] = {f"{gb} GB": bandwidth(gb << 30) for gb in args.bw_gb}
    print(json.dumps(res, indent=1), flush=True)
    cfg = ModelConfig.preset(args.preset)
    params = random_params(cfg, jnp.bfloat16, seed=0)
    res["weights_gb"] = sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9
    nblk = -(-args.ctx // 16)
    runner = ModelRunner(cfg, params, num_blocks=args.batch * nblk + 64, block_size=16)
    del params
    rng = np.random.default_rng(0)
    perm = rng.permutation(runner.num_blocks)
    chunks = [SeqChunk([int(rng.integers(100, 1000))], args.ctx - 1, perm[i * nblk:(i + 1) * nblk].tolist())
              for i in range(args.batch)]
    batch_np = build_step_batch(chunks, [], 16)
    greedy_np = SamplingTensors.from_rows([GREEDY_ROW] * args.batch, pad_to=batch_np.logits_indices.shape[0])
    hot = SamplingRow(1.0, 0, 0.9, 0.0, 7, 0)
    sampled_np = SamplingTensors.from_rows([hot] * args.batch, pad_to=batch_np.logits_indices.shape[0])
    batch_dev, greedy_dev, sampled_dev = jax.device_put((batch_np, greedy_np, sampled_np))
    step = jax.jit(step_fn, static_argnums=0, donate_argnums=2)
    step_select = jax.jit(lambda *a: step_fn(*a), static_argnums=0, donate_argnums=2)
    model = jax.jit(model_fn, static_argnums=0, donate_argnums=2)
    cases = {
        "step, numpy inputs, greedy": (step, lambda: (batch_np, greedy_np)),
        "step, device inputs, greedy": (step, lambda: (batch_dev, greedy_dev)),
        "step, device inputs, top-p": (step, lambda: (batch_dev, sampled_dev)),
        "step select, numpy inputs, greedy": (step_select, lambda: (batch_np, greedy_np)),
        "step select, device inputs, greedy": (step_select, lambda: (batch_dev, greedy_dev)),
        "step select, device inputs, top-p": (step_select, lambda: (batch_dev, sampled_dev)),
        "model, numpy inputs": (model, lambda: (batch_np,)),
        "model, device inputs": (model, lambda: (batch_dev,)),
    }
    res["cases"] = {}
    for name, (fn, args_fn) in cases.items():
        patch = contextlib.nullcontext()
        if fn is step_select:
            patch = _patched(sampling, "lax", _SelectLax())
        t = time.perf_counter()
        with patch:
            out, runner.kv_pool = fn(runner.graphdef, runner.state, runner.kv_pool, *args_fn())
            jax.block_until_ready(out)
        first = time.perf_counter() - t
        res["cases"][name] = {"first_s": first, **timeit(runner, fn, args_fn)}
        print(name, res["cases"][name], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "probe_dispatch.json"), "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


@contextlib.contextmanager
def _patched(obj, name, value):
    saved = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, saved)


if __name__ == "__main__":
    main()
