"""A step program whose scratch would not fit is refused at warm-up, by name, instead of failing with
RESOURCE_EXHAUSTED mid-serving (the 34-71 GiB allocations of benchmarks/RESULTS.md)."""

import jax.numpy as jnp
import numpy as np
import pytest

from runner import programs
from runner.sampling import SamplingTensors
from runner.step_batch import padding_batch


def test_check_scratch_names_the_largest_program_over_the_free_memory():
    needs = [("forward of 8 decode rows", 2 << 30), ("forward of 128 decode rows + 2048 prefill tokens", 40 << 30)]
    programs.check_scratch(needs, free=41 << 30)  # fits
    programs.check_scratch([], free=0)
    with pytest.raises(MemoryError, match=r"128 decode rows \+ 2048 prefill tokens needs 40.00 GiB.*39.00 GiB are "
                                          r"left.*gpu_memory_utilization"):
        programs.check_scratch(needs, free=39 << 30)


def test_scratch_and_name_of_a_compiled_sampler():
    logits = jnp.zeros((16, 1000), jnp.float32)
    st = SamplingTensors.from_rows([None] * 16).replace(mode="filtered")
    args = (logits, st, 0, np.zeros(programs.FEED_ROWS, np.int32), np.full(16, -1, np.int32))
    compiled = programs.sample_step.lower(*args).compile()
    # the sort and the noise of 16 x 1000 float32 scores at least, and nothing like a model's worth
    assert 16 * 1000 * 4 <= programs.scratch_bytes(compiled) < 1 << 28
    assert programs.describe(programs.sample_step, args) == "sampler of 16 rows (filtered)"


def test_name_of_a_forward_shape():
    batch = padding_batch(8, 64, 32)
    assert programs.describe(programs.forward, (None, None, None, batch)) == (
        "forward of 8 decode rows + 64 prefill tokens, tables of 32 blocks")
