"""`nexus-jax bench load`: waves of concurrent gRPC Generate streams that misbehave, against a loopback server.

Each stream follows a random plan: run to the end, cancel mid-stream, close its channel mid-stream (disconnect),
send an Abort RPC mid-stream, run into a short deadline, or send a bad request. A stream refused for overload
(RESOURCE_EXHAUSTED) retries after the server's hint, a bounded number of times. Every stream must end in a
known way within a timeout (none hung, none lost); after each wave the server must drain (no open stream, no
running or waiting request, every KV block free), and its RSS must not grow from wave to wave once warm-up
waves have compiled the step shapes (benchmarks/results/load_test.md has runs and how to read them).

  nexus-jax bench load --streams 1000 --waves 3 --max-in-flight 1024 --out-dir benchmarks/results
  nexus-jax bench load --streams 1000 --waves 3 --warmup-waves 4 --max-in-flight 256 --retry-after-ms 1000 \
      --max-attempts 5 --label overload --out-dir /tmp/load

By default the server is started here in a child process over the embedded model (so its RSS is its own);
`--server 127.0.0.1:PORT [--server-pid PID]` targets a running one. Only loopback addresses are accepted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import random
import sys
import time
from typing import TYPE_CHECKING, Any, Callable

import grpc

from nexus_jax.benchmark.load_server import LocalServer, rss_mb

if TYPE_CHECKING:  # the client and server import grpc_health, which `bench serve` alone does not need
    from nexus_jax.server.client import Client

ACTIONS = ("cancel", "disconnect", "abort", "deadline", "invalid")   # plus "complete": the rest of the streams
OUTCOMES = ("complete", "aborted", "cancelled", "disconnected", "deadline", "rejected", "error", "hung", "lost")
FAILED = ("hung", "lost")  # no known end: past the stream timeout, or the client itself failed
# How a stream with each plan may end; anything else is counted as unexpected. A mid-stream action can lose
# the race with a short completion, and any attempt can be refused for overload until the retries run out.
ALLOWED = {"complete": {"complete"}, "cancel": {"cancelled", "complete"},
           "disconnect": {"disconnected", "complete"}, "abort": {"aborted", "complete"},
           "deadline": {"deadline", "complete"}, "invalid": {"error"}}


@dataclasses.dataclass(frozen=True)
class LoadSettings:
    streams: int = 1000              # concurrent streams per wave
    waves: int = 3
    warmup_waves: int = 1            # run and checked like the others, but before the RSS baseline: they compile
    cancel: float = 0.15             # fractions of the streams per plan; the rest run to the end
    disconnect: float = 0.10
    abort: float = 0.10
    deadline: float = 0.10
    invalid: float = 0.03
    max_tokens: int = 32             # streams run to the end ask for 1..max_tokens tokens
    long_tokens: int = 1024          # mid-stream actions need streams that are still running
    prompt_len: int = 32             # prompt of 1..prompt_len random token ids
    act_after: int = 4               # mid-stream actions fire after 1..act_after chunks
    deadline_s: tuple[float, float] = (0.2, 2.0)
    max_attempts: int = 3            # attempts of a stream refused for overload (RESOURCE_EXHAUSTED)
    channels: int = 4                # shared channels; each disconnecting stream has its own
    stream_timeout_s: float = 300.0  # an attempt running longer has hung
    drain_timeout_s: float = 60.0
    rss_margin: float = 0.05         # last wave's end RSS within this fraction of the first's: stable
    seed: int = 0

    def __post_init__(self) -> None:
        if self.warmup_waves < 0:
            raise ValueError(f"warmup_waves must be >= 0, got {self.warmup_waves}")
        for name in ("streams", "waves", "max_tokens", "long_tokens", "prompt_len", "act_after", "max_attempts",
                     "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        fractions = [getattr(self, a) for a in ACTIONS]
        if any(not 0.0 <= f <= 1.0 for f in fractions) or sum(fractions) > 1.0 + 1e-9:
            raise ValueError(f"action fractions must be in [0, 1] and sum to <= 1, got {dict(zip(ACTIONS, fractions))}")
        object.__setattr__(self, "deadline_s", tuple(self.deadline_s))
        if len(self.deadline_s) != 2 or not 0 < self.deadline_s[0] <= self.deadline_s[1]:
            raise ValueError(f"deadline_s must be (low, high) with 0 < low <= high, got {self.deadline_s}")


def check_loopback(target: str) -> str:
    """Returns target ("host:port") when its host is a loopback address; raises ValueError otherwise."""
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not port.isdigit():
        raise ValueError(f"server must be HOST:PORT, got {target!r}")
    loopback = host == "localhost"
    try:
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not loopback:
        raise ValueError(f"the load test only targets loopback servers (127.0.0.1, ::1, localhost), got {host!r}")
    return target


def plan_streams(settings: LoadSettings, wave: int, vocab_size: int) -> list[dict[str, Any]]:
    """One plan per stream: its action, prompt, sampling fields, deadline and when the action fires."""
    rng = random.Random(settings.seed * 1000 + wave)
    cut, edges = 0.0, []
    for action in ACTIONS:
        cut += getattr(settings, action)
        edges.append((cut, action))
    plans = []
    for i in range(settings.streams):
        draw = rng.random()
        action = next((a for edge, a in edges if draw < edge), "complete")
        prompt = [rng.randrange(3, vocab_size) for _ in range(rng.randint(1, settings.prompt_len))]
        plan = {"id": f"load-w{wave}-{i}", "action": action, "prompt": prompt, "act_after": 0, "timeout": None,
                "sampling": {"max_tokens": rng.randint(1, settings.max_tokens)}}
        if action != "complete":
            plan["sampling"] = {"max_tokens": settings.long_tokens, "ignore_eos": True}
            plan["act_after"] = rng.randint(1, settings.act_after)
        if action == "deadline":
            plan["timeout"] = rng.uniform(*settings.deadline_s)
        if action == "invalid":  # each kind of bad input the server must refuse with INVALID_ARGUMENT
            plan["prompt"], plan["sampling"] = rng.choice([
                ([vocab_size + 5], {}), ([], {}), (prompt, {"top_p": 2.0}), (prompt, {"max_tokens": 10**9})])
        plans.append(plan)
    return plans


async def _attempt(plan: dict, client: Client, rid: str) -> tuple[str, str | None, int]:
    from nexus_jax.server.client import request
    from nexus_jax.server.grpc_server import RETRY_AFTER_KEY

    """One Generate call; returns (outcome, detail, retry hint in ms or 0)."""
    call = client.stub.Generate(request(plan["prompt"], request_id=rid, **plan["sampling"]), timeout=plan["timeout"])
    tokens: list[int] = []
    chunks, complete = 0, None
    try:
        async for r in call:
            kind = r.WhichOneof("response")
            if kind == "error":
                return "error", f"engine error: {r.error.message}", 0
            if kind == "complete":
                complete = r.complete
                continue
            tokens.extend(r.chunk.token_ids)
            chunks += 1
            if chunks == plan["act_after"]:
                if plan["action"] == "cancel":
                    call.cancel()
                    return "cancelled", None, 0
                if plan["action"] == "disconnect":
                    await client.channel.close(grace=None)  # drops the connection under the open stream
                    return "disconnected", None, 0
                if plan["action"] == "abort":
                    # On the stream's own connection: the server finds only a connection's own requests. Not
                    # found: the request ended first, and its Complete follows.
                    await client.abort(rid)
    except grpc.aio.AioRpcError as e:
        code = e.code()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            hint = dict(e.trailing_metadata() or ()).get(RETRY_AFTER_KEY)
            if hint is not None and hint.isdigit():
                return "rejected", e.details(), int(hint)
            return "error", f"RESOURCE_EXHAUSTED without a {RETRY_AFTER_KEY} hint: {e.details()}", 0
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "deadline", None, 0
        return "error", f"{code.name}: {e.details()}", 0
    finally:
        call.cancel()  # a no-op on a finished call; ends it when the watchdog cancelled this attempt
    if complete is None:
        return "error", "stream ended without a Complete", 0
    if list(complete.output_ids) != tokens or complete.completion_tokens != len(tokens):
        return "error", f"Complete disagrees with the chunks ({len(tokens)} tokens streamed)", 0
    return ("aborted" if complete.finish_reason == "abort" else "complete"), complete.finish_reason, 0


async def _run_stream(plan: dict, target: str, shared: Client, settings: LoadSettings) -> dict[str, Any]:
    from nexus_jax.server.client import Client

    record = {"id": plan["id"], "action": plan["action"], "attempts": 0, "rejections": 0}
    try:
        for attempt in range(settings.max_attempts):
            record["attempts"] += 1
            own = Client(target) if plan["action"] == "disconnect" else None
            try:
                outcome, detail, hint = await asyncio.wait_for(
                    _attempt(plan, own or shared, f"{plan['id']}-a{attempt}"), settings.stream_timeout_s)
            except asyncio.TimeoutError:
                outcome, detail, hint = "hung", f"no end within {settings.stream_timeout_s} s", 0
            finally:
                if own is not None:
                    await own.close()
            if outcome != "rejected":
                break
            record["rejections"] += 1
            if attempt + 1 < settings.max_attempts:
                await asyncio.sleep(hint / 1000)
    except Exception as e:  # noqa: BLE001 - whatever broke, the stream's end is unknown and must be counted
        outcome, detail = "lost", f"{type(e).__name__}: {e}"
    record.update(outcome=outcome, detail=detail)
    return record


async def _wait_drained(control: Client, timeout: float) -> dict[str, Any]:
    """Polls GetServerInfo until nothing is in flight, running or waiting and the KV cache is empty."""
    end = time.monotonic() + timeout
    while True:
        info = await control.server_info()
        state = {"num_in_flight": info.num_in_flight, "num_running": info.num_running,
                 "num_waiting": info.num_waiting, "kv_cache_usage": info.kv_cache_usage}
        drained = not (info.num_in_flight or info.num_running or info.num_waiting or info.kv_cache_usage)
        if drained or time.monotonic() > end:
            return {"drained": drained, **state}
        await asyncio.sleep(0.1)


async def _sample_rss(pid: int, samples: list[float], interval: float = 0.2) -> None:
    while True:
        try:
            samples.append(rss_mb(pid))
        except OSError:  # the server is gone: its streams record how they failed
            return
        await asyncio.sleep(interval)


async def run_waves(target: str, settings: LoadSettings, server_pid: int | None = None,
                    probe: Callable[[], dict[str, int]] | None = None) -> dict[str, Any]:
    """Runs the waves against `target`; returns per wave the outcome counts (also by plan), the server's state
    after draining, its RSS (when server_pid is given) and the records of streams that ended unexpectedly; then
    the checks. probe: a blocking callable returning the server's internal counts (local server only)."""
    from nexus_jax.server.client import Client

    check_loopback(target)
    control = Client(target)
    shared = [Client(target) for _ in range(settings.channels)]
    vocab_size = (await control.model_info()).vocab_size
    waves: list[dict[str, Any]] = []
    samples: list[float] = []
    sampler = asyncio.create_task(_sample_rss(server_pid, samples)) if server_pid else None
    try:
        total = settings.warmup_waves + settings.waves
        for w in range(total):
            start_rss, first, begun = rss_mb(server_pid) if server_pid else None, len(samples), time.monotonic()
            plans = plan_streams(settings, w, vocab_size)
            records = await asyncio.gather(*[_run_stream(p, target, shared[i % len(shared)], settings)
                                             for i, p in enumerate(plans)])
            wall = time.monotonic() - begun
            server = await _wait_drained(control, settings.drain_timeout_s)
            if probe is not None:
                server["internals"] = await asyncio.to_thread(probe)
            end_rss = rss_mb(server_pid) if server_pid else None
            peak = max(samples[first:] + [start_rss, end_rss]) if server_pid else None
            by_action: dict[str, dict[str, int]] = {}
            for r in records:
                by_action.setdefault(r["action"], {}).setdefault(r["outcome"], 0)
                by_action[r["action"]][r["outcome"]] += 1
            waves.append({"wave": w, "warmup": w < settings.warmup_waves, "streams": len(records),
                          "wall_s": round(wall, 2), "server": server,
                          "rss_mb": {"start": start_rss, "peak": peak, "end": end_rss},
                          "counts": _counts(records), "by_action": by_action,
                          "unexpected_records": [r for r in records if not _expected(r)]})
            print(f"[bench load] wave {w + 1}/{total}: {waves[-1]['counts']}, drained {server['drained']}, "
                  f"server RSS {end_rss} MiB, {wall:.1f} s", file=sys.stderr, flush=True)
    finally:
        if sampler is not None:
            sampler.cancel()
        for c in (control, *shared):
            await c.close()
    return {"target": target, "settings": dataclasses.asdict(settings), "waves": waves,
            "checks": _checks(waves, settings)}


def _counts(records: list[dict]) -> dict[str, int]:
    counts = {o: 0 for o in OUTCOMES}
    for r in records:
        counts[r["outcome"]] += 1
    counts["rejections"] = sum(r["rejections"] for r in records)
    counts["unexpected"] = sum(not _expected(r) for r in records)
    return counts


def _expected(record: dict) -> bool:
    if record["action"] == "invalid" and record["outcome"] == "error":
        return record["detail"].startswith("INVALID_ARGUMENT")
    return record["outcome"] in ALLOWED[record["action"]] or record["outcome"] == "rejected"


def _checks(waves: list[dict], settings: LoadSettings) -> dict[str, Any]:
    planned = sum(w["streams"] for w in waves)
    ended = sum(w["counts"][o] for w in waves for o in OUTCOMES if o not in FAILED)
    internals = [w["server"].get("internals") for w in waves]
    checks: dict[str, Any] = {
        "streams": planned, "lost": planned - ended, "unexpected": sum(w["counts"]["unexpected"] for w in waves),
        "drained": all(w["server"]["drained"] for w in waves),
        "internals_clear": all(i is None or _clear(i) for i in internals),
        "missing_outcomes": [o for o in OUTCOMES if o not in FAILED and not any(w["counts"][o] for w in waves)]}
    measured = [w for w in waves if not w["warmup"]]
    first, last = measured[0]["rss_mb"]["end"], measured[-1]["rss_mb"]["end"]
    if first is None:
        checks.update(rss_growth_mb=None, rss_stable=None)
    else:
        checks.update(rss_growth_mb=round(last - first, 1), rss_stable=last <= first * (1 + settings.rss_margin))
    checks["ok"] = (checks["lost"] == 0 and checks["unexpected"] == 0 and checks["drained"]
                    and checks["internals_clear"] and checks["rss_stable"] is not False)
    return checks


def _clear(internals: dict[str, int]) -> bool:
    return (internals["free_blocks"] == internals["num_blocks"]
            and not any(internals[k] for k in ("servicer_streams", "async_streams", "engine_groups")))


def run_load_test(settings: LoadSettings, *, server: str | None = None, server_pid: int | None = None,
                  max_in_flight: int = 256, retry_after_ms: int = 200,
                  engine_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs the load test against `server` (a loopback HOST:PORT), or against a server started here in a child
    process over the embedded model (engine_config: EngineConfig fields) with the given admission limit."""
    if server is not None:
        return asyncio.run(run_waves(check_loopback(server), settings, server_pid))
    with LocalServer(engine_config or {}, max_in_flight=max_in_flight, retry_after_ms=retry_after_ms) as local:
        doc = asyncio.run(run_waves(local.target, settings, local.pid, local.probe))
    doc["local_server"] = {"max_in_flight": max_in_flight, "retry_after_ms": retry_after_ms,
                           "engine_config": engine_config or {}}
    return doc
