"""Clients of one server kept apart through real gRPC on 127.0.0.1: ids of bounded length, requests owned by the
connection that sent them, server ids nobody can guess, server info that costs no sweep per call, the token
compared in constant time."""

import argparse
import asyncio
import random
import re
import time

import grpc
import pytest

from nexus_jax.cli.service import register, server_options
from nexus_jax.core.request import MAX_ID_LENGTH
from nexus_jax.server import interceptors
from nexus_jax.server.client import Client
from nexus_jax.server.options import ServerOptions
from nexus_jax.testing.serving import collect, engine_idle, rejected, server_engine, serving


def test_ids_longer_than_the_limit_are_invalid_argument_naming_it():
    limit = random.randint(8, 64)
    engine = server_engine()
    for name in ("request_id", "program_id", "thread_id"):
        with pytest.raises(ValueError, match=f"{name} of {MAX_ID_LENGTH + 1} characters .*MAX_ID_LENGTH"):
            engine.add_request("r" if name != "request_id" else "x" * (MAX_ID_LENGTH + 1), {"prompt_token_ids": [1]},
                               **({name: "x" * (MAX_ID_LENGTH + 1)} if name != "request_id" else {}))
    with pytest.raises(ValueError, match="program_id .*MAX_ID_LENGTH"):
        engine.session("p" * (MAX_ID_LENGTH + 1))
    with pytest.raises(ValueError, match="max_id_length"):
        ServerOptions(max_id_length=MAX_ID_LENGTH + 1)
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    assert server_options(parser.parse_args(["serve", "--max-id-length", str(limit)])).max_id_length == limit

    async def main():
        async with serving(server_engine(), max_id_length=limit) as (_, client):
            long = "x" * (limit + 1)
            for field in ("request_id", "program_id", "thread_id"):
                e = await rejected(collect(client, [1], max_tokens=2, **{field: long}))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, field
                assert f"{field} of {limit + 1} characters exceeds the limit of {limit} (max_id_length)" in e.details()
            for call in (client.start_session(long), client.end_session(long), client.abort(long)):
                e = await rejected(call)
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_id_length" in e.details()
            at_limit = "y" * limit
            _, (done,) = await collect(client, [1], max_tokens=2, request_id=at_limit, program_id=at_limit,
                                       thread_id=at_limit)
            assert done.finish_reason == "length" and done.program_id == at_limit
    asyncio.run(main())


def test_a_client_aborts_and_sees_only_its_own_requests():
    """Two connections use one request id at once; neither can abort, nor detect, the other's request."""
    async def main():
        engine = server_engine(delay=0.005)
        async with serving(engine) as (server, mine):
            async with Client(f"127.0.0.1:{server.port}") as other:
                stream = mine.generate([5, 6], max_tokens=400, request_id="shared")
                assert (await stream.__anext__()).request_id == "shared"
                assert not await other.abort("shared")
                theirs = other.generate([7], max_tokens=400, request_id="shared")  # no ALREADY_EXISTS across clients
                assert (await theirs.__anext__()).request_id == "shared"
                e = await rejected(collect(mine, [1], max_tokens=2, request_id="shared"))
                assert e.code() == grpc.StatusCode.ALREADY_EXISTS  # a client's own id in flight
                assert await other.abort("shared")
                assert [r async for r in theirs][-1].complete.finish_reason == "abort"
                assert len(server.servicer.streams) == 1  # mine still runs
                assert await mine.abort("shared")
                rest = [r async for r in stream]
                assert rest[-1].complete.finish_reason == "abort" and len(rest[-1].complete.output_ids) < 400
            assert await engine_idle(engine)
            ids = set()
            for _ in range(2):
                async for r in mine.generate([1], max_tokens=1):
                    ids.add(r.request_id)
            assert len(ids) == 2 and all(re.fullmatch(r"grpc-[0-9a-f]{32}", i) for i in ids), ids
    asyncio.run(main())


def test_server_info_runs_no_session_sweep_per_call():
    """Counting sessions sweeps them on the engine thread, O(sessions): at most once a second, however often
    clients ask."""
    async def main():
        async with serving(server_engine()) as (server, client):
            for _ in range(random.randint(5, 20)):
                await client.start_session()
            replica = server.servicer.sessions.replicas[0]
            calls, run_on_engine = [], replica.run_on_engine
            replica.run_on_engine = lambda fn: calls.append(fn) or run_on_engine(fn)
            start, asked = time.monotonic(), 40
            infos = [await client.server_info() for _ in range(asked)]
            assert {i.num_sessions for i in infos} == {len(server.servicer.sessions.open)}
            assert len(calls) <= 1 + time.monotonic() - start < asked
    asyncio.run(main())


def test_the_auth_token_is_compared_in_constant_time(monkeypatch):
    compared = []
    monkeypatch.setattr(interceptors.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or a == b)

    async def main():
        async with serving(server_engine(), auth_token="s3cret") as (server, client):
            assert (await client.server_info()).max_in_flight > 0
            async with Client(f"127.0.0.1:{server.port}", token="s3creX") as other:
                assert (await rejected(other.server_info())).code() == grpc.StatusCode.UNAUTHENTICATED
    asyncio.run(main())
    assert compared == [(b"Bearer s3cret", b"Bearer s3cret"), (b"Bearer s3creX", b"Bearer s3cret")]


def test_cache_salt_over_grpc_keeps_prefix_hits_within_one_salt():
    async def main():
        engine = server_engine()
        async with serving(engine) as (_, client):
            prompt = [random.randrange(500) for _ in range(40)]

            async def hit_tokens(salt):
                before = engine.block_manager.stats()["prefix_hit_tokens"]
                await collect(client, prompt, max_tokens=2, cache_salt=salt)
                return engine.block_manager.stats()["prefix_hit_tokens"] - before

            assert [await hit_tokens(s) for s in ("alice", "bob", None, "alice")] == [0, 0, 0, 36]
            e = await rejected(collect(client, prompt, max_tokens=2, cache_salt=""))
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "cache_salt" in e.details()
    asyncio.run(main())
