"""AsyncLLM streaming over the mock executor, and the library API on the real embedded default model."""

import asyncio

import pytest

from nexus_jax import LLM, AsyncLLM, SamplingParams
from nexus_jax.testing.engines import expected, make_engine
from nexus_jax.testing.runs import greedy
from nexus_jax.testing.streams import collect, wait_until
from runner.generate import generate
from runner.model.loader import load_model
from runner.model_runner import ModelRunner


def run(coro):
    return asyncio.run(coro)


def test_many_concurrent_streams_deliver_every_token_once():
    llm = AsyncLLM(make_engine(num_blocks=512))
    try:
        async def main():
            jobs = [collect(llm, {"prompt_token_ids": [i, i + 1]}, greedy(10 + i % 7), request_id=f"r{i}")
                    for i in range(60)]
            return await asyncio.gather(*jobs)
        results = run(main())
        for i, (tokens, finals, reason) in enumerate(results):
            assert tokens == expected([i, i + 1], 10 + i % 7)
            assert finals[-1] and not any(finals[:-1])
            assert reason == "length"
    finally:
        llm.shutdown()


def test_leaving_a_stream_aborts_its_request_and_frees_blocks():
    engine = make_engine()
    llm = AsyncLLM(engine)
    try:
        async def main():
            got = 0
            async for _ in llm.generate({"prompt_token_ids": [1] * 30}, greedy(400), request_id="gone"):
                got += 1
                if got == 3:
                    break
            for _ in range(500):  # the abort is processed on the engine thread; its state is read there too
                if await llm.run_on_engine(lambda: not engine.has_unfinished_requests()):
                    break
                await asyncio.sleep(0.01)
            return got, await llm.run_on_engine(lambda: (engine.block_manager.usage, dict(engine.groups)))
        got, (usage, groups) = run(main())
        assert got == 3
        assert usage == 0.0
        assert not groups
    finally:
        llm.shutdown()


def test_a_closed_client_loop_aborts_its_requests_and_the_engine_keeps_serving():
    engine = make_engine()
    llm = AsyncLLM(engine)
    try:
        async def start():  # reads one output and leaves the stream open
            stream = llm.generate({"prompt_token_ids": [1] * 30}, greedy(400), request_id="orphan")
            await stream.__anext__()
            return stream
        loop = asyncio.new_event_loop()
        kept = loop.run_until_complete(start())
        loop.close()  # unlike asyncio.run, close() does not finalize the open stream: nobody aborts it
        def idle():  # read on the engine thread, between its steps
            return not engine.has_unfinished_requests() and engine.block_manager.usage == 0.0
        for _ in range(500):
            if run(llm.run_on_engine(idle)):
                break
            asyncio.run(asyncio.sleep(0.01))
        assert run(llm.run_on_engine(idle))
        assert llm.dead_error is None
        tokens, _, reason = run(collect(llm, {"prompt_token_ids": [5, 6]}, greedy(4), request_id="after"))
        assert tokens == expected([5, 6], 4) and reason == "length"
        del kept
    finally:
        llm.shutdown()


@pytest.mark.parametrize("delta", [True, False])
def test_a_reader_that_lags_holds_one_merged_output(delta):
    """Outputs are cumulative, so one not read yet is replaced by the next: a stream nobody reads holds one
    output (not a full copy per step), and its reader then gets the missed progress in one piece."""
    engine = make_engine()
    llm = AsyncLLM(engine)
    try:
        async def main():
            stream = llm.generate({"prompt_token_ids": [1]}, SamplingParams(n=3, temperature=0.0, max_tokens=300),
                                  request_id="slow", delta=delta)
            first = await stream.__anext__()
            seen = [len(c.token_ids) for c in first.outputs]
            # The engine ran to the end meanwhile, and the output processor's thread delivered the final output.
            assert await wait_until(lambda: not engine.groups and not llm._streams, 10)
            rest = [out async for out in stream]
            assert len(rest) == 1 and rest[0].finished
            got = [len(c.token_ids) for c in rest[0].outputs]
            assert (got if delta else [g - s for g, s in zip(got, seen)]) == [300 - s for s in seen]
            whole = [(c.token_ids if not delta else f.token_ids + c.token_ids)
                     for f, c in zip(first.outputs, rest[0].outputs)]
            assert whole == [expected([1], 300)] * 3
        run(main())
    finally:
        llm.shutdown()


def test_bad_input_raises_at_generate_and_serving_goes_on():
    llm = AsyncLLM(make_engine())
    try:
        async def main():
            with pytest.raises(ValueError, match="empty"):
                async for _ in llm.generate({"prompt_token_ids": []}, greedy(3)):
                    pass
            return await collect(llm, {"prompt_token_ids": [7]}, greedy(2), request_id="ok")
        assert run(main())[0] == [8, 9]
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def default_llm():
    return LLM(dtype="float32", max_num_batched_tokens=64)


def test_run_on_engine_runs_on_the_engine_thread_and_reports_errors():
    import threading

    from nexus_jax.entrypoints.async_llm import EngineDeadError
    llm = AsyncLLM(make_engine(num_blocks=64))
    try:
        async def main():
            name = await llm.run_on_engine(lambda: threading.current_thread().name)
            with pytest.raises(KeyError, match="boom"):
                await llm.run_on_engine(lambda: {}["boom"])
            tokens, _, _ = await collect(llm, {"prompt_token_ids": [3, 4]}, greedy(5), request_id="after")
            return name, tokens
        name, tokens = run(main())
        assert name == "nexus-jax-engine" and tokens == expected([3, 4], 5)  # an error in a call kills nothing
    finally:
        llm.shutdown()

    async def after_shutdown():
        with pytest.raises(EngineDeadError):
            await llm.run_on_engine(lambda: 1)
    run(after_shutdown())


def test_default_model_generates_like_the_reference_loop(default_llm):
    tok = default_llm.get_tokenizer()
    prompts = ["Hello, world", "The quick brown fox jumps over"]
    outs = default_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                                use_tqdm=False)
    engine = default_llm.llm_engine
    runner: ModelRunner = engine.executor
    ids = [tok.encode(p) for p in prompts]
    params = load_model(None, dtype="float32").params
    ref = generate(ModelRunner(runner.config, params, num_blocks=64, block_size=runner.block_size), ids, 12)
    for out, p, r in zip(outs, prompts, ref):
        assert out.prompt == p and out.prompt_token_ids == tok.encode(p)
        assert out.outputs[0].token_ids == r
        assert out.outputs[0].text == tok.decode(r)
        assert out.outputs[0].finish_reason == "length"


def test_default_model_rejects_an_overlong_prompt_and_keeps_serving(default_llm):
    too_long = {"prompt_token_ids": [5] * (default_llm.llm_engine.max_model_len + 1)}
    with pytest.raises(ValueError, match="context"):
        default_llm.generate([too_long], use_tqdm=False)
    out = default_llm.generate("again", SamplingParams(max_tokens=4, seed=3), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) <= 4 and out.finished


def test_sampling_is_reproducible_with_a_seed(default_llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    a = default_llm.generate("seeded", params, use_tqdm=False)[0].outputs[0].token_ids
    b = default_llm.generate(["other prompt first", "seeded"], params, use_tqdm=False)[1].outputs[0].token_ids
    assert a == b


def test_multi_step_decode_on_the_model_matches_single_steps(default_llm):
    prompts = ["one two three", "a much longer prompt than the first one"]
    params = [SamplingParams(temperature=0, max_tokens=11, ignore_eos=True),
              SamplingParams(temperature=0.7, seed=5, max_tokens=9, ignore_eos=True)]
    single = default_llm.generate(prompts, params, use_tqdm=False)
    multi = LLM(dtype="float32", num_scheduler_steps=4).generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in multi] == [o.outputs[0].token_ids for o in single]


def test_converted_weights_cache_gives_the_same_outputs(tmp_path):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    first = LLM(dtype="float32", params_cache_dir=str(tmp_path)).generate("cache me", params, use_tqdm=False)
    assert any(tmp_path.iterdir())  # the orbax cache was written
    again = LLM(dtype="float32", params_cache_dir=str(tmp_path)).generate("cache me", params, use_tqdm=False)
    assert again[0].outputs[0].token_ids == first[0].outputs[0].token_ids
