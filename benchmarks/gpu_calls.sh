#!/usr/bin/env bash
# The next device calls of the split investigation, each sized for one 10-minute call of the device tool:
#   bash benchmarks/gpu_calls.sh trace   # GPU trace: the split's decode worker vs in-process decode; split without
#                                        # MPS; the host tier's restore and its per-array transfer cost
#   bash benchmarks/gpu_calls.sh loop    # decode_loop engine vs worker (split, split-loop), and the aggregated baseline
#   bash benchmarks/gpu_calls.sh compile   # the GEMMs compiled under MPS vs without, and the split on programs
#                                          # compiled without MPS
#   bash benchmarks/gpu_calls.sh copy      # the split with the decode worker on its own copy of the weights
#   bash benchmarks/gpu_calls.sh hlo       # the GEMMs (configuration, library) in the optimized programs of the
#                                          # split's workers vs the aggregated engine
#   bash benchmarks/gpu_calls.sh sampler   # each sampler program's scratch memory on this GPU
#   bash benchmarks/gpu_calls.sh front     # bench_structured (HTTP, json_schema) and bench_moe; carry wheels/
#   bash benchmarks/gpu_calls.sh pool      # the forward programs' memory at budgets 512/2048; the engine at 0.9
#   bash benchmarks/gpu_calls.sh moe-tiles # the MoE grouped GEMM kernel's tile shapes
#   bash benchmarks/gpu_calls.sh arena     # decode GEMMs on JAX's memory, the arena in its owner, over IPC, a copy
#   bash benchmarks/gpu_calls.sh cublas    # the split and the aggregated engine with XLA's Triton GEMMs off (cuBLAS),
#                                          # against the aggregated engine as it is
#   bash benchmarks/gpu_calls.sh oom       # the in-process engine at 0.9 compiled on first use, XLA preallocating or
#                                          # not: what its step programs ask for (probe_first_step.py)
#   bash benchmarks/gpu_calls.sh handoff   # the tight workload at 12 and 16 req/s, aggregated 512 vs static-50,
#                                          # with the handoff fix (first gap and largest gap per run)
#   bash benchmarks/gpu_calls.sh pace      # tight at 12/16/20: aggregated 512, static-50 and static-30, paced; oom
#   bash benchmarks/gpu_calls.sh unpaced   # tight at 12/16: static-50 with and without pacing; then oom
#   bash benchmarks/gpu_calls.sh structured  # bench_structured with its decode-window profile; carry wheels/
#   bash benchmarks/gpu_calls.sh split     # tight at 12/16/20: aggregated 512 vs static-50 (decode-only weight copies)
#   bash benchmarks/gpu_calls.sh ablation  # tight at 16/20: aggregated 512 and static-50, each FCFS and aged SPF
#   bash benchmarks/gpu_calls.sh dynamic   # tight at 16/20: aggregated 512, static-50 and dynamic (partial copies);
#                                          # MODES="agg-512-arrival dynamic" for fewer modes, or
#                                          # MODES="agg-512-arrival overlap-50-p100-512" (prefill on all or 80% of
#                                          # the SMs beside decode: overlap-50-p{80,100}-{512,1024}), two per call
#   bash benchmarks/gpu_calls.sh tight25   # TBT 25 ms at 12/16: aggregated 256 and 512 vs static-50
#   bash benchmarks/gpu_calls.sh front-cold  # HTTP TTFT (bench_structured, one pair), the cold start with its
#                                            # profile, offline at 1024 seqs / 16384 tokens vs transformers; wheels/
#   bash benchmarks/gpu_calls.sh cold      # the cold start, and the programs its warm cache still misses; the
#                                          # HTTP round trip's floor (probe_http_floor.py; carry wheels/)
#   bash benchmarks/gpu_calls.sh sync MODE  # the mix at 3-8 req/s, budget 512, async (agg-512-arrival) or sync
#                                           # (sync-512) loop: issue 15's sustainable-rate ratio, one mode per call
#   bash benchmarks/gpu_calls.sh host      # the host tier's restore vs recompute; its transfers per array vs in one program
#   SETUP=a bash benchmarks/gpu_calls.sh programs  # issue 20's program mix, 200 programs at 4/s on an eighth of
#                                          # the pool, one setup per call: a (FCFS), b (FCFS + host tier), plas, atlas
#   bash benchmarks/gpu_calls.sh profile [POINTS]  # nexus-jax profile of the 8B shape (shares 30 50 70 100), resumable
#   bash benchmarks/gpu_calls.sh split-start  # the split's start at 0.9 on 80 GB (bounded worker allocators), then
#                                             # tight at 16/20, aggregated 512 vs static-50
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
  # The whole filtered log stays beside the JSON: a failing run's cause is rarely in its last lines.
  timeout "$seconds" python3 benchmarks/bench_split_decode.py "$@" --out "$dir" 2>&1 | grep -Ev "$NOISE" \
    | tee "$dir/log.txt" | tail -3
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
  compile)
    timeout 150 python3 benchmarks/probe_mps_kernels.py --out "$OUT" 2>&1 | grep -Ev "$NOISE" | tail -6
    # Fresh compilation cache, filled by the workers without MPS; the MPS split then runs those programs.
    rm -rf /tmp/nexus-cc-nomps
    bench 170 nomps-fresh split --disaggregation on --prefills 4 --gpu-memory-utilization 0.5 --cache /tmp/nexus-cc-nomps
    bench 150 split-nomps-cache split --trace --prefills 4 --gpu-memory-utilization 0.5 --cache /tmp/nexus-cc-nomps
    ;;
  copy)
    # The aggregate and decode workers' own weight copies cost 2 x 16 GB on top of the holder's 16 GB. At 0.9 of
    # an H100 the sampler's scratch no longer fit beside them (34.46 GiB asked, RESULTS.md), so UTIL defaults to
    # what leaves ~50 GB to XLA: 0.6 of an H200; an H100 has no such setting that also leaves a pool.
    util=${UTIL:-0.6}
    rm -rf /tmp/nexus-cc-copy  # both runs compile the same programs: the second reads the first's
    bench 200 copy split --trace --prefills 2 --gpu-memory-utilization "$util" --decode-weights private \
      --cache /tmp/nexus-cc-copy
    bench 200 shared split --prefills 2 --gpu-memory-utilization "$util" --decode-weights shared \
      --cache /tmp/nexus-cc-copy
    ;;
  hlo)
    # Every module's optimized HLO is dumped, then only its GEMM instructions (shape, Triton tiling or cuBLAS) kept.
    for mode in split agg; do
      rm -rf "/tmp/nexus-hlo-$mode" "/tmp/nexus-cc-hlo-$mode"
      XLA_FLAGS="--xla_dump_to=/tmp/nexus-hlo-$mode --xla_dump_hlo_as_text --xla_dump_hlo_pass_re=^$" \
        bench 200 "hlo-$mode" "$mode" --prefills 2 --gpu-memory-utilization 0.5 --cache "/tmp/nexus-cc-hlo-$mode"
      python3 benchmarks/hlo_gemms.py "/tmp/nexus-hlo-$mode" > "$OUT/hlo-$mode/gemms.txt"
      echo "$mode: $(wc -l < "$OUT/hlo-$mode/gemms.txt") GEMM lines"
    done
    ;;
  cublas)
    # An unknown XLA flag kills every process that reads it, so check the flag before spending the call on it.
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false python3 -c 'import jax; jax.numpy.zeros(1).block_until_ready()' \
      || { echo "this jaxlib has no --xla_gpu_enable_triton_gemm"; exit 3; }
    rm -rf /tmp/nexus-cc-cublas /tmp/nexus-cc-cublas-agg /tmp/nexus-cc-agg  # XLA_FLAGS are not all in the cache key
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false bench 220 split-cublas split --trace --prefills 2 \
      --gpu-memory-utilization 0.5 --cache /tmp/nexus-cc-cublas
    XLA_FLAGS=--xla_gpu_enable_triton_gemm=false bench 150 agg-cublas agg --trace --prefills 2 \
      --gpu-memory-utilization 0.5 --cache /tmp/nexus-cc-cublas-agg
    bench 150 agg agg --prefills 2 --gpu-memory-utilization 0.5 --cache /tmp/nexus-cc-agg
    ;;
  sampler)  # each sampler program's scratch on this GPU (the 34.46 GiB OOM)
    timeout 150 python3 benchmarks/probe_step_memory.py --rows 16,80,272 --out "$OUT/sampler" 2>&1 \
      | grep -Ev "$NOISE" | tail -16
    ;;
  front)  # structured output and the HTTP path (needs carry=["wheels"]: device_wheels.sh), then the MoE kernels
    bash benchmarks/device_wheels.sh install || exit 3
    # the shorter one first: a call cut short by the device budget still brings its file back
    timeout 150 python3 benchmarks/bench_moe.py --json "$OUT/moe.json" 2>&1 | grep -Ev "$NOISE" | tail -8
    timeout 300 python3 benchmarks/bench_structured.py --json "$OUT/structured.json" 2>&1 | grep -Ev "$NOISE" | tail -14
    ;;
  moe-tiles)  # the Pallas grouped GEMM's tile shapes (rows:cols:inner:stages) on one layer's gate/up GEMM
    timeout 400 python3 benchmarks/bench_moe.py --impls pallas --json "$OUT/moe_tiles.json" --tilings \
      auto:128:64:3,auto:256:64:3,auto:128:128:3,auto:64:64:4,64:128:64:3,128:256:64:4,auto:256:128:3 2>&1 \
      | grep -Ev "$NOISE" | tail -20
    ;;
  pool)  # what asks for a second pool-sized buffer (34.46 GiB on the H100, 71.29 GiB on the H200; RESULTS.md)
    for tokens in 512 2048; do  # the in-process engine ran out at budget 2048 and not at 512
      timeout 150 python3 benchmarks/probe_step_memory.py --forward --tokens $tokens --blocks 4096,8192 \
        --out "$OUT/pool-$tokens" 2>&1 | grep -Ev "$NOISE" | grep " tok pool "
    done
    bench 200 agg09 agg --prefills 2 --gpu-memory-utilization 0.9
    ;;
  oom)
    for v in noprealloc:false prealloc:true; do
      mkdir -p "$OUT/${v%%:*}"
      XLA_PYTHON_CLIENT_PREALLOCATE=${v##*:} timeout 150 python3 benchmarks/probe_first_step.py \
        --out "$OUT/${v%%:*}" > "$OUT/${v%%:*}/log.txt" 2>&1
      grep '^{' "$OUT/${v%%:*}/log.txt" | cut -c1-600
    done
    ;;
  handoff)
    timeout 560 python3 benchmarks/bench_serve_modes.py run tight agg-512-arrival static-50 --rates 12 16 \
      --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error'
    ;;
  pace)  # the split with its first token paced, at 50% and 30% decode SMs, against the aggregated engine; then oom
    timeout 510 python3 benchmarks/bench_serve_modes.py run tight agg-512-arrival static-50 static-30 \
      --rates 12 16 20 --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error'
    bash "$0" oom
    ;;
  unpaced)  # pacing's ablation in one run, and the pool's size on a growing allocator (oom)
    timeout 330 python3 benchmarks/bench_serve_modes.py run tight static-50-unpaced static-50 --rates 12 16 \
      --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error'
    bash "$0" oom
    ;;
  structured)  # json_schema's ITL with the GPU trace and host timeline of a decode window; HTTP TTFT, two clients
    bash benchmarks/device_wheels.sh install || exit 3
    timeout 420 python3 benchmarks/bench_structured.py --json "$OUT/structured.json" --trace "$OUT/trace" 2>&1 \
      | grep -Ev "$NOISE" | tail -20
    rm -rf "$OUT/trace"  # summarized in the JSON; the traces are many large files
    ;;
  split)  # the static split, its decode workers on their own weight copies, against the aggregated engine
    timeout 540 python3 benchmarks/bench_serve_modes.py run tight agg-512-arrival static-50 \
      --rates 12 16 20 --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error'
    ;;
  cold)  # the cold start alone, with the programs a warm cache still misses named (issue 15); then the HTTP
         # round trip's floor on this host, server stack against wake-ups (issue 18; carry wheels/)
    timeout 150 python3 benchmarks/bench_async_targets.py cold-start --out "$OUT/cold" 2>&1 | grep -E 'cache|MISS'
    for pre in true false; do  # is the first copy's second the allocator reserving its share of the GPU?
      XLA_PYTHON_CLIENT_PREALLOCATE=$pre timeout 60 python3 -c 'import time, jax; t = time.perf_counter()
jax.devices(); b = time.perf_counter(); jax.device_put(0).block_until_ready(); c = time.perf_counter()
jax.device_put(1).block_until_ready(); print(f"preallocate '$pre': backend {b - t:.3f} s, first copy {c - b:.3f} s, "
f"second {time.perf_counter() - c:.4f} s")'
    done
    bash benchmarks/device_wheels.sh install > /dev/null && \
      timeout 60 python3 benchmarks/probe_http_floor.py --json "$OUT/http_floor.json" 2>&1 | tail -3
    ;;
  sync)  # the mix at budget 512: MODE (agg-512-arrival or sync-512, one per call, ~350 s each) at 3-8 req/s
    timeout 560 python3 benchmarks/bench_serve_modes.py run mix "${2:?agg-512-arrival or sync-512}" --rates 3 4 5 6 7 8 \
      --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error|failed'
    ;;
  programs)  # issue 20 item 4, one setup per call (SETUP: a, b, plas or atlas; ~6-9 min each): 200 programs of the
    # mix at 4/s on a pool cut to an eighth of the H100's (2098 blocks), so that contexts outgrow it within one run
    # (the simulator saw no difference at 100-300 programs on the full pool: docs/programs.md). a: FCFS, no host
    # tier; b: FCFS + an 8 GiB host tier; plas, atlas: the same tier, retention by program. The JSON is written
    # when the run ends: a run cut by the timeout leaves none
    case "${SETUP:?a, b, plas or atlas}" in
      a) policy=fcfs; tier=0 ;; b) policy=fcfs; tier=8 ;; plas|atlas) policy=$SETUP; tier=8 ;;
      *) echo "SETUP must be a, b, plas or atlas" >&2; exit 2 ;;
    esac
    timeout 590 python3 benchmarks/bench_programs_engine.py --model llama-3.1-8b --dataset programs-mix \
      --programs 200 --points 4:1 --policies "$policy" --engine-arg num_kv_blocks=2098 \
      --engine-arg host_cache_gib="$tier" --engine-arg compilation_cache_dir=/tmp/nexus-cc-programs \
      --engine-arg max_model_len=8192 --engine-arg min_table_blocks=512 --json "$OUT/programs-$SETUP.json" 2>&1 \
      | grep -Ev "$NOISE" | tail -4
    ;;
  host)  # the host tier's restore against recompute, and its per-array transfers against one program each way
    mkdir -p "$OUT/host"
    timeout 300 python3 benchmarks/bench_host_tier.py --out "$OUT/host" 2>&1 | grep -Ev "$NOISE" | tail -2
    ;;
  profile)  # the latency profile of this GPU for the 8B shape (issue 16: the H200 has none), with its timing log;
    # a second call continues a cut one: gpu_calls.sh profile benchmarks/results/<dir>/profiles/<gpu>__llama-3.1-8b.points.json
    timeout 570 python3 -m nexus_jax.cli.main profile --model llama-3.1-8b --shares 30 50 70 100 --decode-steps 8 \
      --out-dir "$OUT/profiles" --compile-cache /tmp/nexus-cc-profile ${2:+--resume "$2"} 2>&1 \
      | grep -Ev "$NOISE" | tee "$OUT/profile.log" | tail -12
    ;;
  split-start)  # the split starts on an 80 GB H100 at 0.9 with each worker's allocator bounded; then the tight sweep
    bench 200 start split --disaggregation on --batch 16 --context 512 --window 30 --prefills 2 --prefill-len 2048 \
      --gpu-memory-utilization 0.9
    timeout 330 python3 benchmarks/bench_serve_modes.py run tight agg-512-arrival static-50 --rates 16 20 \
      --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error|failed'
    ;;
  ablation)  # FCFS/SPF x aggregated/split on the tight workload at 16/20 req/s; SPF aged at AGING if set
    timeout 560 python3 benchmarks/bench_serve_modes.py run tight agg-512-arrival agg-512-spf static-50 \
      static-50-arrival --rates 16 20 ${AGING:+--engine-arg "prefill_aging=$AGING"} --out "$OUT/serve" 2>&1 \
      | grep -E '^\| |sweep rate|Error|failed'
    ;;
  dynamic)  # the dynamic split with copies for the decode workers that fit (80 GB: decode-50), against static-50
    timeout 560 python3 benchmarks/bench_serve_modes.py run tight ${MODES:-agg-512-arrival static-50 dynamic} --rates 16 20 \
      --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error|failed'
    ;;
  front-cold)  # issue 18's HTTP target, then issue 15's cold start and offline targets, in one call
    bash benchmarks/device_wheels.sh install || exit 3
    timeout 200 python3 benchmarks/bench_structured.py --repeats 1 --json "$OUT/structured.json" 2>&1 \
      | grep -Ev "$NOISE" | tail -12
    timeout 90 python3 benchmarks/bench_async_targets.py cold-start --out "$OUT/cold" 2>&1 | grep cache
    timeout 280 python3 benchmarks/bench_throughput.py --max-num-seqs 1024 --max-num-batched-tokens 16384 \
      --out "$OUT/offline" 2>&1 | grep -Ev "$NOISE" | tail -12
    ;;
  tight25)  # TBT 25 ms: aggregated 256 and 512 (the tuned budget moves down) against static-50, at 12/16 req/s
    timeout 560 python3 benchmarks/bench_serve_modes.py run tight25 agg-256-arrival agg-512-arrival static-50 \
      --rates 12 16 --out "$OUT/serve" 2>&1 | grep -E '^\| |sweep rate|Error|failed'
    ;;
  arena)
    timeout 150 python3 benchmarks/probe_arena_read.py --out "$OUT" 2>&1 | grep -Ev "$NOISE" | tail -6
    timeout 150 python3 benchmarks/probe_arena_read.py --mps 50 --out "$OUT" 2>&1 | grep -Ev "$NOISE" | tail -6
    ;;
  *)
    echo "usage: OUT=dir bash benchmarks/gpu_calls.sh TARGET (the targets are listed at the top of this file)" >&2
    exit 2
    ;;
esac
# The device tool brings back at most 8 files from $OUT (and none past two folders down): when a call made more,
# they come back as one archive (the dynamic call of 2026-12-07 23:37 lost static-50's results to this limit).
if [ "$(find "$OUT" -type f | wc -l)" -gt 8 ] || [ -n "$(find "$OUT" -mindepth 3 -type f | head -1)" ]; then
  tar -czf /tmp/nexus-results.tar.gz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/nexus-results.tar.gz "$OUT/results.tar.gz"
fi
