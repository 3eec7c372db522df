"""Runs the benchmarks with the arguments RESULTS.md documents and writes $OUT/RESULTS.generated.md and
$OUT/results.json: every figure with its device, date, command, target and the prediction written before
measuring (benchmarks/predictions.json).

  PYTHONPATH=. python3 benchmarks/run_all.py --out $OUT [--only kernels,model,throughput,serve] [--quick]
  PYTHONPATH=. python3 benchmarks/run_all.py --merge OUT1 OUT2 ... --out $OUT     # one file from several runs

Each benchmark runs as a subprocess (its own process: GPU memory is released between benchmarks) in
$OUT/<section>, its output teed to $OUT/<section>/log.txt. A failing benchmark is recorded with the end of its log
and the next one runs. The files are rewritten after every section, so a run cut short keeps what it finished.
--quick runs tiny sizes on the embedded model and tiny presets: it checks the pipeline (on CPU too, for every
section but kernels), it measures nothing worth quoting.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import results_file

ROOT = Path(__file__).resolve().parents[1]

SERVE = ["-m", "nexus_jax.cli.main", "bench", "serve"]
PROGRAMS = [*SERVE, "--model", "llama-3.1-8b", "--dataset", "programs-mix", "--num-prompts", "100",
            "--warmup-requests", "256", "--request-rate", "2", "--max-num-batched-tokens", "8192", "--out-dir", "{out}"]
QUICK_PROGRAMS = [*SERVE, "--dataset", "programs-mix", "--num-prompts", "2", "--warmup-requests", "2", "--request-rate",
                  "inf", "--program-delay-scale", "0.001", "--max-model-len", "128", "--out-dir", "{out}"]
# section: (title, reader kind, full commands, quick commands); "{out}" is the section's output directory
SECTIONS: dict[str, tuple[str, str, list[list[str]], list[list[str]]]] = {
    "kernels": ("Kernels", "kernels",
                [["benchmarks/bench_kernels.py", "--out", "{out}", "--json", "{out}/kernels.json"]],
                [["benchmarks/bench_kernels.py", "--out", "{out}", "--budget", "60", "--copy-mb", "64", "--json",
                  "{out}/kernels.json"]]),
    "model": ("Full model steps", "model",
              [["benchmarks/bench_model.py", "--check-preset", "llama-3.2-1b", "--check-dtype", "float32", "--out",
                "{out}", "--json", "{out}/model.json"]],
              [["benchmarks/bench_model.py", "--preset", "tiny", "--batch", "2", "--ctx", "64", "--prefill-tokens",
                "128", "--decode-only", "--copy-mb", "64", "--out", "{out}", "--json", "{out}/model.json"]]),
    "throughput": ("Offline throughput", "throughput",
                   [["benchmarks/bench_throughput.py", "--out", "{out}", "--json", "{out}/throughput.json"]],
                   [["benchmarks/bench_throughput.py", "--preset", "tiny", "--num-prompts", "8", "--input-len", "16",
                     "--output-len", "8", "--max-num-seqs", "8", "--max-num-batched-tokens", "64", "--skip-hf",
                     "--copy-mb", "64", "--out", "{out}", "--json", "{out}/throughput.json"]]),
    "serve": ("Serving benchmark", "serve",
              [[*SERVE, "--model", "llama-3.1-8b", "--dataset", "sharegpt", "--num-prompts", "200",
                "--warmup-requests", "128", "--request-rate", "4", "8", "--max-num-batched-tokens", "2048",
                "--label", "aggregated-2048", "--out-dir", "{out}"]],
              [[*SERVE, "--dataset", "random", "--input-len", "16", "--output-len", "6", "--num-prompts", "4",
                "--warmup-requests", "4", "--request-rate", "inf", "--max-model-len", "128", "--label", "quick",
                "--out-dir", "{out}"]]),
    "programs-fcfs": ("Agentic programs, FCFS", "serve",
                      [[*PROGRAMS, "--scheduling-policy", "fcfs", "--label", "programs-fcfs"]],
                      [[*QUICK_PROGRAMS, "--scheduling-policy", "fcfs", "--label", "quick-programs-fcfs"]]),
    "programs-plas": ("Agentic programs, PLAS", "serve",
                      [[*PROGRAMS, "--scheduling-policy", "plas", "--label", "programs-plas"]],
                      [[*QUICK_PROGRAMS, "--scheduling-policy", "plas", "--label", "quick-programs-plas"]]),
}


def shown(argv: list[str], out: str) -> str:
    """The command as a person types it from the repository root."""
    argv = [a.replace("{out}", out) for a in argv]
    head = ["nexus-jax"] if argv[:2] == ["-m", "nexus_jax.cli.main"] else ["PYTHONPATH=.", "python3", argv[0]]
    words = head + argv[2 if head == ["nexus-jax"] else 1:]
    return " ".join(w if w.startswith(("$OUT", "PYTHONPATH=")) else shlex.quote(w) for w in words)


def run_logged(argv: list[str], log: Path, timeout_s: float | None) -> int:
    """Runs argv from the repository root, teeing its output to stdout and `log`; returns its exit status
    (-9 when it ran past timeout_s and was killed)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f, subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=subprocess.STDOUT, text=True) as proc:
        watchdog = threading.Timer(timeout_s, proc.kill) if timeout_s else None
        if watchdog:
            watchdog.start()
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                f.write(line)
            return proc.wait()
        finally:
            if watchdog:
                watchdog.cancel()


def run_section(name: str, out_root: Path, quick: bool, predictions: dict[str, Any],
                timeout_s: float | None) -> dict[str, Any]:
    title, kind, full, small = SECTIONS[name]
    out = out_root / name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    log.write_text("")
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    started = time.monotonic()
    commands, failures = [], []
    for argv in small if quick else full:
        commands.append(shown(argv, f"$OUT/{name}"))
        print(f"[run_all] {name}: {commands[-1]}", flush=True)
        status = run_logged([sys.executable, *(a.replace("{out}", str(out)) for a in argv)], log, timeout_s)
        if status != 0:
            failures.append(f"`{commands[-1]}` exited with status {status}")
    meta = {"section": name, "date": date, "commands": commands}
    figures, tables, device = [], [], {}
    try:
        figures, tables, device = results_file.section_figures(kind, out, predictions, name, meta)
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError) as e:
        failures.append(f"no figures: {type(e).__name__}: {e}")
    if not figures and not failures:  # a benchmark that exits 0 having measured nothing did not complete
        failures.append("no figures: the benchmark's output holds no measurement")
    for figure in figures:
        figure.update(device)
    tail = "\n".join(log.read_text().splitlines()[-40:]) if failures else ""
    return {"name": name, "title": title, "quick": quick, "commands": commands, "date": date, **device,
            "seconds": time.monotonic() - started, "status": "; ".join(failures) or "completed",
            "figures": figures, "tables": tables, "log_tail": tail}


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "RESULTS.generated.md").write_text(results_file.render(results))


def merge(sources: list[str]) -> dict[str, dict[str, Any]]:
    """The sections of several results.json (or the directories holding them); a later one wins a name."""
    sections: dict[str, dict[str, Any]] = {}
    for source in sources:
        path = Path(source) / "results.json" if Path(source).is_dir() else Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no results.json at {source}")
        sections.update(json.loads(path.read_text())["sections"])
    return sections


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, measures nothing")
    ap.add_argument("--timeout-s", type=float, default=None, help="kill a benchmark command after this long")
    ap.add_argument("--merge", nargs="+", default=None, metavar="RESULTS",
                    help="render one file from earlier runs' results.json (or their --out directories)")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    command = shlex.join(["PYTHONPATH=.", "python3", "benchmarks/run_all.py", *(argv or sys.argv[1:])])
    results = {"command": command, "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "sections": {}}
    if args.merge:
        results["sections"] = merge(args.merge)
        write(results, out)
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown or not names:
        raise SystemExit(f"--only: unknown section(s) {unknown or names}; known: {', '.join(SECTIONS)}")
    predictions = results_file.load_predictions()
    for name in names:
        results["sections"][name] = run_section(name, out, args.quick, predictions, args.timeout_s)
        write(results, out)
    failed = [n for n, s in results["sections"].items() if s["status"] != "completed"]
    print(f"[run_all] wrote {out}/RESULTS.generated.md and results.json; failed: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
