"""Issue 17's timing attacks on a loopback server over the embedded model: while each attack runs, another
client's stream and the health service must stay live (largest inter-token gap and health latency < 0.5 s).

    PYTHONPATH=. python benchmarks/check_attacks.py --out benchmarks/results/attacks-cpu.json

Each attack runs from a connection of its own, beside one victim stream (greedy, ignore_eos) and a health probe
every 50 ms. Warm-up requests first compile the step shapes (batches up to 17 sequences), so the gaps measured
are the attack's, not a first compilation's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc

from nexus_jax.benchmark.load_server import LocalServer
from nexus_jax.server.client import Client, request
from nexus_jax.server.proto import nexus_pb2_grpc as pb_grpc

LIMIT_S = 0.5


async def _status(stream: AsyncIterator) -> str:
    """The gRPC status a stream ends with ("OK" when it ends well)."""
    try:
        async for _ in stream:
            pass
        return "OK"
    except grpc.aio.AioRpcError as e:
        return f"{e.code().name}: {e.details()[:90]}"


async def huge_prompt(target: str, _: float) -> str:
    async with Client(target) as c:
        return await _status(c.generate("hello " * 1_400_000, max_tokens=4))  # 8.4 MB of text


async def stop_token_ids(target: str, _: float) -> str:
    async with Client(target) as c:
        return await _status(c.generate([1], max_tokens=40, n=4, min_tokens=20,
                                         stop_token_ids=[7] * 750_000))  # 3 MB of ids


async def stop_strings(target: str, _: float) -> str:
    async with Client(target) as c:
        return await _status(c.generate([1], max_tokens=40, stop=["x" * 1000] * 20_000))  # 20 MB of strings


async def long_ids(target: str, _: float) -> str:
    async with Client(target) as c:
        return await _status(c.generate([1], max_tokens=4, request_id="r" * 1_000_000,
                                        program_id="p" * 1_000_000))


async def unread_stream(target: str, window: float) -> str:
    """n=16 completions nobody reads, held open for the whole window, then dropped."""
    channel = grpc.aio.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0)])
    pb_grpc.NexusStub(channel).Generate(request([1, 2], max_tokens=1000, n=16, ignore_eos=True))
    await asyncio.sleep(window)
    await channel.close()
    return f"held unread for {window:.0f} s, then disconnected"


async def info_flood(target: str, window: float, sessions: int = 10_000, rate: float = 70.0) -> str:
    async with Client(target) as c:
        for _ in range(sessions):
            await c.start_session()
        calls, start = 0, time.monotonic()
        while time.monotonic() - start < window:
            await c.server_info()
            calls += 1
            await asyncio.sleep(1 / rate)
        return f"{sessions} sessions, {calls} GetServerInfo calls in {window:.0f} s"


ATTACKS: dict[str, tuple[str, Callable[[str, float], Awaitable[str]]]] = {
    "huge_prompt": ("item 1: 8.4 MB text prompt", huge_prompt),
    "stop_token_ids": ("item 2: 750k stop_token_ids (3 MB), n=4, min_tokens=20", stop_token_ids),
    "stop_strings": ("item 3: 20,000 stop strings of 1000 chars (20 MB)", stop_strings),
    "unread_stream": ("item 4: n=16 stream never read", unread_stream),
    "long_ids": ("item 5: 1 MB request and program ids", long_ids),
    "info_flood": ("item 9: GetServerInfo at 70/s over 10,000 sessions", info_flood),
}


async def victim(target: str, max_tokens: int) -> dict[str, Any]:
    async with Client(target) as c:
        times = []
        async for r in c.generate([3, 4, 5], max_tokens=max_tokens, ignore_eos=True, temperature=0.0):
            if r.WhichOneof("response") == "chunk":
                times.extend([time.monotonic()] * len(r.chunk.token_ids))
        gaps = [b - a for a, b in zip(times, times[1:])]
        return {"tokens": len(times), "max_gap_s": max(gaps, default=0.0)}


async def prober(target: str, stop: asyncio.Event) -> float:
    worst = 0.0
    async with Client(target) as c:
        while not stop.is_set():
            start = time.monotonic()
            assert await c.health() == "SERVING"
            worst = max(worst, time.monotonic() - start)
            await asyncio.sleep(0.05)
    return worst


async def run(target: str, names: list[str], max_tokens: int, window: float) -> list[dict[str, Any]]:
    async with Client(target) as c:  # warm-up: compiles the step shapes of the victim beside an n=16 request
        await asyncio.gather(victim(target, max_tokens), _status(c.generate([1, 2], max_tokens=50, n=16)))
    rows = []
    for name in names:
        stop = asyncio.Event()
        probe = asyncio.create_task(prober(target, stop))
        attack = asyncio.create_task(ATTACKS[name][1](target, window))
        await asyncio.sleep(0.2)  # the attack under way before the victim starts
        seen = await victim(target, max_tokens)
        outcome = await attack
        stop.set()
        row = {"attack": name, "what": ATTACKS[name][0], "outcome": outcome, "victim_tokens": seen["tokens"],
               "victim_max_gap_s": round(seen["max_gap_s"], 3), "health_max_s": round(await probe, 3)}
        row["held"] = row["victim_max_gap_s"] < LIMIT_S and row["health_max_s"] < LIMIT_S
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", nargs="*", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--max-tokens", type=int, default=300, help="the victim stream's length")
    parser.add_argument("--window", type=float, default=5.0, help="seconds the held attacks last")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    with LocalServer({}, max_in_flight=256, retry_after_ms=1000) as server:
        rows = asyncio.run(run(server.target, args.attacks, args.max_tokens, args.window))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    raise SystemExit(0 if all(r["held"] for r in rows) else 1)


if __name__ == "__main__":
    main()
