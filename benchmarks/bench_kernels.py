"""GPU benchmark of the paged-attention kernels: correctness vs the jnp reference, timing, tuning sweeps, and
jax's own shipped kernels for comparison. Prints a Markdown table and writes it (and a log) under --out.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 benchmarks/bench_kernels.py --out $OUT [--json PATH]

Every case is isolated: a failure prints its error and the run goes on. A deadline keeps the whole run inside
the device tool's limit; cases past it are skipped and say so. The exit status is 1 when a case failed (the JSON
lists the failed and skipped cases), so run_all.py does not report a run that measured nothing as completed.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.decode_attention import decode_pallas
from pallas_kernels.prefill_attention import prefill_pallas

HQ, HKV, D, BS = 32, 8, 128, 16
L2_BYTES = 50 << 20
ROWS: list[dict] = []
CLOCK = None  # the run's Clock, set by main; sweeps stop early when it runs low
LOG: list[str] = []
FAILED: list[str] = []   # "case: error" of each case that raised
SKIPPED: list[str] = []  # cases the deadline left out


def say(*parts) -> None:
    line = " ".join(str(p) for p in parts)
    print(line, flush=True)
    LOG.append(line)


class Clock:
    def __init__(self, budget_s: float):
        self.end = time.time() + budget_s

    def left(self) -> float:
        return self.end - time.time()


def timed(fn, arg_sets, iters: int = 30, reps: int = 5) -> float:
    """Median seconds per call over `reps` bursts of `iters` asynchronously dispatched calls."""
    jax.block_until_ready(fn(*arg_sets[0]))
    for i in range(3):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(iters):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def guarded(name: str, clock: Clock, need_s: float = 20.0):
    def wrap(fn):
        @functools.wraps(fn)
        def run(*a, **k):
            if clock.left() < need_s:
                say(f"SKIPPED {name}: deadline ({clock.left():.0f}s left)")
                SKIPPED.append(name)
                return None
            t0 = time.time()
            try:
                return fn(*a, **k)
            except Exception as e:  # a failing case must not hide the others
                say(f"FAILED {name}: {type(e).__name__}: {str(e)[:1500]}")
                FAILED.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
                say(traceback.format_exc()[-3000:])
            finally:
                gc.collect()
                say(f"  ({name} took {time.time() - t0:.1f}s)")
        return run
    return wrap


def row(kernel, case, ms, metric, value, target="", note=""):
    ROWS.append(dict(kernel=kernel, case=case, ms=round(ms, 4), metric=metric, value=round(value, 1),
                     target=target, note=note))
    say(f"| {kernel} | {case} | {ms:.4f} | {metric} {value:.1f} | {target} | {note} |")


# ---- inputs ----------------------------------------------------------------------------------------------------

def num_layers(per_layer_bytes: int) -> int:
    """Layers for the pool: enough to rotate out of L2, and up to 16 so that small kernels can be timed 16 per
    dispatch (see per_layer_calls) within 4 GB."""
    return int(min(32, max(-(-4 * L2_BYTES // per_layer_bytes), min(16, (4 << 30) // per_layer_bytes), 1)))


def per_layer_calls(fn, layers: int):
    """One jitted call running `fn(layer)` once per layer (distinct layers, so XLA cannot merge them): the
    per-kernel time is then free of Python dispatch cost, which otherwise dominates kernels under ~50 us."""
    return jax.jit(lambda *a: [fn(jnp.asarray([i], jnp.int32), *a) for i in range(layers)])


def decode_inputs(key, batch, ctx, *, ragged=False, dtype=jnp.bfloat16):
    pages = -(-ctx // BS)
    layers = num_layers(batch * pages * HKV * BS * D * 2 * 2)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    pool = jax.random.normal(k1, (layers, 2, batch * pages + 1, HKV, BS, D), dtype)
    tables = jax.random.permutation(k2, batch * pages)[:batch * pages].reshape(batch, pages).astype(jnp.int32)
    lens = (jax.random.randint(k3, (batch,), 1, ctx + 1) if ragged else jnp.full((batch,), ctx)).astype(jnp.int32)
    q = jax.random.normal(k4, (batch, HQ, D), dtype)
    return q, pool, tables, lens, layers


def prefill_inputs(key, q_lens, prefixes, *, dtype=jnp.bfloat16):
    kv = [q + p for q, p in zip(q_lens, prefixes)]
    pages = -(-max(kv) // BS)
    layers = num_layers(len(q_lens) * pages * HKV * BS * D * 2 * 2)
    k1, k2, k3 = jax.random.split(key, 3)
    pool = jax.random.normal(k1, (layers, 2, len(q_lens) * pages + 1, HKV, BS, D), dtype)
    tables = jax.random.permutation(k2, len(q_lens) * pages).reshape(len(q_lens), pages).astype(jnp.int32)
    q = jax.random.normal(k3, (sum(q_lens), HQ, D), dtype)
    i32 = lambda x: jnp.asarray(x, jnp.int32)  # noqa: E731
    q_start = i32(np.concatenate([[0], np.cumsum(q_lens)[:-1]]))
    return q, pool, tables, q_start, i32(q_lens), i32(kv), layers


def prefill_flops(q_lens, prefixes) -> float:
    keys_seen = sum(q * p + q * (q + 1) / 2 for q, p in zip(q_lens, prefixes))
    return 4.0 * HQ * D * keys_seen


# ---- cases -----------------------------------------------------------------------------------------------------

def check_correctness(key):
    q, pool, tables, lens, _ = decode_inputs(key, 64, 2048, ragged=True)
    lens = lens.at[5].set(0)
    want = pk.paged_decode_attention(q, pool, 0, tables, lens, scale=D ** -0.5, impl="xla")
    for splits in (None, 1, 3):
        got = decode_pallas(q, pool, jnp.asarray([0], jnp.int32), tables, lens, scale=D ** -0.5, num_splits=splits)
        say(f"decode 64x<=2048 ragged splits={splits}: rel err {rel_err(got, want):.2e}")
    q1, pool1, tables1, lens1, _ = decode_inputs(key, 3, 8192, ragged=True)
    got = pk.paged_decode_attention(q1, pool1, 0, tables1, lens1, scale=D ** -0.5, impl="pallas")
    want = pk.paged_decode_attention(q1, pool1, 0, tables1, lens1, scale=D ** -0.5, impl="xla")
    say(f"decode 3x<=8192 ragged auto: rel err {rel_err(got, want):.2e}")
    for q_lens, prefixes in (([1000, 37, 300, 0], [0, 500, 2000, 0]), ([2048], [0])):
        q, pool, tables, q_start, ql, kvl, _ = prefill_inputs(key, q_lens, prefixes)
        args = (q, pool, 0, tables, q_start, ql, kvl)
        got = pk.paged_prefill_attention(*args, scale=D ** -0.5, max_q_len=max(q_lens), impl="pallas")
        want = pk.paged_prefill_attention(*args, scale=D ** -0.5, max_q_len=max(q_lens), impl="xla")
        say(f"prefill q_lens={q_lens} prefixes={prefixes}: rel err {rel_err(got, want):.2e}")
    k = jax.random.normal(key, (300, HKV, D), jnp.bfloat16)
    slots = jax.random.permutation(key, 64 * BS)[:300].astype(jnp.int32).at[::7].set(-1)
    pool = jnp.zeros((2, 2, 64, HKV, BS, D), jnp.bfloat16)
    same = bool(jnp.array_equal(pk.write_kv(pool, 1, k, -k, slots, impl="pallas"),
                                pk.write_kv(pool, 1, k, -k, slots, impl="xla")))
    say(f"write_kv 300 tokens with padding: identical to reference: {same}")


def bench_decode(key, batch, ctx, *, sweep=(), label="pallas", **knobs):
    q, pool, tables, lens, layers = decode_inputs(key, batch, ctx)
    nbytes = batch * ctx * HKV * D * 2 * 2 + 2 * q.size * 2
    best = None
    for cfg in [knobs, *sweep]:
        if best is not None and CLOCK.left() < 40:
            say("  sweep cut short by the deadline")
            break
        kernel = functools.partial(decode_pallas, scale=D ** -0.5, **cfg)
        fn = per_layer_calls(lambda layer, q, pool, tables, lens: kernel(q, pool, layer, tables, lens), layers)
        ms = timed(fn, [(q, pool, tables, lens)], iters=10) * 1e3 / layers
        tbs = nbytes / ms / 1e9
        say(f"  decode B={batch} ctx={ctx} {cfg}: {ms:.4f} ms {tbs:.2f} TB/s")
        if best is None or ms < best[0]:
            best = (ms, cfg)
    ms, cfg = best
    row(label, f"decode B={batch} ctx={ctx}", ms, "TB/s", nbytes / ms / 1e9,
        ">=2.4" if (batch, ctx) == (64, 2048) else "", str(cfg))
    return q, pool, tables, lens


def bench_decode_baselines(key):
    q, pool, tables, lens, _ = decode_inputs(key, 64, 2048)
    nbytes = 64 * 2048 * HKV * D * 2 * 2 + 2 * q.size * 2
    fn = jax.jit(functools.partial(pk.paged_decode_attention, scale=D ** -0.5, impl="xla"))
    ms = timed(fn, [(q, pool, 0, tables, lens)], iters=10, reps=3) * 1e3
    row("xla reference", "decode B=64 ctx=2048", ms, "TB/s", nbytes / ms / 1e9, "", "gather + dense")
    from jax.experimental.pallas.ops.gpu import paged_attention as jpa
    k_pages = pool[0, 0].transpose(1, 0, 2, 3)  # [Hkv, pages, page, D]
    v_pages = pool[0, 1].transpose(1, 0, 2, 3)
    fn = jax.jit(jpa.paged_attention)
    ms = timed(fn, [(q, k_pages, v_pages, tables, lens)]) * 1e3
    row("jax paged_attention", "decode B=64 ctx=2048", ms, "TB/s", nbytes / ms / 1e9, "", "defaults")


def bench_prefill(key, q_lens, prefixes, *, sweep=(), label="pallas", **knobs):
    q, pool, tables, q_start, ql, kvl, layers = prefill_inputs(key, q_lens, prefixes)
    flops = prefill_flops(q_lens, prefixes)
    best = None
    for cfg in [knobs, *sweep]:
        if best is not None and CLOCK.left() < 40:
            say("  sweep cut short by the deadline")
            break
        kernel = functools.partial(prefill_pallas, scale=D ** -0.5, max_q_len=max(q_lens), **cfg)
        fn = per_layer_calls(lambda layer, *a: kernel(a[0], a[1], layer, *a[2:]), layers)
        ms = timed(fn, [(q, pool, tables, q_start, ql, kvl)], iters=10) * 1e3 / layers
        say(f"  prefill {len(q_lens)} seqs {cfg}: {ms:.4f} ms {flops / ms / 1e9:.1f} TF/s")
        if best is None or ms < best[0]:
            best = (ms, cfg)
    ms, cfg = best
    case = f"prefill q={q_lens[:4]}{'...' if len(q_lens) > 4 else ''} prefix={prefixes[:4]}"
    row(label, case, ms, "TF/s", flops / ms / 1e9, ">=350" if q_lens == [8192] else "", str(cfg))


def bench_dense_baselines(key, seq=8192):
    k1, k2, k3 = jax.random.split(key, 3)
    q = jax.random.normal(k1, (1, seq, HQ, D), jnp.bfloat16)
    k = jax.random.normal(k2, (1, seq, HKV, D), jnp.bfloat16)
    v = jax.random.normal(k3, (1, seq, HKV, D), jnp.bfloat16)
    flops = 2.0 * seq * seq * HQ * D
    baselines = {
        "cudnn dot_product_attention": lambda: jax.jit(functools.partial(
            jax.nn.dot_product_attention, is_causal=True, implementation="cudnn")),
        "jax attention_mgpu": lambda: _mgpu_attention(),
        "jax attention (triton mha)": lambda: _triton_mha(),
    }
    for name, make in baselines.items():
        try:
            fn = make()
            qq, kk, vv = q, k, v
            if "triton" in name:  # no GQA there
                kk, vv = jnp.repeat(k, HQ // HKV, 2), jnp.repeat(v, HQ // HKV, 2)
            if "mgpu" in name:  # its fp32->input cast is written for fp16
                qq, kk, vv = (x.astype(jnp.float16) for x in (q, k, v))
            ms = timed(fn, [(qq, kk, vv)], iters=10) * 1e3
            row(name, f"dense causal S={seq}", ms, "TF/s", flops / ms / 1e9, "", "contiguous KV")
        except Exception as e:
            say(f"FAILED {name}: {type(e).__name__}: {str(e)[:600]}")


def _mgpu_attention():
    from jax.experimental.pallas.ops.gpu import attention_mgpu as am
    cfg = am.TuningConfig(block_q=128, block_kv=128, max_concurrent_steps=2, causal=True)
    return jax.jit(lambda q, k, v: am.attention(q, k, v, cfg))


def _triton_mha():
    from jax.experimental.pallas.ops.gpu import attention as ta
    return jax.jit(lambda q, k, v: ta.mha(q, k, v, None, sm_scale=D ** -0.5, causal=True))


def bench_write(key, tokens, layers=16):
    pool = jnp.zeros((layers, 2, tokens // BS + 8, HKV, BS, D), jnp.bfloat16)
    k, v = jax.random.normal(key, (2, tokens, HKV, D), jnp.bfloat16)
    slots = jax.random.permutation(key, tokens).astype(jnp.int32)
    nbytes = 2 * 2 * k.size * 2  # read k, v and write them

    def all_layers(write, pool, k, v, slots):  # one dispatch writing every layer, as a model step does
        for i in range(layers):
            pool = write(pool, jnp.int32(i), k, v, slots)
        return pool

    for impl in ("pallas", "xla"):
        fn = jax.jit(functools.partial(all_layers, functools.partial(pk.write_kv, impl=impl)), donate_argnums=0)
        ptr = pool.unsafe_buffer_pointer()
        pool = fn(pool, k, v, slots)
        in_place = pool.unsafe_buffer_pointer() == ptr
        t0 = time.perf_counter()
        iters = 20
        for _ in range(iters):
            pool = fn(pool, k, v, slots)
        jax.block_until_ready(pool)
        ms = (time.perf_counter() - t0) / iters / layers * 1e3
        row(f"write_kv {impl}", f"T={tokens}", ms, "GB/s", nbytes / ms / 1e6, "", f"donated pool reused: {in_place}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_out")
    parser.add_argument("--budget", type=float, default=430.0, help="seconds before remaining cases are skipped")
    parser.add_argument("--sweep", action="store_true", help="tuning sweeps of block sizes / warps / stages")
    parser.add_argument("--copy-mb", type=int, default=8 << 10, help="bytes the HBM copy bandwidth is measured "
                        "over (MiB; the default 8 GiB suits a GPU, not a CPU run's host memory)")
    parser.add_argument("--json", default=None, help="also write the rows, device, date and the HBM copy "
                        "bandwidth measured in this run (the memory roofline) here, for run_all.py")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    global CLOCK
    clock = CLOCK = Clock(args.budget)
    dev = jax.devices()[0]
    say(f"device: {dev.device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    key = jax.random.key(0)

    guarded("correctness", clock)(check_correctness)(key)
    decode_sweep = [dict(block_tokens=bt, num_warps=w, num_stages=st)
                    for bt in (32, 64, 128) for w in (2, 4) for st in (3, 4)] if args.sweep else []
    guarded("decode main", clock)(bench_decode)(key, 64, 2048, sweep=decode_sweep)
    prefill_sweep = [dict(block_q=bq, block_kv=bk, num_warps=w, num_stages=st)
                     for bq, bk, w, st in ((128, 64, 4, 4), (128, 64, 4, 2), (128, 32, 4, 3), (128, 128, 8, 3),
                                           (64, 64, 4, 3), (128, 128, 4, 3))] if args.sweep else []
    guarded("prefill main", clock, 40)(bench_prefill)(key, [8192], [0], sweep=prefill_sweep)
    guarded("decode baselines", clock)(bench_decode_baselines)(key)
    guarded("dense baselines", clock, 40)(bench_dense_baselines)(key)
    for batch in (1, 8, 64, 256):
        for ctx in (512, 2048, 8192):
            if (batch, ctx) != (64, 2048):
                splits = (1, 2, 4, 8, 16, 32) if batch <= 8 else (1, 2, 4)
                sweep = [dict(num_splits=n) for n in splits] if args.sweep and batch <= 64 else []
                guarded(f"decode {batch}x{ctx}", clock)(bench_decode)(key, batch, ctx, sweep=sweep)
    prefill_sweep = [dict(num_warps=8), dict(block_kv=128, num_warps=8), dict(block_q=64)] if args.sweep else []
    for q_lens, prefixes in (([1024] * 8, [0, 512, 1024, 1536, 2048, 2560, 3072, 3584]), ([256] * 32, [1024] * 32),
                             ([2048], [6144]), ([64] * 16, [0] * 16)):
        guarded(f"prefill {len(q_lens)} seqs", clock)(bench_prefill)(key, q_lens, prefixes, sweep=prefill_sweep)
    for tokens in (64, 8192):
        guarded(f"write_kv {tokens}", clock)(bench_write)(key, tokens)

    table = ["| kernel | case | ms | result | target | note |", "|---|---|---|---|---|---|"]
    table += [f"| {r['kernel']} | {r['case']} | {r['ms']:.4f} | {r['metric']} {r['value']} | {r['target']} | "
              f"{r['note']} |" for r in ROWS]
    say("\n" + "\n".join(table))
    (out / "kernels_table.md").write_text("\n".join(table) + "\n")
    (out / "kernels_rows.json").write_text(json.dumps(ROWS, indent=1))
    (out / "bench_log.txt").write_text("\n".join(LOG) + "\n")
    if args.json:
        from benchmarks.bench_model import hbm_copy_tbps
        doc = {"device": dev.device_kind, "jax": jax.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "hbm_copy_tbps": hbm_copy_tbps(args.copy_mb << 20), "peak_bf16_tflops": 989.0, "rows": ROWS,
               "table": "\n".join(table), "failed": FAILED, "skipped": SKIPPED}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=1))
    if FAILED:
        say(f"{len(FAILED)} case(s) failed: {', '.join(f.split(':')[0] for f in FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
