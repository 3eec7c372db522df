"""`nexus-jax bench serve` (run a rate sweep and an SLO rate search) and `nexus-jax bench plot` (compare runs).

  nexus-jax bench serve --model llama-3.1-8b --dataset sharegpt --num-prompts 500 --request-rate 2 4 8 inf \\
      --slo ttft=2 --slo tpot=0.05 --target p90_ttft=2 --target p99_tbt=0.05 --label base --out-dir results/
  nexus-jax bench plot results/base.json results/other.json --out compare.png
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import shlex
import sys
from pathlib import Path
from typing import Any

from nexus_jax.benchmark import report
from nexus_jax.benchmark.datasets import DATASETS, BenchRequest, make_requests
from nexus_jax.benchmark.serve import Backend, find_max_rate, run_benchmark


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


async def run_suite(backend: Backend, requests: list[BenchRequest], settings: SuiteSettings,
                    warmup: list[BenchRequest] | None = None) -> dict[str, Any]:
    """Every rate of the sweep, then (with targets) the rate search; returns the results document's runs and
    search outcome. Warm-up runs once, before the first measured run."""
    runs: list[dict[str, Any]] = []

    async def measure(rate: float, phase: str) -> dict[str, Any]:
        nonlocal warmup
        result = await run_benchmark(backend, requests, request_rate=rate, burstiness=settings.burstiness,
                                     max_concurrency=settings.max_concurrency, seed=settings.seed, warmup=warmup)
        warmup = None
        summary = report.summarize(result, settings.slos)
        runs.append({"phase": phase, **report.run_to_json(result, summary)})
        print(f"[bench serve] {phase} rate {rate}: {summary['completed']} done, {summary['failed']} failed, "
              f"{summary['request_throughput']:.2f} req/s, {summary['output_throughput']:.0f} output tok/s",
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


def _rate(text: str) -> float:
    try:
        rate = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"request rate must be a number or inf, got {text!r}") from None
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"request rate must be positive, got {text!r}")
    return rate


def _serve(args: argparse.Namespace) -> int:
    from nexus_jax.benchmark.serve import InProcessBackend
    from nexus_jax.config import EngineConfig

    slos = report.parse_limits(args.slo or [], with_stat=False)
    targets = report.parse_limits(args.target or [], with_stat=True)
    config = EngineConfig(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
                          block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens,
                          num_scheduler_steps=args.num_scheduler_steps, seed=args.seed)
    backend = InProcessBackend.from_config(config)
    try:
        common = dict(vocab_size=backend.vocab_size, max_model_len=backend.max_model_len,
                      input_len=args.input_len, output_len=args.output_len, path=args.dataset_path)
        requests = make_requests(args.dataset, args.num_prompts, seed=args.seed, **common)
        warmup = make_requests(args.dataset, args.warmup, seed=args.seed + 1, **common) if args.warmup else None
        settings = SuiteSettings(args.request_rate or [], args.burstiness, args.max_concurrency, args.seed, slos,
                                 targets, args.search_start, args.search_max, args.search_iterations)
        if not settings.rates and not targets:
            raise SystemExit("nothing to run: give --request-rate and/or --target")
        outcome = asyncio.run(run_suite(backend, requests, settings, warmup))
        doc = {"label": args.label, "command": shlex.join(["nexus-jax", *sys.argv[1:]]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "backend": backend.describe(), "model": args.model or "embedded tiny model",
               "dataset": {"name": args.dataset, "num_prompts": args.num_prompts, "warmup": args.warmup,
                           "path": args.dataset_path, "input_len": args.input_len, "output_len": args.output_len},
               "slos": slos, **outcome}
    finally:
        backend.close()
    table = report.markdown_table([doc])
    print(table)
    if doc["search"]:
        print(f"\nhighest rate meeting {targets}: {doc['search']['best_rate']} req/s")
    if args.out_dir:
        stem = Path(args.out_dir) / (args.label or "bench_serve")
        report.write_json(stem.with_suffix(".json"), doc)
        stem.with_suffix(".md").write_text(f"{doc['command']}\n\n{doc['date']}, {doc['backend'].get('device')}"
                                           f"\n\n{table}\n")
        report.plot_runs([doc], stem.with_suffix(".png"))
        print(f"wrote {stem}.json, .md, .png", file=sys.stderr)
    return 0


def _plot(args: argparse.Namespace) -> int:
    docs = [report.load_json(path) for path in args.results]
    report.plot_runs(docs, args.out)
    table = report.markdown_table(docs)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


def register(subparsers: Any) -> None:
    """Adds `bench serve` and `bench plot` to a `nexus-jax` argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command", required=True)
    s = bench.add_parser("serve", help="online serving benchmark: request-rate sweep, SLO goodput, rate search")
    s.add_argument("--model", default=None, help="checkpoint directory or preset (default: embedded tiny model)")
    s.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    s.add_argument("--max-model-len", type=int, default=None)
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--max-num-seqs", type=int, default=256)
    s.add_argument("--max-num-batched-tokens", type=int, default=2048)
    s.add_argument("--num-scheduler-steps", type=int, default=1)
    s.add_argument("--dataset", default="random", choices=DATASETS)
    s.add_argument("--dataset-path", default=None, help="JSONL file for --dataset jsonl")
    s.add_argument("--input-len", type=int, default=512, help="random dataset: prompt tokens")
    s.add_argument("--output-len", type=int, default=128, help="random dataset, and jsonl lines without one")
    s.add_argument("--num-prompts", type=int, default=100)
    s.add_argument("--warmup", type=int, default=0, help="warm-up requests sent before measuring (not recorded)")
    s.add_argument("--request-rate", type=_rate, nargs="+", default=None, help="req/s, several for a sweep; inf")
    s.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1 = Poisson")
    s.add_argument("--max-concurrency", type=int, default=None)
    s.add_argument("--seed", type=int, default=0)
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
