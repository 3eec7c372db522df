"""Pieces shared by the Pallas (Triton lowering) kernels: paged K/V gathers and the online-softmax step."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.backend import pallas_supports_head_dim

with warnings.catch_warnings():
    # jax >= 0.11 warns that the Triton lowering is deprecated; it still works there (see KERNELS.md). A jax
    # without it must still import this package for the XLA path; backend.resolve_impl then never picks Pallas.
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        from jax.experimental.pallas import triton as plgpu
    except ImportError:
        plgpu = None

LOG2E = math.log2(math.e)
# Finite stand-in for -inf: keeps exp2(masked - max) at 0 without inf - inf = nan.
MASK_VALUE = -1e30


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def check_pow2_head_dim(head_dim: int) -> None:
    if not pallas_supports_head_dim(head_dim):
        raise ValueError(f"the Pallas kernels need a power-of-two head_dim >= 16, got {head_dim}; use impl='xla'")


def gather_pages(pool_ref, layer, which: int, head, block_table_ref, seq, pos, *, block_size: int,
                 max_blocks: int, valid=None):
    """Loads K (which=0) or V (which=1) of one kv head at token positions `pos` [N] -> [N, D].

    Every token gets its own pool address (block from the block table, offset inside the block), so one load
    covers many pages at once whatever the page size. Positions past the table are clamped (and must be
    masked by the caller); `valid` masks the block-table read so no padding entry is trusted.
    """
    page = jnp.minimum(lax.div(pos, block_size), max_blocks - 1)
    if valid is None:
        block = block_table_ref[seq, page]
    else:
        block = plgpu.load(block_table_ref.at[seq, page], mask=valid, other=0)
    return pool_ref[layer, which, block, head, lax.rem(pos, block_size), :]


def online_softmax_step(q, k, v, carry, scale_log2: float, mask=None, softcap: float = 0.0):
    """One flash-attention step: q [M, D], k/v [N, D], carry (acc [M, D] f32, m [M], l [M]) in log2 units.
    softcap > 0 caps each scaled score x at softcap * tanh(x / softcap) (Gemma 2's attention soft-capping)."""
    acc, m, l = carry
    s = plgpu.dot(q, k, trans_b=True) * scale_log2
    if softcap:
        # s is x * log2(e), so capping x is capping s at softcap * log2(e).
        s = (softcap * LOG2E) * jnp.tanh(s / (softcap * LOG2E))
    if mask is not None:
        s = jnp.where(mask, s, MASK_VALUE)
    m_new = jnp.maximum(m, s.max(axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = l * alpha + p.sum(axis=1)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_new, l


def init_carry(rows: int, head_dim: int):
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))


def num_sms() -> int:
    """Streaming multiprocessors of the default GPU (132 on an H100 SXM when the runtime does not say)."""
    return int(getattr(jax.devices()[0], "core_count", 0) or 132)
