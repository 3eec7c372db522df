"""prefill_order in the aggregated engine: "spf" admits the shortest remaining prompt first, aged by the wait, and
"arrival" keeps policy order; "auto" means arrival here and spf in the disaggregated mode."""

import time

import pytest

from nexus_jax import EngineConfig, SamplingParams
from nexus_jax.core.block_manager import BlockManager
from nexus_jax.core.outputs import RequestMetrics
from nexus_jax.core.request import Request
from nexus_jax.core.scheduler import Scheduler
from nexus_jax.core.stop import StopChecker
from nexus_jax.testing.engines import make_engine


def request(rid: str, n: int, arrival: float) -> Request:
    params = SamplingParams(max_tokens=2)
    return Request(rid, list(range(1, n + 1)), params, params.to_row(0), StopChecker(params, None, ()),
                   RequestMetrics(arrival))


def first_admitted(order: str, long_waited: float) -> str:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=8, prefill_order=order)
    now = time.monotonic()
    sched.add(request("long", 100, now - long_waited))
    sched.add(request("short", 5, now))
    return sched.schedule().prefills[0].request.request_id


def test_spf_admits_the_short_prompt_first_until_the_long_one_has_aged():
    assert first_admitted("spf", long_waited=0.1) == "short"
    assert first_admitted("spf", long_waited=10.0) == "long"   # 100 - 15 * 10 < 5
    assert first_admitted("arrival", long_waited=0.1) == "long"


def test_auto_resolves_per_mode_and_bad_values_raise():
    assert make_engine().scheduler.prefill_order == "arrival"
    assert make_engine(prefill_order="spf").scheduler.prefill_order == "spf"
    with pytest.raises(ValueError, match="prefill_order"):
        EngineConfig(prefill_order="shortest")
    with pytest.raises(ValueError, match="prefill_order"):
        Scheduler(BlockManager(8, 4), max_num_seqs=1, max_num_batched_tokens=4, prefill_order="lifo")


def test_default_aging_lets_no_prompt_be_overtaken_for_longer_than_the_ttft_slo():
    def first(long_waited: float) -> str:
        engine = make_engine(prefill_order="spf", slo_ttft=0.5)
        assert engine.scheduler.prefill_aging == engine.max_model_len / 0.5
        now = time.monotonic()
        engine.scheduler.add(request("long", engine.max_model_len - 8, now - long_waited))
        engine.scheduler.add(request("short", 5, now))
        return engine.scheduler.schedule().prefills[0].request.request_id
    assert first(long_waited=0.4) == "short"
    assert first(long_waited=0.5) == "long"  # a prompt of max_model_len waits at most slo_ttft behind later ones
    assert make_engine(prefill_order="spf", prefill_aging=15.0).scheduler.prefill_aging == 15.0
    with pytest.raises(ValueError, match="prefill_aging"):
        EngineConfig(prefill_aging=-1.0)
