"""Where the host time of one step's dispatch goes, and whether the GPU outpaces it (batch-64 decode, context 1024).

  PYTHONPATH=. python3 benchmarks/profile_dispatch.py --out $OUT [--preset llama-3.1-8b] [--variants]

On one ModelRunner (random weights), per step, medians over back-to-back steps:
- sync: `dispatch` then `result()`, with the host time of each part of `dispatch` (DecodeState.build,
  SamplingTensors.from_rows, the forward call, the sampler call) and the whole step;
- chained: steps dispatched back to back, each fed the previous one's samples on the device, read once at the end:
  the host time per dispatch against the device time per step (the pace of the chain);
- micro: what the jit's arguments cost on the host: hashing the nnx graph definition and flattening the nnx state
  (what every call paid before `programs.ModelDef`), moving the batch's numpy arrays to the device one by one
  against as one packed buffer, and the forward call with its inputs already on the device.
--variants runs the same in one process per XLA_FLAGS setting (flags are read at start): the default, CUDA graphs
(command buffers) off, and command buffers for graphs of any size; each writes dispatch-<name>.json.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from runner import batch_state, programs
from runner.executor import StepInput
from runner.model.checkpoint import random_params
from runner.model.config import ModelConfig
from runner.model_runner import ModelRunner
from runner.sampling import GREEDY_ROW, SamplingTensors
from runner.step_batch import SeqChunk, build_step_batch

VARIANTS = {
    "default": "",
    "command-buffers-off": "--xla_gpu_enable_command_buffer=",
    "graphs-any-size": "--xla_gpu_graph_min_graph_size=1",
}


def median_ms(xs: list[float]) -> float:
    return 1e3 * statistics.median(xs)


def timed_parts(targets: list[tuple[object, str]]):
    """Wraps each (object, attribute) callable to record its host time per call; returns (spans, restore)."""
    spans: dict[str, list[float]] = collections.defaultdict(list)
    saved = [(obj, name, inspect.getattr_static(obj, name)) for obj, name in targets]
    for obj, name, _ in saved:
        real = getattr(obj, name)
        def timed(*a, _real=real, _name=name, **k):
            t = time.perf_counter()
            try:
                return _real(*a, **k)
            finally:
                spans[_name].append(time.perf_counter() - t)
        setattr(obj, name, timed)

    def restore():
        for obj, name, real in saved:
            setattr(obj, name, real)
    return spans, restore


def per_call_us(fn, n: int = 200) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - t) / n


def decode_steps_from(runner: ModelRunner, batch: int, ctx: int, span: int):
    """A maker of batch-`batch` decode StepInputs at positions ctx - 1 .. ctx - 1 + span, on blocks 0, 1, ..."""
    nblk = -(-(ctx + span) // runner.block_size)
    if batch * nblk > runner.num_blocks:
        raise ValueError(f"{batch} x {nblk} blocks do not fit the pool's {runner.num_blocks}")
    tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(batch)]
    rng = np.random.default_rng(0)

    def step_input(pos: int, feed: bool) -> StepInput:
        chunks = [SeqChunk([int(rng.integers(100, 1000))], pos, tables[i]) for i in range(batch)]
        return StepInput(chunks, [], [GREEDY_ROW] * batch, feed=[(i, i) for i in range(batch)] if feed else ())
    return step_input


def chained_pace(runner: ModelRunner, batch: int, ctx: int, steps: int) -> dict:
    """Dispatches `steps` decode steps back to back, each fed the previous one's samples on the device, and reads
    the last: the host time per dispatch, and the device's time per step when the host keeps ahead."""
    step_input = decode_steps_from(runner, batch, ctx, 8)
    runner.dispatch(step_input(ctx - 1, False)).result()  # compiled and warm
    inputs = [step_input(ctx - 1 + k % 4, k > 0) for k in range(steps)]
    jax.block_until_ready(runner.kv_pool)
    dispatch = []
    t0 = time.perf_counter()
    for s in inputs:
        t = time.perf_counter()
        pending = runner.dispatch(s)
        dispatch.append(time.perf_counter() - t)
    pending.result()
    return {"dispatch_ms": median_ms(dispatch), "dispatch_max_ms": 1e3 * max(dispatch),
            "per_step_ms": 1e3 * (time.perf_counter() - t0) / steps}


def profile(preset: str, batch: int, ctx: int, steps: int) -> dict:
    cfg = ModelConfig.preset(preset)
    nblk = -(-(ctx + 8) // 16)
    runner = ModelRunner(cfg, random_params(cfg, jnp.bfloat16, seed=0), num_blocks=batch * nblk + 16,
                         block_size=16)
    step_input = decode_steps_from(runner, batch, ctx, 8)
    res: dict = {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "batch": batch, "ctx": ctx,
                 "xla_flags": os.environ.get("XLA_FLAGS", "")}
    t = time.perf_counter()
    runner.dispatch(step_input(ctx - 1, False)).result()
    res["first_step_s"] = time.perf_counter() - t
    for _ in range(3):
        runner.dispatch(step_input(ctx - 1, False)).result()

    parts = [(batch_state.DecodeState, "build"), (SamplingTensors, "from_rows"), (programs, "forward"),
             (programs, "sample_step")]
    spans, restore = timed_parts(parts)
    dispatch, whole = [], []
    for k in range(steps):
        t = time.perf_counter()
        pending = runner.dispatch(step_input(ctx - 1 + k % 4, False))
        t1 = time.perf_counter()
        pending.result()
        dispatch.append(t1 - t)
        whole.append(time.perf_counter() - t)
    restore()
    res["sync"] = {"dispatch_ms": median_ms(dispatch), "step_ms": median_ms(whole),
                   **{f"{name}_ms": median_ms(v) for name, v in spans.items()}}
    res["chained"] = chained_pace(runner, batch, ctx, steps)

    batch_np = build_step_batch(step_input(ctx - 1, False).decodes, [], 16)
    packed = np.concatenate([np.ravel(x) for x in jax.tree.leaves(batch_np)])
    batch_dev = jax.device_put(batch_np)
    st_dev = jax.device_put(SamplingTensors.from_rows([GREEDY_ROW] * batch))
    no_feed = jax.device_put(np.full(batch_np.num_decode, -1, np.int32))

    def forward_call(b, feed_src):
        logits, runner.kv_pool = programs.forward(runner.model_def, runner.weights, runner.kv_pool, b,
                                                  runner._no_feed, feed_src)
        return logits

    def timed_forward(b, feed_src) -> float:
        times = []
        for _ in range(steps):
            jax.block_until_ready(runner.kv_pool)
            t = time.perf_counter()
            logits = forward_call(b, feed_src)
            times.append(time.perf_counter() - t)
            logits.block_until_ready()
        return median_ms(times)

    res["micro"] = {
        "hash_graphdef_us": per_call_us(lambda: hash(runner.graphdef)),
        "flatten_nnx_state_us": per_call_us(lambda: jax.tree.flatten(runner.state)),
        "hash_model_def_us": per_call_us(lambda: hash(runner.model_def)),
        "device_put_batch_arrays_us": per_call_us(lambda: jax.block_until_ready(jax.device_put(batch_np)), 50),
        "device_put_packed_us": per_call_us(lambda: jax.block_until_ready(jax.device_put(packed)), 50),
        "batch_arrays": len(jax.tree.leaves(batch_np)),
        "forward_call_numpy_ms": timed_forward(batch_np, np.asarray(no_feed)),
        "forward_call_device_ms": timed_forward(batch_dev, no_feed),
        "forward_and_sample_calls_device_ms": per_call_us(
            lambda: programs.sample_step(forward_call(batch_dev, no_feed), st_dev, 0), 20) / 1e3,
    }
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=".")
    ap.add_argument("--variants", action="store_true", help="one process per XLA_FLAGS variant")
    ap.add_argument("--name", default="default", help="this process's variant name (for the file name)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.variants:
        for name, flags in VARIANTS.items():
            env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
            cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch), "--ctx",
                   str(args.ctx), "--steps", str(args.steps), "--out", str(out), "--name", name]
            rc = subprocess.run(cmd, env=env).returncode
            print(f"variant {name}: rc={rc}", flush=True)
        return
    res = profile(args.preset, args.batch, args.ctx, args.steps)
    (out / f"dispatch-{args.name}.json").write_text(json.dumps(res, indent=1))
    print(args.name, json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
