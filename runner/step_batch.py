"""The device-side description of one model step, and its host-side builder with shape bucketing.

A step packs decode tokens first (one per sequence) and then the prefill chunks of other sequences back to back.
Every dimension is padded up to a power-of-two bucket so that few shapes, hence few compilations, occur.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import struct


@struct.dataclass
class StepBatch:
    tokens: jax.Array                 # [num_decode + num_prefill_tokens] int32
    positions: jax.Array              # same shape: absolute position of each token
    slot_mapping: jax.Array           # same shape: KV slot to write, -1 for padding
    decode_block_tables: jax.Array    # [num_decode, max_blocks]
    decode_context_lens: jax.Array    # [num_decode]: KV length including this token, 0 for padding rows
    prefill_block_tables: jax.Array   # [num_prefill_seqs, max_blocks]
    prefill_q_start: jax.Array        # [num_prefill_seqs]: first row in the prefill segment
    prefill_q_lens: jax.Array         # [num_prefill_seqs]: new tokens, 0 for padding entries
    prefill_kv_lens: jax.Array        # [num_prefill_seqs]: cached prefix + new tokens
    logits_indices: jax.Array         # [num_decode + num_prefill_seqs]: rows whose logits are wanted
    num_decode: int = struct.field(pytree_node=False, default=0)
    num_prefill_tokens: int = struct.field(pytree_node=False, default=0)
    max_q_len: int = struct.field(pytree_node=False, default=0)


@dataclasses.dataclass
class SeqChunk:
    """Tokens of one sequence to run this step: one for a decode, a prompt chunk for a prefill."""
    token_ids: list[int]
    start_pos: int          # tokens of this sequence already in the KV pool
    block_table: list[int]  # blocks covering at least start_pos + len(token_ids) tokens


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


def build_step_batch(decodes: list[SeqChunk], prefills: list[SeqChunk], block_size: int) -> StepBatch:
    """Packs the chunks into padded numpy arrays. Logits row i belongs to decodes[i] for i < len(decodes) and to
    prefills[i - bucket(len(decodes))] after the decode bucket (the last token of that chunk)."""
    for c in decodes:
        if len(c.token_ids) != 1:
            raise ValueError(f"a decode chunk carries exactly one token, got {len(c.token_ids)}")
    chunks = decodes + prefills
    for c in chunks:
        if not c.token_ids:
            raise ValueError("empty chunk")
        if len(c.block_table) * block_size < c.start_pos + len(c.token_ids):
            raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold "
                             f"{c.start_pos + len(c.token_ids)} tokens")
    nd = bucket(len(decodes)) if decodes else 0
    np_tokens = sum(len(c.token_ids) for c in prefills)
    tp = bucket(np_tokens, 16) if prefills else 0
    sp = bucket(len(prefills)) if prefills else 0
    max_blocks = bucket(max((len(c.block_table) for c in chunks), default=1))
    total = nd + tp

    tokens = np.zeros(total, np.int32)
    positions = np.zeros(total, np.int32)
    slots = np.full(total, -1, np.int32)
    tables = np.zeros((nd + sp, max_blocks), np.int32)
    d_ctx = np.zeros(nd, np.int32)
    q_start = np.zeros(sp, np.int32)
    q_lens = np.zeros(sp, np.int32)
    kv_lens = np.zeros(sp, np.int32)
    logits_idx = np.zeros(nd + sp, np.int32)

    # Decodes in bulk: with 256 of them a step, per-chunk numpy calls cost milliseconds of host time.
    n = len(decodes)
    for i, c in enumerate(decodes):
        tables[i, :len(c.block_table)] = c.block_table
    tokens[:n] = [c.token_ids[0] for c in decodes]
    positions[:n] = [c.start_pos for c in decodes]
    d_pos = positions[:n]
    slots[:n] = tables[np.arange(n), d_pos // block_size] * block_size + d_pos % block_size
    d_ctx[:n] = d_pos + 1
    logits_idx[:n] = np.arange(n)
    row = nd
    for s, c in enumerate(prefills):
        n = len(c.token_ids)
        pos = np.arange(c.start_pos, c.start_pos + n)
        table = np.asarray(c.block_table, np.int32)
        tables[nd + s, :len(table)] = table
        tokens[row:row + n] = c.token_ids
        positions[row:row + n] = pos
        slots[row:row + n] = table[pos // block_size] * block_size + pos % block_size
        q_start[s], q_lens[s], kv_lens[s] = row - nd, n, c.start_pos + n
        logits_idx[nd + s] = row + n - 1
        row += n

    max_q = max((len(c.token_ids) for c in prefills), default=0)
    return StepBatch(
        tokens=tokens, positions=positions, slot_mapping=slots,
        decode_block_tables=tables[:nd], decode_context_lens=d_ctx,
        prefill_block_tables=tables[nd:], prefill_q_start=q_start, prefill_q_lens=q_lens,
        prefill_kv_lens=kv_lens, logits_indices=logits_idx,
        num_decode=nd, num_prefill_tokens=tp, max_q_len=min(bucket(max_q, 16), tp) if prefills else 0)
