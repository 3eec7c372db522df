"""Async helpers for tests of the streaming APIs (AsyncLLM, ReplicatedAsyncLLM)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from nexus_jax.core.sampling_params import SamplingParams


async def collect(llm: Any, prompt: Any, params: SamplingParams, **kw: Any) -> tuple[list[int], list[bool], str]:
    """Streams one request to its end: (the tokens of its first completion, each output's `finished`, the
    finish reason)."""
    tokens, finals = [], []
    async for out in llm.generate(prompt, params, **kw):
        tokens += out.outputs[0].token_ids
        finals.append(out.finished)
    return tokens, finals, out.outputs[0].finish_reason


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> bool:
    """Polls `predicate` every 10 ms: true as soon as it holds, false once `timeout` seconds passed without."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return False
