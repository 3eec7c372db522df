"""What structured output and the HTTP front cost (issue 18's targets): decode ITL at batch 64 with and without a
json_schema on every request (target: at most +10%), and TTFT through the OpenAI-compatible HTTP server against
the in-process engine (AsyncLLM) at light load (target: at most +1 ms).

  PYTHONPATH=. python3 benchmarks/bench_structured.py [--model llama-3.1-8b] [--json out.json]
  PYTHONPATH=. python3 benchmarks/bench_structured.py --quick     # CPU smoke run on the embedded tiny model

Presets carry no tokenizer; `--tokenizer DIR` gives one (wheels/tekken-tokenizer, a real 128k byte-level BPE
vocabulary that benchmarks/device_wheels.sh fetch builds with benchmarks/wide_tokenizer.py, is the default when
present), else the grammar works over the embedded model's 512-token tokenizer (ids above it are never allowed),
where mask filling costs less than with a real vocabulary. The bitmask upload is the full model vocabulary either
way. A structured row's mask needs its previous
sample on the host: the runner dispatches the forward pass, then asks for the masks (StepInput.late), which fold the
step in flight first, so the host's fold, mask filling and sampler dispatch run beside the forward pass.

`--trace DIR` also profiles a window of decode steps of each case: the GPU's busy time and idle gaps per step
(a profiler trace, benchmarks/gpu_trace.py), its top kernels, and the host time of each part of the loop.

TTFT over HTTP is measured with two clients: httpx (what the openai package uses) and a bare http.client reader,
so the client's own parsing is not counted as the server's; the bare reader runs once on a thread of this process
and once in a process of its own, as a real client does (a client thread shares the server's GIL).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import numpy as np
import uvicorn
from fastapi import FastAPI, Header
from fastapi.responses import Response, StreamingResponse

from benchmarks import gpu_trace
from benchmarks.bench_async import host_timeline
from benchmarks.probe_http_floor import bare_ttft, client_process
from nexus_jax import EngineConfig, LLMEngine, SamplingParams
from nexus_jax.core.constraints import ConstraintFactory
from nexus_jax.core.tokenizer import Tokenizer
from nexus_jax.entrypoints.async_llm import AsyncLLM
from nexus_jax.entrypoints.build import build_engine
from nexus_jax.server.http.direct import GenerationRoutes
from nexus_jax.server.http.protocol import CompletionRequest
from nexus_jax.server.http.server import bind
from nexus_jax.testing.http import http_serving
from runner.model.default_model import default_model_dir

# A schema whose free string lets a completion run long, so the decode rows stay structured for the whole run.
SCHEMA = {"type": "object", "required": ["title", "body"], "additionalProperties": False,
          "properties": {"title": {"type": "string", "maxLength": 32}, "body": {"type": "string"}}}


WIDE_TOKENIZER = Path("wheels/tekken-tokenizer")


def with_tokenizer(engine: LLMEngine, tokenizer_dir: str | None) -> LLMEngine:
    """A preset engine gets a tokenizer, so grammars can compile (see the module docstring). The grammar's stop
    token is the tokenizer's: a preset's eos ids are Llama 3's, which another vocabulary does not have."""
    if engine.tokenizer is None:
        engine.tokenizer = Tokenizer.from_dir(tokenizer_dir or default_model_dir())
        engine.constraints = ConstraintFactory(engine.tokenizer, engine.vocab_size, engine.tokenizer.eos_token_ids)
    return engine


def add_batch(engine: LLMEngine, prompts: list[list[int]], output_len: int, structured: bool, tag: str = "") -> None:
    spec = {"structured_outputs": {"json": SCHEMA}} if structured else {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}{'s' if structured else 'p'}{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=1.0, seed=i, max_tokens=output_len, ignore_eos=True, **spec))


def decode_itl(engine: LLMEngine, prompts: list[list[int]], output_len: int, structured: bool) -> dict[str, float]:
    """Runs the batch to the end; ITL over every request's tokens after its first."""
    add_batch(engine, prompts, output_len, structured)
    outs = []
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    elapsed = time.perf_counter() - start
    itl = [x for o in outs for x in o.metrics.itl]
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"itl_median_ms": 1e3 * statistics.median(itl), "itl_p90_ms": 1e3 * float(np.percentile(itl, 90)),
            "tokens": tokens, "tok_per_s": tokens / elapsed}


def profile_decode(engine: LLMEngine, prompts: list[list[int]], output_len: int, structured: bool, trace: Path,
                   steps: int = 24) -> dict[str, Any]:
    """`steps` decode steps of the batch once every request has its first token, under a profiler trace and the
    host timeline: GPU busy and idle per step, the top kernels, and each host part's time per step."""
    add_batch(engine, prompts, output_len, structured, tag="trace-")
    while any(r.in_prefill or not r.output_token_ids for r in engine.scheduler.running + engine.scheduler.waiting):
        engine.step()
    parts = [(engine, "step"), (engine, "_step_input"), (engine, "_late_limits"), (engine.constraints, "masks")]
    with host_timeline(engine, parts) as spans, gpu_trace.capture(trace) as recorded:
        for _ in range(steps):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    events = recorded.events()
    return {"gpu": gpu_trace.idle_gaps(events, steps), "kernels": gpu_trace.kernel_totals(events, steps, top=10),
            "host_ms_per_step": {k: 1e3 * sum(v) / steps for k, v in spans.items()},
            "host_calls": {k: len(v) for k, v in spans.items()}}


async def inprocess_ttft(engine: LLMEngine, prompts: list[list[int]]) -> list[float]:
    llm = AsyncLLM(engine)
    try:
        times = []
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            async for _ in llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=2, ignore_eos=True),
                                        f"ttft-{i}"):
                times.append(time.perf_counter() - start)
                break
            await asyncio.sleep(0.05)  # light load: the stream's rest finishes alone
    finally:
        llm.shutdown()
    return times


def http_ttft(engine: LLMEngine, prompts: list[list[int]]) -> dict[str, list[float]]:
    """Per client (httpx and a bare http.client reader on threads of this process, and the bare reader in a process
    of its own), the time to the first SSE event with a choice of each prompt."""
    times: dict[str, list[float]] = {"httpx": [], "bare": []}
    with http_serving(engine, model_name="bench") as server, httpx.Client(timeout=120) as client:
        bare = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
        for prompt in prompts:
            body = {"model": "bench", "prompt": prompt, "max_tokens": 2, "ignore_eos": True, "stream": True}
            start = time.perf_counter()
            with client.stream("POST", f"http://127.0.0.1:{server.port}/v1/completions", json=body) as r:
                first = None
                for line in r.iter_lines():  # read to the end: the next request starts on an idle engine
                    if first is None and line.startswith("data: {") and json.loads(line[6:])["choices"]:
                        first = time.perf_counter() - start
                times["httpx"].append(first)
            time.sleep(0.05)
            times["bare"].append(bare_ttft(bare, json.dumps(body)))
            time.sleep(0.05)
        bare.close()
        times["bare, own process"] = client_process(server.port, 0.05, [json.dumps(
            {"model": "bench", "prompt": p, "max_tokens": 2, "ignore_eos": True, "stream": True}) for p in prompts])
    return times


EVENT = 'data: {"choices":[{"index":0,"text":"a"}]}\n\n'


def floor_apps() -> dict[str, Any]:
    """Servers of /v1/completions that do nothing but parse the body and stream one fixed event: as a typed
    FastAPI endpoint (what the generation routes were), and as plain ASGI (what they are: server/http/direct.py)."""
    fastapi_app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @fastapi_app.post("/v1/completions")
    async def completions(body: CompletionRequest, x_program_id: str | None = Header(None),
                          x_thread_id: str | None = Header(None)) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            yield EVENT
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def plain(body: CompletionRequest, watch: Any, program: str | None, thread: str | None) -> Response:
        return Response(EVENT + "data: [DONE]\n\n", media_type="text/event-stream")

    return {"fastapi": fastapi_app,
            "asgi": GenerationRoutes(fastapi_app, {"/v1/completions": (CompletionRequest, plain)}, None)}


def framework_floor(app: Any, prompts: list[list[int]]) -> list[float]:
    """The bare reader's time to the first event from `app` served as HttpServer serves (its socket, uvicorn's
    settings): what the HTTP front costs before any of nexus-jax's own work."""
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", sock.getsockname()[1], timeout=60)
        times = []
        for prompt in prompts:
            body = {"model": "bench", "prompt": prompt, "max_tokens": 2, "ignore_eos": True, "stream": True}
            times.append(bare_ttft(conn, json.dumps(body)))
            time.sleep(0.05)
        conn.close()
        return times
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def run(args: argparse.Namespace) -> dict[str, Any]:
    engine = with_tokenizer(build_engine(EngineConfig(
        model=args.model, max_num_seqs=max(args.batch, 8), max_model_len=args.input_len + args.output_len + 16,
        max_num_batched_tokens=max(2048, args.input_len), warmup=not args.quick, enable_prefix_caching=False,
        gpu_memory_utilization=args.gpu_memory_utilization)), args.tokenizer)
    rng = np.random.default_rng(0)
    prompts = lambda n: [rng.integers(10, min(engine.vocab_size, 500), args.input_len).tolist()  # noqa: E731
                         for _ in range(n)]
    for structured in (False, True):  # compiles the steps and the grammar before anything is timed
        decode_itl(engine, prompts(args.batch), 4, structured)
    # Alternated pairs: one pair's ratio moved by 0.5x between two runs on the same kind of card (RESULTS.md).
    pairs = [{name: decode_itl(engine, prompts(args.batch), args.output_len, structured)
              for name, structured in (("plain", False), ("json_schema", True))} for _ in range(args.repeats)]
    ratios = [p["json_schema"]["itl_median_ms"] / p["plain"]["itl_median_ms"] for p in pairs]
    median = sorted(range(len(ratios)), key=ratios.__getitem__)[len(ratios) // 2]
    results: dict[str, Any] = {**pairs[median], "ratios": ratios}
    light = prompts(args.ttft_requests)
    asyncio.run(inprocess_ttft(engine, light[:2]))  # warm
    results["ttft_inprocess_ms"] = 1e3 * statistics.median(asyncio.run(inprocess_ttft(engine, light)))
    http_times = http_ttft(engine, light)
    results["ttft_http_ms"] = 1e3 * statistics.median(http_times["httpx"])
    results["ttft_http_bare_ms"] = 1e3 * statistics.median(http_times["bare"])
    results["ttft_http_process_ms"] = 1e3 * statistics.median(http_times["bare, own process"])
    results["http_floor_ms"] = {name: 1e3 * statistics.median(framework_floor(app, light))
                                for name, app in floor_apps().items()}
    if args.trace:
        results["profile"] = {name: profile_decode(engine, prompts(args.batch), args.output_len, structured,
                                                   Path(args.trace) / name)
                              for name, structured in (("plain", False), ("json_schema", True))}
    return results


def table(args: argparse.Namespace, r: dict[str, Any]) -> str:
    plain, structured = r["plain"], r["json_schema"]
    ratio = structured["itl_median_ms"] / plain["itl_median_ms"]
    added = r["ttft_http_ms"] - r["ttft_inprocess_ms"]
    bare = r["ttft_http_bare_ms"] - r["ttft_inprocess_ms"]
    return "\n".join([
        f"model {args.model or 'embedded tiny'}, batch {args.batch}, {args.input_len} in -> {args.output_len} out, "
        f"tokenizer {args.tokenizer or 'its own'}",
        "| case | ITL median ms | ITL p90 ms | tok/s |", "|---|---|---|---|",
        *(f"| {name} | {c['itl_median_ms']:.2f} | {c['itl_p90_ms']:.2f} | {c['tok_per_s']:.0f} |"
          for name, c in (("plain", plain), ("json_schema on every request", structured))),
        f"structured / plain ITL: {ratio:.3f}, the median of {len(r['ratios'])} alternated pairs "
        f"({', '.join(f'{x:.3f}' for x in r['ratios'])}; target <= 1.10: {'met' if ratio <= 1.10 else 'missed'})",
        "| TTFT at light load | median ms |", "|---|---|",
        f"| in-process (AsyncLLM) | {r['ttft_inprocess_ms']:.2f} |",
        f"| HTTP (/v1/completions, SSE), httpx client | {r['ttft_http_ms']:.2f} |",
        f"| HTTP, bare http.client reader | {r['ttft_http_bare_ms']:.2f} |",
        f"| HTTP, bare reader in a process of its own | {r['ttft_http_process_ms']:.2f} |",
        f"HTTP adds {added:.2f} ms with httpx, {bare:.2f} ms with the bare reader, "
        f"{r['ttft_http_process_ms'] - r['ttft_inprocess_ms']:.2f} ms with the bare reader in its own process "
        f"(target <= 1 ms: {'met' if bare <= 1.0 else 'missed'} by the server with a client thread, "
        f"{'met' if added <= 1.0 else 'missed'} with httpx)",
        f"an endpoint that only parses the body and streams one fixed event (bare reader): as FastAPI "
        f"{r['http_floor_ms']['fastapi']:.2f} ms, as plain ASGI answering in one body "
        f"{r['http_floor_ms']['asgi']:.2f} ms; the server's "
        f"own work past the plain floor: {bare - r['http_floor_ms']['asgi']:.2f} ms",
        *(profile_table(r["profile"]) if "profile" in r else [])])


def profile_table(profile: dict[str, Any]) -> list[str]:
    names = list(profile["json_schema"]["host_ms_per_step"])
    lines = ["| decode window | GPU busy ms/step | GPU idle ms/step | step gap median us | "
             + " | ".join(f"host {k}" for k in names) + " |", "|---|---|---|---|" + "---|" * len(names)]
    for case, p in profile.items():
        gpu = p["gpu"]
        host = " | ".join(f"{p['host_ms_per_step'].get(k, 0.0):.2f}" for k in names)
        device = ("n/a | n/a | n/a" if "error" in gpu else  # no GPU events (a CPU run)
                  f"{gpu['window_ms'] * gpu['busy_fraction'] / gpu['steps']:.2f} | "
                  f"{gpu['idle_per_step_us'] / 1e3:.2f} | {gpu['step_gap_median_us']:.0f}")
        lines.append(f"| {case} | {device} | {host} |")
    for case, p in profile.items():
        lines.append(f"{case} top kernels: " + "; ".join(f"{k['kernel'][:60]} {k['ms_per_step']:.2f} ms"
                                                         for k in p["kernels"][:6]))
    return lines


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="preset name or checkpoint directory")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--ttft-requests", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3, help="plain / json_schema pairs; the table shows the median")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85,
                    help="below vLLM's 0.9: bench_split_decode's engine ran out of memory in the sampler at 0.9")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--trace", default=None, help="directory for profiler traces of a decode window per case")
    ap.add_argument("--tokenizer", default=None,
                    help=f"a tokenizer directory for a preset (default: {WIDE_TOKENIZER} when present, else the "
                         "embedded model's 512 tokens)")
    ap.add_argument("--quick", action="store_true", help="a CPU smoke run on the embedded tiny model")
    args = ap.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.input_len, args.output_len, args.ttft_requests, args.repeats = None, 4, 16, 8, 3, 2
    if args.tokenizer is None and args.model is not None and WIDE_TOKENIZER.is_dir():
        args.tokenizer = str(WIDE_TOKENIZER)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    results = run(args)
    print(table(args, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), **results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
