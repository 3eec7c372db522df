"""Penalties on the device against transformers' RepetitionPenaltyLogitsProcessor and the OpenAI formula."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from runner.penalties import PenaltyHistory, PenaltyRow, apply_penalties, penalty_tables
from runner.sampling import GREEDY_ROW, SamplingTensors, adjust_logits


def reference(logits, prompt, output, repetition, frequency, presence):
    """vLLM's order: repetition over prompt and output, then frequency and presence over the output."""
    x = logits.astype(np.float64).copy()
    seen = sorted(set(prompt) | set(output))
    x[seen] = np.where(x[seen] > 0, x[seen] / repetition, x[seen] * repetition)
    for token in set(output):
        x[token] -= frequency * output.count(token) + presence
    return x


def test_history_lists_each_token_once_with_its_output_count():
    history = PenaltyHistory(1.5, 0.5, 0.25, [4, 9, 4, 2])
    for token in (9, 7, 9, 4):
        history.add(token)
    assert history.row() == PenaltyRow(1.5, 0.5, 0.25, [4, 9, 2, 7], [1, 2, 0, 1])
    ids, counts, penalties = penalty_tables([None, history.row()], 3)
    assert ids.shape == (3, 4) and (ids[0] == -1).all() and (ids[2] == -1).all()
    assert counts[1].tolist() == [1, 2, 0, 1] and penalties.tolist() == [[1, 0, 0], [1.5, 0.5, 0.25], [1, 0, 0]]
    assert penalty_tables([None, None], 2)[0].shape == (2, 0)  # no penalties: no table, nothing on the device


@pytest.mark.parametrize("repetition, frequency, presence", [(1.3, 0.0, 0.0), (1.0, 0.7, -0.4), (0.8, -1.5, 2.0)])
def test_penalties_match_the_reference_and_count_the_pending_token(repetition, frequency, presence):
    rng = np.random.default_rng(5)
    vocab = 50
    logits = (rng.normal(size=(4, vocab)) * 4).astype(np.float32)
    prompts = [[1, 2, 3, 2], [10, 11], [5], [7, 7]]
    outputs = [[3, 3, 40], [11, 12, 12, 12], [], [8]]
    pending = [40, 30, 5, -1]  # listed in the output, new, listed in the prompt only, none
    rows = []
    for prompt, output in zip(prompts, outputs):
        history = PenaltyHistory(repetition, frequency, presence, prompt)
        for token in output:
            history.add(token)
        rows.append(history.row())
    ids, counts, penalties = penalty_tables(rows, 4)
    got = np.asarray(apply_penalties(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(counts),
                                     jnp.asarray(penalties), jnp.asarray(pending, jnp.int32)))
    for i in range(4):
        output = outputs[i] + ([pending[i]] if pending[i] >= 0 else [])
        want = reference(logits[i], prompts[i], output, repetition, frequency, presence)
        np.testing.assert_allclose(got[i], want, rtol=1e-6, atol=1e-6)


def test_repetition_penalty_matches_transformers_and_a_neutral_row_is_untouched():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=(2, 64)) * 3).astype(np.float32)
    sequence = [3, 17, 17, 60, 3, 0]
    history = PenaltyHistory(1.7, 0.0, 0.0, sequence[:4])
    for token in sequence[4:]:
        history.add(token)
    st = jax.tree.map(jnp.asarray, SamplingTensors.from_rows([GREEDY_ROW, GREEDY_ROW], penalties=[history.row(), None]))
    ours = np.asarray(adjust_logits(jnp.asarray(logits), st))
    processor = transformers.RepetitionPenaltyLogitsProcessor(1.7)
    theirs = processor(torch.tensor([sequence]), torch.from_numpy(logits[:1].copy()))[0].numpy()
    np.testing.assert_allclose(ours[0], theirs, rtol=1e-6)
    np.testing.assert_array_equal(ours[1], logits[1])
