"""The servers' event loop: uvloop where it is installed (the `http` extra brings it), else asyncio's own.

uvloop and uvicorn's httptools parser together took a do-nothing ASGI endpoint on uvicorn from 0.88 to 0.57 ms per
streamed request on the CI machine (h11 + asyncio: 0.88; httptools + asyncio: 0.77), the floor under every HTTP
request's TTFT (RESULTS.md, issue 18). uvicorn picks httptools by itself when it is installed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Coroutine, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the servers' event loop."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)
