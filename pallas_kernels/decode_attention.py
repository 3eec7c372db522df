"""Paged decode attention (one query token per sequence) with split-K ("flash decoding").

Grid (batch, kv head, split): a program owns one GQA group, so each K/V token is read once for all query
heads that share it, and walks its split's token range `block_tokens` tokens per step, gathering whichever
pages those tokens live on. Splits write a normalised partial output and its log-sum-exp; a small jnp
epilogue merges them. The number of splits is chosen from the shapes so that about two waves of programs
fill the GPU even at batch 1. With a sliding window a program starts at the window's first token, so the
tokens before it are never read (splits wholly before it end empty).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import resolve_impl
from pallas_kernels.reference import check_heads, check_pool, paged_decode_attention_reference
from pallas_kernels.triton_utils import (
    LOG2E,
    check_pow2_head_dim,
    compiler_params,
    gather_pages,
    init_carry,
    next_pow2,
    num_sms,
    online_softmax_step,
)

# Triton's tensor-core dot needs at least 16 rows, so a GQA group is padded to 16 query rows.
_MIN_ROWS = 16


def paged_decode_attention(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int, block_tables: jax.Array,
                           context_lens: jax.Array, *, scale: float, window: int = 0, logit_softcap: float = 0.0,
                           impl: str | None = None) -> jax.Array:
    """q [B, Hq, D] attends the first context_lens[b] tokens of its pages, only the last `window` of them when
    window > 0 (sliding-window attention), each scaled score x capped at logit_softcap * tanh(x / logit_softcap)
    when logit_softcap > 0; returns [B, Hq, D] in q's dtype. context_lens[b] == 0 marks a padding row and gives
    zeros."""
    _check_args(q, kv_pool, block_tables, context_lens)
    impl = resolve_impl(impl, q.shape[-1])
    if impl == "xla":
        return paged_decode_attention_reference(q, kv_pool, layer, block_tables, context_lens, scale=scale,
                                                window=window, logit_softcap=logit_softcap)
    return decode_pallas(q, kv_pool, jnp.asarray(layer, jnp.int32).reshape(1), block_tables.astype(jnp.int32),
                         context_lens.astype(jnp.int32), scale=float(scale), window=int(window),
                         logit_softcap=float(logit_softcap), interpret=impl == "interpret")


def _check_args(q, kv_pool, block_tables, context_lens) -> None:
    _, _, num_kv_heads, _, head_dim = check_pool(kv_pool)
    if q.ndim != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [B, Hq, {head_dim}], got {q.shape}")
    check_heads(q.shape[1], num_kv_heads)
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables must be [{q.shape[0]}, max_blocks], got {block_tables.shape}")
    if context_lens.shape != (q.shape[0],):
        raise ValueError(f"context_lens must be [{q.shape[0]}], got {context_lens.shape}")


def choose_splits(batch: int, num_kv_heads: int, max_tokens: int, block_tokens: int) -> int:
    """Splits per sequence: enough programs for ~2 waves on the GPU, each split at least 2 steps long."""
    wanted = pl.cdiv(2 * num_sms(), batch * num_kv_heads)
    return max(1, min(wanted, max_tokens // (2 * block_tokens)))


@functools.partial(jax.jit, static_argnames=("scale", "window", "logit_softcap", "interpret", "num_splits",
                                             "block_tokens", "num_warps", "num_stages"))
def decode_pallas(q, kv_pool, layer, block_tables, context_lens, *, scale: float, window: int = 0,
                  logit_softcap: float = 0.0, interpret: bool = False,
                  num_splits: int | None = None, block_tokens: int = 64, num_warps: int = 4,
                  num_stages: int = 3) -> jax.Array:
    """The Pallas path; the tuning knobs are exposed for the benchmark sweep."""
    _, _, num_kv_heads, block_size, head_dim = check_pool(kv_pool)
    check_pow2_head_dim(head_dim)
    batch, num_q_heads, _ = q.shape
    group = check_heads(num_q_heads, num_kv_heads)
    rows = max(_MIN_ROWS, next_pow2(group))
    max_blocks = block_tables.shape[1]
    max_tokens = max_blocks * block_size
    block_tokens = min(block_tokens, max(_MIN_ROWS, next_pow2(max_tokens)))
    if num_splits is None:
        num_splits = choose_splits(batch, num_kv_heads, max_tokens, block_tokens)
    split_tokens = pl.cdiv(pl.cdiv(max_tokens, num_splits), block_tokens) * block_tokens
    num_splits = pl.cdiv(max_tokens, split_tokens)

    qg = q.astype(kv_pool.dtype).reshape(batch, num_kv_heads, group, head_dim)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    part_dtype = q.dtype if num_splits == 1 else jnp.float32
    kernel = functools.partial(_decode_kernel, scale_log2=scale * LOG2E, block_size=block_size,
                               max_blocks=max_blocks, block_tokens=block_tokens, split_tokens=split_tokens,
                               window=window, softcap=logit_softcap)
    out, lse = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec,
                  pl.BlockSpec((None, None, rows, head_dim), lambda b, h, s: (b, h, 0, 0)),
                  pl.no_block_spec],
        out_specs=[pl.BlockSpec((None, None, None, rows, head_dim), lambda b, h, s: (s, b, h, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (s, b, h, 0))],
        out_shape=[jax.ShapeDtypeStruct((num_splits, batch, num_kv_heads, rows, head_dim), part_dtype),
                   jax.ShapeDtypeStruct((num_splits, batch, num_kv_heads, rows), jnp.float32)],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="nexus_paged_decode",
    )(layer, block_tables, context_lens, qg, kv_pool)
    out = _merge_splits(out, lse) if num_splits > 1 else out[0]
    return out[:, :, :group].reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def _merge_splits(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Combines per-split normalised outputs [S, ...,  D] by their log2-sum-exp [S, ...]; empty splits weigh 0."""
    top = lse.max(axis=0)
    weight = jnp.exp2(lse - jnp.where(top > -jnp.inf, top, 0.0))
    total = weight.sum(axis=0)
    merged = (weight[..., None] * out).sum(axis=0)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]


def _decode_kernel(layer_ref, block_tables_ref, context_lens_ref, q_ref, pool_ref, out_ref, lse_ref, *,
                   scale_log2: float, block_size: int, max_blocks: int, block_tokens: int, split_tokens: int,
                   window: int, softcap: float):
    seq, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    context_len = context_lens_ref[seq]
    start = split * split_tokens
    end = jnp.minimum(context_len, start + split_tokens)
    if window:
        # Positions before the window are never loaded: a split wholly before it stays empty (and weighs 0).
        start = jnp.maximum(start, context_len - window)
    q = q_ref[...]
    offsets = jnp.arange(block_tokens)
    gather = functools.partial(gather_pages, pool_ref, layer, head=head, block_table_ref=block_tables_ref,
                               seq=seq, block_size=block_size, max_blocks=max_blocks)

    def step(i, carry):
        pos = start + i * block_tokens + offsets
        valid = pos < end
        k = gather(which=0, pos=pos, valid=valid)
        v = gather(which=1, pos=pos, valid=valid)
        return online_softmax_step(q, k, v, carry, scale_log2, mask=valid[None, :], softcap=softcap)

    steps = lax.div(jnp.maximum(end - start, 0) + block_tokens - 1, block_tokens)
    acc, m, l = lax.fori_loop(0, steps, step, init_carry(q.shape[0], q.shape[1]))
    nonempty = l > 0
    out_ref[...] = (acc / jnp.where(nonempty, l, 1.0)[:, None]).astype(out_ref.dtype)
    lse_ref[...] = jnp.where(nonempty, m + jnp.log2(jnp.where(nonempty, l, 1.0)), -jnp.inf)
