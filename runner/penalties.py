"""Repetition, frequency and presence penalties, applied to the logits on the device (vLLM's semantics).

repetition_penalty r (transformers' RepetitionPenaltyLogitsProcessor): every token of the prompt or the output
has its logit divided by r when positive, multiplied by r otherwise. frequency_penalty f and presence_penalty p
(OpenAI's): a token the output holds c times loses f * c + p * (c > 0). Repetition first, then the other two.

Each row travels as a sparse table of the distinct tokens its sequence holds and their output counts
(`PenaltyHistory` keeps it up to date as tokens are appended), so nothing grows with the vocabulary. The overlapped
loop plans a step before the previous one's samples reach the host: that sample (`pending`, on the device) counts
once more, whether or not the table already lists its token.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


class PenaltyRow(NamedTuple):
    """One sequence's penalties and history: the distinct tokens of its prompt and output, and how many times
    the output holds each (0: prompt only)."""

    repetition: float
    frequency: float
    presence: float
    ids: Sequence[int]
    counts: Sequence[int]


class PenaltyHistory:
    """A sequence's PenaltyRow, kept current as its tokens are appended (in O(1) per token)."""

    def __init__(self, repetition: float, frequency: float, presence: float, prompt_token_ids: Sequence[int]):
        self.penalties = (repetition, frequency, presence)
        self.ids: list[int] = list(dict.fromkeys(prompt_token_ids))
        self.counts: list[int] = [0] * len(self.ids)
        self._where = {token: i for i, token in enumerate(self.ids)}

    def add(self, token: int) -> None:
        at = self._where.get(token)
        if at is None:
            self._where[token] = len(self.ids)
            self.ids.append(token)
            self.counts.append(1)
        else:
            self.counts[at] += 1

    def row(self) -> PenaltyRow:
        return PenaltyRow(*self.penalties, self.ids, self.counts)


def penalty_tables(rows: Sequence[PenaltyRow | None],
                   num_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host columns of `rows` padded to num_rows: ids [B, W] i32 (-1 unused), counts [B, W] f32 and penalties
    [B, 3] f32 (repetition, frequency, presence; neutral for rows without). W is 0 when no row has penalties, else
    a power of two, so a growing history rarely means a new compilation."""
    widest = max((len(row.ids) for row in rows if row is not None), default=-1)
    width = 0 if widest < 0 else 1 << max(widest - 1, 0).bit_length()
    ids = np.full((num_rows, width), -1, np.int32)
    counts = np.zeros((num_rows, width), np.float32)
    penalties = np.tile(np.array([1.0, 0.0, 0.0], np.float32), (num_rows, 1))
    for i, row in enumerate(rows):
        if row is not None:
            ids[i, :len(row.ids)] = row.ids
            counts[i, :len(row.counts)] = row.counts
            penalties[i] = row.repetition, row.frequency, row.presence
    return ids, counts, penalties


def apply_penalties(x: jax.Array, ids: jax.Array, counts: jax.Array, penalties: jax.Array,
                    pending: jax.Array) -> jax.Array:
    """x [B, V] f32 with each row's penalties applied. ids/counts/penalties: penalty_tables' columns; pending [B]
    i32: an output token of the row not in its counts yet (-1: none)."""
    batch, vocab = x.shape
    rows = jnp.arange(batch)[:, None]
    listed = ids >= 0
    hit = listed & (ids == pending[:, None])
    # The pending token as one more column: count 1 when the table does not list it already, else no column.
    extra = jnp.where((pending >= 0) & ~hit.any(axis=-1), pending, -1)[:, None]
    ids = jnp.concatenate([ids, extra], axis=-1)
    counts = jnp.concatenate([counts + hit, (extra >= 0).astype(jnp.float32)], axis=-1)
    safe = jnp.where(ids >= 0, ids, 0)
    values = jnp.take_along_axis(x, safe, axis=-1)
    repetition, frequency, presence = (penalties[:, k:k + 1] for k in range(3))
    values = jnp.where(values > 0, values / repetition, values * repetition)
    values = values - frequency * counts - presence * (counts > 0)
    return x.at[rows, jnp.where(ids >= 0, ids, vocab)].set(values, mode="drop")
