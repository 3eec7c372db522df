"""`nexus-jax profile`: measure step latencies per SM share on this GPU, fit the cost model, store the table.

With CUDA MPS, each share runs in its own worker process (`runner.workers.profile_worker`) capped by the MPS client
variables. Workers come in complementary pairs (20 with 80, 30 with 70, ...): both compile the grid in parallel,
measure alone one after the other, then each measures decode and prefill steps while the other loops the other
phase, which gives the co-run contention per share. Share 100 runs alone and also measures mixed steps. Without
MPS (CPU, no daemon, or workers that cannot start under it) only share 100 is profiled, in this process.

Output, in --out-dir (default configs/profiles): `<gpu>__<model>.json` (the fitted CostModel, fitted on all
points, with a held-out evaluation in its metadata: fit on ~80% of each group, error on the rest) and
`<gpu>__<model>.points.json` (every raw measurement). The points file is also written after each group of workers,
so a run cut short (the device tool stops a command after 10 minutes) continues with `--resume <points file>`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from configs import PROFILES_DIR
from nexus_jax.disagg.cost_model import CostModel, profile_path, split_points
from runner.workers.profile_worker import MARK, Grid, StepTimer

ROOT = Path(__file__).resolve().parents[2]
FULL_SHARES = (20, 30, 40, 50, 60, 70, 80, 100)
QUICK_SHARES = (40, 60, 100)


@dataclasses.dataclass(frozen=True)
class ProfileSettings:
    model: str = "llama-3.1-8b"
    dtype: str = "auto"
    shares: tuple[int, ...] = FULL_SHARES
    quick: bool = False
    out_dir: str = str(PROFILES_DIR)
    kv_gib: float = 8.0            # KV pool per worker process; two 8B workers share one GPU during co-runs
    decode_steps: int = 1          # > 1: time decode through ModelRunner.decode_steps, per step
    use_mps: bool = True
    holdout: float = 0.2
    seed: int = 0
    compile_cache: str | None = None
    resume: str | None = None      # a points file of an interrupted run: its measured groups are skipped
    grid: Grid | None = None       # None: Grid.quick() or Grid.full()

    def __post_init__(self) -> None:
        if not self.shares or any(not isinstance(s, int) or not 1 <= s <= 100 for s in self.shares):
            raise ValueError(f"shares must be integers within 1..100, got {self.shares}")
        if self.kv_gib <= 0 or self.decode_steps < 1:
            raise ValueError(f"kv_gib must be > 0 and decode_steps >= 1, got {self.kv_gib}, {self.decode_steps}")


class WorkerStartFailed(RuntimeError):
    """The first profile workers under MPS did not start (the GPU may refuse MPS clients)."""


class _Worker:
    """One profile worker process at an SM share, spoken to in JSON lines."""

    def __init__(self, share: int, settings: ProfileSettings, grid: Grid, env: dict[str, str]):
        self.share = share
        args = {"model": settings.model, "dtype": settings.dtype, "kv_gib": settings.kv_gib, "share": share,
                "decode_steps": settings.decode_steps, "seed": settings.seed, "grid": dataclasses.asdict(grid)}
        self.proc = subprocess.Popen([sys.executable, "-m", "runner.workers.profile_worker", json.dumps(args)],
                                     cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def send(self, **cmd: Any) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict[str, Any]:
        while line := self.proc.stdout.readline():
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stderr.write(line)
        raise RuntimeError(f"profile worker at SM share {self.share} exited with code {self.proc.wait()} "
                           "(its stderr is above)")

    def call(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send(op="quit")
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def plan_groups(shares: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Share 100 alone, the others with their complement (started even when it is not profiled itself)."""
    groups: list[tuple[int, ...]] = [(100,)] if 100 in shares else []
    todo = sorted(s for s in set(shares) if s < 100)
    while todo:
        s = todo.pop(0)
        if 100 - s in todo:
            todo.remove(100 - s)
        groups.append((s, 100 - s))
    return groups


def _worker_env(mps: Any, share: int, cache: str) -> dict[str, str]:
    path = f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return {**os.environ, **mps.client_env(share), "PYTHONPATH": path,
            "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "2",
            "JAX_COMPILATION_CACHE_DIR": cache, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def _profile_group(group: tuple[int, ...], settings: ProfileSettings, grid: Grid, mps: Any, cache: str,
                   t0: float, first: bool) -> tuple[list, dict]:
    """Points of one group of workers (share 100 alone, or a complementary pair) and the device description."""
    points: list[dict[str, Any]] = []
    workers = [_Worker(share, settings, grid, _worker_env(mps, share, cache)) for share in group]
    try:
        try:
            info = [w.read() for w in workers][0]
        except RuntimeError as e:
            if first:
                raise WorkerStartFailed(str(e)) from e
            raise
        _progress(t0, f"group {group}: workers ready")
        for w in workers:
            w.send(op="warmup")
        for w in workers:
            w.read()
        _progress(t0, f"group {group}: grid compiled and run once")
        measured = [w for i, w in enumerate(workers) if w.share in settings.shares and w.share not in group[:i]]
        for w in measured:
            points += w.call(op="measure", what="solo")["points"]
        if group == (100,):
            points += workers[0].call(op="measure", what="mixed")["points"]
        stop_dir = tempfile.mkdtemp(prefix="nexus-profile-")
        for w in measured if len(workers) == 2 else ():
            other = workers[1] if w is workers[0] else workers[0]
            for phase, loop in (("decode", "prefill"), ("prefill", "decode")):
                stop = os.path.join(stop_dir, f"stop-{w.share}-{phase}")
                other.call(op="loop", kind=loop, stop_file=stop)   # answers once the loop runs
                points += w.call(op="measure", what=f"corun_{phase}", partner=other.share)["points"]
                Path(stop).touch()
                other.read()
    finally:
        for w in workers:
            w.close()
    return points, info


def _profile_with_mps(settings: ProfileSettings, grid: Grid, mps: Any, t0: float, points: list,
                      info: dict) -> tuple[list, dict]:
    """Every group whose shares `points` (from --resume) lacks; the raw points are saved after each group, so an
    interrupted run can be resumed."""
    cache = settings.compile_cache or os.environ.get("JAX_COMPILATION_CACHE_DIR") or str(
        Path(tempfile.gettempdir()) / "nexus-jax-compile-cache")
    done = {p["share"] for p in points if not p.get("corun")}
    groups = plan_groups(settings.shares)
    for i, group in enumerate(groups):
        if all(s in done for s in group if s in settings.shares):
            _progress(t0, f"group {i + 1}/{len(groups)} {group}: already measured, skipped")
            continue
        _progress(t0, f"group {i + 1}/{len(groups)} {group}: starting")
        new, info = _profile_group(group, settings, grid, mps, cache, t0, first=not points)
        points = points + new
        info = {**info, "mps": True}
        _points_path(settings, info).write_text(json.dumps({"metadata": {**info, "partial": True},
                                                            "points": points}) + "\n")
        _progress(t0, f"group {group}: done, {len(points)} points so far")
    return points, info


def _profile_in_process(settings: ProfileSettings, grid: Grid, t0: float) -> tuple[list, dict]:
    timer = StepTimer(settings.model, settings.dtype, grid, kv_gib=settings.kv_gib,
                      decode_steps=settings.decode_steps, seed=settings.seed)
    _progress(t0, f"in-process share 100 on {timer.device}")
    timer.warmup()
    _progress(t0, "grid compiled and run once")
    points = timer.measure("solo", 100) + timer.measure("mixed", 100)
    return points, {**timer.describe(), "mps": False}


def _load_resume(settings: ProfileSettings) -> tuple[list, dict]:
    if settings.resume is None:
        return [], {}
    path = Path(settings.resume)
    if not path.is_file():
        raise FileNotFoundError(f"no points file to resume from at {path}")
    doc = json.loads(path.read_text())
    info = doc["metadata"]
    if Path(str(info.get("model"))).name != Path(settings.model).name:
        raise ValueError(f"{path} holds points of model {info.get('model')!r}, not {settings.model!r}")
    return doc["points"], info


def run_profile(settings: ProfileSettings) -> dict[str, Any]:
    """Profiles, fits, writes the two JSON files; returns their paths and the evaluations."""
    t0 = time.monotonic()
    grid = settings.grid or (Grid.quick() if settings.quick else Grid.full())
    points, info = _load_resume(settings)
    mps = None
    if settings.use_mps:
        from runner.workers.mps import try_start_mps
        mps = try_start_mps()
    try:
        if mps is not None:
            points, info = _profile_with_mps(settings, grid, mps, t0, points, info)
    except WorkerStartFailed as e:
        print(f"[profile] workers failed to start under MPS ({e}); falling back", file=sys.stderr)
    finally:
        if mps is not None:
            mps.stop()
    if not points:
        print("[profile] no MPS: profiling share 100 only, in-process (no per-share table, no contention)",
              file=sys.stderr, flush=True)
        points, info = _profile_in_process(settings, grid, t0)
    return _fit_and_save(settings, points, info, t0)


def _points_path(settings: ProfileSettings, info: dict) -> Path:
    path = profile_path(info["device"], Path(settings.model).name, settings.out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(path.stem + ".points.json")


def _fit_and_save(settings: ProfileSettings, points: list, info: dict, t0: float) -> dict:
    train, test = split_points(points, settings.holdout, settings.seed)
    heldout = CostModel.fit(train).evaluate(test) if test else None
    model_name = Path(settings.model).name
    meta = {"gpu": info["device"], "model": model_name, "jax_version": info["jax"], "dtype": info["dtype"],
            "kernels": info["kernels"], "mps": info["mps"], "quick": settings.quick,
            "decode_steps": settings.decode_steps, "heldout": heldout,
            "profile_seconds": round(time.monotonic() - t0, 1)}
    model = CostModel.fit(points, meta)
    path = profile_path(info["device"], model_name, settings.out_dir)
    model.save(path)
    fit_all = model.evaluate(points)
    points_path = _points_path(settings, info)
    points_path.write_text(json.dumps({"metadata": {**info, "model": model_name, "partial": False},
                                       "train_points": len(train), "test_points": len(test), "fit_on_all": fit_all,
                                       "points": points}) + "\n")
    _progress(t0, f"wrote {path} and {points_path}")
    for label, ev in (("held-out", heldout), ("training", fit_all)):
        if ev:
            kinds = ", ".join(f"{k} {v['median']:.1%}/{v['p90']:.1%} (n={v['n']})" for k, v in ev["by_kind"].items())
            print(f"[profile] {label} relative error median {ev['median']:.1%}, P90 {ev['p90']:.1%}, "
                  f"max {ev['max']:.1%} over {ev['n']} points; by kind median/P90: {kinds}", file=sys.stderr)
    return {"profile": str(path), "points": str(points_path), "num_points": len(points),
            "shares": model.shares, "heldout": heldout, "training": fit_all}


def _progress(t0: float, msg: str) -> None:
    print(f"[profile {time.monotonic() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def register(sub: Any) -> None:
    p = sub.add_parser("profile", help="measure step latency per SM share and fit the partition cost model")
    p.add_argument("--model", default=None,
                   help="preset (random weights) or checkpoint directory (default: llama-3.1-8b, tiny with --quick)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32", "float16"])
    p.add_argument("--shares", type=int, nargs="+", default=None,
                   help=f"SM shares in percent (default {' '.join(map(str, FULL_SHARES))}; "
                        f"{' '.join(map(str, QUICK_SHARES))} with --quick)")
    p.add_argument("--quick", action="store_true", help="a small grid (seconds on a CPU with the tiny preset)")
    p.add_argument("--out-dir", default=str(PROFILES_DIR))
    p.add_argument("--kv-gib", type=float, default=None, help="KV pool per worker (default 8, 0.05 with --quick)")
    p.add_argument("--decode-steps", type=int, default=1)
    p.add_argument("--no-mps", action="store_true", help="profile share 100 in-process even where MPS works")
    p.add_argument("--holdout", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-cache", default=None, help="persistent XLA compilation cache shared by the workers")
    p.add_argument("--resume", default=None,
                   help="points file of an interrupted run (written after each group): skip what it measured")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    settings = ProfileSettings(
        model=args.model or ("tiny" if args.quick else "llama-3.1-8b"), dtype=args.dtype,
        shares=tuple(args.shares or (QUICK_SHARES if args.quick else FULL_SHARES)), quick=args.quick,
        out_dir=args.out_dir, kv_gib=args.kv_gib or (0.05 if args.quick else 8.0), decode_steps=args.decode_steps,
        use_mps=not args.no_mps, holdout=args.holdout, seed=args.seed, compile_cache=args.compile_cache,
        resume=args.resume)
    result = run_profile(settings)
    print(json.dumps({k: result[k] for k in ("profile", "points", "num_points", "shares", "heldout")}, indent=1))
    return 0
