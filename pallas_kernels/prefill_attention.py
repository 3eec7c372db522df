"""Paged causal prefill attention over packed sequences (chunked prefill, prefix-cache hits).

Flash-attention structure: a program owns `block_q` packed query rows of one sequence and one query head and
streams that sequence's K/V `block_kv` tokens at a time through an online softmax (fp32 state, tensor-core dots
in the input dtype). K/V blocks entirely at or before the first row's position run without a mask; only the
diagonal blocks are masked, and blocks after the last row are never visited. With a sliding window the blocks
at its lower edge are masked too, and blocks before every row's window are never visited. The work list (sequence, q
block) is built on the device from q_lens, heaviest blocks first, so its length is static:
min(S * ceil(max_q_len / block_q), ceil(T / block_q) + S). Query heads are the fastest grid axis, so the
programs of one GQA group run together and share K/V through L2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import resolve_impl
from pallas_kernels.reference import check_heads, check_pool, paged_prefill_attention_reference, visible
from pallas_kernels.triton_utils import (
    LOG2E,
    check_pow2_head_dim,
    compiler_params,
    gather_pages,
    init_carry,
    next_pow2,
    online_softmax_step,
    plgpu,
)


def paged_prefill_attention(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int, block_tables: jax.Array,
                            q_start: jax.Array, q_lens: jax.Array, kv_lens: jax.Array, *, scale: float,
                            max_q_len: int, window: int = 0, logit_softcap: float = 0.0,
                            impl: str | None = None) -> jax.Array:
    """Sequence s owns rows [q_start[s], q_start[s] + q_lens[s]) of q [T, Hq, D]; row i sits at position
    p = kv_lens[s] - q_lens[s] + i and attends KV positions up to p (only those > p - window when window > 0),
    each scaled score x capped at logit_softcap * tanh(x / logit_softcap) when logit_softcap > 0.
    Returns [T, Hq, D]; unowned rows are 0."""
    _check_args(q, kv_pool, block_tables, q_start, q_lens, kv_lens, max_q_len)
    impl = resolve_impl(impl, q.shape[-1])
    if impl == "xla":
        return paged_prefill_attention_reference(q, kv_pool, layer, block_tables, q_start, q_lens, kv_lens,
                                                 scale=scale, max_q_len=max_q_len, window=window,
                                                 logit_softcap=logit_softcap)
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    return prefill_pallas(q, kv_pool, i32(layer).reshape(1), i32(block_tables), i32(q_start), i32(q_lens),
                          i32(kv_lens), scale=float(scale), max_q_len=max_q_len, window=int(window),
                          logit_softcap=float(logit_softcap), interpret=impl == "interpret")


def _check_args(q, kv_pool, block_tables, q_start, q_lens, kv_lens, max_q_len) -> None:
    _, _, num_kv_heads, _, head_dim = check_pool(kv_pool)
    if q.ndim != 3 or q.shape[2] != head_dim:
        raise ValueError(f"q must be [T, Hq, {head_dim}], got {q.shape}")
    check_heads(q.shape[1], num_kv_heads)
    if block_tables.ndim != 2:
        raise ValueError(f"block_tables must be [S, max_blocks], got {block_tables.shape}")
    num_seqs = block_tables.shape[0]
    for name, arr in (("q_start", q_start), ("q_lens", q_lens), ("kv_lens", kv_lens)):
        if arr.shape != (num_seqs,):
            raise ValueError(f"{name} must be [{num_seqs}] like block_tables' rows, got {arr.shape}")
    if not isinstance(max_q_len, int) or max_q_len <= 0:
        raise ValueError(f"max_q_len must be a positive Python int, got {max_q_len!r}")


def _work_list(q_lens, kv_lens, num_items: int, block_q: int):
    """(sequence, q block) per program, heaviest first; unused items get block -1."""
    blocks = (q_lens + block_q - 1) // block_q
    ends = jnp.cumsum(blocks)
    item = jnp.arange(num_items)
    # Counting instead of jnp.searchsorted, whose default form is a loop that costs a host round trip per
    # iteration on a GPU (measured ~0.1 ms per call).
    seq = jnp.minimum(jnp.sum(ends[None, :] <= item[:, None], axis=1), q_lens.shape[0] - 1)
    blk = item - (ends[seq] - blocks[seq])
    used = item < ends[-1]
    kv_work = jnp.where(used, kv_lens[seq] - q_lens[seq] + (blk + 1) * block_q, -1)
    order = jnp.argsort(-kv_work)
    return seq[order].astype(jnp.int32), jnp.where(used, blk, -1)[order].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("scale", "max_q_len", "window", "logit_softcap", "interpret",
                                             "block_q", "block_kv", "num_warps", "num_stages"))
def prefill_pallas(q, kv_pool, layer, block_tables, q_start, q_lens, kv_lens, *, scale: float, max_q_len: int,
                   window: int = 0, logit_softcap: float = 0.0, interpret: bool = False,
                   block_q: int | None = None, block_kv: int = 64,
                   num_warps: int = 4, num_stages: int = 3) -> jax.Array:
    """The Pallas path; the tuning knobs are exposed for the benchmark sweep. block_q defaults to 128 rows,
    fewer when no sequence has that many new tokens (Triton's dot needs at least 16)."""
    _, _, num_kv_heads, block_size, head_dim = check_pool(kv_pool)
    check_pow2_head_dim(head_dim)
    num_tokens, num_q_heads, _ = q.shape
    num_seqs, max_blocks = block_tables.shape
    group = check_heads(num_q_heads, num_kv_heads)
    if block_q is None:
        block_q = min(128, max(16, next_pow2(max_q_len)))
    num_items = min(num_seqs * pl.cdiv(max_q_len, block_q), pl.cdiv(num_tokens, block_q) + num_seqs)
    work_seq, work_blk = _work_list(q_lens, kv_lens, num_items, block_q)
    kernel = functools.partial(_prefill_kernel, scale_log2=scale * LOG2E, group=group, block_size=block_size,
                               max_blocks=max_blocks, block_q=block_q, block_kv=block_kv, window=window,
                               softcap=logit_softcap)
    return pl.pallas_call(
        kernel,
        grid=(num_q_heads, num_items),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        input_output_aliases={9: 0},
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
        name="nexus_paged_prefill",
    )(layer, work_seq, work_blk, block_tables, q_start, q_lens, kv_lens, q.astype(kv_pool.dtype), kv_pool,
      jnp.zeros(q.shape, q.dtype))


def _prefill_kernel(layer_ref, work_seq_ref, work_blk_ref, block_tables_ref, q_start_ref, q_lens_ref,
                    kv_lens_ref, q_ref, pool_ref, _zeros_ref, out_ref, *, scale_log2: float, group: int,
                    block_size: int, max_blocks: int, block_q: int, block_kv: int, window: int, softcap: float):
    head, item = pl.program_id(0), pl.program_id(1)
    seq, blk = work_seq_ref[item], work_blk_ref[item]

    @pl.when(blk >= 0)
    def _():
        q_len, kv_len = q_lens_ref[seq], kv_lens_ref[seq]
        prefix = kv_len - q_len
        local = blk * block_q + jnp.arange(block_q)
        row_valid = local < q_len
        rows = q_start_ref[seq] + jnp.minimum(local, q_len - 1)
        q = q_ref[rows, head, :]
        q_pos = prefix + local
        first_pos = prefix + blk * block_q
        last_pos = jnp.minimum(first_pos + block_q, kv_len) - 1
        gather = functools.partial(gather_pages, pool_ref, layer_ref[0], head=lax.div(head, group),
                                   block_table_ref=block_tables_ref, seq=seq, block_size=block_size,
                                   max_blocks=max_blocks)
        offsets = jnp.arange(block_kv)

        def full_step(i, carry):
            pos = i * block_kv + offsets
            return online_softmax_step(q, gather(which=0, pos=pos), gather(which=1, pos=pos), carry, scale_log2,
                                       softcap=softcap)

        def masked_step(i, carry):
            pos = i * block_kv + offsets
            valid = pos < kv_len
            mask = visible(q_pos[:, None], pos[None, :], window) & valid[None, :]
            k, v = gather(which=0, pos=pos, valid=valid), gather(which=1, pos=pos, valid=valid)
            return online_softmax_step(q, k, v, carry, scale_log2, mask=mask, softcap=softcap)

        # KV blocks whose every position is <= first_pos (and, with a window, > last_pos - window) are visible
        # to all rows and run without a mask; the blocks around them that some rows see are masked.
        num_full = lax.div(first_pos + 1, block_kv)
        num_total = lax.div(last_pos + block_kv, block_kv)
        carry = init_carry(block_q, q.shape[1])
        full_lo = 0
        if window:
            # A row whose window starts in a later block than the first row's sees nothing in the first
            # blocks; its all-masked scores are wiped once its first visible key raises its running max.
            lo = lax.div(jnp.maximum(first_pos - window + 1, 0), block_kv)
            full_lo = jnp.clip(lax.div(jnp.maximum(last_pos - window + 1, 0) + block_kv - 1, block_kv), lo, num_full)
            carry = lax.fori_loop(lo, full_lo, masked_step, carry)
        carry = lax.fori_loop(full_lo, num_full, full_step, carry)
        acc, _, l = lax.fori_loop(num_full, num_total, masked_step, carry)
        out = acc / jnp.where(l > 0, l, 1.0)[:, None]
        # Masked stores index every axis with integers (interpret mode cannot mix them with slices).
        dims = jnp.arange(out_ref.shape[-1])[None, :]
        # Rows past q_len point past the end of the output (see kv_write._write_kernel for why).
        rows = jnp.where(row_valid, rows, out_ref.shape[0])
        plgpu.store(out_ref.at[rows[:, None], head, dims], out.astype(out_ref.dtype), mask=row_valid[:, None])
