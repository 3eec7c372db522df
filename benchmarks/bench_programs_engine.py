"""Scheduling policies on the real engine: agentic programs through one compiled engine, policy by policy.

  PYTHONPATH=. python3 benchmarks/bench_programs_engine.py --model llama-3.1-8b --dataset programs-mix \
      --programs 60 --points 3:1 20:0 --policies fcfs atlas plas mlfq --json out.json [--budget 540]
      [--replicas 2 --devices 0,1 --routings locality round_robin]

A point is RATE:DELAY_SCALE (programs/s, and the factor on the programs' think/tool delays). At each point every
policy runs the same programs with the same arrival times and prompts on one engine (compiled once, `warmup`
on): the policy is switched between runs (`Scheduler.set_policy`, on the engine thread while it is idle) and
the prefix cache is emptied, so each run starts cold. Next to each measurement the simulator predicts the same
run (same programs and arrival times, the profiled H100 step times and KV pool of `h100_config`, the engine's
token budget and slots), which checks the simulator that docs/programs.md draws its long-run tables from. The
simulator's calls reuse their previous call's output as prefix; the driver's prompts cannot (the outputs are not
known in advance), so the engine computes somewhat more prompt tokens than the simulator.

With `--replicas N` the engines are N replicas behind `ReplicatedAsyncLLM` (one per device with `--devices`),
and every routing policy of `--routings` runs every policy (a fresh router per run, `set_routing`).

Runs stop being started once `--budget` seconds have passed since start-up (the device tool's 10-minute limit);
what ran is written.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus_jax.benchmark.programs_driver import PROGRAM_DATASETS, make_programs, run_programs, warmup_calls  # noqa: E402
from nexus_jax.benchmark.report import summarize_programs  # noqa: E402
from nexus_jax.benchmark.serve import InProcessBackend, arrival_offsets, run_requests  # noqa: E402
from nexus_jax.benchmark.sim_config import h100_config, host_tokens  # noqa: E402
from nexus_jax.benchmark.simulator import simulate  # noqa: E402
from nexus_jax.core.config import EngineConfig  # noqa: E402
from nexus_jax.core.engine import program_config  # noqa: E402
from nexus_jax.entrypoints.engine_args import engine_arg  # noqa: E402
from nexus_jax.entrypoints.replicas import ReplicatedAsyncLLM  # noqa: E402
from nexus_jax.programs.router import ROUTING_POLICIES, RouterConfig  # noqa: E402
from nexus_jax.server.metrics import replicas_of  # noqa: E402


def parse_point(text: str) -> tuple[float, float]:
    rate, _, scale = text.partition(":")
    try:
        point = float(rate), float(scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is RATE:DELAY_SCALE, got {text!r}") from None
    if not point[0] > 0 or not point[1] >= 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0 and delay scale >= 0, got {text!r}")
    return point


def predicted(programs: list, rate: float, scale: float, seed: int, policy: str, config: EngineConfig,
              replicas: int, routing: str) -> dict:
    """The simulator's version of one run: same programs, arrivals and delays, the engine's budget and slots."""
    offsets = arrival_offsets(len(programs), rate, 1.0, np.random.default_rng(seed))
    timed = [dataclasses.replace(p, arrival=float(t), stages=tuple(dataclasses.replace(s, delay=s.delay * scale)
                                                                  for s in p.stages))
             for p, t in zip(programs, offsets)]
    pool = {"kv_capacity_tokens": config.num_kv_blocks * config.block_size} if config.num_kv_blocks else {}
    sim = simulate(timed, policy, h100_config(max_num_batched_tokens=config.max_num_batched_tokens,
                                              max_num_seqs=config.max_num_seqs,
                                              max_prefill_seqs=config.max_prefill_seqs,
                                              num_replicas=replicas, routing=RouterConfig(routing),
                                              host_capacity_tokens=host_tokens(config.host_cache_gib), **pool),
                   program_config=program_config(config))
    return {"token_latency_ms": sim.mean_token_latency * 1e3, "program_latency_s": sim.mean_program_latency,
            "makespan_s": sim.makespan, "preemptions": sim.num_preemptions, "cached_tokens": sim.cached_tokens,
            "host_hit_tokens": sim.host_hit_tokens}


def totals(llm: Any) -> list[dict[str, int]]:
    keys = ("num_preemptions", "prefix_hit_tokens", "prefix_queries", "prefix_cache_host_hit_tokens")
    return [{k: r.engine.stats()[k] for k in keys} for r in replicas_of(llm)]


async def run_point(backend: InProcessBackend, programs: list, rate: float, scale: float, policy: str,
                    routing: str, seed: int) -> dict[str, Any]:
    llm = backend.llm
    for replica in replicas_of(llm):
        def prepare(engine=replica.engine) -> None:
            engine.scheduler.set_policy(policy)
            engine.block_manager.reset_prefix_cache()
        await replica.run_on_engine(prepare)
    if isinstance(llm, ReplicatedAsyncLLM):
        llm.set_routing(routing)
    before = totals(llm)
    result = await run_programs(backend, programs, program_rate=rate, delay_scale=scale, seed=seed)
    delta = [{k: a[k] - b[k] for k in a} for a, b in zip(totals(llm), before)]
    summary = summarize_programs(result)
    applied = sorted({r.engine.scheduler.policy_name for r in replicas_of(llm)})
    return {"policy": policy, "applied": applied, "routing": routing, "rate": rate, "delay_scale": scale,
            "makespan_s": result.duration,
            "completed": summary["completed"], "failed": summary["failed"],
            "token_latency_ms": summary["token_latency"]["mean"] * 1e3,
            "program_latency_s": summary["program_latency"]["mean"],
            "program_latency_p90_s": summary["program_latency"]["p90"],
            "preemptions": sum(d["num_preemptions"] for d in delta),
            "cached_tokens": sum(d["prefix_hit_tokens"] for d in delta),
            "host_hit_tokens": sum(d["prefix_cache_host_hit_tokens"] for d in delta),
            "calls_per_replica": [d["prefix_queries"] for d in delta]}


async def main_async(args: argparse.Namespace, started: float) -> dict[str, Any]:
    config = EngineConfig(**{"model": args.model, "warmup": True, "seed": args.seed,
                             **dict(args.engine_arg or ())})
    if args.replicas == 1:
        backend = InProcessBackend.from_config(config)
    else:
        llm = ReplicatedAsyncLLM.from_config(config, args.replicas, args.routings[0], devices=args.devices)
        backend = InProcessBackend(llm, {"backend": "in-process", "replicas": args.replicas, "devices": [
            str(r.engine.executor.kv_pool.devices()) for r in llm.replicas]})
    ready = time.monotonic() - started
    print(f"[programs-engine] engine ready after {ready:.0f} s", file=sys.stderr, flush=True)
    limits = dict(vocab_size=backend.vocab_size, max_model_len=backend.max_model_len)
    try:
        if args.warmup:  # first uses of the prefix-cache paths, outside the measurements
            await run_requests(backend, warmup_calls(make_programs(args.dataset, args.warmup, args.seed + 1),
                                                     args.warmup, seed=args.seed + 1, **limits))
        programs = make_programs(args.dataset, args.programs, seed=args.seed)
        runs = []
        plan = [(point, routing, policy) for point in args.points for routing in args.routings
                for policy in args.policies]
        for (rate, scale), routing, policy in plan:
            if time.monotonic() - started > args.budget:
                print(f"[programs-engine] budget spent: {policy}/{routing} at {rate}:{scale} not run",
                      file=sys.stderr)
                continue
            run = await run_point(backend, programs, rate, scale, policy, routing, args.seed)
            if not args.no_sim:
                run["simulated"] = predicted(programs, rate, scale, args.seed, policy, config, args.replicas,
                                             routing)
            runs.append(run)
            print(f"[programs-engine] {json.dumps(run)}", file=sys.stderr, flush=True)
            write(args.json, document(args, backend, ready, runs))  # a run killed later keeps these
        return document(args, backend, ready, runs)
    finally:
        backend.close()


def document(args: argparse.Namespace, backend: InProcessBackend, ready: float, runs: list) -> dict[str, Any]:
    return {"command": shlex.join(["python3", *sys.argv]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "backend": backend.describe(), "dataset": args.dataset, "programs": args.programs, "seed": args.seed,
            "replicas": args.replicas,
            "engine_ready_s": ready, "runs": runs}


def write(path: str | None, doc: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=1))


def table(doc: dict[str, Any]) -> str:
    lines = ["| rate/s : delay scale | policy | routing | done / failed | token latency ms (sim) | "
             "program latency s (sim) | P90 program s | makespan s (sim) | preemptions | cached prompt tokens (sim) | "
             "of which from the host tier (sim) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        s = r.get("simulated") or {}

        def both(key: str, fmt: str) -> str:
            return format(r[key], fmt) + (f" ({format(s[key], fmt)})" if key in s else "")
        lines.append(f"| {r['rate']:g}:{r['delay_scale']:g} | {r['policy']} | {r['routing']} | "
                     f"{r['completed']} / {r['failed']} | "
                     f"{both('token_latency_ms', '.1f')} | {both('program_latency_s', '.2f')} | "
                     f"{r['program_latency_p90_s']:.2f} | {both('makespan_s', '.0f')} | {r['preemptions']} | "
                     f"{both('cached_tokens', 'd')} | {both('host_hit_tokens', 'd')} |")
    return "\n".join(lines)


def main() -> None:
    started = time.monotonic()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory or preset (default: embedded tiny model)")
    p.add_argument("--dataset", default="programs-mix", choices=sorted(PROGRAM_DATASETS))
    p.add_argument("--programs", type=int, default=60)
    p.add_argument("--points", type=parse_point, nargs="+", default=[(3.0, 1.0)], help="RATE:DELAY_SCALE ...")
    p.add_argument("--policies", nargs="+", default=["fcfs", "atlas", "plas", "mlfq"],
                   choices=["fcfs", "mlfq", "plas", "atlas"])
    p.add_argument("--replicas", type=int, default=1, help="engine replicas behind the router")
    p.add_argument("--devices", type=lambda t: [int(d) for d in t.split(",")], default=None,
                   help="comma-separated JAX device indices, one per replica")
    p.add_argument("--routings", nargs="+", default=["locality"], choices=ROUTING_POLICIES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=32, help="independent calls run before the measurements")
    p.add_argument("--engine-arg", type=engine_arg, action="append", help="KEY=VALUE EngineConfig field (repeatable)")
    p.add_argument("--budget", type=float, default=float("inf"), help="seconds after which no run starts")
    p.add_argument("--no-sim", action="store_true", help="skip the simulator's predictions")
    p.add_argument("--json", default=None, help="write the runs here")
    args = p.parse_args()
    doc = asyncio.run(main_async(args, started))
    write(args.json, doc)
    print(table(doc))


if __name__ == "__main__":
    main()
