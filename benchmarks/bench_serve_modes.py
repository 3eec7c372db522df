"""The serving comparison of the modes: aggregated chunked prefill (token budget 2048 and 8192), a static 50/50 SM split
and the dynamic split, on the same mixed workload and rate sweep; then one table with the sustainable rate of each.

  PYTHONPATH=. python3 benchmarks/bench_serve_modes.py run agg-2048 --out $OUT/serve   # one mode per device call
  python3 benchmarks/bench_serve_modes.py summarize benchmarks/results/serve-modes --out RESULTS-part.md

`run` calls `nexus-jax bench serve` with the mode's arguments (printed, and stored as MODE.cmd beside the results),
so every figure can be re-run by hand. Every mode compiles its whole closed set of step shapes before measuring
(`warmup=true`: the aggregated engine's mixed shapes too, on parallel threads), so no run pays compilation.
`--scale tiny` runs the same commands on the embedded model with small prompts (a CPU dry run).

Sustainable rate: the highest swept rate at which P99 TBT (inter-token latency over all requests) and P90 TTFT
meet their bounds, with every lower swept rate meeting them too, and no request failed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from nexus_jax.benchmark import report

TARGETS = {"p99_itl": 0.05, "p90_ttft": 2.0}
RATES = ("1", "1.5", "2", "2.5", "3", "4")
SPLIT = ("--engine-arg", "disaggregation=auto")
MODES = {
    "agg-2048": ("--max-num-batched-tokens", "2048"),
    "agg-8192": ("--max-num-batched-tokens", "8192"),
    "static-50": ("--max-num-batched-tokens", "2048", *SPLIT, "--engine-arg", "sm_ladder=50",
                  "--engine-arg", "aggregate_when_safe=false"),
    "dynamic": ("--max-num-batched-tokens", "2048", *SPLIT, "--engine-arg", "sm_ladder=30,50"),
}
SCALES = {
    # 8B shape on the GPU; block tables one width wide (768 blocks of 16 = 12288 tokens fit in 1024 columns).
    "8b": ("--model", "llama-3.1-8b", "--dataset", "mix", "--num-prompts", "60", "--max-model-len", "12288",
           "--max-num-seqs", "128", "--engine-arg", "min_table_blocks=1024"),
    "tiny": ("--dataset", "random", "--input-len", "48", "--output-len", "8", "--num-prompts", "6",
             "--max-model-len", "256", "--max-num-seqs", "8", "--engine-arg", "min_table_blocks=16",
             "--engine-arg", "max_prefill_seqs=4"),
}


def command(mode: str, scale: str, out: str, rates: tuple[str, ...] = RATES) -> list[str]:
    args = list(MODES[mode])
    if scale == "tiny":
        # Token budgets scaled down with the model; disaggregation "on" runs the worker processes without MPS.
        args = [{"2048": "64", "8192": "128", "disaggregation=auto": "disaggregation=on"}.get(a, a) for a in args]
    return [sys.executable, "-m", "nexus_jax.cli.main", "bench", "serve", *SCALES[scale], *args,
            "--engine-arg", "warmup=true", "--warmup-requests", "8" if scale == "8b" else "2",
            "--slo", "ttft=2", "--slo", "tbt=0.05", "--request-rate", *rates, "--label", mode, "--out-dir", out]


def sustainable_rate(doc: dict) -> float | None:
    best = None
    for run in sorted((r for r in doc["runs"] if r["phase"] == "sweep"), key=lambda r: float(r["request_rate"])):
        if not report.meets_targets(run["summary"], TARGETS):
            break
        best = float(run["request_rate"])
    return best


def summarize(docs: dict[str, dict]) -> str:
    lines = ["| mode | rate | achieved req/s | TTFT mean | TTFT P90 | TTFT P99 | TBT median | TBT P99 | meets |",
             "|---|---|---|---|---|---|---|---|---|"]
    by_rate: dict[str, dict[float, dict]] = {}
    for mode, doc in docs.items():
        for run in doc["runs"]:
            s, rate = run["summary"], float(run["request_rate"])
            by_rate.setdefault(mode, {})[rate] = s
            ms = lambda d, k: f"{d[k] * 1e3:.0f}" if d[k] is not None else "-"  # noqa: E731
            lines.append(f"| {mode} | {rate:g} | {s['request_throughput']:.2f} | {ms(s['ttft'], 'mean')} | "
                         f"{ms(s['ttft'], 'p90')} | {ms(s['ttft'], 'p99')} | {ms(s['itl'], 'median')} | "
                         f"{ms(s['itl'], 'p99')} | {'yes' if report.meets_targets(s, TARGETS) else 'no'} |")
    lines += ["", "| mode | sustainable rate (req/s) |", "|---|---|"]
    rates = {mode: sustainable_rate(doc) for mode, doc in docs.items()}
    lines += [f"| {mode} | {'below the lowest rate' if r is None else f'{r:g}'} |" for mode, r in rates.items()]
    aggregated = [m for m in docs if m.startswith("agg")]
    if "dynamic" in docs and aggregated:
        lines.append("")
        for base in aggregated:
            common = sorted(set(by_rate["dynamic"]) & set(by_rate[base]))
            for rate in common:
                d, a = by_rate["dynamic"][rate], by_rate[base][rate]
                ratio = lambda k, st: a[k][st] / d[k][st] if d[k][st] else float("nan")  # noqa: E731
                lines.append(f"- {base} / dynamic at {rate:g} req/s: mean TTFT {ratio('ttft', 'mean'):.2f}, "
                             f"P99 TBT {ratio('itl', 'p99'):.2f} (above 1: dynamic lower)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("modes", nargs="+", choices=sorted(MODES))
    r.add_argument("--out", required=True)
    r.add_argument("--scale", default="8b", choices=sorted(SCALES))
    r.add_argument("--rates", nargs="+", default=list(RATES))
    s = sub.add_parser("summarize")
    s.add_argument("dir")
    s.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.cmd == "run":
        Path(args.out).mkdir(parents=True, exist_ok=True)
        for mode in args.modes:
            cmd = command(mode, args.scale, args.out, tuple(args.rates))
            text = shlex.join(["python3", *cmd[1:]])
            print(text, flush=True)
            (Path(args.out) / f"{mode}.cmd").write_text(text + "\n")
            subprocess.run(cmd, check=True)
        return
    docs = {p.stem: report.load_json(p) for p in sorted(Path(args.dir).glob("*.json")) if p.stem in MODES}
    if not docs:
        raise SystemExit(f"no results of {', '.join(MODES)} in {args.dir}")
    table = summarize(docs)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")


if __name__ == "__main__":
    main()
