"""The device-side description of one model step, and its host-side builder with shape bucketing.

A step packs decode tokens first (one per sequence) and then the prefill chunks of other sequences back to back.
Every dimension is padded to a small fixed set of sizes (`StepShapes`) so that a server compiles a handful of
programs, ahead of time, instead of stalling on a new compilation whenever a new combination of sizes shows up:
decode rows and prefill tokens in powers of two with a floor, a fixed number of prefill sequence slots, the
longest chunk tied to the prefill token bucket, and block-table widths in powers of two from a floor.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Hashable, Sequence

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
    # Names the sequence across steps, so that a runner keeps its decode row (runner.batch_state) and copies only
    # the blocks its table gained; None: the row is rebuilt every step.
    seq_id: Hashable | None = None


def bucket(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum)."""
    n = max(n, minimum)
    return 1 << (n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class StepShapes:
    """The padded sizes a step may take. The scheduler plans at most `prefill_seqs` prefill chunks per step.

    Floors trade a little padding for far fewer programs: a decode row or a block-table column past the real
    ones costs the kernels nothing but an early exit (they stop at each row's context length).
    """
    prefill_seqs: int = 16      # prefill sequence slots of every step that has prefills
    min_decode_rows: int = 8
    min_prefill_tokens: int = 16
    min_table_blocks: int = 64  # 1024 tokens at block size 16

    def __post_init__(self) -> None:
        for name in ("prefill_seqs", "min_decode_rows", "min_prefill_tokens", "min_table_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def decode_rows(self, n: int) -> int:
        return bucket(n, self.min_decode_rows) if n else 0

    def prefill_tokens(self, n: int) -> int:
        return bucket(n, self.min_prefill_tokens) if n else 0

    def table_width(self, blocks: int) -> int:
        return bucket(blocks, self.min_table_blocks)

    def decode_sizes(self, max_rows: int) -> list[int]:
        """Every decode-row bucket up to max_rows (for compiling ahead of time)."""
        return _pow2_range(self.decode_rows(1), self.decode_rows(max_rows))

    def prefill_sizes(self, max_tokens: int) -> list[int]:
        return _pow2_range(self.prefill_tokens(1), self.prefill_tokens(max_tokens))

    def table_widths(self, max_blocks: int) -> list[int]:
        return _pow2_range(self.table_width(1), self.table_width(max_blocks))


def _pow2_range(lo: int, hi: int) -> list[int]:
    return [1 << k for k in range(lo.bit_length() - 1, hi.bit_length())]


DEFAULT_SHAPES = StepShapes()


def padding_batch(num_decode: int, num_prefill_tokens: int, table_width: int,
                  shapes: StepShapes = DEFAULT_SHAPES) -> StepBatch:
    """A step of the given padded sizes whose every row is padding: running it compiles that shape and writes
    nothing to the KV pool (all slots are -1, all lengths 0)."""
    sp = shapes.prefill_seqs if num_prefill_tokens else 0
    total = num_decode + num_prefill_tokens
    z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
    return StepBatch(
        tokens=z(total), positions=z(total), slot_mapping=np.full(total, -1, np.int32),
        decode_block_tables=z(num_decode, table_width), decode_context_lens=z(num_decode),
        prefill_block_tables=z(sp, table_width), prefill_q_start=z(sp), prefill_q_lens=z(sp),
        prefill_kv_lens=z(sp), logits_indices=z(num_decode + sp),
        num_decode=num_decode, num_prefill_tokens=num_prefill_tokens, max_q_len=num_prefill_tokens)


def check_chunks(decodes: Sequence[SeqChunk], prefills: Sequence[SeqChunk], block_size: int,
                 shapes: StepShapes) -> None:
    if len(prefills) > shapes.prefill_seqs:
        raise ValueError(f"{len(prefills)} prefill chunks in one step; the step shapes allow "
                         f"{shapes.prefill_seqs}")
    for c in decodes:
        if len(c.token_ids) != 1:
            raise ValueError(f"a decode chunk carries exactly one token, got {len(c.token_ids)}")
    for c in itertools.chain(decodes, prefills):
        if not c.token_ids:
            raise ValueError("empty chunk")
        if len(c.block_table) * block_size < c.start_pos + len(c.token_ids):
            raise ValueError(f"block table of {len(c.block_table)} blocks cannot hold "
                             f"{c.start_pos + len(c.token_ids)} tokens")


@dataclasses.dataclass
class DecodeRows:
    """The decode part of a step, one row per padded decode slot; a padding row has context length 0."""
    tokens: np.ndarray        # [num_decode]
    positions: np.ndarray     # [num_decode]
    slots: np.ndarray         # [num_decode], -1 for padding rows
    tables: np.ndarray        # [num_decode, >= the blocks any row uses]
    context_lens: np.ndarray  # [num_decode]
    table_blocks: int         # the longest row's blocks


def build_step_batch(decodes: list[SeqChunk], prefills: list[SeqChunk], block_size: int,
                     shapes: StepShapes = DEFAULT_SHAPES) -> StepBatch:
    """Packs the chunks into padded numpy arrays. Logits row i belongs to decodes[i] for i < len(decodes) and to
    prefills[i - num_decode] after the padded decode rows (the last token of that chunk)."""
    check_chunks(decodes, prefills, block_size, shapes)
    nd = shapes.decode_rows(len(decodes))
    n = len(decodes)
    blocks = max((len(c.block_table) for c in decodes), default=1)
    tables = np.zeros((nd, blocks), np.int32)
    # Decodes in bulk: with 256 of them a step, per-chunk numpy calls cost milliseconds of host time.
    for i, c in enumerate(decodes):
        tables[i, :len(c.block_table)] = c.block_table
    tokens, positions, ctx = np.zeros(nd, np.int32), np.zeros(nd, np.int32), np.zeros(nd, np.int32)
    slots = np.full(nd, -1, np.int32)
    tokens[:n] = [c.token_ids[0] for c in decodes]
    positions[:n] = [c.start_pos for c in decodes]
    d_pos = positions[:n]
    slots[:n] = tables[np.arange(n), d_pos // block_size] * block_size + d_pos % block_size
    ctx[:n] = d_pos + 1
    return pack_step(DecodeRows(tokens, positions, slots, tables, ctx, blocks), prefills, block_size, shapes)


def pack_step(d: DecodeRows, prefills: Sequence[SeqChunk], block_size: int,
              shapes: StepShapes = DEFAULT_SHAPES) -> StepBatch:
    """The step of decode rows `d` (already padded to their bucket) followed by the prefill chunks."""
    nd = len(d.tokens)
    tp = shapes.prefill_tokens(sum(len(c.token_ids) for c in prefills))
    sp = shapes.prefill_seqs if prefills else 0
    max_blocks = shapes.table_width(max([d.table_blocks] + [len(c.block_table) for c in prefills]))
    total = nd + tp

    tokens = np.zeros(total, np.int32)
    positions = np.zeros(total, np.int32)
    slots = np.full(total, -1, np.int32)
    d_tables = np.zeros((nd, max_blocks), np.int32)
    used = min(max_blocks, d.tables.shape[1])
    d_tables[:, :used] = d.tables[:, :used]
    p_tables = np.zeros((sp, max_blocks), np.int32)
    q_start = np.zeros(sp, np.int32)
    q_lens = np.zeros(sp, np.int32)
    kv_lens = np.zeros(sp, np.int32)
    logits_idx = np.zeros(nd + sp, np.int32)
    tokens[:nd], positions[:nd], slots[:nd] = d.tokens, d.positions, d.slots
    logits_idx[:nd] = np.arange(nd)
    row = nd
    for s, c in enumerate(prefills):
        n = len(c.token_ids)
        pos = np.arange(c.start_pos, c.start_pos + n)
        table = np.asarray(c.block_table, np.int32)
        p_tables[s, :len(table)] = table
        tokens[row:row + n] = c.token_ids
        positions[row:row + n] = pos
        slots[row:row + n] = table[pos // block_size] * block_size + pos % block_size
        q_start[s], q_lens[s], kv_lens[s] = row - nd, n, c.start_pos + n
        logits_idx[nd + s] = row + n - 1
        row += n

    # The longest chunk is bounded by the token bucket: one shape per bucket instead of one per chunk length.
    return StepBatch(
        tokens=tokens, positions=positions, slot_mapping=slots,
        decode_block_tables=d_tables, decode_context_lens=d.context_lens,
        prefill_block_tables=p_tables, prefill_q_start=q_start, prefill_q_lens=q_lens,
        prefill_kv_lens=kv_lens, logits_indices=logits_idx,
        num_decode=nd, num_prefill_tokens=tp, max_q_len=tp)
