"""A long text prompt over gRPC: refused by its length before encoding, with INVALID_ARGUMENT naming the limit
(max_prompt_tokens where set, else the model's max_model_len); text that may fit is encoded on a worker thread,
so health and other calls keep answering meanwhile."""

import asyncio
import threading
import time

import grpc

from nexus_jax.testing.engines import held_tokenizer
from nexus_jax.testing.serving import collect, rejected, server_engine, serving
from nexus_jax.testing.streams import wait_until


def test_text_too_long_to_fit_is_invalid_argument_before_encoding(tokenizer):
    held, calls, release = held_tokenizer(tokenizer)
    release.set()
    per_token = tokenizer.max_token_chars

    async def main():
        engine = server_engine(tokenizer=held, max_model_len=256)
        for options, tokens, name in (({"max_prompt_tokens": 40}, 40, "max_prompt_tokens"), ({}, 256, "max_model_len")):
            async with serving(engine, **options) as (_, client):
                e = await rejected(collect(client, "a" * (tokens * per_token + 1), max_tokens=2))
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert f"limit of {tokens * per_token} characters ({name} {tokens} tokens" in e.details()
                assert calls == []
                _, (done,) = await collect(client, "hi", max_tokens=2, ignore_eos=True)
                assert done.completion_tokens == 2 and calls == [2]
                calls.clear()
            engine = server_engine(tokenizer=held, max_model_len=256)  # the server shut the last one down
    asyncio.run(main())


def test_health_answers_while_a_text_prompt_is_encoded(tokenizer):
    held, calls, release = held_tokenizer(tokenizer)
    timer = threading.Timer(1.5, release.set)  # frees a loop that encoding blocks, so that the test fails, not hangs

    async def main():
        async with serving(server_engine(tokenizer=held)) as (_, client):
            timer.start()
            call = asyncio.create_task(collect(client, "hello there", max_tokens=2, ignore_eos=True))
            assert await wait_until(lambda: calls, 5)
            started = time.monotonic()
            assert await client.health() == "SERVING"
            assert not release.is_set() and time.monotonic() - started < 0.5, "encoding held the event loop"
            release.set()
            _, (done,) = await call
            assert done.completion_tokens == 2
    try:
        asyncio.run(main())
    finally:
        timer.cancel()
