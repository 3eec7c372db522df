"""Prometheus metrics: values after requests on the mock engine, and a scrape of a serving server over HTTP."""

import asyncio
import random
import urllib.request

from nexus_jax import LLM, SamplingParams
from nexus_jax.server.metrics import EngineMetrics
from nexus_jax.testing.engines import make_engine
from nexus_jax.testing.metrics import samples
from nexus_jax.testing.serving import serving


def test_finished_requests_are_counted_and_timed():
    engine = make_engine()
    metrics = EngineMetrics(engine)
    prompts = [{"prompt_token_ids": [random.randrange(500) for _ in range(random.randint(1, 30))]}
               for _ in range(5)]
    lengths = [random.randint(1, 9) for _ in prompts]
    outs = LLM.from_engine(engine).generate(prompts, [SamplingParams(max_tokens=n) for n in lengths],
                                            use_tqdm=False)
    for out in outs:
        metrics.observe(out)
    got = samples(metrics.exposition().decode())
    assert got[("nexus:prompt_tokens_total", ())] == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert got[("nexus:generation_tokens_total", ())] == sum(lengths)
    assert got[("nexus:request_success_total", (("finished_reason", "length"),))] == 5
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert got[(f"nexus:{name}_count", ())] == 5
        assert got[(f"nexus:{name}_sum", ())] > 0
    assert got[("nexus:inter_token_latency_seconds_count", ())] == sum(n - 1 for n in lengths)
    assert got[("nexus:num_requests_running", ())] == 0 and got[("nexus:kv_cache_usage_perc", ())] == 0
    assert got[("nexus:sm_split", (("split", "aggregated"),))] == 1
    assert got[("nexus:partition_switches_total", ())] == 0
    assert got[("nexus:num_preemptions_total", ())] == engine.scheduler.num_preemptions


def test_levels_are_read_at_scrape_time():
    engine = make_engine()
    metrics = EngineMetrics(engine)
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": [1] * 20}, SamplingParams(max_tokens=5))
    assert samples(metrics.exposition().decode())[("nexus:num_requests_waiting", ())] == 3
    engine.step()
    got = samples(metrics.exposition().decode())
    assert got[("nexus:num_requests_running", ())] == 3 and got[("nexus:num_requests_waiting", ())] == 0
    assert 0 < got[("nexus:kv_cache_usage_perc", ())] <= 1


def test_server_metrics_scraped_over_http():
    async def main():
        async with serving(make_engine()) as (server, client):
            mport = server.metrics.serve_http(0)
            for i in range(4):
                async for _ in client.generate([i + 1, 2, 3], max_tokens=6):
                    pass
            return await asyncio.to_thread(lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode())
    got = samples(asyncio.run(main()))
    assert got[("nexus:prompt_tokens_total", ())] == 12 and got[("nexus:generation_tokens_total", ())] == 24
    assert got[("nexus:time_to_first_token_seconds_count", ())] == 4
