"""bench serve through gRPC: the real server on 127.0.0.1 over the mock engine, driven by GrpcBackend (limits from
the server, client-side token times, failures as records), program ids reaching the engine, and the CLI."""

import argparse
import asyncio
import contextlib
import json

import numpy as np
import pytest

from nexus_jax import AsyncLLM
from nexus_jax.benchmark import report
from nexus_jax.benchmark.cli import SuiteSettings, register, run_suite
from nexus_jax.benchmark.datasets import BenchRequest, make_requests
from nexus_jax.benchmark.grpc_backend import GrpcBackend
from nexus_jax.benchmark.programs_driver import make_programs
from nexus_jax.server.grpc_server import NexusServer, ServerOptions
from nexus_jax.testing.engines import make_engine, record_requests
from nexus_jax.testing.serving import serving, serving_on_a_thread

VOCAB, CONTEXT = 384, 512


def mock_engine(step_seconds=0.001):
    """The mock engine, recording (prompt, program id, thread id) of every request it is given in `seen`."""
    engine = make_engine(num_blocks=2048, block_size=16, max_model_len=CONTEXT, vocab_size=VOCAB,
                         step_seconds=step_seconds)
    engine.seen = record_requests(engine)
    return engine


@contextlib.asynccontextmanager
async def served(engine, **options):
    """A server over the engine on 127.0.0.1; yields its address."""
    async with serving(engine, **options) as (server, _):
        yield f"127.0.0.1:{server.port}"


def check_records(records, requests):
    for r, q in zip(records, requests):
        assert r.success, r.error
        assert len(r.token_times) == r.output_len == q.output_len and r.prompt_len == q.prompt_len
        assert r.start < r.token_times[0] and r.token_times == sorted(r.token_times) and r.token_times[-1] <= r.end


def test_benchmark_through_grpc_measures_every_token_on_the_client():
    requests = make_requests("sharegpt", 30, vocab_size=VOCAB, max_model_len=CONTEXT, seed=3)

    async def main():
        async with served(mock_engine()) as target:
            backend = await GrpcBackend.connect(target)
            try:
                assert (backend.vocab_size, backend.max_model_len) == (VOCAB, CONTEXT)  # from GetModelInfo
                settings = SuiteSettings(rates=[200.0], max_concurrency=6, seed=1, slos={"ttft": 30.0})
                out = await run_suite(backend, requests, settings, warmup=requests[:3])
                return out, backend.describe()
            finally:
                await backend.close()
    out, described = asyncio.run(main())
    assert described["backend"] == "grpc" and described["vocab_size"] == VOCAB and described["model"]
    (run,) = out["runs"]
    s = run["summary"]
    assert (s["completed"], s["failed"], s["good_requests"]) == (30, 0, 30)
    assert s["total_output_tokens"] == sum(q.output_len for q in requests)
    assert s["ttft"]["p99"] <= s["e2e"]["p99"] and s["ttft"]["mean"] < s["e2e"]["mean"]
    assert s["itl"]["median"] >= 0.0 and s["tpot"]["mean"] > 0
    records = sorted(run["records"], key=lambda r: r["start"])  # sent in order at a finite rate
    for r, q in zip(records, requests):
        assert r["success"] and len(r["token_times"]) == q.output_len and r["prompt_len"] == q.prompt_len
        assert r["start"] < r["token_times"][0] <= r["token_times"][-1] <= r["end"]


def test_failed_requests_become_records_and_auth_is_used():
    too_long = BenchRequest({"prompt_token_ids": [1] * 500}, 500, 100)  # 600 tokens > the 512 context
    good = make_requests("random", 4, vocab_size=VOCAB, max_model_len=CONTEXT, input_len=20, output_len=5, seed=2)

    async def main():
        async with served(mock_engine(), auth_token="s3cret") as target:
            with pytest.raises(ConnectionError, match="UNAUTHENTICATED"):
                await GrpcBackend.connect(target, token="wrong")
            backend = await GrpcBackend.connect(target, token="s3cret")
            try:
                records = await asyncio.gather(*(backend.send(q) for q in [too_long, *good]))
            finally:
                await backend.close()
        return records
    bad, *ok = asyncio.run(main())
    assert not bad.success and "INVALID_ARGUMENT" in bad.error and "context" in bad.error
    assert bad.token_times == [] and bad.start <= bad.end
    check_records(ok, good)
    with pytest.raises(ConnectionError, match="127.0.0.1:1"):  # nothing listens there
        asyncio.run(GrpcBackend.connect("127.0.0.1:1"))


def test_a_server_that_stops_mid_run_fails_the_open_requests():
    requests = make_requests("random", 3, vocab_size=VOCAB, max_model_len=CONTEXT, input_len=8, output_len=200)

    async def main():
        engine = mock_engine(step_seconds=0.005)
        server = NexusServer(AsyncLLM(engine), ServerOptions())
        port = await server.start()
        backend = await GrpcBackend.connect(f"127.0.0.1:{port}")
        try:
            sends = [asyncio.create_task(backend.send(q)) for q in requests]
            await asyncio.sleep(0.1)
            await server.stop(grace=0.0)
            return await asyncio.gather(*sends)
        finally:
            await backend.close()
    for r in asyncio.run(main()):
        assert not r.success and r.error and len(r.token_times) < 200


def test_program_calls_carry_their_program_and_thread_ids_through_grpc():
    programs = make_programs("tree", 3, seed=4)
    engine = mock_engine()

    async def main():
        async with served(engine) as target:
            backend = await GrpcBackend.connect(target)
            try:
                return await run_suite(backend, programs, SuiteSettings(rates=[50.0], program_delay_scale=0.01))
            finally:
                await backend.close()
    (run,) = asyncio.run(main())["runs"]
    assert run["summary"]["failed"] == 0 and run["summary"]["programs"]["completed"] == 3
    assert len(engine.seen) == sum(p.num_calls for p in programs)
    for spec, prog in zip(programs, run["programs"]):
        sent = [pid for _, pid, _ in engine.seen if pid.startswith(spec.program_id + "-")]
        assert len(sent) == spec.num_calls == len(prog["calls"]) and len(set(sent)) == 1
    widths = {len(s.calls) for p in programs for s in p.stages}
    threads = {tid for _, _, tid in engine.seen}
    assert threads == {f"t{b}" for b in range(max(widths))}


def test_cli_serve_through_grpc(tmp_path):
    # The server on a loop of its own: the CLI runs asyncio.run on this thread.
    with serving_on_a_thread(mock_engine(), start_timeout=30) as server:
        ap = argparse.ArgumentParser(prog="nexus-jax")
        register(ap.add_subparsers(dest="command", required=True))
        args = ap.parse_args(["bench", "serve", "--backend", "grpc", "--server", f"127.0.0.1:{server.port}",
                              "--dataset", "chatbot", "--num-prompts", "4", "--program-delay-scale", "0.01",
                              "--warmup-requests", "3", "--request-rate", "20", "--label", "g",
                              "--out-dir", str(tmp_path)])
        assert args.func(args) == 0
    doc = json.loads((tmp_path / "g.json").read_text())
    assert doc["backend"]["backend"] == "grpc" and doc["dataset"]["kind"] == "programs"
    (run,) = doc["runs"]
    assert run["summary"]["programs"]["completed"] == 4 and run["summary"]["failed"] == 0
    assert all(len(r["token_times"]) == r["output_len"] for r in run["records"])
    md = (tmp_path / "g.md").read_text()
    assert "programs/s" in md and "| g | 20.0 |" in md
    with pytest.raises(SystemExit, match="--server"):
        args = ap.parse_args(["bench", "serve", "--backend", "grpc", "--request-rate", "1"])
        args.func(args)
    assert np.isfinite(report.load_json(tmp_path / "g.json")["runs"][0]["summary"]["programs"]["token_latency"]
                       ["mean"])
