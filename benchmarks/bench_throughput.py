"""Offline throughput: `LLM.generate` on random weights against Hugging Face transformers `generate`, same GPU.

  PYTHONPATH=. python3 benchmarks/bench_throughput.py --out $OUT [--json PATH]

transformers runs first in a subprocess (so its CUDA memory is gone before JAX starts). nexus-jax then runs the
workload twice: the first pass includes XLA compilation of every shape bucket it meets, the second is steady
state. Decode-only steps are timed individually and compared with their memory floor: weights plus the K/V of
every sequence's context, over the HBM copy bandwidth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

from configs import CONFIGS_DIR


def preset_fields(preset: str) -> dict:
    """The preset's Hugging Face config fields, for building the same model in transformers."""
    return {k: v for k, v in json.loads((CONFIGS_DIR / f"{preset}.json").read_text()).items()
            if k != "architectures"}


def hf_baseline(preset: str, batch: int, input_len: int, output_len: int) -> dict:
    import torch
    import transformers
    cfg = transformers.AutoConfig.for_model("llama", **preset_fields(preset))
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(100, 30000, (batch, input_len), device="cuda")
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t
    new = (out.shape[1] - input_len) * batch
    return {"batch": batch, "output_tokens": new, "seconds": elapsed, "tok_s": new / elapsed,
            "torch": torch.__version__, "transformers": transformers.__version__}


class StepTimer:
    """Wraps the executor to record (decodes, prefill tokens, summed context, seconds) per device step. A
    synchronous step is timed from call to return; a multi-step decode call counts as its steps, each with the mean
    time; an overlapped step (dispatch) from the previous step's result to its own, which is the device's pace
    while the host keeps ahead."""

    def __init__(self, executor):
        self.executor, self.steps = executor, []
        self.step_fn, self.multi_fn, self.dispatch_fn = executor.step, executor.decode_steps, executor.dispatch
        executor.step, executor.decode_steps, executor.dispatch = self.step, self.decode_steps, self.dispatch
        self.last_result: float | None = None
        self.in_step = False  # a synchronous step goes through dispatch too: record it once

    def restore(self) -> None:
        del self.executor.step, self.executor.decode_steps, self.executor.dispatch

    def record(self, decodes, prefills, seconds: float) -> None:
        ctx = sum(c.start_pos + 1 for c in decodes)
        self.steps.append((len(decodes), sum(len(c.token_ids) for c in prefills), ctx, seconds))

    def step(self, decodes, prefills, rows, *args, **kwargs):  # passes on what else the engine gives (banned ids)
        t = time.perf_counter()
        self.in_step = True
        try:
            out = self.step_fn(decodes, prefills, rows, *args, **kwargs)  # returns host values: the step is done
        finally:
            self.in_step = False
        self.record(decodes, prefills, time.perf_counter() - t)
        return out

    def dispatch(self, step):
        handle, timer = self.dispatch_fn(step), self
        if self.in_step:
            return handle
        started = time.perf_counter()

        class Timed:
            def result(self):
                out = handle.result()
                now = time.perf_counter()
                since = started if timer.last_result is None else max(started, timer.last_result)
                timer.last_result = now
                timer.record(step.decodes, step.prefills, now - since)
                return out
        return Timed()

    def decode_steps(self, decodes, rows, num_steps):
        t = time.perf_counter()
        out = self.multi_fn(decodes, rows, num_steps)
        per_step = (time.perf_counter() - t) / num_steps
        for k in range(num_steps):
            self.steps.append((len(decodes), 0, sum(c.start_pos + 1 + k for c in decodes), per_step))
        return out


def run_nexus(args) -> dict:
    import jax

    from benchmarks.bench_model import hbm_copy_tbps
    from nexus_jax import LLM, SamplingParams
    from runner.model_runner import ModelRunner

    tbps = hbm_copy_tbps(args.copy_mb << 20)
    llm = LLM(args.preset, max_model_len=args.input_len + args.output_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, num_scheduler_steps=args.num_scheduler_steps)
    engine = llm.llm_engine
    runner: ModelRunner = engine.executor
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(runner.state))
    kv_per_token = ModelRunner.kv_bytes_per_block(runner.config, runner.block_size, runner.dtype) / runner.block_size
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(0, runner.config.vocab_size, args.input_len).tolist()}
               for _ in range(args.num_prompts)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    passes = []
    for name in ("first (with compilation)", "steady"):
        timer = StepTimer(runner)
        t = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        timer.restore()
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        decode = [s for s in timer.steps if s[1] == 0]
        floors = [(weight_bytes + ctx * kv_per_token) / (tbps * 1e12) for _, _, ctx, _ in decode]
        ratio = sum(s[3] for s in decode) / max(sum(floors), 1e-9)
        batch_sizes = [s[0] for s in decode]
        passes.append({"pass": name, "seconds": elapsed, "output_tokens": tokens, "tok_s": tokens / elapsed,
                       "steps": len(timer.steps), "decode_steps": len(decode),
                       "decode_time_over_floor": ratio,
                       "decode_batch_median": float(np.median(batch_sizes)) if batch_sizes else 0,
                       "decode_step_ms_median": float(np.median([s[3] for s in decode]) * 1e3) if decode else 0,
                       "mean_ttft_s": float(np.mean([o.metrics.ttft for o in outs])),
                       "steps_detail": [(d, p, round(s * 1e3, 2)) for d, p, _, s in timer.steps if p]})
        print(json.dumps({k: v for k, v in passes[-1].items() if k != "steps_detail"}), flush=True)
    return {"device": jax.devices()[0].device_kind, "jax": jax.__version__, "hbm_tbps": tbps,
            "weights_gb": weight_bytes / 1e9, "kv_blocks": runner.num_blocks, "passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3.1-8b")
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    # 1: the overlapped loop (async_scheduling), which beat the synchronous 8-step decode offline (RESULTS.md)
    ap.add_argument("--num-scheduler-steps", type=int, default=1)
    ap.add_argument("--hf-batch", type=int, default=128)
    ap.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--json", default=None, help="also write the results (with date and command) here")
    ap.add_argument("--copy-mb", type=int, default=8192, help="size of the HBM copy that measures bandwidth")
    args = ap.parse_args()
    if args.hf_only:
        print(json.dumps(hf_baseline(args.preset, args.hf_batch, args.input_len, args.output_len)))
        return
    hf = None
    if not args.skip_hf:
        proc = subprocess.run([sys.executable, __file__, "--hf-only", "--preset", args.preset,
                               "--hf-batch", str(args.hf_batch), "--input-len", str(args.input_len),
                               "--output-len", str(args.output_len)], capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        hf = json.loads(lines[-1]) if lines else {"error": proc.stderr[-2000:]}
        print("transformers:", json.dumps(hf), flush=True)
    nexus = run_nexus(args)
    cmd = "PYTHONPATH=. python3 benchmarks/bench_throughput.py " + " ".join(sys.argv[1:])
    lines = [f"device {nexus['device']}, jax {nexus['jax']}, date {datetime.date.today()}, command `{cmd}`",
             f"workload: {args.num_prompts} prompts x {args.input_len} tokens, {args.output_len} output tokens "
             f"(ignore_eos), {args.preset} random bf16 weights; HBM copy {nexus['hbm_tbps']:.2f} TB/s", "",
             "| engine | output tok/s | seconds | decode steps: median batch, median ms, time / floor |",
             "|---|---|---|---|"]
    if hf and "tok_s" in hf:
        lines.append(f"| transformers {hf['transformers']} generate, batch {hf['batch']} | {hf['tok_s']:.0f} | "
                     f"{hf['seconds']:.1f} | |")
    for p in nexus["passes"]:
        lines.append(f"| nexus-jax LLM.generate, {p['pass']} | {p['tok_s']:.0f} | {p['seconds']:.1f} | "
                     f"{p['decode_batch_median']:.0f}, {p['decode_step_ms_median']:.1f} ms, "
                     f"{p['decode_time_over_floor']:.2f}x |")
    if hf and "tok_s" in hf:
        lines.append(f"\nsteady-state speed-up over transformers: {nexus['passes'][-1]['tok_s'] / hf['tok_s']:.1f}x")
    print("\n".join(lines))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_throughput.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        with open(os.path.join(args.out, "bench_throughput.json"), "w") as f:
            json.dump({"hf": hf, "nexus": nexus}, f, indent=1)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"date": str(datetime.date.today()), "command": cmd, "preset": args.preset,
                       "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                       "hf": hf, "nexus": nexus, "table": "\n".join(lines)}, f, indent=1)


if __name__ == "__main__":
    main()
