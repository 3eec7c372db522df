"""ReplicatedAsyncLLM over mock-executor engines: routing, prefix-cache locality, abort, dead replicas."""

import asyncio

import pytest

from nexus_jax import AsyncLLM, EngineConfig
from nexus_jax.entrypoints.async_llm import EngineDeadError
from nexus_jax.entrypoints.replicas import ReplicatedAsyncLLM
from nexus_jax.programs.router import RouterConfig
from nexus_jax.testing.engines import expected, make_engine
from nexus_jax.testing.runs import greedy
from nexus_jax.testing.streams import collect, wait_until


def replicated(n=3, routing="locality", step_seconds=None, **engine_kw):
    """n replicas over the mock executor; step_seconds slows each step so that a long request is still running
    when the test acts on it."""
    engines = [make_engine(step_seconds=step_seconds, **engine_kw) for _ in range(n)]
    return ReplicatedAsyncLLM([AsyncLLM(e) for e in engines], routing)


@pytest.mark.parametrize("routing", ["locality", "round_robin", "least_loaded"])
def test_concurrent_streams_over_replicas_deliver_every_token(routing):
    llm = replicated(3, routing, num_blocks=512)
    try:
        async def main():
            jobs = [collect(llm, {"prompt_token_ids": [i, i + 1]}, greedy(5 + i % 9), request_id=f"r{i}",
                            program_id=f"p{i % 4}") for i in range(45)]
            return await asyncio.gather(*jobs)
        for i, (tokens, _, reason) in enumerate(asyncio.run(main())):
            assert tokens == expected([i, i + 1], 5 + i % 9) and reason == "length"
        served = [r.engine.block_manager.stats()["prefix_queries"] for r in llm.replicas]
        assert all(q > 0 for q in served) and sum(served) == 45     # every replica took calls
        assert llm.router.load == [0, 0, 0] and not llm.router.calls
    finally:
        llm.shutdown()


@pytest.mark.parametrize("routing,hits", [("locality", True), ("round_robin", False)])
def test_locality_sends_a_programs_long_calls_where_its_prefix_is_cached(routing, hits):
    llm = ReplicatedAsyncLLM([AsyncLLM(make_engine(num_blocks=512)) for _ in range(2)],
                             RouterConfig(routing, locality_threshold=16))
    try:
        async def main():
            context = list(range(100, 164))
            for turn in range(4):  # each turn's prompt extends the previous one: the program's context
                prompt = context[:40 + 8 * turn]
                tokens, _, _ = await collect(llm, {"prompt_token_ids": prompt}, greedy(3), program_id="agent")
                assert tokens == expected(prompt, 3)
        asyncio.run(main())
        hit_tokens = sum(r.engine.block_manager.stats()["prefix_hit_tokens"] for r in llm.replicas)
        assert (hit_tokens >= 3 * 40) == hits  # every later turn finds at least the first 40 tokens
    finally:
        llm.shutdown()


def test_abort_reaches_the_replica_of_the_request():
    llm = replicated(3, "round_robin", step_seconds=0.002)
    try:
        async def main():
            others = [asyncio.create_task(collect(llm, {"prompt_token_ids": [i]}, greedy(4), request_id=f"o{i}"))
                      for i in range(2)]
            stream = llm.generate({"prompt_token_ids": [5] * 10}, greedy(400), request_id="long")
            first = await stream.__anext__()
            assert not first.finished
            index = llm.router.replica_of("long")
            llm.abort("long")
            llm.abort("no-such-request")            # unknown ids are ignored
            reasons = [out.outputs[0].finish_reason async for out in stream]
            return index, reasons, await asyncio.gather(*others)
        index, reasons, others = asyncio.run(main())
        assert reasons[-1] == "abort"
        assert not llm.replicas[index].engine.groups and llm.replicas[index].engine.block_manager.usage == 0.0
        assert [tokens for tokens, _, _ in others] == [expected([0], 4), expected([1], 4)]
        assert llm.router.replica_of("long") is None and llm.router.load == [0, 0, 0]
    finally:
        llm.shutdown()


def test_leaving_a_stream_aborts_it_on_its_replica():
    llm = replicated(2)
    try:
        async def main():
            async for _ in llm.generate({"prompt_token_ids": [1] * 20}, greedy(400), request_id="gone"):
                break
            assert await wait_until(lambda: not any(r.engine.has_unfinished_requests() for r in llm.replicas))
        asyncio.run(main())
        assert llm.router.load == [0, 0] and all(r.engine.block_manager.usage == 0.0 for r in llm.replicas)
    finally:
        llm.shutdown()


def test_a_dead_replica_fails_its_requests_and_the_others_keep_serving():
    llm = replicated(2, "round_robin", step_seconds=0.002)
    try:
        async def main():
            doomed = llm.generate({"prompt_token_ids": [3] * 8}, greedy(400), request_id="doomed")
            await doomed.__anext__()
            victim = llm.replicas[llm.router.replica_of("doomed")]

            def broken_step():
                raise RuntimeError("device lost")
            victim.engine.step = broken_step       # the engine thread dies on its next step
            with pytest.raises(EngineDeadError, match="device lost"):
                async for _ in doomed:
                    pass
            results = [await collect(llm, {"prompt_token_ids": [i]}, greedy(3)) for i in range(4)]
            return victim, results
        victim, results = asyncio.run(main())
        assert [tokens for tokens, _, _ in results] == [expected([i], 3) for i in range(4)]
        assert llm.router.dead == {llm.replicas.index(victim)}
        assert llm.router.load == [0, 0]
    finally:
        llm.shutdown()

    llm = replicated(1)
    llm.replicas[0].shutdown()
    with pytest.raises(EngineDeadError, match="every replica"):
        asyncio.run(collect(llm, {"prompt_token_ids": [1]}, greedy(2)))


def test_bad_input_raises_and_leaves_no_load(tokenizer):
    llm = replicated(2)
    texts = replicated(1, tokenizer=tokenizer)
    try:
        async def main():
            with pytest.raises(ValueError, match="empty"):
                await collect(llm, {"prompt_token_ids": []}, greedy(2))
            for empty in ("", {"prompt": ""}):  # as ids, "" would be one BOS token
                with pytest.raises(ValueError, match="prompt is empty"):
                    await collect(texts, empty, greedy(2))
            with pytest.raises(ValueError, match="tokenizer"):
                await collect(llm, "text without a tokenizer", greedy(2))
            first = llm.generate({"prompt_token_ids": [1]}, greedy(50), request_id="dup")
            await first.__anext__()
            with pytest.raises(ValueError, match="already in use"):
                await collect(llm, {"prompt_token_ids": [2]}, greedy(2), request_id="dup")
            await first.aclose()
        asyncio.run(main())
        assert llm.router.load == [0, 0] and not llm.router.calls
    finally:
        llm.shutdown()
        texts.shutdown()
    with pytest.raises(ValueError, match="at least one replica"):
        ReplicatedAsyncLLM([])
    with pytest.raises(ValueError, match="routing policy"):
        ReplicatedAsyncLLM([object()], "nearest")
    with pytest.raises(ValueError, match="num_replicas"):
        ReplicatedAsyncLLM.from_config(EngineConfig(), num_replicas=0)


def test_text_prompts_are_tokenized_once_and_routed_by_length(tokenizer):
    llm = ReplicatedAsyncLLM([AsyncLLM(make_engine(tokenizer=tokenizer, num_blocks=512)) for _ in range(2)],
                             RouterConfig("least_loaded"))
    try:
        text = "hello replicas"
        ids = tokenizer.encode(text)

        async def main():
            stream = llm.generate(text, greedy(2), request_id="t")
            out = await stream.__anext__()
            load = max(llm.router.load)
            await stream.aclose()
            return out, load
        out, load = asyncio.run(main())
        assert out.prompt == text and out.prompt_token_ids == ids
        assert len(ids) <= load <= len(ids) + 2
    finally:
        llm.shutdown()


def test_sessions_forget_the_programs_replica():
    llm = replicated(2, RouterConfig(locality_threshold=0))
    try:
        with llm.session("agent"):
            asyncio.run(collect(llm, {"prompt_token_ids": [1, 2]}, greedy(2), program_id="agent"))
            assert "agent" in llm.router.program_replica
        assert "agent" not in llm.router.program_replica
        stats = llm.stats()
        assert len(stats) == 2 and stats[0]["load_tokens"] == 0 and "kv_usage" in stats[0]
    finally:
        llm.shutdown()


def test_from_config_starts_replicas_of_the_embedded_model():
    llm = ReplicatedAsyncLLM.from_config(EngineConfig(dtype="float32", max_num_batched_tokens=64,
                                                      cpu_kv_cache_tokens=2048), num_replicas=2,
                                         routing="round_robin")
    try:
        async def main():
            return await asyncio.gather(*[collect(llm, {"prompt_token_ids": [5, 6, 7]}, greedy(4)) for _ in range(2)])
        (first, _, first_reason), (second, _, second_reason) = asyncio.run(main())
        assert (first, first_reason) == (second, second_reason) and len(first) == 4  # two replicas agree (greedy)
        assert all(r.engine.block_manager.stats()["prefix_queries"] == 1 for r in llm.replicas)
    finally:
        llm.shutdown()


def test_the_grpc_server_serves_through_the_front_end():
    from nexus_jax.server.client import Client
    from nexus_jax.server.grpc_server import NexusServer, ServerOptions

    llm = replicated(2, "round_robin")

    async def main():
        server = NexusServer(llm, ServerOptions())
        port = await server.start()
        try:
            async with Client(f"127.0.0.1:{port}") as client:
                session = await client.start_session("p")
                finals = [[r async for r in client.generate([5, 6, 7], max_tokens=4, program_id="p")][-1]
                          for _ in range(3)]
                assert "p" in llm.router.program_replica  # the router keeps the program's replica...
                assert await client.end_session(session.session_id)
                assert "p" not in llm.router.program_replica  # ...until EndSession
                return finals
        finally:
            await server.stop()  # shuts the replicas down
    finals = asyncio.run(main())
    assert [list(f.complete.output_ids) for f in finals] == [expected([5, 6, 7], 4)] * 3
    assert [r.engine.block_manager.stats()["prefix_queries"] for r in llm.replicas] == [2, 1]


def test_set_routing_between_runs():
    llm = replicated(2, "locality", step_seconds=0.01, num_blocks=512)
    try:
        async def main():
            llm.router.mark_dead(1)
            call = asyncio.ensure_future(collect(llm, {"prompt_token_ids": [1, 2]}, greedy(20), program_id="p"))
            assert await wait_until(lambda: llm.router.calls)
            with pytest.raises(RuntimeError, match="cannot change the routing with 1 calls in flight"):
                llm.set_routing("round_robin")
            await call
            llm.set_routing("round_robin")
            assert llm.router.config.policy == "round_robin" and llm.router.dead == {1}
            assert not llm.router.program_replica  # a fresh router: programs are routed afresh
            with pytest.raises(ValueError, match="routing policy"):
                llm.set_routing("random")
        asyncio.run(main())
    finally:
        llm.shutdown()
