"""The whole split-against-baseline comparison (issue 16): aggregated chunked prefill at every token budget, in
arrival and shortest-prompt-first order, against the static SM split (engine-driven decode and the worker's own
decode loop) and the dynamic one, on two workloads, over rate
sweeps from light load to past the baseline's capacity; then, per workload, the best baseline and every mode
against it.

  python3 benchmarks/bench_serve_modes.py plan                                   # modes, rates, device minutes
  PYTHONPATH=. python3 benchmarks/bench_serve_modes.py run mix agg-512-arrival dynamic --out $OUT/serve
  python3 benchmarks/bench_serve_modes.py summarize benchmarks/results/serve-modes --out part.md

`run` calls `nexus-jax bench serve` once per mode (the command is printed and stored as WORKLOAD/MODE.cmd, so every
figure can be re-run by hand); results land in WORKLOAD/MODE.{json,md,png}. Every mode compiles its closed set of
step shapes before measuring (`warmup=true`). Modes can run in separate device calls: `summarize` reads whatever
is there and says what is missing. `--scale tiny` runs the same commands on the embedded model (a CPU dry run).

Workloads: `mix` (60% ShareGPT-like chat, 40% long documents; TTFT <= 2 s, TBT <= 50 ms) and `tight` (90% chat,
10% long documents; TTFT <= 2 s, TBT <= 30 ms): a per-request SLO on the largest gap between its tokens.
Sustainable rate: the highest swept rate whose P90 TTFT and P99 TBT meet the SLOs, every lower rate meeting them
too, nothing failed. The best baseline of a workload is the aggregated mode with the highest sustainable rate (ties:
more goodput there). A sweep is saturated when the achieved request rate of its top two rates differs by < 10%:
then the engine, not the run, set the throughput; `summarize` flags sweeps that are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

from nexus_jax.benchmark import report
from nexus_jax.benchmark.serve import RequestRecord


@dataclasses.dataclass(frozen=True)
class Workload:
    dataset: str
    ttft: float    # seconds, per request and as the P90 target
    tbt: float     # seconds, per request (largest gap) and as the P99 target
    rates: tuple[float, ...]

    @property
    def targets(self) -> dict[str, float]:
        return {"p90_ttft": self.ttft, "p99_itl": self.tbt}


WORKLOADS = {
    "mix": Workload("mix", 2.0, 0.05, (1, 2, 3, 4, 5, 6, 8)),
    "tight": Workload("chat-long", 2.0, 0.03, (2, 4, 6, 8, 10, 12, 16)),
    # below the aggregated engine's largest gaps at budget 512 (28-29.5 ms on an H100): its tuned budget is smaller
    "tight25": Workload("chat-long", 2.0, 0.025, (2, 4, 6, 8, 10, 12, 16)),
}
BUDGETS = (256, 512, 1024, 2048, 8192)
# "on", not "auto": a split whose workers fail to start must fail the mode, not run the aggregated engine under the
# split's label (what "auto" did on an H100 on 2026-12-07, RESULTS.md). Without MPS (CPU) "on" runs the workers
# unpartitioned.
SPLIT = ("--max-num-batched-tokens", "2048", "--engine-arg", "disaggregation=on")
MODES: dict[str, tuple[str, ...]] = {
    **{f"agg-{b}-{order}": ("--max-num-batched-tokens", str(b), "--engine-arg", f"prefill_order={order}")
       for b in BUDGETS for order in ("arrival", "spf")},
    "static-50": (*SPLIT, "--engine-arg", "sm_ladder=50", "--engine-arg", "aggregate_when_safe=false"),
    # the split in arrival order: the ordering half of the FCFS/SPF x aggregated/split ablation
    "static-50-arrival": (*SPLIT, "--engine-arg", "sm_ladder=50", "--engine-arg", "aggregate_when_safe=false",
                          "--engine-arg", "prefill_order=arrival"),
    "static-30": (*SPLIT, "--engine-arg", "sm_ladder=30", "--engine-arg", "aggregate_when_safe=false"),
    # the split with its first token sent at once (pace_first_token=false): pacing's ablation
    "static-50-unpaced": (*SPLIT, "--engine-arg", "sm_ladder=50", "--engine-arg", "aggregate_when_safe=false",
                          "--engine-arg", "pace_first_token=false"),
    # the same split with the decode worker running its own loop (decode_loop=worker): the loop's ablation
    "static-50-loop": (*SPLIT, "--engine-arg", "sm_ladder=50", "--engine-arg", "aggregate_when_safe=false",
                       "--engine-arg", "decode_loop=worker"),
    # the aggregated engine on the synchronous loop: the async loop's ablation (issue 15: its sustainable rate on the
    # mix at budget 512 should be >= 1.6x this one's); not a baseline candidate (its name is not agg-)
    "sync-512": ("--max-num-batched-tokens", "512", "--engine-arg", "prefill_order=arrival",
                 "--engine-arg", "async_scheduling=false"),
    # prefill on a share that overlaps the decode worker's 50% (80%, or all SMs: the aggregate worker), in chunks
    # small enough for the decode steps beside them to keep their gaps: between the split and the unpartitioned
    # run of 2026-12-08 (RESULTS.md)
    **{f"overlap-50-p{p}-{b}": ("--max-num-batched-tokens", str(b), "--engine-arg", "disaggregation=on",
                                "--engine-arg", "sm_ladder=50", "--engine-arg", "aggregate_when_safe=false",
                                "--engine-arg", f"split_prefill_share={p}") for p in (80, 100) for b in (512, 1024)},
    # mixed steps at the best baseline's budget (512 on both workloads so far), prefills split at 2048
    "dynamic": (*SPLIT, "--engine-arg", "sm_ladder=30,50", "--engine-arg", "aggregate_budget=512"),
    "dynamic-arrival": (*SPLIT, "--engine-arg", "sm_ladder=30,50", "--engine-arg", "aggregate_budget=512",
                        "--engine-arg", "prefill_order=arrival"),
}
SCALES = {
    # 8B shape on the GPU; block tables one width wide (768 blocks of 16 = 12288 tokens fit in 1024 columns).
    "8b": ("--model", "llama-3.1-8b", "--num-prompts", "200", "--max-model-len", "12288", "--max-num-seqs", "128",
           "--engine-arg", "min_table_blocks=1024", "--warmup-requests", "8"),
    "tiny": ("--num-prompts", "6", "--max-model-len", "256", "--max-num-seqs", "8", "--engine-arg",
             "min_table_blocks=16", "--engine-arg", "max_prefill_seqs=4", "--warmup-requests", "2"),
}
WARMUP_MINUTES = 2.0  # per mode on the GPU: engine build and compiling its shapes (measured 1-2 min on the H100)
SATURATED = 0.10


def command(workload: str, mode: str, scale: str, out: str, rates: tuple[float, ...] | None = None,
            engine_args: tuple[str, ...] = ()) -> list[str]:
    w, args = WORKLOADS[workload], [*MODES[mode], *(a for kv in engine_args for a in ("--engine-arg", kv))]
    data = ["--dataset", w.dataset]
    if scale == "tiny":
        # Budgets scaled down with the model.
        args = [{"256": "16", "512": "32", "1024": "48", "2048": "64", "8192": "128"}.get(a, a) for a in args]
        data = ["--dataset", "random", "--input-len", "48", "--output-len", "8"]
    return [sys.executable, "-m", "nexus_jax.cli.main", "bench", "serve", *SCALES[scale], *data, *args,
            "--engine-arg", "warmup=true", "--engine-arg", f"slo_ttft={w.ttft}", "--engine-arg", f"slo_tbt={w.tbt}",
            "--slo", f"ttft={w.ttft}", "--slo", f"tbt={w.tbt}",
            "--request-rate", *[f"{r:g}" for r in (rates or w.rates)], "--label", mode,
            "--out-dir", str(Path(out, workload))]


def device_minutes(workload: str, modes: list[str], num_prompts: int = 200) -> float:
    """Arrival time of the sweeps' requests plus each mode's warm-up: a floor, as the last requests drain."""
    return len(modes) * (WARMUP_MINUTES + sum(num_prompts / r for r in WORKLOADS[workload].rates) / 60)


def sweep(doc: dict) -> list[dict]:
    return sorted((r for r in doc["runs"] if r["phase"] == "sweep"), key=lambda r: float(r["request_rate"]))


def sustainable_rate(doc: dict, targets: dict[str, float]) -> float | None:
    best = None
    for run in sweep(doc):
        if not report.meets_targets(run["summary"], targets):
            break
        best = float(run["request_rate"])
    return best


def saturated(doc: dict) -> bool:
    runs = sweep(doc)
    if len(runs) < 2:
        return False
    a, b = (r["summary"]["request_throughput"] for r in runs[-2:])
    return b < (1 + SATURATED) * a


def best_baseline(docs: dict[str, dict], targets: dict[str, float]) -> str | None:
    def key(mode: str) -> tuple[float, float]:
        rate = sustainable_rate(docs[mode], targets)
        at = [r for r in sweep(docs[mode]) if rate is not None and float(r["request_rate"]) == rate]
        return (rate or 0.0, at[0]["summary"].get("goodput", 0.0) if at else 0.0)
    baselines = [m for m in docs if m.startswith("agg-")]
    return max(baselines, key=key) if baselines else None


# The TBT SLOs, as fractions of the workload's, at which `summarize` recounts goodput from each run's requests: the
# aggregated engine's largest gaps sat at 28-29.5 ms against the tight workload's 30 ms (RESULTS.md, 2026-12-07), so
# one threshold alone hid how far each mode is from its edge.
TBT_SCALES = (2 / 3, 5 / 6, 1.0, 7 / 6, 4 / 3)


def goodput_at(run: dict, ttft: float, tbt: float) -> float | None:
    """Requests per second of the run that met TTFT <= ttft and every gap <= tbt, from its records (None without)."""
    if not run.get("records"):
        return None
    limits = {"ttft": ttft, "itl": tbt}
    good = sum(report.meets_slos(RequestRecord(**r), limits) for r in run["records"])
    return good / max(run["summary"]["duration_s"], 1e-9)


def _ms(d: dict | None, stat: str) -> str:
    return f"{d[stat] * 1e3:.0f}" if d and d[stat] is not None else "-"  # None: a run from before the metric


def summarize(workload: str, docs: dict[str, dict], failed: tuple[str, ...] = ()) -> str:
    """The workload's table of every mode's runs and each against the best baseline; `failed` names modes whose
    run exited with an error and left no results."""
    w = WORKLOADS[workload]
    lines = [f"### {workload}: dataset {w.dataset}, SLO TTFT <= {w.ttft:g} s (P90), TBT <= {w.tbt * 1e3:g} ms (P99)",
             "", "| mode | rate | achieved req/s | goodput | TTFT mean | P90 | P99 | TBT median | P99 "
             "| largest gap P90 | first gap P90 | meets |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, doc in docs.items():
        for run in sweep(doc):
            s = run["summary"]
            lines.append(f"| {mode} | {float(run['request_rate']):g} | {s['request_throughput']:.2f} | "
                         f"{s.get('goodput', 0.0):.2f} | {_ms(s['ttft'], 'mean')} | {_ms(s['ttft'], 'p90')} | "
                         f"{_ms(s['ttft'], 'p99')} | {_ms(s['itl'], 'median')} | {_ms(s['itl'], 'p99')} | "
                         f"{_ms(s.get('max_gap'), 'p90')} | {_ms(s.get('first_gap'), 'p90')} | "
                         f"{'yes' if report.meets_targets(s, w.targets) else 'no'} |")
    base = best_baseline(docs, w.targets)
    base_rate = sustainable_rate(docs[base], w.targets) if base else None
    lines += ["", f"Best baseline: **{base or 'none run'}** (sustainable {base_rate if base_rate else '-'} req/s)",
              "", "| mode | sustainable req/s | / best baseline | goodput / baseline's, per common rate | saturated |",
              "|---|---|---|---|---|"]
    for mode, doc in docs.items():
        rate = sustainable_rate(doc, w.targets)
        ratio = f"{rate / base_rate:.2f}" if rate and base_rate else "-"
        goodput = "-"
        if base and mode != base:
            theirs = {float(r["request_rate"]): r["summary"].get("goodput", 0.0) for r in sweep(docs[base])}
            ours = [(float(r["request_rate"]), r["summary"].get("goodput", 0.0)) for r in sweep(doc)]
            goodput = ", ".join(f"{x:g}: {g / theirs[x]:.2f}" for x, g in ours if theirs.get(x))
        lines.append(f"| {mode} | {'-' if rate is None else f'{rate:g}'} | {ratio} | {goodput} | "
                     f"{'yes' if saturated(doc) else '**no**'} |")
    tbts = [w.tbt * x for x in TBT_SCALES]
    lines += ["", f"Goodput (req/s) recounted at other TBT SLOs, TTFT <= {w.ttft:g} s (the baseline a tighter SLO "
              "would pick may be another budget):", "",
              "| mode | rate | " + " | ".join(f"TBT {t * 1e3:.0f} ms" for t in tbts) + " |",
              "|---|---|" + "---|" * len(tbts)]
    for mode, doc in docs.items():
        for run in sweep(doc):
            cells = [goodput_at(run, w.ttft, t) for t in tbts]
            lines.append(f"| {mode} | {float(run['request_rate']):g} | "
                         + " | ".join("-" if g is None else f"{g:.2f}" for g in cells) + " |")
    if failed:
        lines += ["", f"Failed (see their logs): {', '.join(failed)}."]
    missing = sorted(set(MODES) - set(docs) - set(failed))
    if missing:
        lines += ["", f"Not run: {', '.join(missing)}."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan")
    p.add_argument("modes", nargs="*", default=list(MODES))
    r = sub.add_parser("run")
    r.add_argument("workload", choices=sorted(WORKLOADS))
    r.add_argument("modes", nargs="+", choices=sorted(MODES))
    r.add_argument("--out", required=True)
    r.add_argument("--scale", default="8b", choices=sorted(SCALES))
    r.add_argument("--rates", nargs="+", type=float, default=None, help="instead of the workload's sweep")
    r.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="added to every mode's command (e.g. decode_weights=private on an 80 GB GPU)")
    s = sub.add_parser("summarize")
    s.add_argument("dir", help="holds one folder per workload, as `run --out` writes them")
    s.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cmd == "plan":
        for name, w in WORKLOADS.items():
            print(f"{name}: rates {', '.join(f'{x:g}' for x in w.rates)}; {len(args.modes)} modes, "
                  f">= {device_minutes(name, args.modes):.0f} device minutes")
        return
    if args.cmd == "run":
        failed = []
        for mode in args.modes:
            cmd = command(args.workload, mode, args.scale, args.out, tuple(args.rates) if args.rates else None,
                          tuple(args.engine_arg))
            text = shlex.join(["python3", *cmd[1:]])
            print(text, flush=True)
            folder = Path(args.out, args.workload)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{mode}.cmd").write_text(text + "\n")
            # One mode failing (an out-of-memory at warm-up) must not cost the device call the modes after it.
            rc = subprocess.run(cmd).returncode
            if rc:
                (folder / f"{mode}.failed").write_text(f"exit status {rc}\n")
                failed.append(f"{mode} (exit status {rc})")
        if failed:
            raise SystemExit(f"failed: {', '.join(failed)}")
        return
    parts = []
    for workload in WORKLOADS:
        folder = Path(args.dir, workload)
        files = {f.name.removesuffix(".gz").removesuffix(".json"): f for f in sorted(folder.glob("*.json*"))}
        docs = {name: report.load_json(f) for name, f in files.items() if name in MODES}
        failed = tuple(sorted(f.stem for f in folder.glob("*.failed") if f.stem not in docs))
        if docs or failed:
            parts.append(summarize(workload, docs, failed))
            report.plot_runs([{**doc, "label": mode} for mode, doc in docs.items()], folder / "all-modes.png")
    if not parts:
        raise SystemExit(f"no results of any mode under {args.dir}/{{{','.join(WORKLOADS)}}}")
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
