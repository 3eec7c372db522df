"""Writes new tokens' K/V into the paged pool, in place when the caller donates the pool."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.backend import resolve_impl
from pallas_kernels.reference import check_pool, check_write_args, write_kv_reference
from pallas_kernels.triton_utils import check_pow2_head_dim, compiler_params, next_pow2, plgpu

_BLOCK_TOKENS = 64


def write_kv(kv_pool: jax.Array, layer: jax.Array | int, k: jax.Array, v: jax.Array, slot_mapping: jax.Array,
             *, impl: str | None = None) -> jax.Array:
    """Stores k, v [T, Hkv, D] at slot_mapping [T] (block * block_size + offset; < 0 = padding, skipped) of
    `layer`; returns the updated pool [L, 2, num_blocks, Hkv, block_size, D]."""
    impl = resolve_impl(impl, kv_pool.shape[-1])
    if impl == "xla":
        return write_kv_reference(kv_pool, layer, k, v, slot_mapping)
    return _write_kv_pallas(kv_pool, jnp.asarray(layer, jnp.int32).reshape(1), k, v,
                            slot_mapping.astype(jnp.int32), interpret=impl == "interpret")


# No donation here: a caller that wants the update in place jits its step with the pool donated, and the
# input_output_aliases below then writes straight into it.
@functools.partial(jax.jit, static_argnames=("interpret",))
def _write_kv_pallas(kv_pool, layer, k, v, slot_mapping, *, interpret: bool):
    check_write_args(kv_pool, k, v, slot_mapping)
    _, num_blocks, num_kv_heads, block_size, head_dim = check_pool(kv_pool)
    check_pow2_head_dim(head_dim)
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return kv_pool
    block_tokens = min(_BLOCK_TOKENS, next_pow2(num_tokens))
    kernel = functools.partial(_write_kernel, num_tokens=num_tokens, block_tokens=block_tokens,
                               block_size=block_size, num_blocks=num_blocks)
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(num_tokens, block_tokens), num_kv_heads),
        out_shape=jax.ShapeDtypeStruct(kv_pool.shape, kv_pool.dtype),
        input_output_aliases={4: 0},
        compiler_params=compiler_params(num_warps=4, num_stages=1),
        interpret=interpret,
        name="nexus_write_kv",
    )(layer, slot_mapping, k.astype(kv_pool.dtype), v.astype(kv_pool.dtype), kv_pool)


def _write_kernel(layer_ref, slot_ref, k_ref, v_ref, _pool_in_ref, pool_ref, *, num_tokens: int,
                  block_tokens: int, block_size: int, num_blocks: int):
    head = pl.program_id(1)
    rows = pl.program_id(0) * block_tokens + jnp.arange(block_tokens)
    in_range = rows < num_tokens
    rows = jnp.minimum(rows, num_tokens - 1)
    slot = plgpu.load(slot_ref.at[rows], mask=in_range, other=-1)
    # Slots outside the pool would corrupt other memory, so they are skipped like padding.
    store = (slot >= 0) & (slot < num_blocks * block_size)
    # Skipped lanes point one block past the pool: never touched by the GPU (masked) and dropped by interpret
    # mode, which would otherwise write their stale value over a real lane sharing the address.
    block = jnp.where(store, lax.div(slot, block_size), num_blocks)
    offset = jnp.where(store, lax.rem(slot, block_size), 0)
    layer = layer_ref[0]
    # Masked stores index every axis with integers (interpret mode cannot mix them with slices).
    dims = jnp.arange(pool_ref.shape[-1])[None, :]
    block, offset, mask = block[:, None], offset[:, None], store[:, None]
    plgpu.store(pool_ref.at[layer, 0, block, head, offset, dims], k_ref[rows, head, :], mask=mask)
    plgpu.store(pool_ref.at[layer, 1, block, head, offset, dims], v_ref[rows, head, :], mask=mask)
