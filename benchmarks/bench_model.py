"""Full-model step benchmark on a GPU: decode step at batch x context, and a long prefill, on random weights.

  PYTHONPATH=. python3 benchmarks/bench_model.py --preset llama-3.1-8b --out $OUT [--json PATH]

Prints a Markdown table with each figure against its roofline: bytes (weights + KV read) over the measured HBM
bandwidth for decode, FLOPs over the bf16 peak for prefill.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from runner import programs
from runner.model.checkpoint import random_params
from runner.model.config import ModelConfig
from runner.model_runner import ModelRunner
from runner.sampling import GREEDY_ROW
from runner.step_batch import SeqChunk

PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense datasheet; MFU is quoted against it


def hbm_copy_tbps(n_bytes: int = 8 << 30) -> float:
    """Memory bandwidth in TB/s, the roofline of weight reads: the faster of a copy (bytes read + written) and a
    read-only sum over n_bytes, each the median of 10 runs. An `a + 1` over 4 GB, which this measured before,
    reads 3.0-3.3 TB/s on an H200 where the copy and the sum of 8 GB read 3.8-3.9 (2026-12-04)."""
    x = jax.random.normal(jax.random.key(0), (n_bytes // 2,), jnp.bfloat16)
    best = 0.0
    for f, passes in ((jax.jit(lambda a: a * 1), 2), (jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), 1)):
        f(x).block_until_ready()
        times = []
        for _ in range(10):
            t = time.perf_counter()
            f(x).block_until_ready()
            times.append(time.perf_counter() - t)
        best = max(best, passes * n_bytes / float(np.median(times)) / 1e12)
    return best


def timed(fn, iters: int) -> float:
    """Median seconds of fn() (which must block)."""
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def decode_step(runner: ModelRunner, batch: int, ctx: int, rng) -> tuple[float, float]:
    """(seconds per step through ModelRunner.step, seconds per step of the device program alone)."""
    bs = runner.block_size
    nblk = -(-ctx // bs)
    perm = rng.permutation(runner.num_blocks)
    tables = [perm[i * nblk:(i + 1) * nblk].tolist() for i in range(batch)]
    chunks = [SeqChunk([int(rng.integers(100, 1000))], ctx - 1, tables[i]) for i in range(batch)]
    rows = [GREEDY_ROW] * batch
    t = time.perf_counter()
    runner.step(chunks, [], rows)
    print(f"first decode step (compile + run): {time.perf_counter() - t:.1f} s", flush=True)
    full = timed(lambda: runner.step(chunks, [], rows), 20)
    device = timed_device(runner, chunks, [], rows, 20)
    return full, device


def timed_device(runner: ModelRunner, decodes, prefills, rows, iters: int) -> float:
    from runner.sampling import SamplingTensors
    from runner.step_batch import build_step_batch
    batch = jax.device_put(build_step_batch(list(decodes), list(prefills), runner.block_size))
    st = jax.device_put(SamplingTensors.from_rows(rows, pad_to=batch.logits_indices.shape[0]))
    no_feed = jax.device_put(np.full(batch.num_decode, -1, np.int32))

    def run():
        logits, runner.kv_pool = programs.forward(runner.model_def, runner.weights, runner.kv_pool, batch,
                                                  runner._no_feed, no_feed)
        programs.sample_step(logits, st, 0)[0].block_until_ready()
    return timed(run, iters)


def prefill(runner: ModelRunner, seqs: int, tokens: int, rng) -> float:
    bs = runner.block_size
    nblk = -(-tokens // bs)
    perm = rng.permutation(runner.num_blocks)
    chunks = [SeqChunk(rng.integers(100, 1000, tokens).tolist(), 0, perm[i * nblk:(i + 1) * nblk].tolist())
              for i in range(seqs)]
    return timed_device(runner, [], chunks, [GREEDY_ROW] * seqs, 5)


def check_pallas_against_xla(cfg: ModelConfig, params, rng) -> float:
    """Max relative error of the model's logits with the Pallas kernels against the XLA path (small batch)."""
    prompts = [rng.integers(100, 1000, n).tolist() for n in (37, 200, 129)]
    worst = 0.0
    outs = {}
    for impl in ("pallas", "xla"):
        runner = ModelRunner(cfg, params, num_blocks=256, block_size=16, kernel_impl=impl)
        tables = [list(range(i * 20, i * 20 + 20)) for i in range(len(prompts))]
        first = runner.logits([], [SeqChunk(p, 0, t) for p, t in zip(prompts, tables)])
        nxt = runner.logits([SeqChunk([7], len(p), t) for p, t in zip(prompts, tables)], [])
        outs[impl] = np.concatenate([first, nxt])
        del runner
    for a, b in zip(outs["pallas"], outs["xla"]):
        worst = max(worst, float(np.linalg.norm(a - b) / np.linalg.norm(b)))
    return worst


def prefill_flops(cfg: ModelConfig, seqs: int, tokens: int) -> float:
    dense = 2 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) * seqs * tokens  # embedding lookup is free
    attn = 2 * 2 * seqs * tokens * tokens / 2 * cfg.q_size * cfg.num_layers  # causal QK^T and PV
    return dense + attn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--check-preset", default=None, help="preset for the pallas-vs-xla logits check")
    ap.add_argument("--check-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--decode-only", action="store_true", help="skip the logits check and the prefill")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None, help="also write the figures as numbers here, for run_all.py")
    ap.add_argument("--copy-mb", type=int, default=8192, help="size of the HBM copy that measures bandwidth")
    args = ap.parse_args()
    cfg = ModelConfig.preset(args.preset)
    rng = np.random.default_rng(0)
    dev = jax.devices()[0]
    tbps = hbm_copy_tbps(args.copy_mb << 20)
    rows = []
    figures = {"device": dev.device_kind, "jax": jax.__version__, "date": str(datetime.date.today()),
               "preset": args.preset, "hbm_copy_tbps": tbps, "peak_bf16_tflops": PEAK_BF16_TFLOPS}
    if not args.decode_only:
        check = ModelConfig.preset(args.check_preset) if args.check_preset else cfg
        check_dtype = jnp.float32 if args.check_dtype == "float32" else jnp.bfloat16
        err = check_pallas_against_xla(check, random_params(check, check_dtype, seed=1), rng)
        print(f"model logits, pallas vs xla kernels: max relative error {err:.2e}", flush=True)
        rows.append(("logits pallas vs xla", f"{args.check_preset or args.preset} {args.check_dtype}, 3 seqs",
                     f"rel err {err:.1e}", "", ""))
        figures["logits_check"] = {"preset": args.check_preset or args.preset, "dtype": args.check_dtype,
                                   "rel_err": err}
    params = random_params(cfg, jnp.bfloat16, seed=0)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    num_blocks = max(args.batch * -(-args.ctx // 16), -(-args.prefill_tokens // 16)) + 64
    runner = ModelRunner(cfg, params, num_blocks=num_blocks, block_size=16)
    del params  # the model holds per-layer copies; drop the stacked originals
    print(f"kernels: {runner.kernel_impl}", flush=True)
    full, device = decode_step(runner, args.batch, args.ctx, rng)
    kv_bytes = ModelRunner.kv_bytes_per_block(cfg, 16, jnp.bfloat16) * args.batch * args.ctx / 16
    floor = (weight_bytes + kv_bytes) / (tbps * 1e12)
    rows.append(("decode step", f"B={args.batch} ctx={args.ctx}", f"{device * 1e3:.2f} ms (device), "
                 f"{full * 1e3:.2f} ms (with host)", f"floor {floor * 1e3:.2f} ms", f"{floor / device:.0%}"))
    figures["decode"] = {"batch": args.batch, "ctx": args.ctx, "device_ms": device * 1e3, "host_ms": full * 1e3,
                         "floor_ms": floor * 1e3, "weights_gb": weight_bytes / 1e9, "kv_read_gb": kv_bytes / 1e9}
    if not args.decode_only:
        t = prefill(runner, 1, args.prefill_tokens, rng)
        flops = prefill_flops(cfg, 1, args.prefill_tokens)
        rows.append(("prefill", f"1 x {args.prefill_tokens} tokens", f"{t * 1e3:.1f} ms",
                     f"{flops / t / 1e12:.0f} TF/s", f"MFU {flops / t / 1e12 / PEAK_BF16_TFLOPS:.0%}"))
        figures["prefill"] = {"tokens": args.prefill_tokens, "ms": t * 1e3, "tflops": flops / t / 1e12,
                              "mfu": flops / t / 1e12 / PEAK_BF16_TFLOPS}
    head = (f"device: {dev.device_kind}; date {datetime.date.today()}; jax {jax.__version__}; "
            f"HBM copy {tbps:.2f} TB/s; weights {weight_bytes / 1e9:.2f} GB; KV read {kv_bytes / 1e9:.2f} GB")
    table = [head, "", "| what | shape | time | roofline | ratio |", "|---|---|---|---|---|"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    print("\n".join(table))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_model.md"), "w") as f:
            f.write("\n".join(table) + "\n")
        with open(os.path.join(args.out, "bench_model.json"), "w") as f:
            json.dump({"rows": rows, "head": head}, f)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({**figures, "table": "\n".join(table)}, f, indent=1)


if __name__ == "__main__":
    main()
