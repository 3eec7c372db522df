"""On-device token sampling: allowed ids, logit bias, penalties, greedy, temperature, top-k, top-p and min-p, one
jitted call per step.

The work a batch needs is decided on the host, from its rows (`SamplingTensors.mode`, a static field, so each
mode is its own program): greedy batches take an argmax, sampled ones add the noise, and only batches with a
top-k / top-p row compute thresholds. No branch is taken on the device: XLA on GPU runs a `lax.cond` by copying
its predicate to the host, which makes the dispatching thread wait for everything queued before it, so a step
with one would block the host for the whole model forward.

Filters run in vLLM's order (temperature, top-k, top-p, min-p) and each reduces to a per-row threshold on the
temperature-scaled logits z: a token is kept iff z >= threshold (ties with the boundary value are kept). The
token is then one Gumbel-max over the whole vocabulary, with noise indexed by token id and derived only from the
row's (seed, step). A row therefore draws the same token whatever its batch position, its neighbours, or the code
path the batch took (no filter, candidate filter, full sort).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

from runner.penalties import PenaltyRow, apply_penalties, penalty_tables

# As in vLLM, temperatures this small sample greedily; it also keeps z = logits / T finite.
GREEDY_TEMPERATURE = 1e-5
# Rows travel as float32: a larger temperature would become inf on the device, and a top_p under the smallest
# float32 would become 0.
MAX_TEMPERATURE = float(np.finfo(np.float32).max)
MIN_TOP_P = float(np.finfo(np.float32).smallest_subnormal)

# Top-p needs the sorted distribution. XLA's GPU TopK kernel only handles k <= 16 (a larger k is decomposed into
# a full sort), so lax.top_k(z, 1024) would cost as much as sorting [B, V]. Instead take the top 16 of each of 64
# vocabulary groups (1024 candidates, one pass over the logits) and sort only those. Every candidate above
# `bound` (the largest 16th-of-its-group) is in its true global rank, so a row whose top-k / nucleus boundary lies
# above the bound is exact; the others take the answer of a full sort, which a filtered batch always computes.
GROUPS = 64
PER_GROUP = 16
# Below this vocabulary size a full sort is about as cheap as the candidates and needs no fallback.
DIRECT_SORT_MAX_VOCAB = 2 * GROUPS * PER_GROUP

# What a batch computes (SamplingTensors.mode): an argmax; plus noise (temperature, min-p); plus thresholds.
GREEDY, RANDOM, FILTERED = "greedy", "random", "filtered"
MODES = (GREEDY, RANDOM, FILTERED)


@struct.dataclass
class SamplingTensors:
    """Per-row sampling parameters of one batch, all shaped [B]."""

    temperature: jax.Array  # f32; < GREEDY_TEMPERATURE (0) = greedy
    top_k: jax.Array  # i32; <= 0 = off
    top_p: jax.Array  # f32; 1 = off
    min_p: jax.Array  # f32; 0 = off
    seed: jax.Array  # u32; per request
    step: jax.Array  # i32; tokens the request has generated so far
    # [B, M] i32 token ids this row may not sample (-1 = unused); M is 0 when no row bans anything. The engine
    # bans EOS and stop ids until min_tokens is reached, as vLLM does.
    banned: jax.Array
    # [B, ceil(V / 32)] i32 packed bitmask of the token ids a row may sample: bit j of word i allows token 32 i + j
    # (xgrammar's layout, so a grammar's mask travels as it is made; vLLM's allowed_token_ids go through
    # `token_mask`); a row of -1 only is unrestricted; 0 columns when no row is restricted.
    allowed: jax.Array
    # [B, N] i32 token ids and [B, N] f32 values added to their logits (OpenAI's logit_bias; -1 = unused); N is 0
    # when no row has a bias.
    bias_ids: jax.Array
    bias: jax.Array
    # runner.penalties' columns: [B, W] distinct token ids of each row's sequence (-1 = unused), [B, W] their
    # output counts, [B, 3] (repetition, frequency, presence); W is 0 when no row has a penalty. pending [B]: an
    # output token not in the counts yet (the overlapped loop's sample in flight; -1 = none).
    penalty_ids: jax.Array
    penalty_counts: jax.Array
    penalties: jax.Array
    pending: jax.Array
    mode: str = struct.field(pytree_node=False, default=FILTERED)  # see MODES; from_rows picks the cheapest

    @classmethod
    def from_rows(cls, rows: Sequence[SamplingRow | None], banned: Sequence[Sequence[int] | None] | None = None,
                  *, pad_to: int | None = None,
                  bias: Sequence[Mapping[int, float] | None] | None = None,
                  penalties: Sequence[PenaltyRow | None] | None = None,
                  allowed: Sequence[np.ndarray | None] | None = None) -> SamplingTensors:
        """Build host (numpy) columns from rows made by `SamplingRow.validated`; None is a greedy padding row, and
        so is every row after `len(rows)` up to `pad_to`. banned[i] lists token ids row i may not sample (None or
        empty: none); bias[i] maps token ids to what is added to row i's logits (None or empty: nothing);
        penalties[i] is row i's repetition/frequency/presence penalties and history (None: none); allowed[i]
        is row i's packed bitmask of the token ids it may sample (`token_mask`; None: any).

        The engine validates a request's row once and only advances its step, so a step of 256 rows costs
        microseconds here instead of the milliseconds that validating every row every step took.
        """
        if pad_to is not None:
            if pad_to < len(rows):
                raise ValueError(f"pad_to ({pad_to}) is smaller than the number of rows ({len(rows)})")
            rows = list(rows) + [None] * (pad_to - len(rows))
        values = [GREEDY_ROW if row is None else row for row in rows]
        columns = [np.array([row[field] for row in values], dtype) for field, dtype in enumerate(_ROW_DTYPES)]
        table = _id_table(len(values), banned or ())
        bias_ids = _id_table(len(values), [list(b) if b else None for b in bias or ()])
        bias_values = np.zeros(bias_ids.shape, np.float32)
        for i, row_bias in enumerate(bias or ()):
            if row_bias:
                bias_values[i, :len(row_bias)] = list(row_bias.values())
        penalty_columns = penalty_tables(penalties or (), len(values))
        return cls(*columns, table, _mask_table(len(values), allowed or ()), bias_ids, bias_values, *penalty_columns,
                   np.full(len(values), -1, np.int32), mode_of(values))


def token_mask(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """The packed bitmask [ceil(vocab_size / 32)] i32 that allows exactly `ids` (ids below vocab_size)."""
    bits = np.zeros(mask_words(vocab_size) * 32, np.bool_)
    bits[np.asarray(ids, np.int64)] = True
    return np.packbits(bits.reshape(-1, 32), axis=-1, bitorder="little").view(np.int32).reshape(-1)


def mask_ids(mask: np.ndarray) -> list[int]:
    """The token ids a packed bitmask allows (tests and logs)."""
    bits = np.unpackbits(np.ascontiguousarray(mask, np.int32).view(np.uint8), bitorder="little")
    return np.flatnonzero(bits).tolist()


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // 32)


def _mask_table(num_rows: int, masks: Sequence[np.ndarray | None]) -> np.ndarray:
    """[num_rows, W] i32 of the rows' packed masks, -1 (all allowed) for rows without; W 0 when none has one."""
    width = max((len(m) for m in masks if m is not None), default=0)
    table = np.full((num_rows, width), -1, np.int32)
    for i, mask in enumerate(masks):
        if mask is not None:
            table[i, :len(mask)] = mask
    return table


def _id_table(num_rows: int, ids: Sequence[Sequence[int] | None]) -> np.ndarray:
    """[num_rows, W] i32 with row i's ids first and -1 after them; W the next power of two of the longest list
    (0 when every list is empty), so that a changing number of ids rarely means a new compilation."""
    widest = max((len(row) for row in ids if row), default=0)
    table = np.full((num_rows, 0 if widest == 0 else 1 << (widest - 1).bit_length()), -1, np.int32)
    for i, row in enumerate(ids):
        if row:
            table[i, :len(row)] = row
    return table


def mode_of(rows: Sequence[SamplingRow]) -> str:
    """The cheapest mode that samples every row exactly."""
    sampled = [row for row in rows if row.temperature >= GREEDY_TEMPERATURE]
    if not sampled:
        return GREEDY
    return FILTERED if any(row.top_k > 0 or row.top_p < 1.0 for row in sampled) else RANDOM


class SampleResult(NamedTuple):
    tokens: jax.Array  # [B] i32
    token_logprobs: jax.Array  # [B] f32, log-prob of the sampled token under the raw distribution
    top_ids: jax.Array  # [B, n] i32, most likely tokens of the raw distribution, best first
    top_logprobs: jax.Array  # [B, n] f32
    # Per chunk, the prompt log-probs a step was asked for (runner.executor.StepInput.prompt_logprobs), else None.
    prompt_logprobs: Any = None


def sample(logits: jax.Array, st: SamplingTensors, *, num_logprobs: int = 0) -> jax.Array | SampleResult:
    """Sample one token per row of `logits` [B, V] (any float dtype, computed in f32).

    Returns the tokens [B] i32, or with num_logprobs > 0 (static) a SampleResult whose log-probs are
    log_softmax of the raw logits, before temperature and filters, as vLLM reports them.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {logits.shape}")
    batch, vocab = logits.shape
    if st.temperature.shape != (batch,):
        raise ValueError(f"sampling tensors are for batch {st.temperature.shape}, logits for {batch}")
    if not 0 <= num_logprobs <= vocab:
        raise ValueError(f"num_logprobs must be in [0, {vocab}], got {num_logprobs}")
    raw = logits.astype(jnp.float32)
    x = adjust_logits(raw, st)
    if st.mode not in MODES:
        raise ValueError(f"sampling mode must be one of {MODES}, got {st.mode!r}")
    tokens = jnp.argmax(x, axis=-1).astype(jnp.int32)
    if st.mode != GREEDY:
        tokens = _sample_rows(x, st, tokens)
    if num_logprobs == 0:
        return tokens
    logprobs = jax.nn.log_softmax(raw, axis=-1)
    top_logprobs, top_ids = lax.top_k(logprobs, num_logprobs)
    token_logprobs = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return SampleResult(tokens, token_logprobs, top_ids.astype(jnp.int32), top_logprobs)


def adjust_logits(logits: jax.Array, st: SamplingTensors) -> jax.Array:
    """The logits [B, V] f32 the filters and the draw see: tokens outside a row's allowed ids at -inf, its
    logit_bias added (as transformers' SequenceBiasLogitsProcessor with one-token sequences), its penalties applied
    (runner.penalties), then its banned ids at -inf (vLLM's order)."""
    batch, vocab = logits.shape
    rows = jnp.arange(batch)[:, None]
    x = logits
    if st.allowed.shape[1]:
        if st.allowed.shape[1] < mask_words(vocab):  # made for a smaller vocabulary: it cannot say what is allowed
            raise ValueError(f"allowed masks of {st.allowed.shape[1]} words do not cover a vocabulary of {vocab}")
        token = jnp.arange(vocab, dtype=jnp.int32)
        words = st.allowed[:, token // 32]
        keep = (lax.shift_right_logical(words, jnp.broadcast_to(token % 32, words.shape)) & 1) == 1
        x = jnp.where(keep, x, -jnp.inf)
    if st.bias_ids.shape[1]:
        x = x.at[rows, jnp.where(st.bias_ids >= 0, st.bias_ids, vocab)].add(st.bias, mode="drop")
    if st.penalty_ids.shape[1]:
        x = apply_penalties(x, st.penalty_ids, st.penalty_counts, st.penalties, st.pending)
    if st.banned.shape[1]:
        x = x.at[rows, jnp.where(st.banned >= 0, st.banned, vocab)].set(-jnp.inf, mode="drop")  # -1: dropped
    return x


def _sample_rows(x: jax.Array, st: SamplingTensors, greedy_tokens: jax.Array) -> jax.Array:
    vocab = x.shape[1]
    sampled = st.temperature >= GREEDY_TEMPERATURE
    z = x / jnp.where(sampled, st.temperature, 1.0)[:, None]
    # Greedy rows must not force the sort, whatever filters they carry.
    top_k = jnp.where(sampled & (st.top_k > 0) & (st.top_k < vocab), st.top_k, vocab)
    top_p = jnp.where(sampled, st.top_p, 1.0)
    threshold = jnp.full(z.shape[:1], -jnp.inf)
    if st.mode == FILTERED:
        threshold = _filter_threshold(z, top_k, top_p)
    # min-p keeps p >= min_p * p_max, a ratio that top-k / top-p renormalization leaves unchanged: no sort needed.
    threshold = jnp.maximum(threshold, jnp.max(z, axis=-1) + jnp.log(st.min_p))
    noise = jax.vmap(partial(_gumbel, vocab=vocab))(st.seed, st.step)
    scores = jnp.where(z >= threshold[:, None], z + noise, -jnp.inf)
    return jnp.where(sampled, jnp.argmax(scores, axis=-1).astype(jnp.int32), greedy_tokens)


def _gumbel(seed: jax.Array, step: jax.Array, *, vocab: int) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.gumbel(key, (vocab,), jnp.float32)


def _filter_threshold(z: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Per-row threshold of top-k then top-p on z (top_k == vocab and top_p == 1 mean off)."""
    if z.shape[1] <= DIRECT_SORT_MAX_VOCAB:
        return _sorted_threshold(z, _sort_descending(z), top_k, top_p, None)[0]
    candidates, bound = _candidates(z)
    threshold, exact = _sorted_threshold(z, candidates, top_k, top_p, bound)
    # Rows the candidates settled keep that answer, so no row's draw depends on its neighbours. The full sort runs
    # whether or not a row needs it: skipping it would take a branch on the device (see the module docstring).
    return jnp.where(exact, threshold, _sorted_threshold(z, _sort_descending(z), top_k, top_p, None)[0])


def _candidates(z: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The top PER_GROUP values of each of GROUPS vocabulary groups, sorted descending, and their bound."""
    batch, vocab = z.shape
    size = -(-vocab // GROUPS)
    padded = jnp.pad(z, ((0, 0), (0, size * GROUPS - vocab)), constant_values=-jnp.inf)
    group_top, _ = lax.top_k(padded.reshape(batch * GROUPS, size), PER_GROUP)
    group_top = group_top.reshape(batch, GROUPS, PER_GROUP)
    bound = jnp.max(group_top[:, :, -1], axis=-1)
    return _sort_descending(group_top.reshape(batch, GROUPS * PER_GROUP)), bound


def _sorted_threshold(z: jax.Array, s: jax.Array, top_k: jax.Array, top_p: jax.Array,
                      bound: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Top-k then top-p threshold from s, the s.shape[1] largest values of z per row in descending order.

    Values of s above `bound` are known to hold their global rank (None: s is the full sort). Returns the
    threshold [B] and whether it is provably the one a full sort gives [B].
    """
    vocab, width = z.shape[1], s.shape[1]
    bound = jnp.full(z.shape[:1], -jnp.inf) if bound is None else bound
    top_k_on, top_p_on = top_k < vocab, top_p < 1.0
    kth = _at(s, top_k - 1)
    top_k_threshold = jnp.where(top_k_on, kth, -jnp.inf)
    top_k_exact = ~top_k_on | ((top_k <= width) & (kth > bound))
    # Top-p renormalizes over what top-k kept (values tied with the k-th included).
    in_top_k = s >= top_k_threshold[:, None]
    log_norm = jax.nn.logsumexp(jnp.where(z >= top_k_threshold[:, None], z, -jnp.inf), axis=-1)
    probs = jnp.where(in_top_k, jnp.exp(s - log_norm[:, None]), 0.0)
    mass = jnp.cumsum(probs, axis=-1)
    mass_before = jnp.concatenate([jnp.zeros_like(mass[:, :1]), mass[:, :-1]], axis=-1)
    # The smallest prefix with mass >= top_p: every token whose predecessors hold less than top_p.
    last = jnp.sum((mass_before < top_p[:, None]) & in_top_k, axis=-1) - 1
    top_p_threshold = jnp.where(top_p_on, _at(s, last), -jnp.inf)
    # With top-k on and exact, every kept value lies in s. Otherwise the nucleus must end on an exact value; it
    # then also closed inside s, since the smallest value of s is never above the bound.
    top_p_exact = ~top_p_on | top_k_on | (_at(s, last) > bound)
    return jnp.maximum(top_k_threshold, top_p_threshold), top_k_exact & top_p_exact


def _at(a: jax.Array, index: jax.Array) -> jax.Array:
    index = jnp.clip(index, 0, a.shape[1] - 1)
    return jnp.take_along_axis(a, index[:, None], axis=-1)[:, 0]


def _sort_descending(a: jax.Array) -> jax.Array:
    return -jnp.sort(-a, axis=-1)


class SamplingRow(NamedTuple):
    """One row of SamplingTensors: a sequence's sampling parameters at one step.

    Build it with `SamplingRow.validated`, the one check of these values (SamplingParams uses it too); a row
    then only changes its step (`at_step`), so the engine never validates per step.
    """

    temperature: float  # < GREEDY_TEMPERATURE (0): greedy
    top_k: int  # 0: off
    top_p: float  # 1: off
    min_p: float  # 0: off
    seed: int  # in [0, 2**32)
    step: int  # tokens the sequence has generated, in [0, 2**31)

    @classmethod
    def validated(cls, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                  seed: int | None = None, step: int = 0) -> SamplingRow:
        """Checks the values (ValueError naming the field) and normalizes them for the device: a top_k that is
        not in (0, 2**31) is off, the seed is taken modulo 2**32. Defaults are vLLM's (temperature 1, filters
        off); a sampled row must carry a seed, since equal seeds give equal draws (the engine assigns one per
        sequence); a greedy row may leave it None."""
        temperature = _real(temperature, "temperature")
        if not 0.0 <= temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:.4g}], got {temperature}")
        top_p = _real(top_p, "top_p")
        if not MIN_TOP_P <= top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (at least {MIN_TOP_P:.2g}), got {top_p}")
        top_k = _integer(top_k, "top_k")
        min_p = _real(min_p, "min_p")
        if not 0.0 <= min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        step = _integer(step, "step")
        if not 0 <= step < 2**31:
            raise ValueError(f"step must be in [0, 2**31), got {step}")
        if seed is None and temperature >= GREEDY_TEMPERATURE:
            raise ValueError(f"seed is required for a sampled row (temperature {temperature} > 0)")
        seed = 0 if seed is None else _integer(seed, "seed") % 2**32
        return cls(temperature, top_k if 0 < top_k < 2**31 else 0, top_p, min_p, seed, step)

    def at_step(self, step: int) -> SamplingRow:
        """This row at another step (unchecked: the engine calls it per sequence per step, and a plain
        constructor call costs a third of `_replace`)."""
        return SamplingRow(self.temperature, self.top_k, self.top_p, self.min_p, self.seed, step)


GREEDY_ROW = SamplingRow(0.0, 0, 1.0, 0.0, 0, 0)
_ROW_DTYPES = (np.float32, np.int32, np.float32, np.float32, np.uint32, np.int32)


def _real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range; its repr may be thousands of digits
        raise ValueError(f"{name} is too large to be a float") from None


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)
