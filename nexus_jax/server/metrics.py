"""Prometheus metrics with vLLM's names under the `nexus_` prefix, one private registry per server.

vLLM writes `vllm:`, but Prometheus reserves colons for recording rules (`promtool check metrics` rejects them),
so the names here are what a Prometheus rule would not clash with: `nexus_request_success_total` and so on.

Per-request latencies are observed when a request finishes (its RequestMetrics holds every timestamp); engine
levels (running, waiting, KV use, preemptions) are read from the engines at scrape time, so they are never stale.
Over several replicas (a front end with `replicas`, as ReplicatedAsyncLLM) the usual names carry the totals, and
`nexus_replica_*` series with a `replica` label give each replica's levels and whether its engine thread is alive.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from nexus_jax.core.engine import LLMEngine
from nexus_jax.core.outputs import RequestOutput

# vLLM's buckets, so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0, 1920.0, 7680.0)


def replicas_of(llm: Any) -> list[Any]:
    """The AsyncLLMs behind a front end: a ReplicatedAsyncLLM's replicas, or an AsyncLLM itself."""
    return list(getattr(llm, "replicas", None) or [llm])


def replica_stats(source: Any) -> list[tuple[bool, dict[str, Any]]]:
    """(alive, engine.stats()) per engine behind `source`: an LLMEngine, an AsyncLLM or a ReplicatedAsyncLLM. An
    engine whose thread died is not alive; its stats are where it stopped. Plain reads of the engine threads'
    state: they may be one step behind."""
    if isinstance(source, LLMEngine):
        return [(True, source.stats())]
    return [(r.dead_error is None, r.engine.stats()) for r in replicas_of(source)]


@dataclasses.dataclass
class Totals:
    """Levels of several engines. Levels (running, waiting, KV use, SM split) count live engines only: a dead
    one runs nothing. Counters count every engine, so that a total never goes down when a replica dies."""
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0  # mean over live engines: each has its own pool, and a sum of fractions is no fraction
    num_preemptions: int = 0
    splits: dict[str, int] = dataclasses.field(default_factory=dict)       # live engines per SM split
    switches: int = 0                                                       # changes of the SM split
    modes: dict[str, int] = dataclasses.field(default_factory=dict)        # partition decisions by mode
    counters: dict[str, int] = dataclasses.field(default_factory=dict)     # swap and fault counters by name


def totals(per_engine: list[tuple[bool, dict[str, Any]]], sm_split: str = "aggregated") -> Totals:
    """The totals of replica_stats(...); `sm_split` names the split of an engine without a partition controller."""
    t = Totals()
    splits: collections.Counter = collections.Counter()
    modes: collections.Counter = collections.Counter()
    counters: collections.Counter = collections.Counter()
    live = [stats for alive, stats in per_engine if alive]
    for stats in live:
        t.running += stats["running"]
        t.waiting += stats["waiting"]
        # The disaggregated engine reports its partition controller; the aggregated one is one partition.
        splits[(stats.get("controller") or {}).get("current") or sm_split] += 1
    t.kv_usage = sum(stats["kv_usage"] for stats in live) / len(live) if live else 0.0
    for _, stats in per_engine:
        t.num_preemptions += stats["num_preemptions"]
        controller = stats.get("controller") or {}
        t.switches += controller.get("switches", 0)
        modes.update(controller.get("modes") or {})
        # Swap preemption (aggregated engine in swap mode) and worker faults (disaggregated engine).
        counters.update({k[4:]: stats[k] for k in ("num_swap_outs", "num_swap_ins", "num_swap_fallbacks")
                         if k in stats})
        counters.update(stats.get("faults") or {})
        # Prompt tokens served from the prefix cache, split by tier (the host tier: EngineConfig.host_cache_gib).
        counters.update({k: stats[k] for k in ("prefix_cache_device_hit_tokens", "prefix_cache_host_hit_tokens")
                         if k in stats})
    t.splits, t.modes, t.counters = dict(splits), dict(modes), dict(counters)
    return t


class _EngineCollector(Collector):
    """Scrape-time levels of the engines behind a source (and the placeholders of features still to come)."""

    def __init__(self, source: Any, sm_split: str):
        self.source = source
        self.sm_split = sm_split
        self.replicated = hasattr(source, "replicas")  # one engine keeps the plain names only

    def collect(self) -> Iterator[Any]:
        per_engine = replica_stats(self.source)
        t = totals(per_engine, self.sm_split)
        for name, value, doc in (("running", t.running, "Requests being run"),
                                 ("waiting", t.waiting, "Requests waiting to be scheduled")):
            g = GaugeMetricFamily(f"nexus_num_requests_{name}", doc)
            g.add_metric([], float(value))
            yield g
        g = GaugeMetricFamily("nexus_kv_cache_usage_perc", "Fraction of KV cache blocks in use (0-1)")
        g.add_metric([], float(t.kv_usage))
        yield g
        c = CounterMetricFamily("nexus_num_preemptions", "Preemptions by the scheduler")
        c.add_metric([], float(t.num_preemptions))
        yield c
        g = GaugeMetricFamily("nexus_sm_split", "Current SM split between prefill and decode", labels=["split"])
        for split, n in t.splits.items():
            g.add_metric([str(split)], float(n))
        yield g
        c = CounterMetricFamily("nexus_partition_switches", "Changes of the SM split")
        c.add_metric([], float(t.switches))
        yield c
        c = CounterMetricFamily("nexus_partition_decisions", "Partition decisions by mode", labels=["mode"])
        for mode, n in sorted(t.modes.items()):
            c.add_metric([mode], float(n))
        yield c
        for name, value in t.counters.items():
            c = CounterMetricFamily(f"nexus_{name}", f"{name.replace('_', ' ')} since start")
            c.add_metric([], float(value))
            yield c
        yield from _decision_families(per_engine)
        if self.replicated:
            yield from _replica_families(per_engine)


def _decision_families(per_engine: list[tuple[bool, dict[str, Any]]]) -> Iterator[Any]:
    """What each live engine's partition controller predicted for every candidate at its last decision (its
    `controller.last`), so a dashboard shows why the split is what it is."""
    families = {key: GaugeMetricFamily(f"nexus_partition_predicted_{name}", doc, labels=["replica", "candidate"])
                for key, name, doc in (
                    ("ttft", "ttft_seconds", "Predicted TTFT of the worst waiting prompt, per candidate partition"),
                    ("tbt", "tbt_seconds", "Predicted time between tokens, per candidate partition"),
                    ("goodput", "goodput", "Requests predicted to meet both SLOs, per candidate partition"))}
    for i, (live, stats) in enumerate(per_engine):
        last = (stats.get("controller") or {}).get("last") if live else None
        for candidate in (last or {}).get("candidates", []):
            for key, family in families.items():
                family.add_metric([str(i), candidate["candidate"]], float(candidate[key]))
    yield from families.values()


def _replica_families(per_engine: list[tuple[bool, dict[str, Any]]]) -> Iterator[Any]:
    """Each replica's liveness, and the levels of the live ones (a dead replica runs nothing)."""
    alive = GaugeMetricFamily("nexus_replica_alive", "1 while the replica's engine thread runs", labels=["replica"])
    levels = [GaugeMetricFamily(f"nexus_replica_{name}", doc, labels=["replica"]) for name, doc in (
        ("num_requests_running", "Requests being run on the replica"),
        ("num_requests_waiting", "Requests waiting on the replica"),
        ("kv_cache_usage_perc", "Fraction of the replica's KV cache blocks in use (0-1)"))]
    for i, (live, stats) in enumerate(per_engine):
        alive.add_metric([str(i)], float(live))
        if live:
            for family, key in zip(levels, ("running", "waiting", "kv_usage")):
                family.add_metric([str(i)], float(stats[key]))
    yield alive
    yield from levels


class EngineMetrics:
    """The metrics of the engines behind `source` (an LLMEngine, an AsyncLLM or a ReplicatedAsyncLLM);
    `observe(output)` for every finished request."""

    def __init__(self, source: Any, registry: CollectorRegistry | None = None, sm_split: str = "aggregated"):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("nexus_time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("nexus_inter_token_latency_seconds", "Inter-token latency", buckets=ITL_BUCKETS,
                             registry=r)
        self.e2e = Histogram("nexus_e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue = Histogram("nexus_request_queue_time_seconds", "Time waiting before first scheduled",
                               buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("nexus_prompt_tokens", "Prefill tokens processed", registry=r)
        self.generation_tokens = Counter("nexus_generation_tokens", "Generated tokens", registry=r)
        self.requests = Counter("nexus_request_success", "Finished requests by finish reason",
                                ["finished_reason"], registry=r)
        r.register(_EngineCollector(source, sm_split))
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

    def aborted(self, completions: int) -> None:
        """Records a request aborted before its last output was read (its client cancelled or went away): its
        completions count as finished with reason "abort", as vLLM counts them."""
        self.requests.labels("abort").inc(completions)

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

