"""The output processor on the engine's thread (LLMEngine.step()) and on its own (AsyncLLM's) give the same outputs;
the threaded one applies backpressure, drops nothing, and ends every request exactly once."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nexus_jax import AsyncLLM
from nexus_jax.core.output_processor import ThreadedOutputProcessor
from nexus_jax.core.sampling_params import SamplingParams
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.entrypoints.async_llm import EngineDeadError
from nexus_jax.testing.engines import expected, make_engine
from runner.model.default_model import default_model_dir

PROMPT = [40, 41, 42, 43]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(default_model_dir())


def spanning_stop(tokenizer: Tokenizer, after: int = 3) -> str:
    """A stop string that ends inside the greedy continuation's token `after + 1` and starts in an earlier one."""
    tokens = expected(PROMPT, 12)
    cut = len(tokenizer.decode(tokens[:after]))
    text = tokenizer.decode(tokens)
    assert len(text) > cut + 2
    return text[cut - 1:cut + 2]


def summary(out) -> tuple:
    """Everything an output says that does not depend on the wall clock."""
    return (out.request_id, out.finished, out.error, out.num_cached_tokens, out.prompt_logprobs,
            len(out.metrics.token_times),
            [(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob, c.logprobs)
             for c in out.outputs])


def run_inline(engine, requests, actions=None) -> dict:
    finals: dict[str, list] = {}
    for rid, prompt, params, stream in requests:
        engine.add_request(rid, prompt, params, stream=stream)
    step = 0
    while engine.has_unfinished_requests():
        (actions or {}).get(step, lambda e: None)(engine)
        step += 1
        for out in engine.step():
            if out.finished:
                finals.setdefault(out.request_id, []).append(summary(out))
    return finals


def run_threaded(engine, requests, actions=None, maxsize=2, deliver=None) -> dict:
    finals: dict[str, list] = {}

    def collect(view) -> None:
        if deliver is not None:
            deliver(view)
        if view.finished:
            finals.setdefault(view.request_id, []).append(summary(view.build()))
    processor = ThreadedOutputProcessor(engine.tokenizer, collect, maxsize)
    engine.output = processor
    for rid, prompt, params, stream in requests:
        engine.add_request(rid, prompt, params, stream=stream)
    step = 0
    while engine.has_unfinished_requests():
        (actions or {}).get(step, lambda e: None)(engine)
        step += 1
        engine.step()
    processor.close()
    return finals


def both(tokenizer, requests, actions=None, **engine_args) -> dict:
    inline = run_inline(make_engine(tokenizer=tokenizer, **engine_args), requests, actions)
    threaded = run_threaded(make_engine(tokenizer=tokenizer, **engine_args), requests, actions)
    assert threaded == inline
    assert all(len(finals) == 1 for finals in inline.values())  # exactly one final output per request
    return {rid: finals[0] for rid, finals in inline.items()}


def request(rid: str, stream: bool = True, **params) -> tuple:
    return rid, {"prompt_token_ids": PROMPT}, SamplingParams(**{"max_tokens": 12, **params}), stream


@pytest.mark.parametrize("num_scheduler_steps", [1, 4])
def test_greedy_seeded_and_logprobs_agree(tokenizer, num_scheduler_steps):
    finals = both(tokenizer, [request("greedy"), request("plain", stream=False),
                              request("seeded", temperature=0.8, seed=7),
                              request("logprobs", logprobs=2, prompt_logprobs=1)],
                  num_scheduler_steps=num_scheduler_steps)
    assert finals["greedy"][-1][0][2] == expected(PROMPT, 12)
    assert finals["logprobs"][-1][0][6][0][expected(PROMPT, 1)[0]].decoded_token is not None


@pytest.mark.parametrize("include", [False, True])
def test_stop_strings_spanning_tokens_agree(tokenizer, include):
    stop = spanning_stop(tokenizer)
    finals = both(tokenizer, [request("s", stop=[stop], include_stop_str_in_output=include),
                              request("n3", n=3, stop=[stop], include_stop_str_in_output=include),
                              request("late", stop=[stop], min_tokens=8)])
    (_, text, tokens, reason, stop_reason, *_), = finals["s"][-1]
    assert (reason, stop_reason, len(tokens)) == ("stop", stop, 5)
    assert text.endswith(stop) == include
    assert all(c[3:5] == ("stop", stop) for c in finals["n3"][-1])
    assert finals["late"][-1][0][3:5] == ("length", None)  # the string came only within min_tokens


def test_stop_token_ids_eos_and_min_tokens_agree(tokenizer):
    tokens = expected(PROMPT, 12)
    finals = both(tokenizer, [request("ids", stop_token_ids=[tokens[2]]),
                              request("min", stop_token_ids=[tokens[2]], min_tokens=5),
                              request("eos", stream=False)], eos=[tokens[6]])
    assert finals["ids"][-1][0][2:5] == (tokens[:3], "stop", tokens[2])
    # the stop id is banned within min_tokens (the mock samples the next id), then EOS ends it
    assert finals["min"][-1][0][2:5] == ([t for t in tokens[:7] if t != tokens[2]], "stop", None)
    assert finals["eos"][-1][0][3] == "stop"


def test_abort_mid_stream_and_an_engine_error_agree(tokenizer):
    def fail_next_dispatch(engine) -> None:
        dispatch = engine.executor.dispatch

        def failing(step):
            engine.executor.dispatch = dispatch
            raise RuntimeError("device lost")
        engine.executor.dispatch = failing
    actions = {3: lambda e: e.abort_request("aborted"), 6: fail_next_dispatch}
    finals = both(tokenizer, [request("aborted", max_tokens=40), request("failed", max_tokens=40)], actions)
    assert finals["aborted"][-1][0][3] == "abort"
    assert finals["failed"][2] == "RuntimeError: device lost"
    assert finals["failed"][-1][0][3] == "error"


def test_a_full_queue_blocks_the_engine_and_loses_nothing(tokenizer):
    release = threading.Event()
    delivered = []

    def held(view) -> None:
        release.wait(10)
        delivered.append(view)
    engine = make_engine(tokenizer=tokenizer)
    requests = [request(f"r{i}", max_tokens=30) for i in range(3)]
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(run_threaded(engine, requests, maxsize=1, deliver=held)))
    runner.start()
    runner.join(1.0)
    assert runner.is_alive()  # waiting for the held processor thread
    steps = engine.executor.num_dispatches
    runner.join(0.5)
    assert engine.executor.num_dispatches == steps <= 4  # blocked: one batch in hand, one queued
    release.set()
    runner.join(30)
    assert done == run_inline(make_engine(tokenizer=tokenizer), requests)
    assert len(delivered) == 3 * 30  # one output per step per streamed request, the last one final


def test_tokens_after_a_matched_stop_string_are_never_emitted_and_the_blocks_go(tokenizer):
    stop = spanning_stop(tokenizer)
    release = threading.Event()
    engine = make_engine(tokenizer=tokenizer)
    seen: list = []

    def held(view) -> None:
        release.wait(10)
        seen.append(view.build())
    requests = [request("s", max_tokens=60, stop=[stop])]
    done: dict = {}
    runner = threading.Thread(target=lambda: done.update(run_threaded(engine, requests, maxsize=1, deliver=held)))
    runner.start()
    runner.join(1.0)  # the engine runs ahead of the held processor until the queue is full
    release.set()
    runner.join(30)
    assert done == run_inline(make_engine(tokenizer=tokenizer), requests)
    assert all(len(out.outputs[0].token_ids) <= 5 for out in seen)
    assert seen[-1].finished and seen[-1].outputs[0].stop_reason == stop
    assert engine.block_manager.num_free_blocks == engine.executor.num_blocks
    assert 5 < engine.executor.num_dispatches <= 5 + 6  # wasted steps: bounded by the queue and the flight


def test_async_llm_streams_agree_with_the_engine(tokenizer):
    stop = spanning_stop(tokenizer)
    params = SamplingParams(max_tokens=12, stop=[stop], n=2, logprobs=1)
    inline = run_inline(make_engine(tokenizer=tokenizer), [("a", {"prompt_token_ids": PROMPT}, params, True)])
    llm = AsyncLLM(make_engine(tokenizer=tokenizer))
    try:
        async def main():
            deltas = [out async for out in llm.generate({"prompt_token_ids": PROMPT}, params, "a")]
            whole = [out async for out in llm.generate({"prompt_token_ids": PROMPT}, params, "b", delta=False)]
            return deltas, whole
        deltas, whole = asyncio.run(main())
    finally:
        llm.shutdown()
    final = inline["a"][0][-1]
    assert summary(whole[-1])[-1] == final
    for c in final:
        parts = [d.outputs[c[0]] for d in deltas]
        assert "".join(p.text for p in parts) == c[1]
        assert [t for p in parts for t in p.token_ids] == c[2]
        assert [lp for p in parts for lp in p.logprobs] == c[6]


def test_a_failed_output_thread_ends_every_stream(tokenizer):
    llm = AsyncLLM(make_engine(tokenizer=tokenizer))

    def broken(*args):
        raise ValueError("decoder broke")
    llm._outputs._token = broken
    try:
        async def main():
            with pytest.raises(EngineDeadError, match="output processor"):
                async for _ in llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(max_tokens=50)):
                    pass
        asyncio.run(main())
    finally:
        llm.shutdown()
