"""The `nexus-jax bench load` command: options, the run, and its Markdown table (the test itself is load_test.py)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any

from nexus_jax.benchmark.load_test import OUTCOMES, LoadSettings, run_load_test
from nexus_jax.entrypoints.engine_args import engine_arg


def markdown(doc: dict[str, Any]) -> str:
    """One row per wave: outcome counts, drain state, server RSS, compiled step programs and Python objects
    (local server), wall time; then the checks."""
    head = ["wave", "streams", *OUTCOMES, "rejections", "unexpected", "drained", "RSS start / peak / end (MiB)",
            "compiled steps", "Python objects", "wall (s)"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in doc["waves"]:
        c, rss, inside = w["counts"], w["rss_mb"], w["server"].get("internals", {})
        memory = "n/a" if rss["start"] is None else f"{rss['start']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f}"
        cells = [f"{w['wave'] + 1}{' (warm-up)' if w['warmup'] else ''}", w["streams"], *(c[o] for o in OUTCOMES),
                 c["rejections"], c["unexpected"], "yes" if w["server"]["drained"] else "**no**", memory,
                 inside.get("compiled_steps", "n/a"), inside.get("python_objects", "n/a"), f"{w['wall_s']:.1f}"]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    k = doc["checks"]
    growth = "not measured" if k["rss_growth_mb"] is None else \
        f"{k['rss_growth_mb']:+.1f} MiB ({'stable' if k['rss_stable'] else '**growing**'})"
    rows.append(f"\nstreams {k['streams']}, lost {k['lost']}, unexpected {k['unexpected']}, drained "
                f"{k['drained']}, server internals clear {k['internals_clear']}, RSS at the end of the last vs the "
                f"first measured wave: {growth}; outcomes never seen: {', '.join(k['missing_outcomes']) or 'none'}; "
                f"**{'PASS' if k['ok'] else 'FAIL'}**")
    return "\n".join(rows)


def _load(args: argparse.Namespace) -> int:
    if args.server is not None and (args.engine_arg or args.max_in_flight is not None):
        raise SystemExit("--engine-arg and --max-in-flight configure the local server; --server has its own")
    settings = LoadSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LoadSettings)})
    engine_config = {"max_num_seqs": args.max_num_seqs, **dict(args.engine_arg or ())}
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    doc = run_load_test(settings, server=args.server, server_pid=args.server_pid,
                        max_in_flight=args.max_in_flight or 256, retry_after_ms=args.retry_after_ms,
                        engine_config=engine_config)
    doc.update(command=shlex.join(["nexus-jax", *sys.argv[1:]]), machine=f"{platform.machine()}, "
               f"{os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}",
               date=started)
    table = markdown(doc)
    print(table)
    if args.out_dir:
        stem = Path(args.out_dir) / args.label
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
        stem.with_suffix(".md").write_text(f"`{doc['command']}`\n\n{doc['date']}, {doc['machine']}\n\n{table}\n")
        print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0 if doc["checks"]["ok"] else 1


def register(bench: Any) -> None:
    """Adds `load` to the `nexus-jax bench` subparsers; every LoadSettings field is an option."""
    p = bench.add_parser("load", help="load test: concurrent gRPC streams with cancels, disconnects, aborts, "
                                      "deadlines and bad requests; checks that none is lost and memory is stable")
    p.add_argument("--server", default=None, metavar="HOST:PORT", help="a running loopback server "
                   "(default: start one over the embedded model in a child process)")
    p.add_argument("--server-pid", type=int, default=None, help="--server's process id, to sample its RSS")
    p.add_argument("--max-in-flight", type=int, default=None, help="local server: open streams admitted "
                   "(default 256); beyond it, RESOURCE_EXHAUSTED")
    p.add_argument("--retry-after-ms", type=int, default=200, help="local server: the retry hint it sends")
    p.add_argument("--max-num-seqs", type=int, default=256, help="local server: running requests per step")
    p.add_argument("--engine-arg", type=engine_arg, action="append", metavar="KEY=VALUE",
                   help="local server: an EngineConfig field")
    plans = {"cancel": "cancel mid-stream", "disconnect": "close their channel mid-stream",
             "abort": "send an Abort RPC mid-stream", "deadline": "run into a short deadline",
             "invalid": "send a bad request"}
    for f in dataclasses.fields(LoadSettings):
        flag = "--" + f.name.replace("_", "-")
        what = f"fraction of the streams that {plans[f.name]} " if f.name in plans else ""
        if isinstance(f.default, tuple):
            p.add_argument(flag, type=float, nargs=2, default=f.default, help=f"{what}(default {f.default})")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f"{what}(default {f.default})")
    p.add_argument("--out-dir", default=None, help="writes LABEL.json and LABEL.md here")
    p.add_argument("--label", default="load_test")
    p.set_defaults(func=_load)
