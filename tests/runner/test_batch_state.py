"""The persistent decode rows (runner.batch_state) give, row for row, the step a fresh build_step_batch gives."""

import random

import numpy as np
import pytest

from runner.batch_state import DecodeState
from runner.step_batch import SeqChunk, StepShapes, build_step_batch, pack_step

BS = 4
SHAPES = StepShapes(prefill_seqs=4, min_decode_rows=2, min_prefill_tokens=4, min_table_blocks=4)


def assert_same(decodes, prefills, state):
    d, rows = state.update(decodes)
    got = pack_step(d, prefills, BS, SHAPES)
    want = build_step_batch(decodes, prefills, BS, SHAPES)
    assert got.num_decode == want.num_decode and got.num_prefill_tokens == want.num_prefill_tokens
    assert got.decode_block_tables.shape == want.decode_block_tables.shape
    n, nd = len(decodes), want.num_decode
    hole = np.setdiff1d(np.arange(nd), rows)
    for field in ("tokens", "positions", "slot_mapping", "decode_context_lens", "decode_block_tables"):
        g, w = getattr(got, field), getattr(want, field)
        np.testing.assert_array_equal(g[rows], w[:n], err_msg=field)
        np.testing.assert_array_equal(g[hole], w[n:nd] if field != "slot_mapping" else -1, err_msg=field)
        np.testing.assert_array_equal(g[nd:], w[nd:], err_msg=field)
    for field in ("prefill_block_tables", "prefill_q_start", "prefill_q_lens", "prefill_kv_lens"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
    np.testing.assert_array_equal(got.logits_indices, want.logits_indices)
    return rows


class Pool:
    """Sequences with growing tables from a shared block counter (a sequence back from preemption gets new ones)."""

    def __init__(self):
        self.next_block, self.seqs = 1, {}

    def blocks(self, n):
        self.next_block += n
        return list(range(self.next_block - n, self.next_block))

    def join(self, sid, length):
        self.seqs[sid] = [length, self.blocks(length // BS + 1)]

    def advance(self, sid, steps=1):
        seq = self.seqs[sid]
        seq[0] += steps
        while len(seq[1]) * BS <= seq[0]:
            seq[1] += self.blocks(1)

    def chunk(self, sid):
        length, table = self.seqs[sid]
        return SeqChunk([sid * 7 % 50], length, list(table), seq_id=sid)


def test_random_join_leave_reorder_preempt():
    rng = random.Random(0)
    pool, state, next_id = Pool(), DecodeState(BS, SHAPES, rows=2, blocks=4), 0
    for _ in range(300):
        for _ in range(rng.choice([0, 0, 1, 3])):  # joins
            pool.join(next_id, rng.randrange(1, 40))
            next_id += 1
        running = list(pool.seqs)
        for sid in rng.sample(running, k=min(len(running), rng.choice([0, 0, 1, 2]))):
            if rng.random() < 0.5:
                del pool.seqs[sid]  # finished
            else:
                pool.join(sid, pool.seqs[sid][0])  # preempted and back: same id, new blocks
        while len(pool.seqs) > 40:
            del pool.seqs[rng.choice(list(pool.seqs))]
        order = list(pool.seqs)
        rng.shuffle(order)
        prefills = [SeqChunk([1, 2, 3], 5, [90, 91]) for _ in range(rng.randrange(3))]
        assert_same([pool.chunk(s) for s in order], prefills, state)
        for sid in pool.seqs:
            pool.advance(sid, rng.choice([1, 1, 1, 4]))  # 4: a multi-step decode's jump


def test_rows_stay_put_and_a_freed_row_is_reused():
    pool, state = Pool(), DecodeState(BS, SHAPES)
    for sid in range(4):
        pool.join(sid, 3)  # the next token crosses into a new block
    rows = assert_same([pool.chunk(s) for s in range(4)], [], state)
    for sid in (0, 2, 3):
        pool.advance(sid)
    again = assert_same([pool.chunk(s) for s in (3, 2, 0)], [], state)
    assert list(again) == [rows[3], rows[2], rows[0]]
    pool.join(7, 30)
    new = assert_same([pool.chunk(s) for s in (2, 7, 0, 3)], [], state)
    assert new[1] == rows[1]


def test_rows_move_down_when_the_batch_shrinks():
    pool, state = Pool(), DecodeState(BS, SHAPES)
    for sid in range(16):
        pool.join(sid, 5)
    assert_same([pool.chunk(s) for s in range(16)], [], state)
    rows = assert_same([pool.chunk(15)], [], state)
    assert rows[0] < 2


def test_table_wider_than_the_mirror_and_bad_tables():
    state = DecodeState(BS, SHAPES, blocks=2)
    assert_same([SeqChunk([1], 40, list(range(1, 12)), seq_id="a")], [], state)
    with pytest.raises(ValueError):
        state.update([SeqChunk([1], 8, [1, 2], seq_id="b")])
    with pytest.raises(ValueError):
        state.update([SeqChunk([1], 0, [1], seq_id="b"), SeqChunk([1], 0, [2], seq_id="b")])
