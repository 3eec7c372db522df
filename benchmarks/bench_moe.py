"""Mixture-of-experts MLP on a GPU: the grouped GEMM of runner/model/moe.py as the Pallas kernel
(pallas_kernels/grouped_matmul.py, "pallas") and as jax.lax.ragged_dot ("ragged_dot"), against computing every
expert for every token with einsums ("dense"), for one layer of the Qwen3-30B-A3B shape (hidden 2048, 128 experts
of 768, top 8) at decode (batch 64) and prefill (8192 tokens), random bf16 weights and random (near-uniform) routing.

  PYTHONPATH=. python3 benchmarks/bench_moe.py [--json PATH]      # on the GPU
  PYTHONPATH=. python3 benchmarks/bench_moe.py --quick            # tiny shapes, a CPU smoke run (CI)
  PYTHONPATH=. python3 benchmarks/bench_moe.py --tilings auto:128:64:3,128:256:64:3,64:128:128:4
                                          # also the Pallas kernel's tile shapes (rows:cols:inner:stages) on the
                                          # layer's gate/up grouped GEMM alone, at each size

Each row is one layer (router + experts), the median of --iters runs. Decode is judged against its memory floor:
the bytes of the experts the batch actually routes to (counted from its routing) plus the router, over the HBM
bandwidth measured in the same run. Prefill is judged by MFU on the active FLOPs (2 x tokens x top_k x 3 x hidden x
expert size, plus the router) against the bf16 peak. The dense rows do E / top_k times the active work; their
MFU is quoted on the same active FLOPs, so it says how much of the device the useful work got. Every row's
output is checked against the dense one ("max rel err": largest |difference| over the largest |dense value|).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_model import PEAK_BF16_TFLOPS, hbm_copy_tbps, timed
from pallas_kernels.grouped_matmul import Tiling, grouped_matmul
from runner.model.activations import ACTIVATIONS
from runner.model.moe import moe_dense, moe_ragged, route


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    inter: int  # each expert's intermediate size
    experts: int
    top_k: int
    layers: int  # only to scale one layer's time to the model's in the table

    def expert_bytes(self, itemsize: int) -> int:
        return 3 * self.hidden * self.inter * itemsize


QWEN3_30B_A3B = Shape("qwen3-30b-a3b", hidden=2048, inter=768, experts=128, top_k=8, layers=48)
TINY = Shape("tiny", hidden=64, inter=32, experts=8, top_k=2, layers=2)


def make_layer(shape: Shape, dtype, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    router = (0.02 * jax.random.normal(keys[0], (shape.hidden, shape.experts), jnp.float32)).astype(dtype)
    gate_up = (0.02 * jax.random.normal(keys[1], (shape.experts, shape.hidden, 2 * shape.inter),
                                        jnp.float32)).astype(dtype)
    down = (0.02 * jax.random.normal(keys[2], (shape.experts, shape.inter, shape.hidden), jnp.float32)).astype(dtype)
    return router, gate_up, down


IMPLS = ("pallas", "ragged_dot", "dense")


def layer_fn(shape: Shape, impl: str, kernel: str):
    """impl: one of IMPLS; kernel: the Pallas implementation "pallas" runs ("pallas" on a GPU, "interpret" on CPU)."""
    act = ACTIVATIONS["silu"]

    @jax.jit
    def run(x, router, gate_up, down):
        weights, experts = route(x, router, shape.top_k, True)
        if impl == "dense":
            return moe_dense(x, weights, experts, gate_up, down, act)
        return moe_ragged(x, weights, experts, gate_up, down, act, kernel if impl == "pallas" else "xla")

    return run


def bench_case(shape: Shape, tokens: int, dtype, iters: int, tbps: float, impls, kernel: str) -> list[dict]:
    router, gate_up, down = make_layer(shape, dtype)
    x = jax.random.normal(jax.random.key(tokens), (tokens, shape.hidden), jnp.float32).astype(dtype)
    _, experts = route(x, router, shape.top_k, True)
    routed = int(np.unique(np.asarray(experts)).size)
    itemsize = jnp.dtype(dtype).itemsize
    floor_bytes = routed * shape.expert_bytes(itemsize) + shape.hidden * shape.experts * itemsize
    floor_s = floor_bytes / (tbps * 1e12)
    active_flops = 2 * tokens * (shape.top_k * 3 * shape.hidden * shape.inter + shape.hidden * shape.experts)
    rows = []
    dense = np.asarray(layer_fn(shape, "dense", kernel)(x, router, gate_up, down), np.float32)
    for impl in impls:
        fn = layer_fn(shape, impl, kernel)
        err = float(np.abs(np.asarray(fn(x, router, gate_up, down), np.float32) - dense).max() / np.abs(dense).max())
        t = timed(lambda: fn(x, router, gate_up, down).block_until_ready(), iters)
        rows.append({"shape": shape.name, "tokens": tokens, "impl": impl, "max_rel_err": err, "ms_per_layer": t * 1e3,
                     "ms_model": t * 1e3 * shape.layers, "routed_experts": routed, "floor_ms": floor_s * 1e3,
                     "x_floor": t / floor_s, "tflops": active_flops / t / 1e12,
                     "mfu": active_flops / t / 1e12 / PEAK_BF16_TFLOPS})
    return rows


def parse_tilings(text: str) -> list[Tiling]:
    """"rows:cols:inner:stages,..." (rows "auto": the kernel's own choice) as Tilings."""
    tilings = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) != 4:
            raise ValueError(f"{item!r} is not rows:cols:inner:stages")
        rows, cols, inner, stages = parts
        tilings.append(Tiling(None if rows == "auto" else int(rows), int(cols), int(inner), int(stages)))
    return tilings


def bench_tilings(shape: Shape, tokens: int, dtype, iters: int, tilings: list[Tiling], kernel: str) -> list[dict]:
    """The gate/up grouped GEMM of one layer (tokens x top_k rows sorted by expert, times [E, H, 2I]) under each
    tiling: ms, MFU on its FLOPs, and its largest difference from ragged_dot's result."""
    router, gate_up, _ = make_layer(shape, dtype)
    x = jax.random.normal(jax.random.key(tokens), (tokens, shape.hidden), jnp.float32).astype(dtype)
    _, experts = route(x, router, shape.top_k, True)
    flat = experts.reshape(-1)
    lhs = x[jnp.argsort(flat, stable=True) // shape.top_k]
    sizes = jnp.bincount(flat, length=shape.experts).astype(jnp.int32)
    ref = np.asarray(jax.lax.ragged_dot(lhs, gate_up, sizes), np.float32)
    flops = 2 * lhs.shape[0] * shape.hidden * 2 * shape.inter
    rows = []
    for tiling in tilings:
        fn = jax.jit(lambda a, b, c, t=tiling: grouped_matmul(a, b, c, impl=kernel, tiling=t))
        err = float(np.abs(np.asarray(fn(lhs, gate_up, sizes), np.float32) - ref).max() / np.abs(ref).max())
        t = timed(lambda: fn(lhs, gate_up, sizes).block_until_ready(), iters)
        rows.append({"tokens": tokens, "tiling": dataclasses.asdict(tiling), "ms": t * 1e3,
                     "tflops": flops / t / 1e12, "mfu": flops / t / 1e12 / PEAK_BF16_TFLOPS, "max_rel_err": err})
    return rows


def tiling_table(rows: list[dict]) -> str:
    lines = ["| tokens | rows | cols | inner | stages | gate/up GEMM ms | TF/s | MFU | max rel err vs ragged_dot |",
             "|" + "---|" * 9]
    for r in rows:
        t = r["tiling"]
        lines.append(f"| {r['tokens']} | {t['rows'] or 'auto'} | {t['cols']} | {t['inner']} | {t['stages']} "
                     f"| {r['ms']:.3f} | {r['tflops']:.1f} | {r['mfu']:.1%} | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    head = ("| shape | tokens | impl | ms / layer | ms x layers | routed experts | bytes floor ms | x floor | "
            "active TF/s | MFU (active) | max rel err |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['impl']} | {r['ms_per_layer']:.3f} | {r['ms_model']:.2f} "
                     f"| {r['routed_experts']} | {r['floor_ms']:.3f} | {r['x_floor']:.2f} | {r['tflops']:.1f} "
                     f"| {r['mfu']:.1%} | {r['max_rel_err']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few iterations (a CPU smoke run)")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--prefill-tokens", type=int, default=8192)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--impls", default=",".join(IMPLS), help=f"which of {', '.join(IMPLS)} to time")
    ap.add_argument("--copy-mb", type=int, default=8192, help="size of the HBM copy that measures bandwidth")
    ap.add_argument("--json", help="write the rows and the measured bandwidth here")
    ap.add_argument("--tilings", default=None, help="rows:cols:inner:stages,... of the Pallas kernel to sweep")
    args = ap.parse_args()
    shape, dtype = (TINY, jnp.float32) if args.quick else (QWEN3_30B_A3B, jnp.bfloat16)
    cases = (4, 64) if args.quick else (args.decode_batch, args.prefill_tokens)
    iters = 2 if args.quick else args.iters
    tbps = hbm_copy_tbps((1 << 20) if args.quick else args.copy_mb << 20)
    impls = args.impls.split(",")
    unknown = set(impls) - set(IMPLS)
    if unknown:
        ap.error(f"unknown --impls {sorted(unknown)}; choose from {', '.join(IMPLS)}")
    try:
        tilings = parse_tilings(args.tilings) if args.tilings else []
    except ValueError as e:
        ap.error(f"--tilings: {e}")
    kernel = "pallas" if jax.devices()[0].platform == "gpu" else "interpret"
    rows = [row for tokens in cases for row in bench_case(shape, tokens, dtype, iters, tbps, impls, kernel)]
    print(f"device: {jax.devices()[0].device_kind}; copy bandwidth {tbps:.2f} TB/s; MFU against "
          f"{PEAK_BF16_TFLOPS:.0f} TF/s (bf16 dense peak)")
    print(table(rows))
    swept = [row for tokens in cases for row in bench_tilings(shape, tokens, dtype, iters, tilings, kernel)]
    if swept:
        print(tiling_table(swept))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(), "device":
                       jax.devices()[0].device_kind, "hbm_copy_tbps": tbps, "peak_bf16_tflops": PEAK_BF16_TFLOPS,
                       "rows": rows, "tilings": swept}, f, indent=1)


if __name__ == "__main__":
    main()
