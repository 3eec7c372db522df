#!/usr/bin/env bash
# The next device calls of the split investigation, each sized for one 10-minute call of the device tool:
#   bash benchmarks/gpu_calls.sh trace   # GPU trace: the split's decode worker vs in-process decode; split without
#                                        # MPS; the host tier's restore and its per-array transfer cost
#   bash benchmarks/gpu_calls.sh loop    # decode_loop engine vs worker (split, split-loop), and the aggregated baseline
# Everything goes under $OUT (JSON per run, the logs filtered of XLA's chatter). Predictions: benchmarks/RESULTS.md.
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
NOISE='hlo_rematerialization|^W12|^I12|^W0000|^I0000|^E0000|gpu_hlo_schedule|absl|random weights'
OUT=${OUT:?set OUT to the output directory}
nvidia-smi --query-gpu=name --format=csv,noheader

bench() {  # bench SECONDS DIR ARGS...: one bench_split_decode run, its JSON under $OUT/DIR
  local seconds=$1 dir=$OUT/$2
  shift 2
  mkdir -p "$dir"
  timeout "$seconds" python3 benchmarks/bench_split_decode.py "$@" --out "$dir" 2>&1 | grep -Ev "$NOISE" | tail -3
  rm -rf "$dir"/timeline_*/*.jsonl "$dir"/timeline_*/trace_* "$dir"/trace_*  # summarized in the JSON; too many files
}

case "${1:-}" in
  trace)
    timeout 90 python3 benchmarks/probe_mps_kernels.py --out "$OUT" 2>&1 | grep -Ev "$NOISE" | tail -7
    bench 140 split split --trace --prefills 4 --gpu-memory-utilization 0.5
    bench 120 agg agg --trace --prefills 4 --gpu-memory-utilization 0.5
    bench 120 nomps split --disaggregation on --prefills 4 --gpu-memory-utilization 0.5
    mkdir -p "$OUT/host"  # and the host tier's per-array transfer cost (RESULTS.md, issue 20)
    timeout 120 python3 benchmarks/bench_host_tier.py --out "$OUT/host" 2>&1 | grep -Ev "$NOISE" | tail -2
    ;;
  loop)
    bench 300 loop loop-compare --prefills 4 --gpu-memory-utilization 0.5
    bench 120 agg agg --prefills 4 --gpu-memory-utilization 0.5
    ;;
  *)
    echo "usage: OUT=dir bash benchmarks/gpu_calls.sh trace|loop" >&2
    exit 2
    ;;
esac
