"""The gRPC server over a ReplicatedAsyncLLM through real gRPC on 127.0.0.1: server info and metrics over every
replica, sessions in every replica's process table, and the `serve` flags that build the replicas."""

import argparse
import asyncio
import contextlib
import random

import grpc
import pytest

from nexus_jax import AsyncLLM, SamplingParams
from nexus_jax.cli.main import main as cli_main
from nexus_jax.cli.service import register, replica_options, serve_front
from nexus_jax.entrypoints.replicas import ReplicatedAsyncLLM
from nexus_jax.programs.router import RouterConfig
from nexus_jax.testing.engines import program_table
from nexus_jax.testing.metrics import samples
from nexus_jax.testing.serving import collect, engine_idle, rejected, server_engine, serving
from nexus_jax.testing.streams import wait_until

MAX_SEQS = 2  # per replica: a replica given more requests keeps the rest waiting


@contextlib.asynccontextmanager
async def serving_replicas(n=2, routing="round_robin", engine_kw=None, **options):
    llm = ReplicatedAsyncLLM([AsyncLLM(server_engine(**(engine_kw or {}))) for _ in range(n)], routing)
    async with serving(llm, **options) as (server, client):
        yield server, llm, client


def engines(llm):
    return [r.engine for r in llm.replicas]


async def hold_requests(llm, client, count):
    """`count` long streams (request ids r0, r1, ...) spread round robin; returns their tasks and each replica's
    share once every replica has admitted its share."""
    jobs = [asyncio.create_task(collect(client, [i + 1, 2], max_tokens=400, request_id=f"r{i}"))
            for i in range(count)]
    share = [len(range(i, count, len(llm.replicas))) for i in range(len(llm.replicas))]
    assert await wait_until(lambda: [e.stats()["running"] for e in engines(llm)] == [min(s, MAX_SEQS) for s in share]
                            and [e.stats()["waiting"] for e in engines(llm)] == [max(s - MAX_SEQS, 0) for s in share])
    return jobs, share


def kv_usage(llm):
    return [e.block_manager.usage for e in engines(llm)]


def test_server_info_and_metrics_add_up_the_replicas():
    count = random.randint(3, 6)
    preemptions = [random.randint(0, 50) for _ in range(2)]

    async def main():
        async with serving_replicas(engine_kw={"delay": 0.005, "max_num_seqs": MAX_SEQS}) as (server, llm, client):
            for engine, n in zip(engines(llm), preemptions):
                engine.scheduler.num_preemptions = n  # none happen here (plenty of KV): counters the test can know
            jobs, share = await hold_requests(llm, client, count)
            running = sum(min(s, MAX_SEQS) for s in share)
            before = kv_usage(llm)  # KV use only grows while every request decodes
            info = await client.server_info()
            got = samples(server.metrics.exposition().decode())
            after = kv_usage(llm)
            assert (info.num_running, info.num_waiting, info.num_in_flight) == (running, count - running, count)
            assert 0 < sum(before) / 2 <= info.kv_cache_usage <= sum(after) / 2  # the mean over the replicas
            assert info.num_preemptions == sum(preemptions) and info.sm_split == "aggregated"
            assert got[("nexus_num_requests_running", ())] == running
            assert got[("nexus_num_requests_waiting", ())] == count - running
            assert got[("nexus_num_preemptions_total", ())] == sum(preemptions)
            assert got[("nexus_sm_split", (("split", "aggregated"),))] == 2  # replicas in that split
            for i, s in enumerate(share):
                replica = (("replica", str(i)),)
                assert got[("nexus_replica_alive", replica)] == 1
                assert got[("nexus_replica_num_requests_running", replica)] == min(s, MAX_SEQS)
                assert got[("nexus_replica_num_requests_waiting", replica)] == max(s - MAX_SEQS, 0)
                assert before[i] <= got[("nexus_replica_kv_cache_usage_perc", replica)] <= after[i]

            on_replica = [llm.router.replica_of(f"r{i}") for i in range(count)]
            llm.replicas[1].shutdown()  # its streams fail; the totals keep replica 0's levels only
            results = await asyncio.gather(*[j for j, r in zip(jobs, on_replica) if r == 1], return_exceptions=True)
            assert all(isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.UNAVAILABLE
                       for r in results)
            info = await client.server_info()
            got = samples(server.metrics.exposition().decode())
            assert info.num_running == min(share[0], MAX_SEQS) == got[("nexus_num_requests_running", ())]
            assert info.num_preemptions == sum(preemptions) == got[("nexus_num_preemptions_total", ())]
            assert got[("nexus_replica_alive", (("replica", "1"),))] == 0
            assert ("nexus_replica_num_requests_running", (("replica", "1"),)) not in got
            assert got[("nexus_sm_split", (("split", "aggregated"),))] == 1
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            assert await engine_idle(engines(llm)[0])
            info = await client.server_info()
            assert (info.num_running, info.num_waiting, info.kv_cache_usage) == (0, 0, 0.0)
    asyncio.run(main())


def test_sessions_open_on_every_replica_and_end_everywhere():
    limit = random.randint(2, 4)

    async def main():
        async with serving_replicas(max_sessions=limit, engine_kw={"delay": 0.002}) as (_, llm, client):
            session = await client.start_session("agent")
            assert all("agent" in program_table(e) and program_table(e)["agent"].session for e in engines(llm))
            assert (await client.server_info()).num_sessions == 1  # counted once, not once per replica
            e = await rejected(client.start_session("agent"))
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "agent" in e.details()
            for i in range(3):  # round robin: the program's calls land on both replicas, ranked by each table
                await collect(client, [i + 1], max_tokens=2, program_id="agent")
            assert sum(program_table(e)["agent"].calls for e in engines(llm)) == 3
            assert "agent" in llm.router.program_replica
            # Ended with a call in flight on one replica: its record goes with that call, the other's at once.
            stream = client.generate([9], max_tokens=60, program_id="agent")
            await stream.__anext__()
            home = llm.router.program_replica["agent"]
            assert await client.end_session(session.session_id)
            assert program_table(engines(llm)[home])["agent"].ended
            assert "agent" not in program_table(engines(llm)[1 - home])
            assert not await client.end_session(session.session_id)
            async for _ in stream:
                pass
            assert await wait_until(lambda: all("agent" not in program_table(e) for e in engines(llm))
                                    and "agent" not in llm.router.program_replica)

            # A program with a call in flight on replica 1 only: refused, and replica 0 keeps no record of it.
            busy = llm.replicas[1].generate({"prompt_token_ids": [3]}, SamplingParams(max_tokens=200),
                                            program_id="busy")
            await busy.__anext__()
            e = await rejected(client.start_session("busy"))
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "busy" not in program_table(engines(llm)[0])
            await busy.aclose()

            sessions = [await client.start_session() for _ in range(limit)]
            e = await rejected(client.start_session())
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions" in e.details()
            assert (await client.server_info()).num_sessions == limit
            assert all({s.program_id for s in sessions} <= set(program_table(e)) for e in engines(llm))

            llm.replicas[0].shutdown()  # the live replica carries on: sessions end and start there alone
            assert await client.end_session(sessions[0].session_id)
            assert sessions[0].program_id not in program_table(engines(llm)[1])
            replacement = await client.start_session("after")
            assert "after" in program_table(engines(llm)[1]) and "after" not in program_table(engines(llm)[0])
            assert (await client.server_info()).num_sessions == limit
            assert await client.end_session(replacement.session_id) and "after" not in program_table(engines(llm)[1])
            llm.replicas[1].shutdown()
            e = await rejected(client.start_session())
            assert e.code() == grpc.StatusCode.UNAVAILABLE
    asyncio.run(main())


def test_sessions_never_ended_expire_on_every_replica():
    idle = 0.3

    async def main():
        async with serving_replicas(engine_kw={"program_idle_timeout": idle}) as (server, llm, client):
            sessions = [await client.start_session() for _ in range(random.randint(2, 8))]
            await collect(client, [1], max_tokens=2, program_id=sessions[0].program_id)
            assert (await client.server_info()).num_sessions == len(sessions)
            await asyncio.sleep(idle + 0.1)
            assert (await client.server_info()).num_sessions == 0 and not server.servicer.sessions.open
            assert all(not ({s.program_id for s in sessions} & set(program_table(e))) for e in engines(llm))
            assert not await client.end_session(sessions[0].session_id)
    asyncio.run(main())


def serve_parser():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    return parser


def test_serve_replica_flags():
    parser = serve_parser()
    assert replica_options(parser.parse_args(["serve"])) == {"num_replicas": 1, "routing": RouterConfig()}
    n, threshold, idle = random.randint(2, 8), random.randint(0, 10**5), random.uniform(1, 1000)
    devices = [random.randrange(8) for _ in range(n)]
    options = replica_options(parser.parse_args(
        ["serve", "--replicas", str(n), "--routing", "least_loaded", "--locality-threshold", str(threshold),
         "--devices", ",".join(map(str, devices)), "--program-idle-timeout", str(idle)]))
    assert options == {"num_replicas": n, "routing": RouterConfig("least_loaded", threshold, idle), "devices": devices}
    args = parser.parse_args(["serve", "--replicas", str(n), "--devices", "0"])
    with pytest.raises(ValueError, match="--devices names 1 device"):
        replica_options(args)
    with pytest.raises(ValueError, match="--devices"):
        serve_front(args)  # before any engine is built


@pytest.mark.parametrize("argv,flag", [
    (["--replicas", "0"], "--replicas"), (["--replicas", "two"], "--replicas"),
    (["--routing", "nearest"], "--routing"), (["--locality-threshold", "-1"], "--locality-threshold"),
    (["--devices", "0,,1"], "--devices"), (["--devices", "gpu0"], "--devices"), (["--devices", "-1"], "--devices"),
    (["--replicas", "3", "--devices", "0,1"], "--devices"), (["--devices", "1000"], "device 1000 does not exist"),
])
def test_bad_serve_flags_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["serve", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and flag in err


def test_serve_builds_replicas_of_the_embedded_model_on_the_given_devices():
    llm = serve_front(serve_parser().parse_args(["serve", "--replicas", "2", "--routing", "round_robin",
                                                 "--devices", "0,0", "--dtype", "float32"]))
    try:
        assert isinstance(llm, ReplicatedAsyncLLM) and llm.router.config.policy == "round_robin"
        assert [r.engine.config.device for r in llm.replicas] == [0, 0]

        async def main():
            async with serving(llm) as (_, client):
                finals = [(await collect(client, [5, 6, 7], max_tokens=3))[1][0] for _ in range(2)]
                return finals, await client.server_info()
        finals, info = asyncio.run(main())
        assert list(finals[0].output_ids) == list(finals[1].output_ids) and len(finals[0].output_ids) == 3
        assert [r.engine.block_manager.stats()["prefix_queries"] for r in llm.replicas] == [1, 1]
        assert info.num_running == 0 and info.num_in_flight == 0
    finally:
        llm.shutdown()
    single = serve_front(serve_parser().parse_args(["serve", "--devices", "0", "--dtype", "float32"]))
    try:
        assert isinstance(single, AsyncLLM) and single.engine.config.device == 0
    finally:
        single.shutdown()
