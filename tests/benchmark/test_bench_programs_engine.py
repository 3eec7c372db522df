"""benchmarks/bench_programs_engine.py end to end on the embedded model: policies switched between runs, the
simulator's prediction next to each, replicas behind each routing policy."""

import json
import os
import subprocess
import sys

from nexus_jax.benchmark.programs_driver import make_programs
from nexus_jax.testing.paths import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "bench_programs_engine.py"
SMALL = ["--engine-arg", "warmup=false", "--engine-arg", "max_num_seqs=8", "--engine-arg", "max_model_len=1024",
         "--warmup", "1", "--dataset", "chatbot", "--programs", "2", "--points", "50:0"]


def run(tmp_path, xla_cache_env, *args):
    """The script's runs and table. Both tests' runs share the session's compilation cache: the second loads the
    step programs the first compiled (same model, same engine arguments)."""
    out = tmp_path / "runs.json"
    done = subprocess.run([sys.executable, str(SCRIPT), *SMALL, *args, "--json", str(out)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, **xla_cache_env})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def test_every_policy_runs_the_same_programs_on_one_engine(tmp_path, xla_cache_env):
    doc, table = run(tmp_path, xla_cache_env, "--policies", "fcfs", "atlas")
    assert [r["policy"] for r in doc["runs"]] == ["fcfs", "atlas"]
    for r in doc["runs"]:
        assert r["applied"] == [r["policy"]]                 # the engine really switched
        assert (r["completed"], r["failed"]) == (2, 0) and r["token_latency_ms"] > 0
        assert r["simulated"]["makespan_s"] > 0 and r["calls_per_replica"][0] > 0
    assert "| 50:0 | atlas | locality | 2 / 0 |" in table


def test_replicas_behind_each_routing_policy(tmp_path, xla_cache_env):
    doc, _ = run(tmp_path, xla_cache_env, "--policies", "plas", "--replicas", "2", "--routings", "locality",
                 "round_robin", "--no-sim")
    assert [r["routing"] for r in doc["runs"]] == ["locality", "round_robin"]
    calls = sum(p.num_calls for p in make_programs("chatbot", 2, seed=0))
    for r in doc["runs"]:
        assert r["applied"] == ["plas"] and (r["completed"], r["failed"]) == (2, 0)
        assert sum(r["calls_per_replica"]) == calls and "simulated" not in r
    assert doc["runs"][1]["calls_per_replica"][1] > 0  # round-robin used the second replica
    assert doc["replicas"] == 2
