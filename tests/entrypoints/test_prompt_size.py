"""A long text prompt must neither freeze the event loop nor be encoded at all when it cannot fit: the library
refuses it by its length alone (ValueError naming max_model_len) and encodes the rest on a worker thread."""

import asyncio
import threading

import pytest

from nexus_jax.entrypoints.async_llm import AsyncLLM
from nexus_jax.entrypoints.replicas import ReplicatedAsyncLLM
from nexus_jax.testing.engines import held_tokenizer, make_engine
from nexus_jax.testing.runs import greedy
from nexus_jax.testing.streams import collect, wait_until

MAX_LEN = 128


def test_text_too_long_to_fit_is_refused_before_encoding(tokenizer):
    held, calls, release = held_tokenizer(tokenizer)
    release.set()
    engine = make_engine(tokenizer=held, max_model_len=MAX_LEN)
    bound = MAX_LEN * tokenizer.max_token_chars
    for prompt in ("a" * (bound + 1), {"prompt": "ab " * bound}):
        with pytest.raises(ValueError, match=f"limit of {bound} characters .*max_model_len {MAX_LEN}"):
            engine.add_request("long", prompt, greedy(2))
    assert calls == [] and not engine.groups
    engine.add_request("short", "hello", greedy(2))
    assert calls == [5]

    llm = AsyncLLM(make_engine(tokenizer=held, max_model_len=MAX_LEN))
    replicas = ReplicatedAsyncLLM([AsyncLLM(make_engine(tokenizer=held, max_model_len=MAX_LEN))])
    try:
        for front in (llm, replicas):
            with pytest.raises(ValueError, match="max_model_len"):
                asyncio.run(collect(front, "a" * (bound + 1), greedy(2)))
        assert calls == [5]
    finally:
        llm.shutdown()
        replicas.shutdown()


@pytest.mark.parametrize("front", ["async_llm", "replicated"])
def test_encoding_a_text_prompt_leaves_the_event_loop_free(tokenizer, front):
    held, calls, release = held_tokenizer(tokenizer)
    engine = make_engine(tokenizer=held, max_model_len=MAX_LEN)
    llm = AsyncLLM(engine) if front == "async_llm" else ReplicatedAsyncLLM([AsyncLLM(engine)])
    timer = threading.Timer(1.5, release.set)  # frees a loop that encoding blocks, so that the test fails, not hangs
    try:
        async def main():
            timer.start()
            task = asyncio.create_task(collect(llm, "hello there", greedy(2, ignore_eos=True)))
            assert await wait_until(lambda: calls, 5)
            await asyncio.sleep(0.05)  # the loop runs other work while the text is encoded
            assert not release.is_set(), "encoding held the event loop"
            release.set()
            tokens, _, reason = await task
            assert len(tokens) == 2 and reason == "length"
        asyncio.run(main())
    finally:
        timer.cancel()
        llm.shutdown()
