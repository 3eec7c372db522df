"""Prometheus metrics with vLLM's names under the `nexus:` prefix, one private registry per server.

Per-request latencies are observed when a request finishes (its RequestMetrics holds every timestamp); engine
levels (running, waiting, KV use, preemptions) are read from the engine at scrape time, so they are never stale.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nexus_jax.engine import LLMEngine
from nexus_jax.outputs import RequestOutput

# vLLM's buckets, so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineCollector(Collector):
    """Scrape-time levels of one engine (and the placeholders of features still to come)."""

    def __init__(self, engine: LLMEngine, sm_split: str):
        self.engine = engine
        self.sm_split = sm_split

    def collect(self) -> Iterator[Any]:
        stats = self.engine.stats()  # plain reads of the engine thread's state; a scrape may be one step behind
        for name, key, doc in (("running", "running", "Requests being run"),
                               ("waiting", "waiting", "Requests waiting to be scheduled")):
            g = GaugeMetricFamily(f"nexus:num_requests_{name}", doc)
            g.add_metric([], float(stats[key]))
            yield g
        g = GaugeMetricFamily("nexus:kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)")
        g.add_metric([], float(stats["kv_usage"]))
        yield g
        c = CounterMetricFamily("nexus:num_preemptions", "Preemptions by the scheduler")
        c.add_metric([], float(stats["num_preemptions"]))
        yield c
        # The disaggregated engine reports its partition controller; the aggregated one is one partition.
        controller = stats.get("controller") or {}
        g = GaugeMetricFamily("nexus:sm_split", "Current SM split between prefill and decode", labels=["split"])
        g.add_metric([str(controller.get("current") or self.sm_split)], 1.0)
        yield g
        c = CounterMetricFamily("nexus:partition_switches", "Changes of the SM split")
        c.add_metric([], float(controller.get("switches", 0)))
        yield c
        c = CounterMetricFamily("nexus:partition_decisions", "Partition decisions by mode", labels=["mode"])
        for mode, n in sorted((controller.get("modes") or {}).items()):
            c.add_metric([mode], float(n))
        yield c
        # Swap preemption (aggregated engine in swap mode) and worker faults (disaggregated engine).
        counts = {k[4:]: stats[k] for k in ("num_swap_outs", "num_swap_ins", "num_swap_fallbacks")
                  if k in stats}
        counts.update(stats.get("faults") or {})
        for name, value in counts.items():
            c = CounterMetricFamily(f"nexus:{name}", f"{name.replace('_', ' ')} since start")
            c.add_metric([], float(value))
            yield c


class EngineMetrics:
    """The metrics of one engine; `observe(output)` for every finished request."""

    def __init__(self, engine: LLMEngine, registry: CollectorRegistry | None = None, sm_split: str = "aggregated"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("nexus:time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("nexus:inter_token_latency_seconds", "Inter-token latency", buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("nexus:e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("nexus:request_queue_time_seconds", "Time waiting before first scheduled",
                               buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nexus:prompt_tokens", "Prefill tokens processed", registry=r)
        self.generation_tokens = Counter("nexus:generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("nexus:request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        r.register(_EngineCollector(engine, sm_split))
        self._http = None

    def observe(self, out: RequestOutput) -> None:
        """Records a finished request: its latencies, its token counts and its finish reasons."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        for c in out.outputs:
            self.generation_tokens.inc(len(c.token_ids))
            self.requests.labels(c.finish_reason or "unknown").inc()
        m = out.metrics
        if m is None:
            return
        for hist, value in ((self.ttft, m.ttft), (self.e2e, m.e2e), (self.queue, m.queue_time)):
            if value is not None:
                hist.observe(value)
        for gap in m.itl:
            self.itl.observe(gap)

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)

    def serve_http(self, port: int, host: str = "127.0.0.1") -> int:
        """Serves /metrics on a background thread; returns the bound port (port 0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return server.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None

