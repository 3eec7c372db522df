"""The gRPC server end to end through real gRPC on 127.0.0.1: the mock engine for speed, the embedded model once."""

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nexus_jax import LLM, AsyncLLM, EngineConfig, SamplingParams
from nexus_jax.cli.service import register
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.server.client import Client, generate_sync
from nexus_jax.server.grpc_server import RETRY_AFTER_KEY, SERVICE_NAME, NexusServer, ServerOptions
from nexus_jax.server.proto import nexus_pb2 as pb
from nexus_jax.testing.engines import VOCAB, expected
from nexus_jax.testing.serving import collect, engine_idle, rejected, server_engine, serving


def test_token_ids_stream_in_chunks_then_complete():
    async def main():
        async with serving(server_engine()) as (_, client):
            prompt = [random.randrange(VOCAB) for _ in range(random.randint(1, 20))]
            chunks, completes = await collect(client, prompt, max_tokens=9, temperature=0.0, request_id="r1",
                                              program_id="p7", thread_id="t1")
            assert [t for c in chunks for t in c.token_ids] == expected(prompt, 9)
            assert len(chunks) >= 2 and all(c.index == 0 for c in chunks)
            (done,) = completes
            assert list(done.output_ids) == expected(prompt, 9) and done.finish_reason == "length"
            assert (done.prompt_tokens, done.completion_tokens) == (len(prompt), 9)
            assert 0 < done.ttft_s <= done.e2e_s and (done.program_id, done.thread_id) == ("p7", "t1")
    asyncio.run(main())


def test_text_input_n_completions_stop_token_and_logprobs(tokenizer):
    async def main():
        async with serving(server_engine(tokenizer=tokenizer)) as (_, client):
            text = "hello there"
            ids = tokenizer.encode(text)
            stop = expected(ids, 5)[3]
            chunks, completes = await collect(client, text, max_tokens=8, temperature=0.0, n=2,
                                              stop_token_ids=[stop], logprobs=1, ignore_eos=True)
            assert sorted(c.index for c in completes) == [0, 1]
            for c in completes:
                assert list(c.output_ids) == expected(ids, 4) and c.finish_reason == "stop"
                assert c.stop_token_id == stop and c.prompt_tokens == len(ids)
                assert c.text == tokenizer.decode(list(c.output_ids)[:3])
                assert len(c.logprobs) == 4 and c.cumulative_logprob < 0
                assert "".join(ch.text for ch in chunks if ch.index == c.index) == c.text
    asyncio.run(main())


def test_abort_rpc_ends_the_stream_with_abort_and_frees_kv():
    async def main():
        engine = server_engine(delay=0.005)
        async with serving(engine) as (_, client):
            stream = client.generate([5, 6, 7], max_tokens=400, request_id="long")
            first = await stream.__anext__()
            assert first.WhichOneof("response") == "chunk"
            assert await client.abort("long") and not await client.abort("unknown")
            rest = [r async for r in stream]
            assert rest[-1].complete.finish_reason == "abort" and len(rest[-1].complete.output_ids) < 400
            assert await engine_idle(engine)
    asyncio.run(main())


def test_client_cancel_and_deadline_abort_the_request():
    async def main():
        engine = server_engine(delay=0.005)
        async with serving(engine) as (server, client):
            got = 0
            async for _ in client.generate([1] * 10, max_tokens=400):
                got += 1
                if got == 3:
                    break
            assert await engine_idle(engine)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(client, [3, 4], max_tokens=400, timeout=0.3)
            assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await engine_idle(engine)
            assert not server.servicer.streams
    asyncio.run(main())


def test_an_empty_text_prompt_is_invalid_argument(tokenizer):
    async def main():
        async with serving(server_engine(tokenizer=tokenizer)) as (_, client):
            for prompt in ("", []):
                e = await rejected(collect(client, prompt, max_tokens=2))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt is empty" in e.details()
            _, (done,) = await collect(client, "hi", max_tokens=2, ignore_eos=True)
            assert done.completion_tokens == 2
    asyncio.run(main())


def test_bad_input_is_invalid_argument_and_serving_goes_on():
    async def main():
        async with serving(server_engine()) as (_, client):
            for prompt, kw, reason in (([1], {"top_p": 2.0}, "top_p"), ([], {}, "prompt is empty"),
                                       ([VOCAB + 3], {}, "outside the vocabulary"),
                                       ([1, 2], {"max_tokens": 600}, "context"),
                                       ("text", {}, "tokenizer"),
                                       ([1], {"stop_token_ids": [1] * 1025}, "more than the limit of 1024"),
                                       ([1], {"stop": ["x"] * 129}, "more than the limit of 128"),
                                       ([1], {"stop": ["x" * 257]}, "exceeds the limit of 256 characters")):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await collect(client, prompt, **kw)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (prompt, kw)
                assert reason in e.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await client.stub.Generate(pb.GenerateRequest()).read()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs an input" in e.value.details()
            _, (done,) = await collect(client, [9], max_tokens=2)
            assert list(done.output_ids) == [10, 11]
    asyncio.run(main())


def test_message_size_limit():
    async def main():
        async with serving(server_engine(), max_message_bytes=1024) as (_, client):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(client, [1] * 2000, max_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            _, (done,) = await collect(client, [1] * 100, max_tokens=2)
            assert done.prompt_tokens == 100
    asyncio.run(main())


def test_overload_is_resource_exhausted_with_a_retry_hint():
    async def main():
        engine = server_engine(delay=0.005)
        async with serving(engine, max_in_flight=2, retry_after_ms=250) as (_, client):
            streams = [client.generate([i], max_tokens=400) for i in range(2)]
            for s in streams:
                await s.__anext__()
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await collect(client, [3], max_tokens=2)
            assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert dict(e.value.trailing_metadata())[RETRY_AFTER_KEY] == "250"
            for s in streams:
                await s.aclose()
            assert await engine_idle(engine)
            _, (done,) = await collect(client, [3], max_tokens=2)
            assert done.finish_reason == "length"
    asyncio.run(main())


def test_auth_token_health_and_reflection():
    async def main():
        async with serving(server_engine(), auth_token="s3cret") as (server, client):
            _, (done,) = await collect(client, [1], max_tokens=3)
            assert list(done.output_ids) == [2, 3, 4]
            for token in (None, "wrong"):
                async with Client(f"127.0.0.1:{server.port}", token=token) as other:
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await collect(other, [1], max_tokens=3)
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await other.server_info()
                    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
                    assert await other.health() == "SERVING"
            assert await client.health(SERVICE_NAME) == "SERVING"
            stub = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                             metadata=client.metadata)
            names = [s.name async for r in call for s in r.list_services_response.service]
            assert SERVICE_NAME in names and "grpc.health.v1.Health" in names
    asyncio.run(main())


def test_info_and_sessions():
    async def main():
        async with serving(server_engine(num_blocks=300)) as (_, client):
            model = await client.model_info()
            assert (model.vocab_size, model.max_model_len, model.num_kv_blocks, model.block_size) == \
                   (VOCAB, 512, 300, 4)
            info = await client.server_info()
            assert info.sm_split == "aggregated" and info.num_running == 0 and info.kv_cache_usage == 0.0
            session = await client.start_session("prog-1")
            assert session.program_id == "prog-1" and (await client.server_info()).num_sessions == 1
            assert await client.end_session(session.session_id) and not await client.end_session("nope")
    asyncio.run(main())


def test_many_concurrent_streams_all_complete():
    async def main():
        engine = server_engine()
        async with serving(engine) as (_, client):
            lengths = [random.randint(1, 12) for _ in range(120)]
            results = await asyncio.gather(*[collect(client, [i % VOCAB, 7], max_tokens=n)
                                             for i, n in enumerate(lengths)])
            for i, (n, (chunks, (done,))) in enumerate(zip(lengths, results)):
                assert list(done.output_ids) == expected([i, 7], n) == [t for c in chunks for t in c.token_ids]
            assert await engine_idle(engine)
    asyncio.run(main())


def test_shutdown_drains_open_streams():
    async def main():
        engine = server_engine(delay=0.005)
        server = NexusServer(AsyncLLM(engine), ServerOptions())
        port = await server.start()
        async with Client(f"127.0.0.1:{port}") as client:
            job = asyncio.create_task(collect(client, [1], max_tokens=40))
            await asyncio.sleep(0.05)
            await server.stop(grace=5.0)
            _, (done,) = await job
            assert done.finish_reason == "length" and len(done.output_ids) == 40
            with pytest.raises(grpc.aio.AioRpcError):
                await collect(client, [1], max_tokens=2, timeout=1.0)
    asyncio.run(main())


def test_tls(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)

    async def main():
        server = NexusServer(AsyncLLM(server_engine()), ServerOptions(tls_cert=str(cert), tls_key=str(key)))
        port = await server.start()
        try:
            async with Client(f"localhost:{port}", tls=str(cert)) as client:
                _, (done,) = await collect(client, [4], max_tokens=2)
                assert list(done.output_ids) == [5, 6]
        finally:
            await server.stop(grace=1.0)
    asyncio.run(main())


def test_default_model_through_grpc_matches_the_offline_engine():
    engine = build_engine(EngineConfig(dtype="float32"))
    prompt = "The capital of France is"

    async def main():
        async with serving(engine) as (server, _):  # the blocking client runs on a thread: the server's loop serves
            return (await asyncio.to_thread(generate_sync, f"127.0.0.1:{server.port}", prompt, max_tokens=8,
                                            temperature=0.0, ignore_eos=True))[0]
    done = asyncio.run(main())
    ref = LLM.from_engine(engine).generate(prompt, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                                           use_tqdm=False)[0].outputs[0]
    assert list(done.output_ids) == ref.token_ids and done.text == ref.text
    assert done.finish_reason == "length" and done.prompt_tokens == len(engine.tokenizer.encode(prompt))


SERVE = ("import argparse, sys; from nexus_jax.cli.service import register; p = argparse.ArgumentParser(); "
         "register(p.add_subparsers(dest='command', required=True)); a = p.parse_args(); sys.exit(a.func(a))")


def test_serve_and_client_commands(capsys, xla_cache_env):
    """`serve --port 0` prints its port, `client` streams from it, SIGTERM drains and exits cleanly."""
    # The session's compilation cache: test_http_limits.py's `serve` runs the same default engine.
    proc = subprocess.Popen([sys.executable, "-c", SERVE, "serve", "--port", "0", "--dtype", "float32"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, **xla_cache_env})
    try:
        line = proc.stdout.readline()
        assert "serving embedded-default on 127.0.0.1:" in line, line
        target = line.split()[-1]
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["client", "--target", target, "--token-ids", "[5, 6, 7]", "--max-tokens", "4"])
        assert args.func(args) == 0
        assert "[length] 3 prompt + 4 tokens" in capsys.readouterr().err
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
