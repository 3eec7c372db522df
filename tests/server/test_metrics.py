"""Prometheus metrics: values after requests on the mock engine, and a scrape of a serving server over HTTP."""

import asyncio
import random
import re
import shutil
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from nexus_jax import LLM, SamplingParams
from nexus_jax.server.metrics import EngineMetrics
from nexus_jax.testing.engines import make_engine
from nexus_jax.testing.metrics import samples
from nexus_jax.testing.serving import serving
from nexus_jax.testing.streams import wait_until


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
    assert got[("nexus_prompt_tokens_total", ())] == sum(len(p["prompt_token_ids"]) for p in prompts)
    assert got[("nexus_generation_tokens_total", ())] == sum(lengths)
    assert got[("nexus_request_success_total", (("finished_reason", "length"),))] == 5
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert got[(f"nexus_{name}_count", ())] == 5
        assert got[(f"nexus_{name}_sum", ())] > 0
    assert got[("nexus_inter_token_latency_seconds_count", ())] == sum(n - 1 for n in lengths)
    assert got[("nexus_num_requests_running", ())] == 0 and got[("nexus_kv_cache_usage_perc", ())] == 0
    assert got[("nexus_sm_split", (("split", "aggregated"),))] == 1
    assert got[("nexus_partition_switches_total", ())] == 0
    assert got[("nexus_num_preemptions_total", ())] == engine.scheduler.num_preemptions


def test_levels_are_read_at_scrape_time():
    engine = make_engine()
    metrics = EngineMetrics(engine)
    for i in range(3):
        engine.add_request(f"r{i}", {"prompt_token_ids": [1] * 20}, SamplingParams(max_tokens=5))
    assert samples(metrics.exposition().decode())[("nexus_num_requests_waiting", ())] == 3
    engine.step()
    got = samples(metrics.exposition().decode())
    assert got[("nexus_num_requests_running", ())] == 3 and got[("nexus_num_requests_waiting", ())] == 0
    assert 0 < got[("nexus_kv_cache_usage_perc", ())] <= 1


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
    assert got[("nexus_prompt_tokens_total", ())] == 12 and got[("nexus_generation_tokens_total", ())] == 24
    assert got[("nexus_time_to_first_token_seconds_count", ())] == 4


def test_names_and_types_are_valid_prometheus_and_pass_promlint():
    """Every family parses back with its type, has help, and keeps promlint's rules: no colon (reserved for
    recording rules), counters end in _total and nothing else does; promtool checks it too where installed."""
    engine = make_engine()
    metrics = EngineMetrics(engine)
    metrics.observe(LLM.from_engine(engine).generate([{"prompt_token_ids": [1, 2]}], SamplingParams(max_tokens=3),
                                                     use_tqdm=False)[0])
    metrics.aborted(2)
    text = metrics.exposition().decode()
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 12 and {f.type for f in families} == {"counter", "gauge", "histogram"}
    for family in families:
        assert re.fullmatch(r"nexus_[a-z0-9_]+", family.name) and family.documentation, family.name
        for sample in family.samples:
            assert re.fullmatch(r"nexus_[a-z0-9_]+", sample.name) and sample.name.startswith(family.name)
            if family.type == "counter":
                assert sample.name.endswith(("_total", "_created")), sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
    promtool = shutil.which("promtool")
    if promtool:
        run = subprocess.run([promtool, "check", "metrics"], input=text, text=True, capture_output=True)
        assert run.returncode == 0, run.stdout + run.stderr


def test_a_cancelled_or_disconnected_request_counts_as_aborted():
    async def main():
        async with serving(make_engine(step_seconds=0.005)) as (server, client):
            stream = client.generate([1, 2], max_tokens=400, n=3)
            await stream.__anext__()
            await stream.aclose()  # the client cancels
            async for _ in client.generate([3], max_tokens=2):
                pass
            assert await wait_until(lambda: samples(server.metrics.exposition().decode()).get(
                ("nexus_request_success_total", (("finished_reason", "abort"),))) == 3, 5)
            return samples(server.metrics.exposition().decode())
    got = asyncio.run(main())
    assert got[("nexus_request_success_total", (("finished_reason", "length"),))] == 1
