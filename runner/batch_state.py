"""The decode rows of a step, kept on the host across steps instead of rebuilt from the chunks' lists every step.

Each sequence (SeqChunk.seq_id) keeps its row while it decodes. A step writes the rows of the sequences that
joined, clears those that left, and copies into a kept row only the blocks its table gained (a sequence's table
only grows while it holds its blocks; one that is preempted or finishes misses at least one step's decodes, which
frees its row). So the per-step work that scales with the batch is a few vectorized numpy operations; the Python
work per row is a dict lookup and a length comparison.

Rows are not in chunk order: `update` returns the row of each chunk, which the caller uses for logits, samples and
feeds. Rows are kept below the decode bucket of the live count (rows above it move down into holes), so a step
has the same padded shape as a fresh build.
"""

from __future__ import annotations

import heapq
from typing import Hashable, Sequence

import numpy as np

from runner.step_batch import DecodeRows, SeqChunk, StepShapes


class DecodeState:
    def __init__(self, block_size: int, shapes: StepShapes, rows: int = 8, blocks: int = 64):
        self.block_size, self.shapes = block_size, shapes
        self._row_of: dict[Hashable, int] = {}
        self._free: list[int] = []  # a heap: the lowest free row first keeps rows dense
        self.tables = np.zeros((0, blocks), np.int32)  # [rows, capacity]: each row's table, zero past its blocks
        self.num_blocks = np.zeros(0, np.int32)  # each row's blocks; 0 for a free row
        self._grow(rows, blocks)

    def _grow(self, rows: int, blocks: int) -> None:
        old = self.tables
        self.tables = np.zeros((rows, blocks), np.int32)
        self.tables[:old.shape[0], :old.shape[1]] = old
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros(rows - old.shape[0], np.int32)])
        for r in range(old.shape[0], rows):
            heapq.heappush(self._free, r)

    def clear(self) -> None:
        """Forgets every row (a step without sequence ids rebuilt its decodes)."""
        for seq_id in list(self._row_of):
            self._leave(seq_id)

    def _leave(self, seq_id: Hashable) -> None:
        row = self._row_of.pop(seq_id)
        self.tables[row, :self.num_blocks[row]] = 0
        self.num_blocks[row] = 0
        heapq.heappush(self._free, row)

    def update(self, decodes: Sequence[SeqChunk]) -> tuple[DecodeRows, np.ndarray]:
        """The decode rows of this step's chunks (each with a seq_id, one token) and the row of each chunk."""
        ids = [c.seq_id for c in decodes]
        if len(set(ids)) != len(ids):
            raise ValueError("two decode chunks of one step name the same sequence")
        live = set(ids)
        for seq_id in [s for s in self._row_of if s not in live]:
            self._leave(seq_id)
        n = len(ids)
        nd = self.shapes.decode_rows(n)
        if nd > len(self.num_blocks):
            self._grow(nd, self.tables.shape[1])
        self._compact(nd)
        rows = np.empty(n, np.int64)
        for i, c in enumerate(decodes):
            row = self._row_of.get(c.seq_id)
            if row is None:
                row = self._row_of[c.seq_id] = heapq.heappop(self._free)
            rows[i] = row
            self._copy_table(row, c.block_table)
        positions = np.zeros(nd, np.int32)
        tokens = np.zeros(nd, np.int32)
        positions[rows] = [c.start_pos for c in decodes]
        tokens[rows] = [c.token_ids[0] for c in decodes]
        held = self.num_blocks[:nd]
        if np.any(held[rows] * self.block_size <= positions[rows]):
            raise ValueError("a decode chunk's block table cannot hold its token")
        on = np.zeros(nd, bool)
        on[rows] = True
        slots = self.tables[np.arange(nd), np.where(on, positions // self.block_size, 0)] * self.block_size
        slots = np.where(on, slots + positions % self.block_size, -1).astype(np.int32)
        table_blocks = int(held.max()) if n else 1
        # Copies: the arrays may be read by a step still in flight while the mirror changes for the next one.
        return DecodeRows(tokens, positions, slots, self.tables[:nd, :table_blocks].copy(),
                          np.where(on, positions + 1, 0).astype(np.int32), max(table_blocks, 1)), rows

    def _copy_table(self, row: int, table: Sequence[int]) -> None:
        """Writes the blocks the row lacks. The first and last known blocks must match, else the sequence is not
        the one the row knew (a cheap check, not a proof) and its whole table is rewritten."""
        known = int(self.num_blocks[row])
        if known and (len(table) < known or table[0] != self.tables[row, 0]
                      or table[known - 1] != self.tables[row, known - 1]):
            self.tables[row, :known] = 0
            known = 0
        if len(table) == known:
            return
        if len(table) > self.tables.shape[1]:
            self._grow(len(self.num_blocks), 1 << (len(table) - 1).bit_length())
        self.tables[row, known:len(table)] = table[known:]
        self.num_blocks[row] = len(table)

    def _compact(self, nd: int) -> None:
        """Moves rows at nd or above into the lowest free rows, so that the live rows fit the step's bucket."""
        for seq_id, row in list(self._row_of.items()):
            if row < nd:
                continue
            new = heapq.heappop(self._free)
            blocks = self.num_blocks[row]
            self.tables[new, :blocks] = self.tables[row, :blocks]
            self.num_blocks[new] = blocks
            self._row_of[seq_id] = new
            self.tables[row, :blocks] = 0
            self.num_blocks[row] = 0
            heapq.heappush(self._free, row)
