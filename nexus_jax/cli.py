"""`nexus-jax` command line."""

from __future__ import annotations

import argparse
import sys
import time


def _generate(args: argparse.Namespace) -> int:
    from runner.generate import generate
    from runner.loader import load_model
    from runner.model_runner import ModelRunner

    loaded = load_model(args.model, dtype=args.dtype)
    if loaded.tokenizer is None:
        raise SystemExit(f"model {loaded.name} has no tokenizer.json; give a checkpoint directory with one")
    tok = loaded.tokenizer
    prompts = args.prompt or ["The capital of France is"]
    ids = [tok.encode(p) for p in prompts]
    longest = max(len(i) for i in ids) + args.max_tokens
    blocks = len(ids) * -(-longest // args.block_size)
    runner = ModelRunner(loaded.config, loaded.params, num_blocks=blocks, block_size=args.block_size)
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "seed": args.seed}
    start = time.perf_counter()
    outs = generate(runner, ids, args.max_tokens, sampling=sampling, eos_token_ids=tok.eos_token_ids)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outs):
        print(f"{prompt!r} -> {tok.decode(out)!r}")
    n = sum(len(o) for o in outs)
    print(f"{len(prompts)} prompts, {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s) on "
          f"{loaded.name} [{runner.kernel_impl} kernels]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nexus-jax")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for a few prompts")
    g.add_argument("--model", default=None,
                   help="Hugging Face checkpoint directory (default: the embedded tiny random model)")
    g.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    g.add_argument("--block-size", type=int, default=16)
    g.set_defaults(func=_generate)
    args = ap.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
