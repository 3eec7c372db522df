"""The decode rows of a step, kept on the host across steps instead of rebuilt from the chunks' lists every step.

Each sequence (SeqChunk.seq_id) keeps its row while it decodes. A step writes the rows of the sequences that
joined, clears those that left, and copies into a kept row only the blocks its table gained: a sequence's table
only grows while it holds its blocks, and the engine keys a resumed request anew (with its preemption count). A
row whose first or last block is not the chunk's is rewritten whole. So the per-step work that scales with the
batch is a few vectorized numpy operations; the Python work per row is a dict lookup and a tuple comparison.

Rows are not in chunk order: `update` returns the row of each chunk, which the caller uses for logits, samples and
feeds. Rows are kept below the decode bucket of the live count (rows above it move down into holes), so a step
has the same padded shape as a fresh build.
"""

from __future__ import annotations

import heapq
from typing import Hashable, Sequence

import numpy as np

from runner.step_batch import DecodeRows, SeqChunk, StepBatch, StepShapes, build_step_batch, check_chunks, pack_step


class DecodeState:
    """One runner's decode rows; `build` makes each step from them. `rows` and `blocks` are the initial capacity
    (it grows to the largest bucket and table seen)."""

    def __init__(self, block_size: int, shapes: StepShapes, rows: int = 8, blocks: int = 64):
        self.block_size, self.shapes = block_size, shapes
        self._row_of: dict[Hashable, int] = {}
        self._free: list[int] = []  # a heap: the lowest free row first keeps rows dense
        self.tables = np.zeros((0, blocks), np.int32)  # [rows, capacity]: each row's table, zero past its blocks
        self.num_blocks = np.zeros(0, np.int32)  # each row's blocks; 0 for a free row
        # Each row's first block, last block and block count as Python ints: the per-row check of a step reads no
        # numpy scalar.
        self._ends: list[tuple[int, int, int] | None] = []
        self._grow(rows, blocks)

    def _grow(self, rows: int, blocks: int) -> None:
        old = self.tables
        self.tables = np.zeros((rows, blocks), np.int32)
        self.tables[:old.shape[0], :old.shape[1]] = old
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros(rows - old.shape[0], np.int32)])
        self._ends += [None] * (rows - old.shape[0])
        for r in range(old.shape[0], rows):
            heapq.heappush(self._free, r)

    def build(self, decodes: Sequence[SeqChunk], prefills: Sequence[SeqChunk]) -> tuple[StepBatch, np.ndarray]:
        """The step and the logits row of each chunk (decodes, then prefills after the padded decode rows). Decodes
        that all name their sequences keep their rows; otherwise the rows are rebuilt in chunk order and
        forgotten."""
        decodes, prefills = list(decodes), list(prefills)
        if all(c.seq_id is not None for c in decodes):
            check_chunks([], prefills, self.block_size, self.shapes)
            d, rows = self.update(decodes)
            batch = pack_step(d, prefills, self.block_size, self.shapes)
        else:
            for seq_id in list(self._row_of):
                self._leave(seq_id)
            batch = build_step_batch(decodes, prefills, self.block_size, self.shapes)
            rows = np.arange(len(decodes))
        return batch, np.concatenate([rows, batch.num_decode + np.arange(len(prefills))]).astype(np.int64)

    def update(self, decodes: Sequence[SeqChunk]) -> tuple[DecodeRows, np.ndarray]:
        """The decode rows of this step's chunks (each with a seq_id, one token) and the row of each chunk. The
        rows' tables are a view of the mirror: `pack_step` copies them."""
        ids = [c.seq_id for c in decodes]
        live = set(ids)
        if len(live) != len(ids):
            raise ValueError("two decode chunks of one step name the same sequence")
        if any(len(c.token_ids) != 1 for c in decodes):
            raise ValueError("a decode chunk carries exactly one token")
        for seq_id in [s for s in self._row_of if s not in live]:
            self._leave(seq_id)
        n = len(ids)
        nd = self.shapes.decode_rows(n)
        if nd > len(self._ends):
            self._grow(nd, self.tables.shape[1])
        self._compact(nd)
        rows = [0] * n
        row_of, ends = self._row_of, self._ends
        for i, c in enumerate(decodes):
            row = row_of.get(c.seq_id)
            if row is None:
                row = row_of[c.seq_id] = heapq.heappop(self._free)
            rows[i] = row
            table, known = c.block_table, ends[row]
            if not table or known != (table[0], table[-1], len(table)):
                self._copy_table(row, table)
        rows_np = np.asarray(rows, np.int64)
        positions = np.zeros(nd, np.int32)
        tokens = np.zeros(nd, np.int32)
        positions[rows_np] = [c.start_pos for c in decodes]
        tokens[rows_np] = [c.token_ids[0] for c in decodes]
        held = self.num_blocks[:nd]
        # Every padding row (no blocks, position 0) fails this test and no live row may.
        if np.count_nonzero(held * self.block_size <= positions) != nd - n:
            raise ValueError("a decode chunk's block table cannot hold its token")
        on = held > 0  # the live rows: a free row holds no blocks, and a live one at least its token's
        # A padding row reads block 0 of its all-zero table, then gets slot -1.
        slots = self.tables[np.arange(nd), positions // self.block_size] * self.block_size
        slots = np.where(on, slots + positions % self.block_size, -1)
        table_blocks = max(int(held.max()), 1) if n else 1
        return DecodeRows(tokens, positions, slots, self.tables[:nd, :table_blocks], (positions + 1) * on,
                          table_blocks), rows_np

    def _leave(self, seq_id: Hashable) -> None:
        row = self._row_of.pop(seq_id)
        self._clear_row(row)
        heapq.heappush(self._free, row)

    def _clear_row(self, row: int) -> None:
        self.tables[row, :self.num_blocks[row]] = 0
        self.num_blocks[row] = 0
        self._ends[row] = None

    def _copy_table(self, row: int, table: Sequence[int]) -> None:
        """Writes the blocks the row lacks. The first block and the last known one must match, else the sequence
        is not the one the row knew (a cheap check, not a proof) and its whole table is rewritten."""
        known = int(self.num_blocks[row])
        if known and (len(table) < known or table[0] != self.tables[row, 0]
                      or table[known - 1] != self.tables[row, known - 1]):
            self._clear_row(row)
            known = 0
        if len(table) > self.tables.shape[1]:
            self._grow(len(self._ends), 1 << (len(table) - 1).bit_length())
        self.tables[row, known:len(table)] = table[known:]
        self.num_blocks[row] = len(table)
        self._ends[row] = (table[0], table[-1], len(table)) if table else None

    def _compact(self, nd: int) -> None:
        """Moves rows at nd or above into the lowest free rows, so that the live rows fit the step's bucket."""
        for seq_id, row in list(self._row_of.items()):
            if row < nd:
                continue
            new = heapq.heappop(self._free)
            blocks = self.num_blocks[row]
            self.tables[new, :blocks] = self.tables[row, :blocks]
            self.num_blocks[new], self._ends[new] = blocks, self._ends[row]
            self._row_of[seq_id] = new
            self._clear_row(row)
            heapq.heappush(self._free, row)
