"""Server exposure and sessions through real gRPC on 127.0.0.1: limits from the server's configuration, loopback by
default, no model path in any request, bounded admission, sessions backed by the engine's process table."""

import argparse
import asyncio
import logging
import random
import time

import grpc
import pytest

from nexus_jax.cli.service import register, server_options
from nexus_jax.server.client import request
from nexus_jax.server.grpc_server import RETRY_AFTER_KEY, SERVICE_NAME, ServerOptions
from nexus_jax.server.proto import nexus_pb2 as pb
from nexus_jax.server.proto import nexus_pb2_grpc as pb_grpc
from nexus_jax.testing.engines import program_table
from nexus_jax.testing.serving import collect, engine_idle, rejected, server_engine, serving
from nexus_jax.testing.streams import wait_until

# 127.0.0.1 as /proc/net/tcp writes it, and as tcp6 writes it mapped to IPv6 (::ffff:127.0.0.1), and ::1.
LOOPBACK = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}


def listening_addresses(port):
    """Local addresses (hex, as /proc/net/tcp* write them) of the sockets listening on `port`."""
    found = []
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(name) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.append(address)
    return found


def test_loopback_by_default_and_serve_flags():
    assert ServerOptions().host == "127.0.0.1"
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    options = server_options(parser.parse_args(["serve"]))
    assert options.host == "127.0.0.1" and options.max_n == 16 and options.max_prompt_tokens is None
    limits = [random.randint(1, 10**6) for _ in range(4)]
    options = server_options(parser.parse_args(
        ["serve", "--max-prompt-tokens", str(limits[0]), "--max-tokens-limit", str(limits[1]),
         "--max-n", str(limits[2]), "--max-sessions", str(limits[3])]))
    assert [options.max_prompt_tokens, options.max_tokens_limit, options.max_n, options.max_sessions] == limits
    assert options.write_timeout_s == 30.0
    for flag, value in (("2.5", 2.5), ("0", None)):
        assert server_options(parser.parse_args(["serve", "--write-timeout", flag])).write_timeout_s == value
    for bad in ({"max_n": 0}, {"max_prompt_tokens": -3}, {"max_tokens_limit": 2.5}, {"max_sessions": True},
                {"write_timeout_s": -1.0}, {"write_timeout_s": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerOptions(**bad)

    async def main():
        async with serving(server_engine()) as (server, _):
            found = listening_addresses(server.port)
            assert found and set(found) <= LOOPBACK, found  # no wildcard, no outside address
    asyncio.run(main())


def test_no_request_can_name_a_model_or_a_path():
    """Models come from the server's configuration only: no request message (nested ones included) has a field
    that could carry a model, checkpoint, file or path."""
    service = pb.DESCRIPTOR.services_by_name["Nexus"]
    assert service.full_name == SERVICE_NAME
    seen, todo = set(), [m.input_type for m in service.methods]
    while todo:
        message = todo.pop()
        if message.full_name in seen:
            continue
        seen.add(message.full_name)
        for field in message.fields:
            assert not any(word in field.name.lower() for word in ("model", "path", "checkpoint", "file", "dir",
                                                                     "url", "weights")), field.full_name
            if field.message_type is not None:
                todo.append(field.message_type)
    assert "nexus.v1.GenerateRequest" in seen and "nexus.v1.SamplingParams" in seen


def test_request_limits_are_invalid_argument_naming_the_limit(tokenizer):
    max_prompt, max_tokens, max_n = random.randint(3, 20), random.randint(2, 30), random.randint(1, 4)

    async def main():
        async with serving(server_engine(tokenizer=tokenizer), max_prompt_tokens=max_prompt,
                           max_tokens_limit=max_tokens, max_n=max_n) as (_, client):
            long_text = " ".join(["w"] * 40)  # short enough for the length check, too many tokens
            over = [([1] * (max_prompt + random.randint(1, 5)), {}, "max_prompt_tokens"),
                    (long_text, {}, "max_prompt_tokens"),
                    ([1], {"max_tokens": max_tokens + random.randint(1, 100)}, "max_tokens_limit"),
                    ([1], {"n": max_n + random.randint(1, 10)}, "max_n")]
            for prompt, kw, option in over:
                e = await rejected(collect(client, prompt, **kw))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and option in e.details(), (option, e.details())
                value = len(tokenizer.encode(prompt)) if isinstance(prompt, str) else kw.get("max_tokens") or \
                    kw.get("n") or len(prompt)
                assert f" {value} exceeds the server's limit" in e.details()
            _, done = await collect(client, [7] * max_prompt, max_tokens=max_tokens, n=max_n, ignore_eos=True)
            assert len(done) == max_n and all(len(c.output_ids) == max_tokens for c in done)
            _, (done,) = await collect(client, "hi", ignore_eos=True)  # text under the limit: tokenized once, served
            assert done.prompt_tokens == len(tokenizer.encode("hi"))
            assert done.completion_tokens == min(16, max_tokens)  # an unset max_tokens: the default, capped
    asyncio.run(main())


def test_admission_bounds_waiting_requests_and_hints_retry():
    """max_in_flight counts every accepted request, also those waiting in the engine's queue."""
    limit, hint = random.randint(2, 4), random.randint(1, 10**6)

    async def main():
        engine = server_engine(delay=0.02, max_num_seqs=1)  # one runs (8 s), the others wait in the engine
        async with serving(engine, max_in_flight=limit, retry_after_ms=hint) as (server, client):
            calls = [client.stub.Generate(request([i + 1], max_tokens=400)) for i in range(limit)]
            end = time.monotonic() + 5
            while len(engine.scheduler.running) + len(engine.scheduler.waiting) < limit and time.monotonic() < end:
                await asyncio.sleep(0.01)
            stats = engine.stats()
            assert (stats["running"], stats["waiting"]) == (1, limit - 1)
            assert len(server.servicer.streams) == limit
            for _ in range(2):
                e = await rejected(collect(client, [3], max_tokens=2))
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert dict(e.trailing_metadata())[RETRY_AFTER_KEY] == str(hint)
            assert engine.stats()["running"] + engine.stats()["waiting"] == limit  # the rejected never queued
            for call in calls:
                call.cancel()
            assert await engine_idle(engine)
            _, (done,) = await collect(client, [3], max_tokens=2)
            assert done.finish_reason == "length"
    asyncio.run(main())


def test_sessions_live_in_the_process_table():
    async def main():
        engine = server_engine(delay=0.002)
        async with serving(engine) as (_, client):
            named = await client.start_session("agent-7")
            picked = await client.start_session()
            assert named.program_id == "agent-7" and picked.program_id.startswith("program-")
            assert {"agent-7", picked.program_id} <= set(program_table(engine))
            assert (await client.server_info()).num_sessions == 2
            e = await rejected(client.start_session("agent-7"))
            assert e.code() == grpc.StatusCode.ALREADY_EXISTS and "agent-7" in e.details()
            calls = random.randint(1, 4)
            for i in range(calls):
                await collect(client, [i + 1], max_tokens=2, program_id="agent-7", thread_id=str(i))
            record = program_table(engine)["agent-7"]
            assert record.calls == calls and record.service > 0 and record.threads == {str(i) for i in range(calls)}
            assert await client.end_session(named.session_id)
            assert "agent-7" not in program_table(engine) and not await client.end_session(named.session_id)
            assert (await client.server_info()).num_sessions == 1
            # Ended with a call in flight: the record goes with that call.
            stream = client.generate([5], max_tokens=60, program_id=picked.program_id)
            await stream.__anext__()
            assert await client.end_session(picked.session_id)
            assert program_table(engine)[picked.program_id].ended
            assert (await client.server_info()).num_sessions == 0
            async for _ in stream:
                pass
            assert await engine_idle(engine) and picked.program_id not in program_table(engine)
    asyncio.run(main())


def test_sessions_never_ended_expire_and_leave_nothing_behind():
    idle = 0.3

    async def main():
        engine = server_engine(delay=0.01, program_idle_timeout=idle)
        async with serving(engine) as (server, client):
            count = random.randint(5, 40)
            sessions = [await client.start_session() for _ in range(count)]
            busy = sessions[0]
            stream = client.generate([1], max_tokens=80, program_id=busy.program_id)  # ~0.8 s in flight
            await stream.__anext__()
            assert (await client.server_info()).num_sessions == count
            await asyncio.sleep(idle + 0.1)
            assert (await client.server_info()).num_sessions == 1  # the one with a call in flight stays
            assert set(server.servicer.sessions.open) == {busy.session_id}
            assert {s.program_id for s in sessions[1:]}.isdisjoint(program_table(engine))
            assert not await client.end_session(sessions[1].session_id)
            async for _ in stream:
                pass
            await asyncio.sleep(idle + 0.1)
            assert (await client.server_info()).num_sessions == 0
            assert not server.servicer.sessions.open and busy.program_id not in program_table(engine)
    asyncio.run(main())


def test_session_limit_is_resource_exhausted():
    limit, hint = random.randint(1, 5), random.randint(1, 5000)

    async def main():
        async with serving(server_engine(), max_sessions=limit, retry_after_ms=hint) as (_, client):
            sessions = [await client.start_session() for _ in range(limit)]
            e = await rejected(client.start_session())
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions" in e.details()
            assert dict(e.trailing_metadata())[RETRY_AFTER_KEY] == str(hint)
            assert await client.end_session(random.choice(sessions).session_id)
            await client.start_session()
            assert (await client.server_info()).num_sessions == limit
    asyncio.run(main())


def test_a_stream_nobody_reads_is_ended_after_the_write_timeout_and_frees_its_slot():
    """A client that sends a request and never reads: once its flow-control window is full, the server's writes
    wait; after write_timeout_s the stream ends, its request is aborted and its admission slot is free again."""
    timeout = 1.0

    async def main():
        engine = server_engine(delay=0.001)
        async with serving(engine, max_in_flight=1, write_timeout_s=timeout, max_id_length=1000) as (server, client):
            idle, call = await unread_stream(server)
            try:
                e = await rejected(collect(client, [3], max_tokens=2))
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # the unread stream holds the one slot
                assert await wait_until(lambda: not server.servicer.streams, 5 + timeout)
                assert await engine_idle(engine)
                _, (done,) = await collect(client, [3], max_tokens=2)
                assert done.finish_reason == "length"
                e = await rejected(_drain(call))  # what was sent before the timeout, then the status
                assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "write_timeout_s" in e.details()
            finally:
                await idle.close()
    asyncio.run(main())


def test_a_client_that_disconnects_while_its_writes_wait_is_one_info_line(caplog):
    """A blocked writer whose client goes away: the request is aborted and the server logs one INFO line, not the
    traceback of the refused write at ERROR."""
    async def main():
        engine = server_engine(delay=0.001)
        async with serving(engine, max_id_length=1000) as (server, _):
            idle, _ = await unread_stream(server)
            await asyncio.sleep(0.3)  # the window fills and a write waits
            await idle.close()
            assert await wait_until(lambda: not server.servicer.streams, 5) and await engine_idle(engine)

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    (gone,) = [r for r in caplog.records if "went away" in r.getMessage()]
    assert gone.levelno == logging.INFO and gone.exc_info is None and "\n" not in gone.getMessage()


async def unread_stream(server) -> tuple[grpc.aio.Channel, grpc.aio.UnaryStreamCall]:
    """A Generate stream on a channel of its own that nobody reads, once the server holds it. Its chunks are ~1 KiB
    (the id is echoed) and, without BDP probing, the window stays at 64 KiB: the server's writes soon wait."""
    idle = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.http2.bdp_probe", 0)])
    call = pb_grpc.NexusStub(idle).Generate(request([1], request_id="r" * 1000, max_tokens=500, n=4))
    assert await wait_until(lambda: server.servicer.streams, 5)
    return idle, call


async def _drain(call) -> None:
    async for _ in call:
        pass
