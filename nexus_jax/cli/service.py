"""The `serve`, `client` and `batch` subcommands of `nexus-jax` (cli.py calls `register(subparsers)`)."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from nexus_jax.entrypoints.engine_args import add_engine_args, engine_config_from_args
from nexus_jax.programs.router import ROUTING_POLICIES, RouterConfig
from nexus_jax.server import TOKEN_ENV, event_loop

DEFAULT_GRPC_PORT = 50051

if TYPE_CHECKING:
    from nexus_jax.server.options import ServerOptions


def _int_at_least(minimum: int):
    """An argparse type: an integer >= minimum, else a usage error naming the flag."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _device_list(text: str) -> list[int]:
    """`0,1,3`: JAX device indices, one per replica."""
    try:
        return [_int_at_least(0)(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated device indices >= 0 (e.g. 0,1), got {text!r}")


def _check_readable(flag: str, path: str | None) -> None:
    """ValueError naming the flag when the file cannot be read: the server reads its TLS files only once the
    model has loaded, minutes later on a real model."""
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError(f"argument {flag}: cannot read {path}: {e.strerror or e}") from None


def server_options(args: argparse.Namespace) -> ServerOptions:
    """The ServerOptions of the `serve` flags; ValueError naming the flag for a TLS file that cannot be read."""
    from nexus_jax.server.options import ServerOptions

    _check_readable("--tls-cert", args.tls_cert)
    _check_readable("--tls-key", args.tls_key)
    return ServerOptions(host=args.host, port=_ports(args)[0] or 0, max_in_flight=args.max_in_flight,
                         max_message_bytes=args.max_message_mb * 1024 * 1024,
                         auth_token=args.auth_token or os.environ.get(TOKEN_ENV) or None,
                         tls_cert=args.tls_cert, tls_key=args.tls_key, grace_s=args.grace,
                         model_name=args.model or "embedded-default", max_prompt_tokens=args.max_prompt_tokens,
                         max_tokens_limit=args.max_tokens_limit, max_n=args.max_n, max_sessions=args.max_sessions,
                         write_timeout_s=args.write_timeout or None, max_id_length=args.max_id_length)


def replica_options(args: argparse.Namespace) -> dict[str, Any]:
    """ReplicatedAsyncLLM.from_config's arguments of the `serve` flags (num_replicas, routing, and devices when
    --devices is given); ValueError naming the flag when they disagree."""
    if args.devices is not None and len(args.devices) != args.replicas:
        raise ValueError(f"--devices names {len(args.devices)} device(s) for --replicas {args.replicas}: give one "
                         "device index per replica")
    routing = RouterConfig(args.routing, locality_threshold=args.locality_threshold,
                           idle_timeout=args.program_idle_timeout)  # the router forgets programs as the engines do
    return {"num_replicas": args.replicas, "routing": routing,
            **({"devices": args.devices} if args.devices is not None else {})}


def serve_front(args: argparse.Namespace):
    """What `serve` serves: one AsyncLLM with --replicas 1 (on --devices' one device if given), else a
    ReplicatedAsyncLLM of replica_options(args). Bad flags raise ValueError before any engine is built."""
    from nexus_jax.entrypoints.async_llm import AsyncLLM
    from nexus_jax.entrypoints.replicas import ReplicatedAsyncLLM

    replicas = replica_options(args)
    config = engine_config_from_args(args)
    if replicas["num_replicas"] == 1:
        devices = replicas.get("devices")
        return AsyncLLM.from_config(config if devices is None else dataclasses.replace(config, device=devices[0]))
    return ReplicatedAsyncLLM.from_config(config, **replicas)


def _ports(args: argparse.Namespace) -> tuple[int | None, int | None]:
    """(gRPC port, HTTP port), None for a server not started: gRPC on 50051 when no port is given at all."""
    if args.port is None and args.http_port is None:
        return DEFAULT_GRPC_PORT, None
    return args.port, args.http_port


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from nexus_jax.server.grpc_server import NexusServer
    from nexus_jax.server.metrics import EngineMetrics

    grpc_port, http_port = _ports(args)
    try:  # flags that disagree, or a device that does not exist: a usage error, not a traceback
        options = server_options(args)
        llm = serve_front(args)
    except ValueError as e:
        parser.error(str(e))
    grpc_server = NexusServer(llm, options) if grpc_port is not None else None
    metrics = grpc_server.metrics if grpc_server is not None else EngineMetrics(llm)
    http_server = None
    if http_port is not None:
        from nexus_jax.server.http.server import HttpServer
        http_server = HttpServer(llm, options, http_port, metrics)

    async def stop() -> None:
        if http_server is not None:
            await http_server.stop()
        if grpc_server is not None and grpc_server.port:  # a started gRPC server stops the engine with it
            await grpc_server.stop()
        else:
            metrics.stop_http()
            llm.shutdown()

    async def main() -> int:
        fronts = "" if args.replicas == 1 else f" ({args.replicas} replicas, {args.routing} routing)"
        try:
            if grpc_server is not None:
                port = await grpc_server.start()
                print(f"nexus-jax serving {options.model_name}{fronts} on {options.host}:{port}", flush=True)
            if http_server is not None:
                port = await http_server.start()
                print(f"nexus-jax serving {options.model_name}{fronts} (OpenAI-compatible HTTP) on "
                      f"http://{options.host}:{port}/v1", flush=True)
        except OSError as e:  # a port in use: say so and exit, never serve part of someone else's traffic
            print(f"error: {e}", file=sys.stderr, flush=True)
            await stop()
            return 1
        if args.metrics_port is not None:
            mport = metrics.serve_http(args.metrics_port, args.host)
            print(f"metrics on http://{args.host}:{mport}/metrics", flush=True)
        stop_requested = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop_requested.set)
        await stop_requested.wait()
        print("draining open streams...", file=sys.stderr, flush=True)
        await stop()
        return 0

    return event_loop.run(main())


def _client(args: argparse.Namespace) -> int:
    from nexus_jax.server.client import Client

    prompt: Any = json.loads(args.token_ids) if args.token_ids else args.prompt
    if prompt is None:
        raise SystemExit("give --prompt or --token-ids")

    async def main() -> int:
        tls = args.tls_ca if args.tls_ca else bool(args.tls)
        async with Client(args.target, token=args.auth_token or os.environ.get(TOKEN_ENV), tls=tls) as client:
            async for r in client.generate(prompt, timeout=args.timeout, max_tokens=args.max_tokens,
                                           temperature=args.temperature, top_p=args.top_p, seed=args.seed):
                kind = r.WhichOneof("response")
                if kind == "chunk":
                    print(r.chunk.text, end="", flush=True)
                elif kind == "complete":
                    c = r.complete
                    print(f"\n[{c.finish_reason}] {c.prompt_tokens} prompt + {c.completion_tokens} tokens, "
                          f"ttft {c.ttft_s * 1e3:.1f} ms, e2e {c.e2e_s * 1e3:.1f} ms", file=sys.stderr)
                else:
                    print(f"\nerror: {r.error.message}", file=sys.stderr)
                    return 1
        return 0

    import grpc

    try:
        return asyncio.run(main())
    except grpc.aio.AioRpcError as e:
        print(f"\nerror: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


def _batch(args: argparse.Namespace) -> int:
    from nexus_jax.entrypoints.batch import BatchError, BatchInterrupted, HostMemoryError, run_batch
    from nexus_jax.entrypoints.build import build_engine

    config = engine_config_from_args(args)
    defaults = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        engine = build_engine(config)
        summary = run_batch(engine, args.input, args.output, args.errors, defaults=defaults,
                            max_in_flight=args.max_in_flight, progress=not args.no_progress,
                            min_available_mb=args.min_available_mb or None)
    except (HostMemoryError, BatchError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # 130 = 128 + SIGINT, what a shell reports for a command Ctrl-C stopped
        done = f"{e.summary.completed} results written this run, " if isinstance(e, BatchInterrupted) else ""
        print(f"\nbatch interrupted: {done}all finished results are in {args.output}; rerun the same command to "
              "resume", file=sys.stderr)
        return 130
    if summary.corrupt_output_lines:
        numbers = ", ".join(map(str, summary.corrupt_output_lines[:10]))
        more = f" and {len(summary.corrupt_output_lines) - 10} more" if len(summary.corrupt_output_lines) > 10 else ""
        print(f"warning: line(s) {numbers}{more} of {args.output} are not valid results: left in place and not "
              "counted as done (an input id they held ran again); remove them for a clean file", file=sys.stderr)
    rate = summary.generated_tokens / max(summary.elapsed_s, 1e-9)
    print(f"batch done: {summary.completed} completed, {summary.skipped} skipped (already in {args.output}), "
          f"{summary.errors} errors, {summary.generated_tokens} tokens in {summary.elapsed_s:.2f} s "
          f"({rate:.1f} tok/s)", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    s = subparsers.add_parser("serve", help="serve the model over gRPC and/or the OpenAI-compatible HTTP API")
    add_engine_args(s, exclude=("device",))  # --devices places the replicas
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    s.add_argument("--port", type=int, default=None,
                   help=f"gRPC port; 0 picks a free port (printed). Default {DEFAULT_GRPC_PORT} unless only "
                        "--http-port is given")
    s.add_argument("--http-port", type=int, default=None,
                   help="serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...) on this "
                        "port, next to gRPC when --port is given too; 0 picks a free port (printed)")
    s.add_argument("--max-in-flight", type=int, default=1024,
                   help="requests accepted at once per protocol (gRPC streams; HTTP prompts); beyond it gRPC says "
                        "RESOURCE_EXHAUSTED and HTTP 429 with Retry-After")
    s.add_argument("--max-message-mb", type=int, default=64)
    s.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="longest prompt a request may send (default: the model's context)")
    s.add_argument("--max-tokens-limit", type=int, default=None,
                   help="largest max_tokens a request may ask for (default: what the context leaves)")
    s.add_argument("--max-n", type=int, default=16, help="most completions (n) a request may ask for")
    s.add_argument("--max-sessions", type=int, default=10000, help="most sessions open at once")
    s.add_argument("--max-id-length", type=int, default=256,
                   help="longest request, program, thread or session id, in characters")
    s.add_argument("--auth-token", "--api-key", dest="auth_token", default=None,
                   help=f"require this bearer token on gRPC and HTTP (or set {TOKEN_ENV})")
    s.add_argument("--tls-cert", default=None)
    s.add_argument("--tls-key", default=None)
    s.add_argument("--grace", type=float, default=10.0, help="seconds open streams may finish at shutdown")
    s.add_argument("--write-timeout", type=float, default=30.0,
                   help="seconds a Generate stream may go unread before it is ended and its request aborted "
                        "(0: never; default 30)")
    s.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port")
    s.add_argument("--replicas", type=_int_at_least(1), default=1,
                   help="engine replicas behind one router (default 1: one engine, no router)")
    s.add_argument("--routing", default="locality", choices=ROUTING_POLICIES,
                   help="how calls are spread over replicas (default: locality)")
    s.add_argument("--locality-threshold", type=_int_at_least(0), default=2048,
                   help="locality routing: prompts longer than this go to their program's replica (default 2048)")
    s.add_argument("--devices", type=_device_list, default=None,
                   help="comma-separated JAX device indices, one per replica (default: JAX's default device)")
    s.set_defaults(func=lambda args: _serve(args, s))

    c = subparsers.add_parser("client", help="send one prompt to a server and stream the text")
    c.add_argument("--target", default="127.0.0.1:50051")
    c.add_argument("--prompt", default=None)
    c.add_argument("--token-ids", default=None, help="JSON list of prompt token ids instead of --prompt")
    c.add_argument("--max-tokens", type=int, default=32)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    c.add_argument("--auth-token", default=None, help=f"bearer token (or set {TOKEN_ENV})")
    c.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    c.add_argument("--tls-ca", default=None, help="TLS with this PEM root certificate")
    c.set_defaults(func=_client)

    b = subparsers.add_parser("batch", help="run a JSONL file of prompts offline")
    add_engine_args(b)
    b.add_argument("--input", required=True)
    b.add_argument("--output", required=True, help="results are appended; ids already there are skipped")
    b.add_argument("--errors", default=None, help="error records (default: <output>.errors.jsonl)")
    b.add_argument("--max-tokens", type=int, default=16, help="default for lines that give none")
    b.add_argument("--temperature", type=float, default=1.0, help="default for lines that give none")
    b.add_argument("--max-in-flight", type=int, default=256, help="requests in the engine at once")
    b.add_argument("--min-available-mb", type=float, default=256.0,
                   help="host memory floor: below it no request is admitted; 0 turns the guard off")
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_batch)
