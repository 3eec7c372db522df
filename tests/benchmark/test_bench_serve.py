"""`nexus-jax bench serve`: arrivals, workload distributions, metrics on hand-made timestamps, SLO goodput, the
rate search against a simulated server with a known capacity, the results files, and end-to-end runs over the
mock engine and the embedded default model."""

import argparse
import asyncio
import json
import math
import time

import matplotlib.image
import numpy as np
import pytest

from nexus_jax import AsyncLLM
from nexus_jax.benchmark import report
from nexus_jax.benchmark.cli import SuiteSettings, register, run_suite
from nexus_jax.benchmark.datasets import BenchRequest, LogNormal, load_jsonl, make_requests, sample_lengths
from nexus_jax.benchmark.serve import (
    InProcessBackend,
    RequestRecord,
    RunResult,
    arrival_offsets,
    find_max_rate,
    run_benchmark,
)
from nexus_jax.testing.engines import VOCAB, make_engine

# ---- arrivals

@pytest.mark.parametrize("burstiness", [1.0, 4.0, 0.25])
def test_gamma_arrivals_have_the_rate_and_burstiness(burstiness):
    rate = 40.0
    t = arrival_offsets(40_000, rate, burstiness, np.random.default_rng(1))
    gaps = np.diff(t)
    assert t[0] == 0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / math.sqrt(burstiness), rel=0.05)  # gamma CV
    if burstiness == 1.0:  # Poisson: counts per second have variance = mean = rate
        counts = np.bincount(t.astype(int))[:-1]
        assert counts.mean() == pytest.approx(rate, rel=0.03)
        assert counts.var() == pytest.approx(rate, rel=0.15)


def test_infinite_rate_sends_at_once_and_bad_rates_raise():
    assert (arrival_offsets(7, math.inf, 1.0, np.random.default_rng(0)) == 0).all()
    with pytest.raises(ValueError, match="rate"):
        arrival_offsets(3, 0.0, 1.0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="burstiness"):
        arrival_offsets(3, 1.0, -1.0, np.random.default_rng(0))


# ---- datasets

SPECS = {"sharegpt": ((496, 1367), (97, 474)), "long-doc": ((5905, 9817), (180, None)),
         "arxiv": ((3832, 6894), (200, None))}


@pytest.mark.parametrize("name", list(SPECS))
def test_workload_samples_reproduce_mean_and_p99(name):
    ins, outs, _ = sample_lengths(name, 200_000, np.random.default_rng(2))
    for lengths, (mean, p99) in zip((ins, outs), SPECS[name]):
        assert lengths.min() >= 1
        assert lengths.mean() == pytest.approx(mean, rel=0.02)
        if p99 is not None:
            assert np.percentile(lengths, 99) == pytest.approx(p99, rel=0.03)


def test_lognormal_fit_is_exact_and_rejects_impossible_specs():
    d = LogNormal.fit(496, 1367)
    assert math.exp(d.mu + d.sigma ** 2 / 2) == pytest.approx(496)
    assert math.exp(d.mu + 2.3263478740408408 * d.sigma) == pytest.approx(1367)
    with pytest.raises(ValueError, match="no log-normal"):
        LogNormal.fit(100, 90)
    with pytest.raises(ValueError, match="no log-normal"):
        LogNormal.fit(100, 100 * math.exp(3))  # a P99 too far above the mean for any sigma


def test_mix_is_sixty_forty_and_requests_fit_the_context():
    _, _, names = sample_lengths("mix", 20_000, np.random.default_rng(3))
    assert names.count("sharegpt") / len(names) == pytest.approx(0.6, abs=0.015)
    reqs = make_requests("mix", 300, vocab_size=VOCAB, max_model_len=2048, seed=4)
    assert {r.source for r in reqs} == {"sharegpt", "long-doc"}
    for r in reqs:
        ids = r.prompt["prompt_token_ids"]
        assert len(ids) == r.prompt_len and r.prompt_len + r.output_len <= 2048 and r.output_len <= 1024
        assert min(ids) >= 0 and max(ids) < VOCAB
    # every long document (5905 tokens on average) is longer than the context: clipped to fill it exactly
    assert all(r.prompt_len + r.output_len == 2048 for r in reqs if r.source == "long-doc")
    same = make_requests("mix", 300, vocab_size=VOCAB, max_model_len=2048, seed=4)
    assert [r.prompt for r in same] == [r.prompt for r in reqs]


def test_random_dataset_has_fixed_lengths_and_checks_the_context():
    reqs = make_requests("random", 5, vocab_size=VOCAB, max_model_len=64, input_len=20, output_len=7, seed=1)
    assert [(r.prompt_len, r.output_len, len(r.prompt["prompt_token_ids"])) for r in reqs] == [(20, 7, 20)] * 5
    with pytest.raises(ValueError, match="context"):
        make_requests("random", 5, vocab_size=VOCAB, max_model_len=64, input_len=60, output_len=7)
    with pytest.raises(ValueError, match="unknown"):
        make_requests("nope", 5, vocab_size=VOCAB, max_model_len=64)


def test_jsonl_dataset(tmp_path):
    path = tmp_path / "reqs.jsonl"
    path.write_text('{"prompt": "hello there", "output_len": 5}\n\n{"prompt_token_ids": [1, 2, 3]}\n')
    reqs = load_jsonl(str(path), 5, vocab_size=VOCAB, default_output_len=9)
    assert [(r.prompt, r.prompt_len, r.output_len) for r in reqs[:2]] == [
        ({"prompt": "hello there"}, None, 5), ({"prompt_token_ids": [1, 2, 3]}, 3, 9)]
    assert len(reqs) == 5 and reqs[4].prompt == reqs[0].prompt
    bad = tmp_path / "bad.jsonl"
    for line, message in (('{"prompt_token_ids": [1, 999]}', "vocab|\\[0, 512\\)"), ('[1]', "object"),
                          ('{"prompt": "x", "output_len": 0}', "output_len"), ("{oops", "not JSON")):
        bad.write_text(line + "\n")
        with pytest.raises(ValueError, match=message):
            load_jsonl(str(bad), 1, vocab_size=VOCAB, default_output_len=4)
    with pytest.raises(FileNotFoundError):
        load_jsonl(str(tmp_path / "missing.jsonl"), 1, vocab_size=VOCAB, default_output_len=4)


# ---- metrics

def hand_made_run():
    a = RequestRecord(10, 4, 10.0, [10.5, 10.6, 10.8, 11.1], 11.2, True)
    b = RequestRecord(20, 2, 10.2, [10.4, 10.9], 11.0, True)
    failed = RequestRecord(30, 4, 10.1, [10.3], 10.3, False, "abort")
    return RunResult(math.inf, 1.0, None, 2.0, [a, b, failed])


def test_metrics_on_hand_made_timestamps():
    s = report.summarize(hand_made_run())
    assert (s["completed"], s["failed"], s["total_input_tokens"], s["total_output_tokens"]) == (2, 1, 30, 6)
    assert s["request_throughput"] == pytest.approx(1.0)
    assert s["input_throughput"] == pytest.approx(15.0) and s["output_throughput"] == pytest.approx(3.0)
    assert s["ttft"] == pytest.approx({"mean": 0.35, "median": 0.35, "p90": 0.47, "p99": 0.497})
    assert s["tpot"] == pytest.approx({"mean": 0.35, "median": 0.35, "p90": 0.47, "p99": 0.497})
    assert s["itl"] == pytest.approx({"mean": 0.275, "median": 0.25, "p90": 0.44, "p99": 0.494})
    assert s["max_gap"] == pytest.approx({"mean": 0.4, "median": 0.4, "p90": 0.48, "p99": 0.498})  # 0.3 and 0.5
    assert s["first_gap"] == pytest.approx({"mean": 0.3, "median": 0.3, "p90": 0.46, "p99": 0.496})  # 0.1, 0.5
    assert s["e2e"] == pytest.approx({"mean": 1.0, "median": 1.0, "p90": 1.16, "p99": 1.196})
    assert "goodput" not in s


@pytest.mark.parametrize("slos, good", [({"ttft": 0.3}, 1), ({"ttft": 0.6}, 2), ({"ttft": 0.6, "tpot": 0.3}, 1),
                                        ({"itl": 0.35}, 1), ({"e2e": 0.5}, 0), ({"tpot": 0.6, "e2e": 1.2}, 2)])
def test_goodput_counts_requests_meeting_every_slo(slos, good):
    s = report.summarize(hand_made_run(), slos)
    assert s["good_requests"] == good and s["goodput"] == pytest.approx(good / 2.0)
    # each SLO counts the completed requests over it (TTFTs 0.5 and 0.2, TPOTs 0.2 and 0.5, largest gaps 0.3, 0.5)
    over = {"ttft": {0.3: 1, 0.6: 0}, "tpot": {0.3: 1, 0.6: 0}, "itl": {0.35: 1}, "e2e": {0.5: 2, 1.2: 0}}
    assert s["slo_misses"] == {k: over[k][limit] for k, limit in slos.items()}
    doc = {"label": "hand", "runs": [report.run_to_json(hand_made_run(), s)]}
    assert "(over: " + ", ".join(f"{k} {over[k][v]}" for k, v in slos.items()) + ")" in report.markdown_table([doc])


def test_limits_parse_and_targets_check():
    assert report.parse_limits(["ttft=2", "tpot=0.05"], with_stat=False) == {"ttft": 2.0, "tpot": 0.05}
    assert report.parse_limits(["p90_ttft=2", "p99_tbt=0.05"], with_stat=True) == {"p90_ttft": 2.0, "p99_itl": 0.05}
    for bad, stat in (("ttft", False), ("ttft=-1", False), ("lag=1", False), ("p95_ttft=1", True), ("ttft=1", True)):
        with pytest.raises(ValueError):
            report.parse_limits([bad], with_stat=stat)
    s = report.summarize(RunResult(1.0, 1.0, None, 2.0, hand_made_run().records[:2]))
    assert report.meets_targets(s, {"p90_ttft": 0.5, "p99_itl": 0.5})
    assert not report.meets_targets(s, {"p90_ttft": 0.46})
    assert not report.meets_targets(report.summarize(hand_made_run()), {"p90_ttft": 5.0})  # a failed request


# ---- rate search

def test_ladder_and_bisection_find_a_known_knee():
    def search(knee, **kw):
        async def meets(rate):
            return rate <= knee
        return asyncio.run(find_max_rate(meets, **kw))
    best, tried = search(37.0, start=1.0, iterations=4)
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38]
    assert best == 36
    assert search(1.0, start=2.0) == (None, [2.0])
    assert search(math.inf, start=3.0, max_rate=10.0) == (10.0, [3.0, 6.0, 10.0])
    with pytest.raises(ValueError, match="max_rate"):
        search(5.0, start=1.0, max_rate=math.inf)


class QueueServer:
    """A simulated server: one request at a time, `service` seconds each, tokens spread over the service time;
    its capacity is 1 / service requests per second, so latency explodes past that rate."""

    vocab_size, max_model_len = VOCAB, 4096

    def __init__(self, service: float):
        self.service = service
        self.lock = asyncio.Lock()

    async def send(self, request):
        start = time.monotonic()
        async with self.lock:
            begin = time.monotonic()
            await asyncio.sleep(self.service)
        end = time.monotonic()
        times = list(np.linspace(begin, end, request.output_len + 1)[1:])
        return RequestRecord(request.prompt_len, request.output_len, start, times, end, True)

    def describe(self):
        return {"backend": "simulated", "device": "none"}

    def close(self):
        pass


def test_rate_search_finds_the_capacity_of_a_simulated_server_and_results_are_written(tmp_path):
    server = QueueServer(service=0.01)  # capacity 100 req/s
    requests = [BenchRequest({"prompt_token_ids": [1] * 8}, 8, 4) for _ in range(50)]
    settings = SuiteSettings(rates=[math.inf], seed=5, slos={"ttft": 0.1}, targets={"p90_ttft": 0.06},
                             search_start=25.0, search_iterations=3)
    out = asyncio.run(run_suite(server, requests, settings))
    best, tried = out["search"]["best_rate"], out["search"]["tried"]
    assert 50 <= best <= 120, tried
    assert any(r > best for r in tried)  # a failing rate above the answer was seen
    sweep = out["runs"][0]
    assert sweep["phase"] == "sweep" and sweep["request_rate"] == "inf"
    assert sweep["summary"]["request_throughput"] == pytest.approx(100, rel=0.25)  # all at once: at capacity
    doc = {"label": "simulated", "command": "test", "date": "today", **out}
    report.write_json(tmp_path / "a.json", doc)
    back = report.load_json(tmp_path / "a.json")
    assert len(back["runs"][0]["records"]) == 50 and back["search"]["best_rate"] == best
    table = report.markdown_table([back, {**back, "label": "again"}])
    assert table.count("| simulated |") == len(out["runs"]) and "| again |" in table
    report.plot_runs([back, {**back, "label": "again"}], tmp_path / "p.png")
    assert matplotlib.image.imread(tmp_path / "p.png").shape[:2] == (800, 1100)


# ---- end to end

def test_mock_engine_run_respects_concurrency_and_measures_real_gaps():
    engine = make_engine(num_blocks=512, block_size=16, max_model_len=1024, step_seconds=0.002)
    executor = engine.executor
    backend = InProcessBackend(AsyncLLM(engine))
    try:
        requests = make_requests("sharegpt", 24, vocab_size=VOCAB, max_model_len=256, seed=6)
        run = asyncio.run(run_benchmark(backend, requests, request_rate=200.0, max_concurrency=4, seed=1,
                                        warmup=requests[:2]))
    finally:
        backend.close()
    assert executor.max_batch <= 4
    assert all(r.success for r in run.records)
    assert [len(r.token_times) for r in run.records] == [q.output_len for q in requests]
    assert [r.prompt_len for r in run.records] == [q.prompt_len for q in requests]
    s = report.summarize(run, {"ttft": 10.0})
    assert s["completed"] == 24 and s["good_requests"] == 24
    # The simulated device runs a step every 2 ms; the overlapped loop observes each landing with some jitter, so
    # one gap can come out a little short of 2 ms when the previous landing was seen late.
    assert s["itl"]["median"] >= 0.0019 and s["ttft"]["mean"] >= 0.002


def test_text_prompts_are_measured_and_rejected_requests_recorded_as_failures(tmp_path, tokenizer):
    engine = make_engine(num_blocks=64, block_size=16, tokenizer=tokenizer, max_model_len=64)
    backend = InProcessBackend(AsyncLLM(engine))
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt": "hello benchmark", "output_len": 3}\n{"prompt_token_ids": [5, 6], "output_len": 99}\n')
    try:
        run = asyncio.run(run_benchmark(backend, load_jsonl(str(path), 2, vocab_size=VOCAB, default_output_len=4)))
    finally:
        backend.close()
    text, too_long = run.records
    assert text.success and text.prompt_len == len(tokenizer.encode("hello benchmark"))
    assert len(text.token_times) == 3 and text.start < text.token_times[0] <= text.end
    assert not too_long.success and "context" in too_long.error
    s = report.summarize(run)
    assert (s["completed"], s["failed"]) == (1, 1)


def test_cli_serve_on_the_default_model_then_plot(tmp_path, capsys):
    ap = argparse.ArgumentParser(prog="nexus-jax")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["bench", "serve", "--dataset", "random", "--input-len", "16", "--output-len", "6",
                          "--num-prompts", "4", "--warmup-requests", "4", "--request-rate", "inf", "--slo", "ttft=30",
                          "--label", "tiny", "--out-dir", str(tmp_path)])
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "tiny.json").read_text())
    assert doc["backend"]["backend"] == "in-process" and "cpu" in doc["backend"]["device"]
    assert doc["date"] and doc["command"].startswith("nexus-jax")
    (run,) = doc["runs"]
    assert run["summary"]["completed"] == 4 and run["summary"]["good_requests"] == 4
    assert isinstance(run["compiled_while_measuring"], int)  # the engine's compiled programs, counted around the run
    # the engine's counters after the run: nothing left running, no step dropped
    assert run["engine_stats"]["running"] == 0 and run["engine_stats"]["recoveries"]["dropped_steps"] == 0
    assert all(len(r["token_times"]) == 6 and r["prompt_len"] == 16 for r in run["records"])
    assert "| tiny | inf |" in (tmp_path / "tiny.md").read_text()
    assert matplotlib.image.imread(tmp_path / "tiny.png").shape[:2] == (800, 1100)
    args = ap.parse_args(["bench", "plot", str(tmp_path / "tiny.json"), str(tmp_path / "tiny.json"),
                          "--out", str(tmp_path / "both.png"), "--markdown", str(tmp_path / "both.md")])
    assert args.func(args) == 0
    assert matplotlib.image.imread(tmp_path / "both.png").shape[:2] == (800, 1100)
    assert (tmp_path / "both.md").read_text().count("| tiny |") == 2
    with pytest.raises(SystemExit):
        ap.parse_args(["bench", "serve", "--request-rate", "-3"])


def test_plot_survives_a_rate_run_twice(tmp_path):
    # The rate search may try a rate the sweep already ran: two points at one x must not compare their stats.
    def run(rate, latency):
        stats = {"mean": latency, "median": latency, "p90": latency, "p99": latency}
        return {"request_rate": rate, "summary": {**{m: stats for m in report.METRICS}, "request_throughput": 2.0}}
    runs = [run("2.0", 0.1), run("4.0", 0.3), run("2.0", 0.2)]
    report.plot_runs([{"label": "repeat", "runs": runs}], tmp_path / "p.png")
    assert matplotlib.image.imread(tmp_path / "p.png").shape[:2] == (800, 1100)


def test_results_load_gzipped_or_plain_and_other_json_is_refused(tmp_path):
    import gzip

    doc = {"runs": [{"request_rate": 1.0}], "label": "x"}
    (tmp_path / "a.json").write_text(json.dumps(doc))
    (tmp_path / "b.json.gz").write_bytes(gzip.compress(json.dumps(doc).encode()))
    assert report.load_json(tmp_path / "a.json") == report.load_json(tmp_path / "b.json.gz") == doc
    (tmp_path / "c.json.gz").write_bytes(gzip.compress(b'{"rows": []}'))
    with pytest.raises(ValueError, match="not a bench serve results file"):
        report.load_json(tmp_path / "c.json.gz")
