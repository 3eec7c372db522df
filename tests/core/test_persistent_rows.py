"""The runner's persistent decode rows (runner.batch_state) change no output: the tiny model's engine gives the same
outputs when its steps' decodes carry sequence ids (rows kept across steps, out of chunk order once requests
leave and join) as when they do not (every step rebuilt in chunk order), synchronously and overlapped, with
look-ahead, and under preemption."""

from __future__ import annotations

import dataclasses

import pytest

from nexus_jax import EngineConfig
from nexus_jax.core.engine import LLMEngine
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.testing.runs import assert_same_outputs, both, greedy
from tests.core.test_async_scheduling import CAPITALS, REAL_WORKLOAD


def engine(rebuild: bool, **cfg) -> LLMEngine:
    cfg = {"max_num_batched_tokens": 32, "cpu_kv_cache_tokens": 4096, **cfg}
    built = build_engine(EngineConfig(dtype="float32", **cfg))
    if rebuild:
        real = built.executor.dispatch
        built.executor.dispatch = lambda step: real(dataclasses.replace(
            step, decodes=[dataclasses.replace(c, seq_id=None) for c in step.decodes]))
    return built


PREEMPTING = {0: [(f"r{i}", CAPITALS + " x" * i, greedy(30)) for i in range(4)],
              4: [("late", "Once upon a time", greedy(20))]}


@pytest.mark.parametrize("workload,cfg", [(REAL_WORKLOAD, {}), (REAL_WORKLOAD, {"num_scheduler_steps": 4}),
                                          (PREEMPTING, {"cpu_kv_cache_tokens": 160})],
                         ids=["mixed", "look_ahead", "preempting"])
def test_outputs_are_the_same_with_persistent_rows(workload, cfg):
    kept = both(lambda **c: engine(False, **cfg, **c), workload)
    rebuilt = both(lambda **c: engine(True, **cfg, **c), workload)
    for a, b in zip(kept, rebuilt):
        assert_same_outputs(a, b, rel=1e-5)
    if workload is PREEMPTING:
        assert all(r.engine.scheduler.num_preemptions for r in kept), "no preemption happened"
