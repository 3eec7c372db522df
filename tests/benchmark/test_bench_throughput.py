"""bench_throughput's StepTimer: every step of either loop is recorded once, with its decode rows, prefill tokens
and its time; an overlapped step's time is the device's pace (the mock's simulated step time), not its dispatch."""

import pytest

from benchmarks.bench_throughput import StepTimer
from nexus_jax.testing.engines import make_engine
from nexus_jax.testing.runs import greedy, ids

STEP_SECONDS = 0.02


@pytest.mark.parametrize("overlap", [False, True])
def test_step_timer_records_every_step_at_the_device_pace(overlap):
    engine = make_engine(step_seconds=STEP_SECONDS, async_scheduling=overlap)
    timer = StepTimer(engine.executor)
    for i in range(3):
        engine.add_request(f"r{i}", ids(range(10 * i, 10 * i + 5)), greedy(6))
    while engine.has_unfinished_requests():
        engine.step()
    timer.restore()
    assert "dispatch" not in vars(engine.executor)  # the executor's own methods again
    prefills = [s for s in timer.steps if s[1]]
    decodes = [s for s in timer.steps if not s[1]]
    assert sum(s[1] for s in prefills) == 15  # every prompt token prefilled once
    assert len(decodes) == 5 and all(s[0] == 3 for s in decodes)  # 6 tokens: one from the prefill, 5 decodes
    assert all(s[3] == pytest.approx(STEP_SECONDS, abs=0.015) for s in decodes)


def test_the_transformers_baseline_reads_the_preset_it_compares_with():
    # It read ../../configs from the benchmark's folder, which the layout move broke (the H100 run lost its baseline)
    from benchmarks.bench_throughput import preset_fields
    fields = preset_fields("llama-3.1-8b")
    assert fields["num_hidden_layers"] == 32 and "architectures" not in fields
