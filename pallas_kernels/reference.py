"""Pure-jnp paged KV write and paged attention: the XLA fallback path and the oracle for the Pallas kernels.

Pool layout (shared contract): kv_pool[num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim], axis 1
is K (0) / V (1); a token's slot is block_id * block_size + offset. Attention gathers each sequence's pages
into a dense [Hkv, max_blocks * block_size, D] view and runs masked dense attention, which is what a CPU
wants for small models and what XLA on a GPU does reasonably without a custom kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG_INF = -1e30


def check_pool(kv_pool: jax.Array) -> tuple[int, int, int, int, int]:
    """Returns (num_layers, num_blocks, num_kv_heads, block_size, head_dim) or raises on a malformed pool."""
    if kv_pool.ndim != 6 or kv_pool.shape[1] != 2:
        raise ValueError(
            f"kv_pool must be [num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim], got {kv_pool.shape}")
    num_layers, _, num_blocks, num_kv_heads, block_size, head_dim = kv_pool.shape
    return num_layers, num_blocks, num_kv_heads, block_size, head_dim


def check_heads(num_q_heads: int, num_kv_heads: int) -> int:
    """Returns the GQA group size (query heads per kv head)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of kv heads ({num_kv_heads})")
    return num_q_heads // num_kv_heads


def check_write_args(kv_pool: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> None:
    _, _, num_kv_heads, _, head_dim = check_pool(kv_pool)
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"k and v must both be [T, {num_kv_heads}, {head_dim}], got {k.shape} and {v.shape}")
    if slot_mapping.shape != k.shape[:1]:
        raise ValueError(f"slot_mapping must be [{k.shape[0]}], got {slot_mapping.shape}")


def write_kv_reference(kv_pool: jax.Array, layer: jax.Array | int, k: jax.Array, v: jax.Array,
                       slot_mapping: jax.Array) -> jax.Array:
    """Scatters k, v [T, Hkv, D] into the pool at slot_mapping [T]; negative slots are padding and skipped."""
    check_write_args(kv_pool, k, v, slot_mapping)
    _, num_blocks, num_kv_heads, block_size, head_dim = check_pool(kv_pool)
    slot = slot_mapping.astype(jnp.int32)
    # Padding goes to block index num_blocks, which is out of range and dropped by the scatter (a negative
    # index would wrap around instead).
    block = jnp.where(slot >= 0, slot // block_size, num_blocks)
    offset = jnp.where(slot >= 0, slot % block_size, 0)
    heads = jnp.arange(num_kv_heads)
    kv = jnp.stack([k, v]).astype(kv_pool.dtype)  # [2, T, Hkv, D]
    # All advanced indices are adjacent, so the indexed shape is [2, T, Hkv, D] like `kv`.
    return kv_pool.at[layer, jnp.arange(2)[:, None, None], block[None, :, None], heads[None, None, :],
                      offset[None, :, None]].set(kv, mode="drop")


def gather_sequence_kv(kv_pool: jax.Array, layer: jax.Array | int,
                       block_tables: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns K and V of each sequence as dense [S, Hkv, max_blocks * block_size, D] arrays."""
    _, _, num_kv_heads, block_size, head_dim = check_pool(kv_pool)
    num_seqs, max_blocks = block_tables.shape
    # layer and block_tables are advanced indices split by a slice, so their dims lead: [S, nb, 2, Hkv, bs, D].
    pages = kv_pool[layer, :, block_tables]
    pages = pages.transpose(2, 0, 3, 1, 4, 5).reshape(2, num_seqs, num_kv_heads, max_blocks * block_size, head_dim)
    return pages[0], pages[1]


def _masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
                      logit_softcap: float = 0.0) -> jax.Array:
    """q [S, Hkv, G, Q, D], k/v [S, Hkv, N, D], mask [S, Q, N] -> fp32 [S, Hkv, G, Q, D]; fully masked rows -> 0.
    logit_softcap > 0 caps each scaled score x at logit_softcap * tanh(x / logit_softcap) before the mask."""
    scores = jnp.einsum("shgqd,shnd->shgqn", q, k, preferred_element_type=jnp.float32) * scale
    if logit_softcap:
        scores = logit_softcap * jnp.tanh(scores / logit_softcap)
    mask = mask[:, None, None]
    scores = jnp.where(mask, scores, _NEG_INF)
    probs = jnp.exp(scores - scores.max(axis=-1, keepdims=True))
    probs = jnp.where(mask, probs, 0.0)
    denom = probs.sum(axis=-1, keepdims=True)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    return jnp.einsum("shgqn,shnd->shgqd", probs, v.astype(jnp.float32))


def visible(query_pos: jax.Array, kv_pos: jax.Array, window: int) -> jax.Array:
    """Whether a query at query_pos sees the key at kv_pos: causal, and with window > 0 only the `window` latest
    positions (kv_pos > query_pos - window, as transformers' sliding-window mask has it)."""
    seen = kv_pos <= query_pos
    return seen & (kv_pos > query_pos - window) if window else seen


def paged_decode_attention_reference(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                                     block_tables: jax.Array, context_lens: jax.Array, *,
                                     scale: float, window: int = 0, logit_softcap: float = 0.0) -> jax.Array:
    """One query token per sequence: q [B, Hq, D] attends the first context_lens[b] tokens of its pages (the
    last `window` of them when window > 0), scores soft-capped at logit_softcap when > 0."""
    _, _, num_kv_heads, block_size, head_dim = check_pool(kv_pool)
    batch, num_q_heads, _ = q.shape
    group = check_heads(num_q_heads, num_kv_heads)
    k, v = gather_sequence_kv(kv_pool, layer, block_tables)
    positions = jnp.arange(k.shape[2])
    mask = visible(context_lens[:, None] - 1, positions[None, :], window)[:, None, :]  # [B, 1, N]
    qg = q.reshape(batch, num_kv_heads, group, 1, head_dim)
    out = _masked_attention(qg, k, v, mask, scale, logit_softcap)
    return out.reshape(batch, num_q_heads, head_dim).astype(q.dtype)


def paged_prefill_attention_reference(q: jax.Array, kv_pool: jax.Array, layer: jax.Array | int,
                                      block_tables: jax.Array, q_start: jax.Array, q_lens: jax.Array,
                                      kv_lens: jax.Array, *, scale: float, max_q_len: int,
                                      window: int = 0, logit_softcap: float = 0.0) -> jax.Array:
    """Causal attention of packed new tokens q [T, Hq, D] over their sequences' cached prefix and themselves
    (over the last `window` positions up to each token when window > 0)."""
    _, _, num_kv_heads, block_size, head_dim = check_pool(kv_pool)
    num_tokens, num_q_heads, _ = q.shape
    num_seqs = block_tables.shape[0]
    group = check_heads(num_q_heads, num_kv_heads)
    k, v = gather_sequence_kv(kv_pool, layer, block_tables)
    # Gather each sequence's rows into a dense [S, max_q_len] tile; rows past q_lens[s] point past the end.
    local = jnp.arange(max_q_len)
    valid_row = local[None, :] < q_lens[:, None]
    rows = jnp.where(valid_row, q_start[:, None] + local[None, :], num_tokens)
    qs = jnp.take(q, rows, axis=0, mode="fill", fill_value=0)  # [S, Q, Hq, D]
    qs = qs.reshape(num_seqs, max_q_len, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    query_pos = (kv_lens - q_lens)[:, None] + local[None, :]  # absolute position of each row
    kv_pos = jnp.arange(k.shape[2])
    mask = visible(query_pos[:, :, None], kv_pos[None, None, :], window) & valid_row[:, :, None]
    out = _masked_attention(qs, k, v, mask, scale, logit_softcap)  # [S, Hkv, G, Q, D]
    out = out.transpose(0, 3, 1, 2, 4).reshape(num_seqs * max_q_len, num_q_heads, head_dim)
    result = jnp.zeros((num_tokens, num_q_heads, head_dim), q.dtype)
    return result.at[rows.reshape(-1)].set(out.astype(q.dtype), mode="drop")
