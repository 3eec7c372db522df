"""Program workloads in bench serve: dependencies, delays and parallel threads against a recording backend,
arrivals, failures, program metrics on hand-made records, and runs over the mock engine."""

import asyncio
import math
import time

import numpy as np
import pytest

from nexus_jax import AsyncLLM
from nexus_jax.benchmark import report
from nexus_jax.benchmark.cli import SuiteSettings, run_suite
from nexus_jax.benchmark.datasets import make_requests
from nexus_jax.benchmark.programs_driver import (
    ProgramRecord,
    ProgramRunResult,
    make_programs,
    run_programs,
    warmup_calls,
)
from nexus_jax.benchmark.serve import InProcessBackend, RequestRecord, arrival_offsets
from nexus_jax.benchmark.workloads import CallSpec, ProgramSpec, Stage
from nexus_jax.testing.engines import VOCAB, make_engine, record_requests


class Recorder:
    """A backend whose calls take `seconds`, one token per call, and remember what they were sent and when.
    A call asking for `fail_len` output tokens fails."""

    vocab_size, max_model_len = VOCAB, 1024

    def __init__(self, seconds=0.02, fail_len=None):
        self.seconds, self.fail_len = seconds, fail_len
        self.calls = []

    async def send(self, request):
        start = time.monotonic()
        await asyncio.sleep(self.seconds)
        end = time.monotonic()
        self.calls.append((request, start, end))
        ok = request.output_len != self.fail_len
        return RequestRecord(request.prompt_len, request.output_len, start, [end] * request.output_len if ok else [],
                             end, ok, None if ok else "boom", request.source)

    def describe(self):
        return {"backend": "recorder"}

    def close(self):
        pass


def spec(name="chatbot-0"):
    """1 call, then (0.05 s later) 3 parallel calls, then (0.03 s later) 1 call."""
    return ProgramSpec(name, 0.0, (
        Stage(0.0, (CallSpec(100, 2),)),
        Stage(0.05, tuple(CallSpec(150 + b, 3, f"t{b}") for b in range(3))),
        Stage(0.03, (CallSpec(300, 4),))))


def test_stages_wait_for_their_dependencies_and_delays_and_threads_run_together():
    backend = Recorder(seconds=0.02)
    run = asyncio.run(run_programs(backend, [spec()], delay_scale=1.0))
    calls = sorted(backend.calls, key=lambda c: c[1])
    first, parallel, last = calls[0], calls[1:4], calls[4]
    assert first[1] >= run.programs[0].start
    for _, start, _ in parallel:
        assert start >= first[2] + 0.05 - 0.002  # after the previous stage and its delay
    assert max(s for _, s, _ in parallel) < min(e for _, _, e in parallel)  # all three in flight together
    assert last[1] >= max(e for _, _, e in parallel) + 0.03 - 0.002
    assert sorted(r.thread_id for r, _, _ in parallel) == ["t0", "t1", "t2"]
    ids = {r.program_id for r, _, _ in calls}
    assert len(ids) == 1 and ids.pop().startswith("chatbot-0-")
    prompts = [r.prompt["prompt_token_ids"] for r, _, _ in calls]  # one context: each prompt extends the first
    assert all(p[:100] == prompts[0] for p in prompts) and [len(p) for p in prompts][4] == 300
    (prog,) = run.programs
    assert prog.success and prog.num_calls == 5 and len(prog.calls) == 5
    assert prog.output_tokens == 2 + 3 * 3 + 4 and prog.end == pytest.approx(last[2])
    assert prog.end - prog.start >= 3 * 0.02 + 0.05 + 0.03
    again = asyncio.run(run_programs(backend, [spec()], delay_scale=0.0))
    assert again.programs[0].end - again.programs[0].start < prog.end - prog.start - 0.06  # no delays now
    assert len({r.program_id for r, _, _ in backend.calls}) == 2  # a program id is unique per run


def test_programs_arrive_on_the_drawn_schedule():
    programs = [ProgramSpec(f"react-{i}", 0.0, (Stage(0.0, (CallSpec(10, 1),)),)) for i in range(40)]
    run = asyncio.run(run_programs(Recorder(seconds=0.001), programs, program_rate=80.0, seed=7))
    starts = np.array([p.start for p in run.programs])
    want = arrival_offsets(40, 80.0, 1.0, np.random.default_rng(7))
    assert np.abs((starts - starts[0]) - want).max() < 0.02
    assert run.request_rate == 80.0 and len(run.records) == 40


def test_a_failed_call_fails_its_program_and_stops_it():
    bad = ProgramSpec("react-1", 0.0, (Stage(0.0, (CallSpec(10, 7),)), Stage(0.0, (CallSpec(20, 2),))))
    run = asyncio.run(run_programs(Recorder(seconds=0.001, fail_len=7), [bad, spec()], delay_scale=0.0))
    failed, ok = run.programs
    assert not failed.success and failed.error == "boom" and len(failed.calls) == 1 and failed.num_calls == 2
    assert ok.success
    s = report.summarize(run)
    assert (s["programs"]["completed"], s["programs"]["failed"]) == (1, 1)
    assert (s["completed"], s["failed"]) == (5, 1)


def test_program_metrics_on_hand_made_records():
    rec = RequestRecord(1, 1, 0.0, [1.0], 1.0, True)
    programs = [ProgramRecord("a", "chatbot", 10.0, 12.0, 2, [0], 100, True),
                ProgramRecord("b", "react", 10.5, 11.5, 1, [0], 10, True),
                ProgramRecord("c", "tree", 11.0, 11.2, 3, [0], 0, False, "x")]
    run = ProgramRunResult(2.0, 1.0, None, 4.0, [rec], programs)
    p = report.summarize(run)["programs"]
    assert (p["completed"], p["failed"]) == (2, 1)
    assert p["program_throughput"] == pytest.approx(0.5)
    assert p["calls_per_program"] == 1.5 and p["output_tokens_per_program"] == 55
    assert p["program_latency"] == pytest.approx({"mean": 1.5, "median": 1.5, "p90": 1.9, "p99": 1.99})
    assert p["token_latency"] == pytest.approx({"mean": 0.06, "median": 0.06, "p90": 0.092, "p99": 0.0992})
    doc = {"label": "hand", "runs": [report.run_to_json(run, report.summarize(run))]}
    assert [q["program_id"] for q in doc["runs"][0]["programs"]] == ["a", "b", "c"]
    table = report.markdown_table([doc])
    assert "| hand | 2.0 | - | 2 / 1 | 0.500 | 1.5 / 55 | 60.0 / 60.0 / 92.0 / 99.2 | 1.50 / 1.50 / 1.90 / 1.99 |" \
        in table


def test_program_datasets_and_warmup_calls():
    mix = make_programs("programs-mix", 30, seed=1)
    assert {p.program_id.rsplit("-", 1)[0] for p in mix} == {"chatbot", "react", "tree"}
    assert [p.stages for p in make_programs("react", 5, seed=2)] == [p.stages for p in make_programs("react", 5, 2)]
    with pytest.raises(ValueError, match="programs-mix"):
        make_programs("mixed", 3)
    with pytest.raises(ValueError, match="num_programs"):
        make_programs("tree", 0)
    warm = warmup_calls(make_programs("tree", 4, seed=3), 9, vocab_size=VOCAB, max_model_len=256, seed=3)
    assert len(warm) == 9 and all(r.program_id is None for r in warm)
    assert all(r.prompt_len + r.output_len <= 256 and max(r.prompt["prompt_token_ids"]) < VOCAB for r in warm)


def mock_backend(max_model_len=1024):
    """An in-process backend over a PLAS mock engine that records (prompt, program id, thread id) in `seen`."""
    engine = make_engine(num_blocks=4096, block_size=16, max_model_len=max_model_len, scheduling_policy="plas")
    engine.seen = record_requests(engine)
    return InProcessBackend(AsyncLLM(engine)), engine


def test_a_program_sweep_over_the_mock_engine():
    programs = make_programs("programs-mix", 10, seed=5)
    backend, engine = mock_backend()
    settings = SuiteSettings(rates=[40.0, math.inf], seed=2, slos={"ttft": 30.0}, program_delay_scale=0.005)
    warm = warmup_calls(make_programs("programs-mix", 2, seed=6), 4, vocab_size=VOCAB, max_model_len=1024, seed=6)
    try:
        out = asyncio.run(run_suite(backend, programs, settings, warm))
    finally:
        backend.close()
    calls = sum(p.num_calls for p in programs)
    assert len(engine.seen) == 4 + 2 * calls
    for run in out["runs"]:
        s = run["summary"]
        assert (s["completed"], s["failed"], s["good_requests"]) == (calls, 0, calls)
        assert all(len(r["token_times"]) == r["output_len"] and r["success"] for r in run["records"])
        p = s["programs"]
        assert (p["completed"], p["failed"]) == (10, 0) and p["program_throughput"] > 0
        per_token = [(q["end"] - q["start"]) / q["output_tokens"] for q in run["programs"]]
        assert p["token_latency"]["mean"] == pytest.approx(np.mean(per_token)) and min(per_token) > 0
        for spec, prog in zip(programs, run["programs"]):
            records = [run["records"][i] for i in prog["calls"]]
            assert prog["num_calls"] == spec.num_calls == len(records) and prog["success"]
            assert prog["output_tokens"] == sum(len(r["token_times"]) for r in records)
            assert prog["start"] <= min(r["start"] for r in records) and prog["end"] == max(r["end"] for r in records)
    first, second = ([s for s in engine.seen[4:]][k * calls:(k + 1) * calls] for k in range(2))
    assert all(pid is not None for _, pid, _ in first + second)
    assert {pid for _, pid, _ in first}.isdisjoint({pid for _, pid, _ in second})  # fresh ids per run
    prompts = [{tuple(p["prompt_token_ids"]) for p, _, _ in run} for run in (first, second)]
    assert prompts[0].isdisjoint(prompts[1])  # fresh prompts per run: no prefix-cache hits across the sweep
    assert "programs/s" in report.markdown_table([{"label": "mock", **out}])


def test_request_sweeps_send_fresh_prompts_of_the_same_lengths():
    requests = make_requests("sharegpt", 6, vocab_size=VOCAB, max_model_len=512, seed=1)
    backend = Recorder(seconds=0.001)
    asyncio.run(run_suite(backend, requests, SuiteSettings(rates=[math.inf, math.inf])))
    first, second = ([r for r, _, _ in backend.calls[k * 6:(k + 1) * 6]] for k in range(2))
    first_ids = {tuple(r.prompt["prompt_token_ids"]) for r in first}
    assert first_ids == {tuple(r.prompt["prompt_token_ids"]) for r in requests}  # the first run: unchanged
    assert first_ids.isdisjoint({tuple(r.prompt["prompt_token_ids"]) for r in second})
    assert sorted(r.prompt_len for r in first) == sorted(r.prompt_len for r in second)
