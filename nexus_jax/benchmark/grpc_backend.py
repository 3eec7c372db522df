"""The bench serve backend that drives a running nexus-jax server through its gRPC API (nexus_jax/client.py).

Token times are taken on this client's monotonic clock when each chunk arrives, so they include the network and
the server's streaming; all tokens of one chunk (a multi-step decode delivers several) share its arrival time.
The model's limits come from the server's GetModelInfo. A failed call (a gRPC status, an Error message, a stream
that ends without its Complete or short of its tokens) becomes a record with success=False, never an exception.
"""

from __future__ import annotations

import time
from typing import Any

import grpc

from nexus_jax.benchmark.datasets import BenchRequest
from nexus_jax.benchmark.serve import RequestRecord
from nexus_jax.server.client import Client


class GrpcBackend:
    """One channel to `target`; open it with `await GrpcBackend.connect(...)` inside the benchmark's event loop
    (a grpc.aio channel belongs to the loop it was made on) and `await close()` it there."""

    def __init__(self, client: Client, target: str, model_info: Any, timeout: float | None = None):
        self.client = client
        self.target = target
        self.model_info = model_info
        self.timeout = timeout
        self.vocab_size = int(model_info.vocab_size)
        self.max_model_len = int(model_info.max_model_len)
        self.server_version = ""

    @classmethod
    async def connect(cls, target: str, token: str | None = None, tls: bool | str = False,
                      timeout: float | None = None) -> "GrpcBackend":
        """Connects and reads the model's limits; raises ConnectionError naming the target when it cannot."""
        client = Client(target, token, tls)
        try:
            info = await client.model_info()
            version = (await client.server_info()).version
        except grpc.aio.AioRpcError as e:
            await client.close()
            raise ConnectionError(f"cannot read model info from the server at {target}: "
                                  f"{e.code().name}: {e.details()}") from None
        if info.vocab_size < 1 or info.max_model_len < 2:
            await client.close()
            raise ConnectionError(f"the server at {target} reports vocab_size {info.vocab_size} and "
                                  f"max_model_len {info.max_model_len}")
        backend = cls(client, target, info, timeout)
        backend.server_version = version
        return backend

    async def send(self, request: BenchRequest) -> RequestRecord:
        ids = request.prompt.get("prompt_token_ids")
        prompt = ids if ids is not None else request.prompt["prompt"]
        prompt_len = len(ids) if ids is not None else 0
        times: list[float] = []
        complete, error = None, None
        start = time.monotonic()
        try:
            async for response in self.client.generate(
                    prompt, timeout=self.timeout, max_tokens=request.output_len, temperature=0.0, ignore_eos=True,
                    program_id=request.program_id or "", thread_id=request.thread_id):
                kind = response.WhichOneof("response")
                if kind == "chunk":
                    now = time.monotonic()
                    times.extend([now] * len(response.chunk.token_ids))
                elif kind == "complete":
                    complete = response.complete
                elif kind == "error":
                    error = f"server error: {response.error.message}"
        except grpc.aio.AioRpcError as e:
            error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # a broken call is data, not a crash of the benchmark
            error = f"{type(e).__name__}: {e}"
        end = time.monotonic()
        if complete is not None:
            prompt_len = complete.prompt_tokens
            if error is None and (complete.finish_reason != "length" or len(times) != request.output_len):
                error = f"finished with {complete.finish_reason} after {len(times)} tokens"
        elif error is None:
            error = f"the stream ended without a Complete after {len(times)} tokens"
        return RequestRecord(prompt_len, request.output_len, start, times, end, error is None, error,
                             request.source)

    def describe(self) -> dict[str, Any]:
        m = self.model_info
        return {"backend": "grpc", "target": self.target, "server_version": self.server_version,
                "device": f"the server's at {self.target} (not reported over gRPC)", "model": m.model,
                "dtype": m.dtype, "block_size": m.block_size, "num_kv_blocks": m.num_kv_blocks,
                "max_model_len": self.max_model_len, "vocab_size": self.vocab_size}

    async def close(self) -> None:
        await self.client.close()
