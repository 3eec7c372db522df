"""Program-aware scheduling and routing in the simulator, on the profiled H100 step times (Llama-3.1-8B shape).

  PYTHONPATH=. python3 benchmarks/bench_programs_sim.py [--section policies|defaults|routing|all]
      [--programs 1200] [--seeds 0] [--jobs 2] [--json PATH]

policies: FCFS, MLFQ, PLAS and ATLAS on each workload: program-level token latency and program latency against
  the arrival rate, and the sustainable rate (highest rate of the grid whose mean token latency stays within
  TARGET x the lowest one at the lightest rate) with its ratio to FCFS's.
defaults: PLAS and ATLAS on the mixed workload under a grid of ProgramConfig values (bin scale, number of
  queues, explicit quanta, beta), latencies relative to FCFS at two loads.
routing: 4 replicas behind locality, round-robin and least-loaded routing: the same table and sustainable rates
  at 4x the one-replica rates (2x the programs).
cache: issue 20's setups on one replica: (a) FCFS with no host tier, (b) FCFS + a 32 GiB host tier, (c) PLAS and
  ATLAS with retention + the host tier; and the ablations: ATLAS with ranks kept until expiry (no retention
  window), ATLAS with plain LRU, ATLAS with no host tier.
Each replica is one engine as configured by default (256 sequences, 2048-token budget, 16 prompt chunks, prefix
caching) with the measured KV pool (16791 blocks of 16 tokens) and the profiled step-time table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nexus_jax.benchmark.sim_config import H200_KV_TOKENS, h100_config, host_tokens  # noqa: E402
from nexus_jax.benchmark.simulator import simulate  # noqa: E402
from nexus_jax.benchmark.workloads import generate  # noqa: E402
from nexus_jax.programs.router import ROUTING_POLICIES, RouterConfig  # noqa: E402
from nexus_jax.programs.table import ProgramConfig  # noqa: E402

POLICIES = ("fcfs", "mlfq", "plas", "atlas")
WORKLOADS = ("chatbot", "react", "tree", "mixed")
# Arrival rates (programs/s) per H100 replica, from light load to past capacity (measured with this script).
RATES = {"chatbot": (2, 4, 6, 8, 12, 16), "react": (0.5, 0.75, 1, 1.25, 1.5, 2),
         "tree": (1, 2, 3, 4, 5, 6), "mixed": (1, 1.5, 2, 2.5, 3, 4)}
TARGET = 2.0  # sustainable: mean token latency within TARGET x the light-load one
# ProgramConfig variants for the defaults section: name -> keyword arguments.
VARIANTS = {
    "default": {},
    "bins x0.25": {"bins": (0.5, 1, 2, 4, 8, 16)},
    "bins x0.5": {"bins": (1, 2, 4, 8, 16, 32)},
    "bins x2": {"bins": (4, 8, 16, 32, 64, 128)},
    "bins x4": {"bins": (8, 16, 32, 64, 128, 256)},
    "K=3": {"bins": (4, 32)},
    "K=5": {"bins": (2, 8, 32, 128)},
    "K=10": {"bins": (1, 2, 4, 8, 16, 32, 64, 128, 256)},
    "quanta 0.5 s": {"quanta": (0.5,) * 7},
    "quanta 2x bins": {"quanta": (4, 4, 8, 16, 32, 64, 1e9)},
    "beta 2": {"beta": 2.0},
    "beta 4": {"beta": 4.0},
    "beta 16": {"beta": 16.0},
    "beta inf": {"beta": 1e12},
}

# The cache section's setups: name -> (policy, SimConfig overrides, ProgramConfig overrides).
HOST = {"host_capacity_tokens": host_tokens(32)}
SETUPS = {
    "a: fcfs": ("fcfs", {}, {}),
    "b: fcfs+host": ("fcfs", HOST, {}),
    "c: plas+host": ("plas", HOST, {}),
    "c: atlas+host": ("atlas", HOST, {}),
    "atlas+host, no window": ("atlas", HOST, {"retention_window": float("inf")}),
    "atlas+host, lru": ("atlas", {**HOST, "retention": False}, {}),
    "atlas, no host": ("atlas", {}, {}),
}
CACHE_RATES = {"chatbot": (8, 16, 24, 32, 48), "react": (0.75, 1, 1.5, 2, 3, 4),
               "tree": (3, 4, 5, 6, 8, 10), "mixed": (2, 2.5, 3, 4, 5, 6, 8, 10)}


@dataclasses.dataclass(frozen=True)
class Job:
    kind: str
    rate: float
    policy: str
    seed: int = 0
    num_programs: int = 1200
    replicas: int = 1
    routing: str = "locality"
    variant: str = "default"
    setup: str = ""     # one of SETUPS (its policy replaces `policy`)
    pool: str = "h100"  # the KV pool: the H100's, or the H200's (the H100's step times either way)


def run_job(job: Job) -> dict:
    start = time.perf_counter()
    policy, sim, programs = SETUPS[job.setup] if job.setup else (job.policy, {}, VARIANTS[job.variant])
    pool = {"kv_capacity_tokens": H200_KV_TOKENS} if job.pool == "h200" else {}
    config = h100_config(num_replicas=job.replicas, routing=RouterConfig(job.routing), **pool, **sim)
    res = simulate(generate(job.kind, job.num_programs, job.rate, job.seed), policy, config,
                   ProgramConfig(**programs))
    return {**dataclasses.asdict(job), "token_latency": res.mean_token_latency,
            "program_latency": res.mean_program_latency, "preemptions": res.num_preemptions,
            "prefill_tokens": res.prefill_tokens, "cached_tokens": res.cached_tokens,
            "host_hit_tokens": res.host_hit_tokens, "seconds": time.perf_counter() - start}


def run_all(jobs: list[Job], workers: int) -> dict[Job, dict]:
    with multiprocessing.Pool(workers) as pool:
        return dict(zip(jobs, pool.map(run_job, jobs, chunksize=1)))


def mean_over_seeds(results: dict[Job, dict], job: Job, seeds: list[int], key: str) -> float:
    return sum(results[dataclasses.replace(job, seed=s)][key] for s in seeds) / len(seeds)


def cell(results: dict[Job, dict], job: Job, seeds: list[int]) -> str:
    """token latency (ms) / program latency (s)"""
    return (f"{mean_over_seeds(results, job, seeds, 'token_latency') * 1e3:.1f} / "
            f"{mean_over_seeds(results, job, seeds, 'program_latency'):.1f}")


def sustainable(results: dict[Job, dict], base: Job, rates: tuple, seeds: list[int], target: float) -> float:
    """Highest rate of the grid whose token latency (mean over seeds) is within target, every lower rate too."""
    best = 0.0
    for rate in rates:
        if mean_over_seeds(results, dataclasses.replace(base, rate=rate), seeds, "token_latency") > target:
            break
        best = rate
    return best


def latency_table(results: dict[Job, dict], base: Job, rates: tuple, field: str, values: tuple,
                  seeds: list[int], out: list[str]) -> None:
    """One row per rate, one column per value of `field` (policy or routing), then the sustainable rates at
    TARGET x the lowest token latency of the lightest rate."""
    out.append(f"\n{base.kind}\n\n| rate | " + " | ".join(values) + " |\n|---|" + "---|" * len(values))
    for r in rates:
        out.append(f"| {r:g} | " + " | ".join(cell(results, dataclasses.replace(base, rate=r, **{field: v}), seeds)
                                          for v in values) + " |")
    target = TARGET * min(mean_over_seeds(results, dataclasses.replace(base, rate=rates[0], **{field: v}), seeds,
                                          "token_latency") for v in values)
    best = {v: sustainable(results, dataclasses.replace(base, **{field: v}), rates, seeds, target) for v in values}
    first = best[values[0]]
    out.append(f"\nsustainable rate at {target * 1e3:.1f} ms: " + ", ".join(
        f"{v} {best[v]:g}" + (f" ({best[v] / first:.2f}x)" if first else "") for v in values))


def section_policies(args, out: list[str]) -> list[dict]:
    jobs = [Job(k, r, p, s, args.programs) for k in args.workloads for r in RATES[k] for p in POLICIES
            for s in args.seeds]
    results = run_all(jobs, args.jobs)
    out.append(f"\n## Policies, one H100 replica, {args.programs} programs per run: mean token latency (ms) / "
               "mean program latency (s)")
    for k in args.workloads:
        latency_table(results, Job(k, 0, "fcfs", 0, args.programs), RATES[k], "policy", POLICIES, args.seeds, out)
    return list(results.values())


def section_defaults(args, out: list[str]) -> list[dict]:
    loads = (3, 4)  # past the mixed workload's capacity (~2.5/s): below it every policy gives the same
    base = Job("mixed", 0, "fcfs", 0, args.programs)
    jobs = [dataclasses.replace(base, rate=r, seed=s, policy=p, variant=v) for r in loads for s in args.seeds
            for p, v in [("fcfs", "default")] + [(p, v) for p in ("plas", "atlas") for v in VARIANTS]]
    results = run_all(jobs, args.jobs)
    out.append(f"\n## Defaults: mixed workload, one H100 replica, {args.programs} programs per run; token latency "
               "/ program latency relative to FCFS\n\n| variant | "
               + " | ".join(f"{p} at {r}/s" for r in loads for p in ("plas", "atlas")) + " |\n|---|" + "---|" * 4)

    def ratio(r: float, p: str, v: str) -> str:
        fcfs, job = dataclasses.replace(base, rate=r), dataclasses.replace(base, rate=r, policy=p, variant=v)
        mean = lambda j, key: mean_over_seeds(results, j, args.seeds, key)  # noqa: E731
        return " / ".join(f"{mean(job, key) / mean(fcfs, key):.3f}" for key in ("token_latency", "program_latency"))
    for v in VARIANTS:
        out.append(f"| {v} | " + " | ".join(ratio(r, p, v) for r in loads for p in ("plas", "atlas")) + " |")
    return list(results.values())


def section_routing(args, out: list[str]) -> list[dict]:
    num = 2 * args.programs  # 4 replicas at 4x the rate: half the arrival window of the one-replica runs
    jobs = [Job(k, 4 * r, args.policy, s, num, 4, route) for k in args.workloads for r in RATES[k]
            for route in ROUTING_POLICIES for s in args.seeds]
    results = run_all(jobs, args.jobs)
    out.append(f"\n## Routing, 4 H100 replicas, {args.policy}, {num} programs per run: mean token latency (ms) / "
               "mean program latency (s)")
    for k in args.workloads:
        latency_table(results, Job(k, 0, args.policy, 0, num, 4, "locality"), tuple(4 * r for r in RATES[k]),
                      "routing", ROUTING_POLICIES, args.seeds, out)
    return list(results.values())


def section_cache(args, out: list[str]) -> list[dict]:
    setups = tuple(SETUPS)
    jobs = [Job(k, r, "", s, args.programs, setup=v, pool=args.pool) for k in args.workloads
            for r in CACHE_RATES[k] for v in setups for s in args.seeds]
    results = run_all(jobs, args.jobs)
    out.append(f"\n## Host tier and retention (issue 20), one replica, the {args.pool.upper()}'s KV pool, "
               f"{args.programs} programs per run: mean token latency (ms) / mean program latency (s)")
    for k in args.workloads:
        latency_table(results, Job(k, 0, "", 0, args.programs, setup=setups[0], pool=args.pool), CACHE_RATES[k],
                      "setup", setups, args.seeds, out)
    return list(results.values())


SECTIONS = {"policies": section_policies, "defaults": section_defaults, "routing": section_routing,
            "cache": section_cache}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--section", choices=(*SECTIONS, "all"), default="all")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    ap.add_argument("--programs", type=int, default=1200, help="programs per run (x the replicas when routing)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--policy", choices=POLICIES, default="atlas", help="scheduling policy of the routing section")
    ap.add_argument("--pool", choices=("h100", "h200"), default="h100",
                    help="cache section: the 8B's KV pool of this GPU (step times stay the H100's)")
    ap.add_argument("--jobs", type=int, default=multiprocessing.cpu_count())
    ap.add_argument("--json", type=Path, help="write every run's numbers here")
    args = ap.parse_args()
    start = time.perf_counter()
    out: list[str] = []
    rows: list[dict] = []
    for name in SECTIONS if args.section == "all" else (args.section,):
        rows += SECTIONS[name](args, out)
        print("\n".join(out), flush=True)
        out.clear()
    print(f"\n({len(rows)} simulations, {time.perf_counter() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
