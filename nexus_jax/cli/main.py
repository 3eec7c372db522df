"""`nexus-jax` command line."""

from __future__ import annotations

import argparse
import sys
import time

from nexus_jax.benchmark.cli import register as register_bench
from nexus_jax.cli.service import register as register_service_commands
from nexus_jax.disagg.profile import register as register_profile
from nexus_jax.entrypoints.engine_args import add_engine_args, engine_config_from_args


def _generate(args: argparse.Namespace) -> int:
    from nexus_jax import LLM, SamplingParams
    from nexus_jax.entrypoints.build import build_engine

    llm = LLM.from_engine(build_engine(engine_config_from_args(args)))
    if llm.get_tokenizer() is None:
        raise SystemExit(f"model {args.model} has no tokenizer.json; give a checkpoint directory with one")
    prompts = args.prompt or ["The capital of France is"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.sampling_seed)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    for out in outs:
        print(f"{out.prompt!r} -> {out.outputs[0].text!r} [{out.outputs[0].finish_reason}]")
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    runner = llm.llm_engine.executor
    print(f"{len(prompts)} prompts, {n} tokens in {elapsed:.2f} s ({n / elapsed:.1f} tok/s) with "
          f"{runner.kernel_impl} kernels, dtype {runner.dtype}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `nexus-jax` parser with every subcommand."""
    ap = argparse.ArgumentParser(prog="nexus-jax")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate text for a few prompts")
    # --seed stays the prompts' sampling seed: the engine's seed also draws the embedded model's weights
    add_engine_args(g, exclude=("seed",))
    g.add_argument("--prompt", action="append", help="prompt text (repeat for several)")
    g.add_argument("--max-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", dest="sampling_seed", type=int, default=0, help="sampling seed of every prompt")
    g.set_defaults(func=_generate)
    register_service_commands(sub)
    register_bench(sub)
    register_profile(sub)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
