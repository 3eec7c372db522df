"""Faults of the disaggregated mode on the GPU: a worker killed mid-run, then the MPS daemon killed mid-run.

  PYTHONPATH=. python3 benchmarks/check_faults.py --out $OUT [--model llama-3.2-1b]
  python3 benchmarks/check_faults.py --out /tmp/faults --model tiny --skip mps   # CPU form (no MPS)

Each run sends the same greedy requests, staggered; a fault is injected after a few steps. Every request must end
with its tokens and no error (the faulted steps' requests are recomputed); greedy tokens are compared with the
fault-free run (float32 reductions over differently batched steps may flip near-tied argmaxes, so a few
differences are the noise floor, not a loss). Writes faults.json and prints it.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse
import json
import logging
import random
import signal
import subprocess
import time
from pathlib import Path

from nexus_jax import LLM, SamplingParams
from nexus_jax.disagg.partition import Slo


def staggered(engine, prompts, max_tokens, tag, fault=None, fault_step=8):
    rng = random.Random(0)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    done, steps = {}, 0
    while order or engine.has_unfinished_requests():
        if order and rng.random() < 0.5:
            i = order.pop()
            engine.add_request(f"{tag}-{i}", {"prompt_token_ids": prompts[i]},
                               SamplingParams(temperature=0.0, max_tokens=max_tokens[i], ignore_eos=True))
        if fault is not None and steps == fault_step:
            fault()
        for out in engine.step():
            if out.finished:
                done[int(out.request_id.split("-")[1])] = out
        steps += 1
    return [done[i] for i in range(len(prompts))]


def kill_mps() -> list[int]:
    """SIGKILL the MPS control daemon and servers (the daemon 'dies')."""
    out = subprocess.run(["pgrep", "-f", "nvidia-cuda-mps"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    return pids


def summary(outs, ref) -> dict:
    return {"finished": len(outs), "errors": sum(o.error is not None for o in outs),
            "complete_lengths": sum(len(o.outputs[0].token_ids) == len(r.outputs[0].token_ids)
                                    for o, r in zip(outs, ref)),
            "equal_to_fault_free": sum(o.outputs[0].token_ids == r.outputs[0].token_ids for o, r in zip(outs, ref)),
            "of": len(ref)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--model", default="llama-3.2-1b")
    ap.add_argument("--skip", default="", help="comma list of: worker,mps")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("nexus_jax.disagg.partition").setLevel(logging.WARNING)
    skip = set(filter(None, args.skip.split(",")))
    model = None if args.model == "tiny" else args.model
    rng = random.Random(1)
    prompts = [[rng.randrange(10, 500) for _ in range(rng.randint(5, 300))] for _ in range(16)]
    max_tokens = [rng.randint(8, 40) for _ in prompts]
    llm = LLM(model, disaggregation="on" if model is None else "auto", sm_ladder=(50,), dtype="float32",
              max_num_batched_tokens=256, num_kv_blocks=2048, num_scheduler_steps=2)
    engine = llm.llm_engine
    if not hasattr(engine, "pool"):
        raise SystemExit("the engine fell back to the aggregated mode (see the log)")
    engine.controller.slo = Slo(tbt=1e-9)  # splits: both phase workers run steps
    doc = {"date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "sm_isolation": engine.sm_enforced}
    t = time.monotonic()
    ref = staggered(engine, prompts, max_tokens, "ref")
    doc["fault_free_s"] = time.monotonic() - t
    if "worker" not in skip:
        victim = engine.pool.workers["decode-50"]
        t = time.monotonic()
        outs = staggered(engine, prompts, max_tokens, "w", fault=lambda: victim.process.kill())
        doc["worker_killed"] = {**summary(outs, ref), "seconds": time.monotonic() - t,
                                "faults": engine.stats()["faults"]}
        print(json.dumps(doc["worker_killed"]), flush=True)
    if "mps" not in skip and engine.sm_enforced:
        killed: list[int] = []
        t = time.monotonic()
        outs = staggered(engine, prompts, max_tokens, "m", fault=lambda: killed.extend(kill_mps()))
        doc["mps_killed"] = {**summary(outs, ref), "seconds": time.monotonic() - t, "killed_pids": killed,
                             "faults": engine.stats()["faults"]}
        print(json.dumps(doc["mps_killed"]), flush=True)
    llm.shutdown()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "faults.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
