"""`nexus-jax bench serve` (run a rate sweep and an SLO rate search), `nexus-jax bench plot` (compare runs) and
`nexus-jax bench load` (the gRPC load test of load_test.py, its command in load_cli.py).

  nexus-jax bench serve --model llama-3.1-8b --dataset sharegpt --num-prompts 500 --request-rate 2 4 8 inf \\
      --slo ttft=2 --slo tpot=0.05 --target p90_ttft=2 --target p99_tbt=0.05 --label base --out-dir results/
  nexus-jax bench serve --backend grpc --server 127.0.0.1:50051 --dataset programs-mix --num-prompts 100 \\
      --request-rate 0.5 1 --label programs --out-dir results/
  nexus-jax bench plot results/base.json results/other.json --out compare.png

Every measured run sends prompts of its own (same lengths, token ids salted by the run's index), so a later run
of a sweep does not find the previous run's prompts in the prefix cache.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import inspect
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from nexus_jax.benchmark import load_cli, report
from nexus_jax.benchmark.datasets import DATASETS, BenchRequest, make_requests, salted
from nexus_jax.benchmark.programs_driver import PROGRAM_DATASETS, make_programs, run_programs, warmup_calls
from nexus_jax.benchmark.serve import Backend, RunResult, find_max_rate, run_requests
from nexus_jax.benchmark.workloads import ProgramSpec
from nexus_jax.core.config import EngineConfig
from nexus_jax.entrypoints.engine_args import add_engine_args, engine_arg, engine_config_from_args
from nexus_jax.server import TOKEN_ENV


@dataclasses.dataclass
class SuiteSettings:
    rates: list[float]
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    slos: dict[str, float] = dataclasses.field(default_factory=dict)
    targets: dict[str, float] = dataclasses.field(default_factory=dict)  # e.g. {"p90_ttft": 2.0}
    search_start: float = 1.0
    search_max: float = 1024.0
    search_iterations: int = 4
    program_delay_scale: float = 1.0  # program workloads: think/tool delays are multiplied by this


async def run_suite(backend: Backend, workload: list[BenchRequest] | list[ProgramSpec], settings: SuiteSettings,
                    warmup: list[BenchRequest] | None = None) -> dict[str, Any]:
    """Every rate of the sweep, then (with targets) the rate search; returns the results document's runs and
    search outcome. The workload is requests, or programs (rates are then programs/s). Warm-up requests run
    once, all at once, before the first measured run."""
    runs: list[dict[str, Any]] = []
    if warmup:
        await run_requests(backend, warmup, max_concurrency=settings.max_concurrency, seed=settings.seed)

    # A backend that can count its engine's compiled programs (in-process) says whether a run timed compilation.
    compiled = getattr(backend, "compiled_programs", None)
    engine_stats = getattr(backend, "engine_stats", None)  # what the engine counted, after each run

    async def measure(rate: float, phase: str) -> dict[str, Any]:
        before = await compiled() if compiled else None
        result = await _run_once(backend, workload, settings, rate, salt=len(runs))
        summary = report.summarize(result, settings.slos)
        new = None if compiled is None else await compiled() - before
        runs.append({"phase": phase, **report.run_to_json(result, summary), "compiled_while_measuring": new})
        if engine_stats is not None:
            runs[-1]["engine_stats"] = await engine_stats()
        if new:
            print(f"[bench serve] {phase} rate {rate}: {new} step programs compiled while measuring: its latencies "
                  f"include compilation (warm-up did not cover them)", file=sys.stderr, flush=True)
        programs = summary.get("programs")
        extra = f", {programs['program_throughput']:.3f} programs/s" if programs else ""
        print(f"[bench serve] {phase} rate {rate}: {summary['completed']} done, {summary['failed']} failed, "
              f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.0f} output tok/s{extra}",
              file=sys.stderr, flush=True)
        return summary

    for rate in settings.rates:
        await measure(rate, "sweep")
    search = None
    if settings.targets:
        async def meets(rate: float) -> bool:
            return report.meets_targets(await measure(rate, "search"), settings.targets)

        best, tried = await find_max_rate(meets, start=settings.search_start, max_rate=settings.search_max,
                                          iterations=settings.search_iterations)
        search = {"targets": settings.targets, "best_rate": best, "tried": tried}
    return {"runs": runs, "search": search}


async def _run_once(backend: Backend, workload: list[BenchRequest] | list[ProgramSpec], settings: SuiteSettings,
                    rate: float, salt: int) -> RunResult:
    common = dict(burstiness=settings.burstiness, max_concurrency=settings.max_concurrency, seed=settings.seed)
    if workload and isinstance(workload[0], ProgramSpec):
        return await run_programs(backend, workload, program_rate=rate, delay_scale=settings.program_delay_scale,
                                  salt=salt, **common)
    return await run_requests(backend, salted(workload, salt, backend.vocab_size), request_rate=rate, **common)


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"request rate must be a number or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be positive, got {text!r}")
    return rate


def _serve(args: argparse.Namespace) -> int:
    slos = report.parse_limits(args.slo or [], with_stat=False)
    targets = report.parse_limits(args.target or [], with_stat=True)
    settings = SuiteSettings(args.request_rate or [], args.burstiness, args.max_concurrency, args.seed, slos,
                             targets, args.search_start, args.search_max, args.search_iterations,
                             args.program_delay_scale)
    if not settings.rates and not targets:
        raise SystemExit("nothing to run: give --request-rate and/or --target")
    if args.backend == "grpc" and (args.server is None or args.model is not None):
        raise SystemExit("--backend grpc needs --server HOST:PORT and takes no --model (the server has one)")
    config = engine_config_from_args(args) if args.backend == "in-process" else None  # bad flags: usage error
    doc = asyncio.run(_serve_async(args, settings, config))
    table = report.markdown_table([doc])
    print(table)
    if doc["search"]:
        unit = "programs/s" if args.dataset in PROGRAM_DATASETS else "req/s"
        print(f"\nhighest rate meeting {targets}: {doc['search']['best_rate']} {unit}")
    if args.out_dir:
        stem = Path(args.out_dir) / (args.label or "bench_serve")
        report.write_json(stem.with_suffix(".json"), doc)
        stem.with_suffix(".md").write_text(f"{doc['command']}\n\n{doc['date']}, {doc['backend'].get('device')}"
                                           f"\n\n{table}\n")
        report.plot_runs([doc], stem.with_suffix(".png"))
        print(f"wrote {stem}.json, .md, .png", file=sys.stderr)
    return 0


async def _open_backend(args: argparse.Namespace, config: EngineConfig | None) -> Backend:
    """The gRPC backend of --server, or an in-process engine of `config`."""
    if args.backend == "grpc":
        from nexus_jax.benchmark.grpc_backend import GrpcBackend

        tls = args.tls_ca or args.tls
        return await GrpcBackend.connect(args.server, args.auth_token or os.environ.get(TOKEN_ENV), tls,
                                         args.request_timeout)
    from nexus_jax.benchmark.serve import InProcessBackend

    return InProcessBackend.from_config(config)


async def _serve_async(args: argparse.Namespace, settings: SuiteSettings,
                       config: EngineConfig | None) -> dict[str, Any]:
    """Opens the backend inside the event loop (a gRPC channel belongs to its loop), runs the suite, closes."""
    backend = await _open_backend(args, config)
    try:
        limits = dict(vocab_size=backend.vocab_size, max_model_len=backend.max_model_len)
        workload: list[BenchRequest] | list[ProgramSpec]
        if args.dataset in PROGRAM_DATASETS:
            workload = make_programs(args.dataset, args.num_prompts, seed=args.seed)
            count = args.warmup_requests
            warmup = warmup_calls(make_programs(args.dataset, count, seed=args.seed + 1), count, seed=args.seed + 1,
                                  **limits) if count else None
        else:
            common = dict(input_len=args.input_len, output_len=args.output_len, path=args.dataset_path, **limits)
            workload = make_requests(args.dataset, args.num_prompts, seed=args.seed, **common)
            warmup = make_requests(args.dataset, args.warmup_requests, seed=args.seed + 1, **common) \
                if args.warmup_requests else None
        outcome = await run_suite(backend, workload, settings, warmup)
        described = backend.describe()
    finally:
        closing = backend.close()
        if inspect.isawaitable(closing):
            await closing
    dataset = {"name": args.dataset, "num_prompts": args.num_prompts, "warmup": args.warmup_requests}
    if args.dataset in PROGRAM_DATASETS:
        dataset.update(kind="programs", program_delay_scale=args.program_delay_scale)
    else:
        dataset.update(kind="requests", path=args.dataset_path, input_len=args.input_len, output_len=args.output_len)
    return {"label": args.label, "command": shlex.join(["nexus-jax", *sys.argv[1:]]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": described, "model": described.get("model") or args.model or "embedded tiny model",
            "dataset": dataset, "slos": settings.slos, **outcome}


def _plot(args: argparse.Namespace) -> int:
    docs = [report.load_json(path) for path in args.results]
    report.plot_runs(docs, args.out)
    table = report.markdown_table(docs)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


def register(subparsers: Any) -> None:
    """Adds `bench serve`, `bench plot` and `bench load` to a `nexus-jax` argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    s = bench.add_parser("serve", help="online serving benchmark: request-rate sweep, SLO goodput, rate search")
    s.add_argument("--backend", default="in-process", choices=["in-process", "grpc"],
                   help="an engine in this process, or a running `nexus-jax serve` at --server")
    s.add_argument("--server", default=None, metavar="HOST:PORT",
                   help="the gRPC server of --backend grpc (--target is the rate search's)")
    s.add_argument("--auth-token", default=None, help="gRPC: bearer token (or set NEXUS_AUTH_TOKEN)")
    s.add_argument("--tls", action="store_true", help="gRPC: TLS with the system's root certificates")
    s.add_argument("--tls-ca", default=None, help="gRPC: TLS with this PEM root certificate")
    s.add_argument("--request-timeout", type=float, default=None, help="gRPC: deadline of each request (s)")
    add_engine_args(s, exclude=("seed",))  # the in-process engine's; --seed below is the dataset's and the engine's
    s.add_argument("--engine-arg", type=engine_arg, action="append", metavar="KEY=VALUE",
                   help="in-process engine: an EngineConfig field, as its flag would set it (kept for older "
                        "command lines), e.g. sm_ladder=30,50")
    s.add_argument("--dataset", default="random", choices=[*DATASETS, *PROGRAM_DATASETS],
                   help="requests, or agentic programs: chatbot, react, tree, programs-mix (docs/programs.md)")
    s.add_argument("--dataset-path", default=None, help="JSONL file for --dataset jsonl")
    s.add_argument("--input-len", type=int, default=512, help="random dataset: prompt tokens")
    s.add_argument("--output-len", type=int, default=128, help="random dataset, and jsonl lines without one")
    s.add_argument("--num-prompts", type=int, default=100, help="requests, or programs for a program dataset")
    s.add_argument("--program-delay-scale", type=float, default=1.0,
                   help="program datasets: multiplies the think/tool delays between calls")
    s.add_argument("--warmup-requests", type=int, default=0,
                   help="warm-up requests sent before measuring (not recorded)")
    s.add_argument("--request-rate", type=_rate, nargs="+", default=None,
                   help="req/s (programs/s for program datasets), several for a sweep; inf")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    s.add_argument("--max-concurrency", type=int, default=None)
    s.add_argument("--seed", type=int, default=0, help="seeds the dataset and arrivals, and is the in-process "
                   "engine's seed (default: 0)")
    s.add_argument("--slo", action="append", metavar="METRIC=S", help="per-request SLO for goodput, e.g. ttft=2")
    s.add_argument("--target", action="append", metavar="STAT_METRIC=S",
                   help="rate search target, e.g. p90_ttft=2 p99_tbt=0.05")
    s.add_argument("--search-start", type=_rate, default=1.0)
    s.add_argument("--search-max", type=_rate, default=1024.0)
    s.add_argument("--search-iterations", type=int, default=4)
    s.add_argument("--label", default=None, help="names this configuration in tables and plots")
    s.add_argument("--out-dir", default=None, help="writes LABEL.json, LABEL.md and LABEL.png here")
    s.set_defaults(func=_serve)
    p = bench.add_parser("plot", help="plot and tabulate several bench serve results files together")
    p.add_argument("results", nargs="+", help="JSON files written by bench serve")
    p.add_argument("--out", required=True, help="PNG path")
    p.add_argument("--markdown", default=None, help="also write the combined table here")
    p.set_defaults(func=_plot)
    load_cli.register(bench)
