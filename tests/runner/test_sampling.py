"""Tests for runner/sampling.py: filters against a float64 reference, statistics, reproducibility, jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runner import sampling
from runner.sampling import (
    FILTERED,
    GREEDY,
    GREEDY_ROW,
    RANDOM,
    SamplingRow,
    SamplingTensors,
    mask_ids,
    sample,
    token_mask,
)

jit_sample = jax.jit(sample, static_argnames="num_logprobs")
# 99.9% quantiles of chi-square with 1..7 degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
DRAWS = 8192


def tensors(rows, pad_to):
    """Sampling tensors of rows given as SamplingRow.validated arguments, padded with greedy rows to pad_to."""
    return SamplingTensors.from_rows([SamplingRow.validated(**row) for row in rows], pad_to=pad_to)


def draw(logits_row, n=DRAWS, **params):
    """n draws of one request from one distribution: the same row at steps 0..n-1.

    Rows are padded with -inf logits (impossible tokens) to a vocabulary of 8, so that the calls share one compile.
    """
    rows = [dict(params, seed=params.get("seed", 7), step=step) for step in range(n)]
    padded = np.pad(np.asarray(logits_row, np.float32), (0, 8 - len(logits_row)), constant_values=-np.inf)
    logits = jnp.broadcast_to(jnp.asarray(padded), (n, 8))
    return np.asarray(jit_sample(logits, tensors(rows, n)))


def reference_keep(logits_row, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Float64 keep mask of vLLM's filters: temperature, top-k, top-p (after top-k), min-p (after both)."""
    z = np.asarray(logits_row, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if 0 < top_k < len(z):
        keep &= z >= np.sort(z)[::-1][top_k - 1]
    if top_p < 1.0:
        probs = np.where(keep, np.exp(z - z.max()), 0.0)
        probs /= probs.sum()
        order = np.argsort(-z, kind="stable")
        before = np.cumsum(probs[order]) - probs[order]
        keep &= z >= z[order[(before < top_p) & keep[order]]].min()
    if min_p > 0.0:
        keep &= z >= z.max() + np.log(min_p)
    return keep


def chi_square(tokens, probs):
    counts = np.bincount(tokens, minlength=len(probs))
    assert len(counts) == len(probs), "drew a token outside the distribution"
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token of zero probability"
    expected = probs[support] * len(tokens)
    return float(np.sum((counts[support] - expected) ** 2 / expected)), int(support.sum()) - 1


def softmax(z):
    e = np.exp(z - np.max(z))
    return e / e.sum()


def test_greedy_equals_argmax_with_ties():
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, size=(64, 300)).astype(np.float32)  # many ties; argmax takes the lowest index
    rows = [{"temperature": 0.0, "top_k": 3, "top_p": 0.5, "min_p": 0.2} for _ in range(8)]
    st = tensors(rows, pad_to=64)
    for dtype in (jnp.float32, jnp.bfloat16):
        tokens = jit_sample(jnp.asarray(logits, dtype), st)
        assert tokens.dtype == jnp.int32
        np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))


@pytest.mark.parametrize("temperature", [0.7, 1.5])
def test_temperature_matches_softmax(temperature):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, -2.0], np.float32)
    stat, df = chi_square(draw(logits, temperature=temperature), softmax(logits / temperature))
    assert stat < CHI2_999[df]
    # The test has power: the untempered distribution is rejected by far.
    wrong, _ = chi_square(draw(logits, temperature=temperature), softmax(logits))
    assert wrong > 10 * CHI2_999[df]


def test_top_k_draws_only_from_k_largest():
    logits = np.array([0.3, 2.0, -1.0, 1.2, 0.9, -0.2, 1.5, 0.0], np.float32)
    keep = reference_keep(logits, 1.0, top_k=3)
    assert sorted(np.flatnonzero(keep)) == [1, 3, 6]
    probs = np.where(keep, softmax(logits), 0.0)
    stat, df = chi_square(draw(logits, temperature=1.0, top_k=3), probs / probs.sum())
    assert stat < CHI2_999[df]


@pytest.mark.parametrize("top_p, nucleus", [(0.6, [0, 1]), (0.7, [0, 1, 2]), (0.95, [0, 1, 2, 3, 4])])
def test_top_p_draws_the_smallest_nucleus_and_covers_it(top_p, nucleus):
    probs = np.array([0.38, 0.27, 0.2, 0.1, 0.05], np.float32)
    tokens = draw(np.log(probs), temperature=1.0, top_p=top_p)
    assert sorted(set(tokens.tolist())) == nucleus
    renormalized = np.where(np.isin(np.arange(5), nucleus), probs, 0.0)
    stat, df = chi_square(tokens, renormalized / renormalized.sum())
    assert stat < CHI2_999[df]


def test_min_p_threshold():
    probs = np.array([0.5, 0.3, 0.1, 0.06, 0.04], np.float32)
    tokens = draw(np.log(probs), temperature=1.0, min_p=0.15)  # keeps p >= 0.075
    assert sorted(set(tokens.tolist())) == [0, 1, 2]


@pytest.mark.parametrize("params, allowed", [
    # top-p after top-k renormalization: 0.4 / 0.7 >= 0.5, so only the best token stays.
    ({"top_k": 2, "top_p": 0.5}, [0]),
    ({"top_p": 0.5}, [0, 1]),
    # min-p after top-p: of {0.4, 0.3, 0.2}, min_p 0.6 drops 0.2 < 0.24.
    ({"top_p": 0.8, "min_p": 0.6}, [0, 1]),
    ({"top_k": 3, "min_p": 0.6}, [0, 1]),
])
def test_filter_combinations(params, allowed):
    tokens = draw(np.log(np.array([0.4, 0.3, 0.2, 0.1], np.float32)), temperature=1.0, **params)
    assert sorted(set(tokens.tolist())) == allowed


@pytest.mark.parametrize("vocab", [512, 4096])  # direct sort and grouped candidates
def test_random_filters_match_reference(vocab):
    rng = np.random.default_rng(vocab)
    cases = []
    for _ in range(16):
        scale = rng.choice([0.3, 2.0, 5.0])  # flat rows force the candidate path's full-sort fallback
        cases.append((rng.normal(size=vocab).astype(np.float32) * scale,
                      {"temperature": float(rng.choice([0.5, 1.0, 1.3])), "top_k": int(rng.choice([0, 1, 5, 40, 3000])),
                       "top_p": float(rng.choice([1.0, 0.3, 0.9])), "min_p": float(rng.choice([0.0, 0.05, 0.5]))}))
    per_case = 64
    logits = np.repeat(np.stack([row for row, _ in cases]), per_case, axis=0)
    rows = [dict(params, seed=i, step=step) for i, (_, params) in enumerate(cases) for step in range(per_case)]
    tokens = np.asarray(jit_sample(jnp.asarray(logits), tensors(rows, len(rows))))
    for i, (row, params) in enumerate(cases):
        keep = reference_keep(row, **params)
        drawn = set(tokens[i * per_case:(i + 1) * per_case].tolist())
        assert drawn <= set(np.flatnonzero(keep).tolist()), params
        if keep.sum() <= 3:
            assert drawn == set(np.flatnonzero(keep).tolist()), params


def test_candidate_thresholds_are_exact_or_flagged():
    rng = np.random.default_rng(1)
    vocab = 8192
    scale = np.array([[6.0], [6.0], [6.0], [0.2], [6.0], [6.0]], np.float32)
    z = jnp.asarray(rng.normal(size=(6, vocab)).astype(np.float32) * scale)
    top_k = jnp.array([vocab, 20, vocab, vocab, 1000, 5], jnp.int32)
    top_p = jnp.array([0.9, 0.8, 1.0, 0.95, 1.0, 1.0], jnp.float32)

    @jax.jit
    def thresholds(z, top_k, top_p):
        candidates, bound = sampling._candidates(z)
        head, exact = sampling._sorted_threshold(z, candidates, top_k, top_p, bound)
        full, _ = sampling._sorted_threshold(z, sampling._sort_descending(z), top_k, top_p, None)
        return head, exact, full, sampling._filter_threshold(z, top_k, top_p)

    head, exact, full, chosen = map(np.asarray, thresholds(z, top_k, top_p))
    np.testing.assert_array_equal(exact, [True, True, True, False, False, True])
    np.testing.assert_array_equal(head[exact], full[exact])
    np.testing.assert_array_equal(chosen, full)
    for r in range(6):
        keep = reference_keep(np.asarray(z[r]), 1.0, int(top_k[r]) % vocab, float(top_p[r]))
        np.testing.assert_array_equal(np.asarray(z[r]) >= full[r], keep)


def test_reproducible_across_positions_and_neighbours():
    rng = np.random.default_rng(2)
    vocab, n = 4096, 16
    probe_logits = rng.normal(size=vocab).astype(np.float32) * 4.0
    probes = [{"temperature": 0.8, "top_p": 0.9, "seed": 100 + i, "step": 3 * i} for i in range(n // 2)]
    probes += [{"temperature": 1.0, "seed": 200 + i, "step": i} for i in range(n // 2)]
    alone = jit_sample(jnp.broadcast_to(jnp.asarray(probe_logits), (2 * n, vocab)),
                       tensors(probes, 2 * n))[:n]
    # Interleave with different requests; the flat top-p neighbour forces the full-sort fallback.
    neighbours = [{"temperature": 1.0, "top_p": 0.95, "seed": 5, "step": 0}] + [{"temperature": 0.0}] * (n - 1)
    order = rng.permutation(2 * n)
    mixed_rows = [(probes + neighbours)[j] for j in order]
    mixed_logits = np.concatenate([np.tile(probe_logits, (n, 1)), rng.normal(size=(n, vocab)) * 0.1])[order]
    mixed = jit_sample(jnp.asarray(mixed_logits, jnp.float32), tensors(mixed_rows, 2 * n))
    position = np.argsort(order)[:n]
    np.testing.assert_array_equal(np.asarray(mixed)[position], np.asarray(alone))


@pytest.mark.parametrize("vocab", [512, 4096])
def test_no_filter_path_equals_sort_path(vocab):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(32, vocab)).astype(np.float32)
    rows = [{"temperature": 1.0, "seed": 9, "step": i} for i in range(31)]
    plain = jit_sample(jnp.asarray(logits), tensors(rows + [{"temperature": 1.0, "seed": 1}], 32))
    with_filter = rows + [{"temperature": 1.0, "seed": 1, "top_p": 0.99, "top_k": 3000}]  # takes the full sort
    sorted_path = jit_sample(jnp.asarray(logits), tensors(with_filter, 32))
    np.testing.assert_array_equal(np.asarray(plain)[:31], np.asarray(sorted_path)[:31])


def test_steps_and_seeds_change_draws():
    rows = [{"temperature": 1.0, "seed": 11, "step": step} for step in range(64)]
    tokens = jit_sample(jnp.zeros((64, 300)), tensors(rows, 64))
    assert len(set(np.asarray(tokens).tolist())) > 45
    rows = [{"temperature": 1.0, "seed": seed, "step": 0} for seed in range(64)]
    tokens = jit_sample(jnp.zeros((64, 300)), tensors(rows, 64))
    assert len(set(np.asarray(tokens).tolist())) > 45


def test_mixed_batch():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(64, 300)).astype(np.float32)
    rows = [{"temperature": 0.0} if i % 2 else {"temperature": 2.0, "seed": i, "top_k": 50} for i in range(60)]
    tokens = np.asarray(jit_sample(jnp.asarray(logits), tensors(rows, 64)))
    argmax = np.argmax(logits, axis=-1)
    greedy = np.array([i % 2 == 1 or i >= 60 for i in range(64)])
    np.testing.assert_array_equal(tokens[greedy], argmax[greedy])
    assert np.mean(tokens[~greedy] != argmax[~greedy]) > 0.5


def test_logprobs_are_raw_log_softmax():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(64, 300)) * 3, jnp.bfloat16)
    rows = [{"temperature": 0.5, "top_k": 10, "seed": i} for i in range(32)]
    result = jit_sample(logits, tensors(rows, 64), num_logprobs=5)
    expected = np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))
    np.testing.assert_allclose(result.token_logprobs, expected[np.arange(64), np.asarray(result.tokens)], rtol=1e-6)
    order = np.argsort(-expected, axis=-1, kind="stable")[:, :5]
    np.testing.assert_array_equal(result.top_ids, order)
    np.testing.assert_allclose(result.top_logprobs, np.take_along_axis(expected, order, axis=-1), rtol=1e-6)
    assert np.all(np.diff(np.asarray(result.top_logprobs), axis=-1) <= 0)
    np.testing.assert_array_equal(result.tokens, jit_sample(logits, tensors(rows, 64)))


@pytest.mark.parametrize("row, field", [
    ({"temperature": -0.1, "seed": 0}, "temperature"),
    ({"temperature": float("nan"), "seed": 0}, "temperature"),
    ({"top_p": 0.0, "seed": 0}, "top_p"),
    ({"top_p": 1.5, "seed": 0}, "top_p"),
    ({"min_p": -0.1, "seed": 0}, "min_p"),
    ({"min_p": 1.1, "seed": 0}, "min_p"),
    ({"top_k": 5.0, "seed": 0}, "top_k"),
    ({"top_k": "5", "seed": 0}, "top_k"),
    ({"temperature": 1.0}, "seed"),
    ({"seed": 0, "step": -1}, "step"),
])
def test_validation_errors(row, field):
    with pytest.raises(ValueError, match=field):
        SamplingRow.validated(**row)


def test_from_rows_pads_with_greedy_rows():
    rows = [SamplingRow.validated(temperature=0.9, top_k=-1, top_p=0.8, min_p=0.1, seed=-1, step=4),
            SamplingRow.validated(temperature=0.0)]
    st = SamplingTensors.from_rows(rows, pad_to=4)
    np.testing.assert_allclose(st.temperature, [0.9, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(st.top_k, [0, 0, 0, 0])
    np.testing.assert_allclose(st.top_p, [0.8, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(st.seed, [2**32 - 1, 0, 0, 0])
    np.testing.assert_array_equal(st.step, [4, 0, 0, 0])
    assert (st.seed.dtype, st.top_k.dtype, st.temperature.dtype) == (jnp.uint32, jnp.int32, jnp.float32)
    with pytest.raises(ValueError, match="pad_to"):
        SamplingTensors.from_rows(rows, pad_to=1)


def test_rows_are_validated_once_and_only_change_their_step():
    row = SamplingRow.validated(temperature=0.5, top_k=2**31, top_p=0.5, seed=2**32 + 3)
    assert row == SamplingRow(0.5, 0, 0.5, 0.0, 3, 0)  # top_k out of int32 range is off; the seed wraps
    assert row.at_step(9) == row._replace(step=9) and type(row.at_step(9)) is SamplingRow
    assert SamplingRow.validated(temperature=0.0) == GREEDY_ROW
    with pytest.raises(ValueError, match="top_p must be a number"):
        SamplingRow.validated(top_p=None, seed=0)  # no field takes None for its default (only a greedy seed)
    with pytest.raises(ValueError, match="temperature is too large"):
        SamplingRow.validated(temperature=10**400, seed=0)


def test_jit_retraces_on_the_sampling_mode_only():
    traces = []

    def step(logits, st):
        traces.append(st.mode)
        return sample(logits, st, num_logprobs=2)

    jitted = jax.jit(step)
    logits = jnp.asarray(np.random.default_rng(6).normal(size=(8, 100)), jnp.float32)
    first = jitted(logits, tensors([], 8))
    jitted(logits * 3, tensors([{"temperature": 0.0}] * 3, 8))
    rows = [{"temperature": 1.0, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "seed": 3, "step": 2}] * 8
    second = jitted(logits * 2, tensors(rows, 8))
    other = [{"temperature": 0.7, "top_k": 0, "top_p": 0.9, "min_p": 0.0, "seed": 9, "step": 5}] * 8
    jitted(logits, tensors(other, 8))
    jitted(logits, tensors([{"temperature": 0.5, "seed": 1}] * 8, 8))
    assert traces == [GREEDY, FILTERED, RANDOM]
    np.testing.assert_array_equal(first.tokens, np.argmax(np.asarray(logits), axis=-1))
    assert second.tokens.shape == (8,)


def test_every_mode_draws_what_the_filtered_mode_draws():
    """The mode only skips work: a row draws the same token in the cheapest mode that covers it and in FILTERED."""
    logits = jnp.asarray(np.random.default_rng(8).normal(size=(6, 300)) * 2, jnp.float32)
    greedy = [SamplingRow.validated(temperature=0.0)] * 6
    sampled = [SamplingRow.validated(temperature=0.8, min_p=m, seed=s, step=4) for s, m in enumerate([0, .1] * 3)]
    for rows, mode in ((greedy, GREEDY), (sampled, RANDOM), (greedy[:3] + sampled[:3], RANDOM)):
        st = SamplingTensors.from_rows(rows)
        assert st.mode == mode
        cheap = np.asarray(sample(logits, jax.tree.map(jnp.asarray, st)))
        full = np.asarray(sample(logits, jax.tree.map(jnp.asarray, st.replace(mode=FILTERED))))
        np.testing.assert_array_equal(cheap, full)


def test_banned_tokens_are_never_sampled_but_keep_their_logprobs():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 64)) * 3, jnp.float32)
    best = np.asarray(jnp.argmax(logits, axis=-1))
    rows = [GREEDY_ROW, SamplingRow.validated(temperature=1.0, seed=1),
            SamplingRow.validated(temperature=0.5, top_k=2, seed=2), GREEDY_ROW]
    banned = [[int(best[0])], list(range(0, 64, 2)), [int(best[2])], None]
    st = jax.tree.map(jnp.asarray, SamplingTensors.from_rows(rows, banned))
    run = jax.jit(lambda st: sample(logits, st, num_logprobs=2))
    for step in range(20):
        out = run(st.replace(step=st.step + step))
        tokens = np.asarray(out.tokens)
        assert tokens[0] != best[0] and tokens[1] % 2 == 1 and tokens[2] != best[2]
        assert tokens[3] == best[3]
    raw = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[0, 0], raw[0].max(), rtol=1e-6)


def test_logit_bias_matches_transformers_sequence_bias_and_steers_the_draw():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 64)).astype(np.float32) * 3
    bias = [{5: 100.0, 7: -3.5}, None, {0: -100.0, 63: 2.25, int(np.argmax(logits[2])): -100.0}]
    rows = [GREEDY_ROW, GREEDY_ROW, SamplingRow.validated(temperature=1.0, seed=4)]
    st = jax.tree.map(jnp.asarray, SamplingTensors.from_rows(rows, bias=bias))
    ours = np.asarray(sampling.adjust_logits(jnp.asarray(logits), st))
    np.testing.assert_array_equal(ours[1], logits[1])
    for i in (0, 2):  # one processor per row: transformers' bias is per batch
        processor = transformers.SequenceBiasLogitsProcessor({(t,): b for t, b in bias[i].items()})
        theirs = processor(torch.zeros((1, 1), dtype=torch.long), torch.from_numpy(logits[i:i + 1].copy()))
        np.testing.assert_array_equal(ours[i], theirs[0].numpy())
    tokens = np.asarray(jit_sample(jnp.asarray(logits), st))
    assert tokens[0] == 5 and tokens[1] == np.argmax(logits[1]) and tokens[2] != np.argmax(logits[2])
    assert SamplingTensors.from_rows(rows).bias_ids.shape == (3, 0)  # no bias: no table, no scatter


def test_allowed_ids_restrict_only_their_rows_and_keep_raw_logprobs():
    logits = jnp.asarray(np.random.default_rng(7).normal(size=(3, 64)) * 3, jnp.float32)
    rows = [GREEDY_ROW, SamplingRow.validated(temperature=2.0, seed=1), GREEDY_ROW]
    allowed = [token_mask([3, 40], 64), token_mask([1, 2, 5], 64), None]
    assert mask_ids(allowed[0]) == [3, 40] and allowed[0].shape == (2,)
    st = jax.tree.map(jnp.asarray, SamplingTensors.from_rows(rows, allowed=allowed))
    run = jax.jit(lambda st: sample(logits, st, num_logprobs=1))
    drawn = set()
    for step in range(40):
        out = run(st.replace(step=st.step + step))
        tokens = np.asarray(out.tokens)
        assert tokens[0] == [3, 40][int(np.argmax(np.asarray(logits)[0, [3, 40]]))]
        assert tokens[2] == int(jnp.argmax(logits[2]))
        drawn.add(int(tokens[1]))
    assert drawn <= {1, 2, 5} and len(drawn) > 1
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[:, 0], np.asarray(jax.nn.log_softmax(logits)).max(-1),
                               rtol=1e-6)


def test_an_unrestricted_row_beside_a_mask_samples_anything_and_a_short_mask_is_refused():
    logits = jnp.zeros((2, 100), jnp.float32).at[:, 90].set(5.0).at[:, 7].set(1.0)
    st = SamplingTensors.from_rows([GREEDY_ROW, GREEDY_ROW], allowed=[token_mask([7, 30], 100), None])
    assert st.allowed.shape == (2, 4) and (st.allowed[1] == -1).all()
    assert np.asarray(jit_sample(logits, jax.tree.map(jnp.asarray, st))).tolist() == [7, 90]
    short = SamplingTensors.from_rows([GREEDY_ROW], allowed=[token_mask([7], 40)])
    with pytest.raises(ValueError, match="do not cover a vocabulary of 100"):
        jit_sample(logits[:1], jax.tree.map(jnp.asarray, short))
