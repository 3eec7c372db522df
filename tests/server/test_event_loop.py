"""The servers run on uvloop and uvicorn's httptools parser (dependencies): the HTTP floor under every TTFT."""

import asyncio

import httptools  # noqa: F401 - a dependency: uvicorn's "auto" picks it
import uvicorn
import uvloop

from nexus_jax.server import event_loop


def test_the_serve_loop_is_uvloop():
    async def which() -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()
    assert isinstance(event_loop.run(which()), uvloop.Loop)


def test_uvicorn_parses_http_with_httptools():
    config = uvicorn.Config(lambda scope, receive, send: None, lifespan="off")
    config.load()
    assert config.http_protocol_class.__name__ == "HttpToolsProtocol"
