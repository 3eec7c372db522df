"""Checks the multi-process memory plane: one shared int32 pool, two JAX worker processes under MPS.

  PYTHONPATH=. python3 benchmarks/check_ipc.py --out $OUT               # GPU: cuda arena, MPS if it starts
  python3 benchmarks/check_ipc.py --kind shm --steps 50 --width 4096    # CPU smoke test of the same logic

A holder process owns the arena (as in the runner), two workers map it; this process never touches the GPU, so
it can stop the MPS daemon (whose `quit` waits for every client) at the end.
The pool is [4, width] int32: row 0 is worker A's counter, row 1 worker B's, row 2 A's messages, row 3 B's acks.
1. Both workers (different CUDA_MPS_ACTIVE_THREAD_PERCENTAGE) run `steps` jitted, donated `pool.at[row].add(1)`
   on their own row at the same time, twice: checking the buffer pointer after every step, then without checks
   (async dispatch). In place means the pointer never moves; a whole-buffer rewrite would also clobber the other
   worker's row, which the final counts catch.
2. Ordering: `rounds` ping-pongs. A fills row 2 with k, waits for completion, signals B; B must see k everywhere
   in row 2, fills row 3 with k, signals A, who must see it.
3. Leaks: JAX bytes in use per worker after warm-up vs after all steps, and device memory in the holder before
   the arena vs after the workers are gone and the arena is closed. All three processes must exit with 0.
On CPU (kind shm) a donated update is not in place, so workers write their new rows back through the arena: the
run checks the logic and the ordering protocol, and reports in-place as "no" without failing on it.
Exits nonzero on any failed check.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from multiprocessing.connection import wait

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from runner.workers.mps import MpsControl, MpsUnavailable  # noqa: E402
from runner.workers.shared_arena import SharedArena  # noqa: E402

ROWS, MESSAGE, ACK = 4, 2, 3
TIMEOUT = 300.0
LEAK_TOLERANCE = 64 << 20  # device memory the owner may see unreturned after everything closed
JAX_GROWTH_TOLERANCE = 1 << 20


class Pool:
    """A worker's view of the shared pool; updates land in the arena (in place on GPU, written back on CPU)."""

    def __init__(self, arena: SharedArena, width: int):
        self.arena, self.width, self.cuda = arena, width, arena.handle.kind == "cuda"
        self.array = arena.jax_array(0, (ROWS, width), np.int32)
        self.base = self.array.unsafe_buffer_pointer()
        self.moved = 0  # steps whose result was not the arena's memory
        donate = (0,) if self.cuda else ()
        self._add = jax.jit(lambda p, r: p.at[r].add(1), donate_argnums=donate)
        self._set = jax.jit(lambda p, r, v: p.at[r].set(v), donate_argnums=donate)
        self._range = jax.jit(lambda p, r: jnp.stack([p[r].min(), p[r].max()]))

    def _apply(self, out, row: int, check: bool) -> None:
        if not self.cuda:
            self.arena.write(row * self.width * 4, out[row])
            return
        self.array = out
        if check and out.unsafe_buffer_pointer() != self.base:
            self.moved += 1

    def add(self, row: int, check: bool = True) -> None:
        self._apply(self._add(self.array, row), row, check)

    def set(self, row: int, value: int) -> None:
        self._apply(self._set(self.array, row, np.int32(value)), row, True)

    def sync(self) -> None:
        self.array.block_until_ready()

    def range(self, row: int) -> tuple[int, int]:
        lo, hi = np.asarray(self._range(self.array, row)).tolist()
        return lo, hi


def _bytes_in_use() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_in_use") if stats else None


def worker(role: str, handle, width: int, steps: int, rounds: int, peer, barrier, conn) -> None:
    try:
        conn.send(("ok", _worker(role, handle, width, steps, rounds, peer, barrier)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _worker(role, handle, width, steps, rounds, peer, barrier) -> dict:
    arena = SharedArena.open(handle)
    pool = Pool(arena, width)
    mine = 0 if role == "A" else 1
    report = {"role": role, "pid": os.getpid(), "device": str(jax.devices()[0]), "jax": jax.__version__,
              "sm_percent": os.environ.get("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"),
              "zero_copy": True}  # jax_array raises when JAX copies instead of aliasing
    pool.add(mine)  # compiles; the counter starts at 1
    pool.set(MESSAGE if role == "A" else ACK, 0)
    pool.range(mine)
    pool.sync()
    report["jax_bytes_after_warmup"] = _bytes_in_use()

    for label, check in (("step_ms_checked", True), ("step_ms_async", False)):
        barrier.wait(TIMEOUT)
        start = time.perf_counter()
        for _ in range(steps):
            pool.add(mine, check)
        pool.sync()
        report[label] = (time.perf_counter() - start) / steps * 1e3
    if pool.cuda and pool.array.unsafe_buffer_pointer() != pool.base:
        pool.moved += 1
    report["moved_steps"] = pool.moved
    report["counter"] = pool.range(mine)
    report["counter_expected"] = 1 + 2 * steps

    barrier.wait(TIMEOUT)
    passed = 0
    for k in range(1, rounds + 1):
        if role == "A":
            pool.set(MESSAGE, k)
            pool.sync()  # complete on the device before the other process is told
            peer.send(k)
            if not peer.poll(TIMEOUT):
                raise TimeoutError(f"no ack for round {k}")
            passed += peer.recv() == k and pool.range(ACK) == (k, k)
        else:
            if not peer.poll(TIMEOUT):
                raise TimeoutError(f"no message for round {k}")
            passed += peer.recv() == k and pool.range(MESSAGE) == (k, k)
            pool.set(ACK, k)
            pool.sync()
            peer.send(k)
    report["ordering_passed"] = passed
    report["jax_bytes_after"] = _bytes_in_use()
    del pool
    arena.close()
    return report


def _device_used(kind: str) -> int | None:
    if kind != "cuda":
        return None
    import cupy as cp
    free, total = cp.cuda.runtime.memGetInfo()
    return total - free


def holder(kind: str, width: int, conn) -> None:
    """Owns the arena, like the runner's holder worker: creates it, waits for the workers, reads it, frees it."""
    try:
        before = _device_used(kind)
        arena = SharedArena.create(ROWS * width * 4, kind)
        conn.send(("ok", {"handle": arena.handle, "device_used_before": before}))
        conn.recv()  # the workers are done
        final = arena.read(0, (ROWS, width), np.int32)
        rows = [[int(row.min()), int(row.max())] for row in final]
        del final
        arena.close()
        conn.send(("ok", {"final_rows_min_max": rows, "device_used_after": _device_used(kind)}))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def _spawn(ctx, target, args: tuple, env: dict[str, str]):
    proc = ctx.Process(target=target, args=args, daemon=True)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # spawn copies the environment at start()
    try:
        proc.start()
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return proc


def _receive(conn, timeout: float) -> dict:
    if not conn.poll(timeout):
        raise TimeoutError(f"no answer within {timeout:.0f} s")
    status, value = conn.recv()
    if status != "ok":
        raise RuntimeError(value)
    return value


def _start_mps(args) -> tuple[MpsControl | None, str]:
    if args.kind != "cuda" or args.no_mps:
        return None, "not used"
    try:
        control = MpsControl.start()
    except MpsUnavailable as e:
        return None, f"unavailable: {e}"
    return control, f"{'private' if control.owned else 'reused'} daemon on {control.pipe_dir}"


def _run(args, mps_control: MpsControl | None, report: dict) -> None:
    ctx = mp.get_context("spawn")
    base_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    if args.kind == "shm":
        base_env["JAX_PLATFORMS"] = "cpu"
    env = lambda percent: {**base_env, **(mps_control.client_env(percent) if mps_control else {})}  # noqa: E731
    to_holder, holder_end = ctx.Pipe()
    procs = [_spawn(ctx, holder, (args.kind, args.width, holder_end), env(None))]
    holder_end.close()
    try:
        first = _receive(to_holder, TIMEOUT)
        report["device_used_before"] = first["device_used_before"]
        report["arena_bytes"] = first["handle"].nbytes
        barrier = ctx.Barrier(2)
        end_a, end_b = ctx.Pipe()
        conns = {}
        for role, percent, peer in (("A", args.shares[0], end_a), ("B", args.shares[1], end_b)):
            parent, child = ctx.Pipe()
            procs.append(_spawn(ctx, worker, (role, first["handle"], args.width, args.steps, args.rounds, peer,
                                              barrier, child), env(percent)))
            child.close()
            conns[parent] = role
        end_a.close()  # only the workers hold the peer pipe: one dying gives the other EOF, not a long wait
        end_b.close()
        report["workers"] = _collect(conns, barrier, time.monotonic() + TIMEOUT + 60 + args.steps * 0.05)
        if mps_control is not None:
            try:
                report["mps_servers"] = mps_control.servers()
            except MpsUnavailable as e:
                report["mps_servers"] = str(e)
        for proc in procs[1:]:
            proc.join(30)
        to_holder.send("done")
        report.update(_receive(to_holder, TIMEOUT))
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(10)
        report["exit_codes"] = [proc.exitcode for proc in procs]


def _collect(roles: dict, barrier, deadline: float) -> dict:
    """Each worker's report; the first failure aborts the barrier so the other worker stops waiting too."""
    results = {}
    while roles:
        ready = wait(list(roles), max(0.0, deadline - time.monotonic()))
        if not ready:
            results.update({role: {"error": "no report before the deadline"} for role in roles.values()})
            break
        for conn in ready:
            role = roles.pop(conn)
            try:
                status, value = conn.recv()
            except EOFError:
                status, value = "error", "the worker died without a report"
            results[role] = value if status == "ok" else {"error": value}
            if status != "ok":
                barrier.abort()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("auto", "cuda", "shm"), default="auto")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--width", type=int, default=8 << 20, help="int32 elements per pool row")
    parser.add_argument("--shares", default="60,40", help="SM percent of worker A,B under MPS")
    parser.add_argument("--no-mps", action="store_true")
    parser.add_argument("--out", default=None, help="JSON file, or a directory to write check_ipc.json into")
    args = parser.parse_args()
    args.shares = [int(s) for s in args.shares.split(",")]
    if len(args.shares) != 2 or args.steps < 1 or args.rounds < 1 or args.width < 1:
        parser.error("need two shares and positive --steps, --rounds, --width")
    if args.kind == "auto":
        import importlib.util
        args.kind = "cuda" if importlib.util.find_spec("cupy") and os.path.exists("/dev/nvidia0") else "shm"

    # This process never touches the GPU: MPS `quit` waits for every client to exit, so the owner of the daemon
    # must not be one.
    mps_control, mps_status = _start_mps(args)
    report = {"kind": args.kind, "steps": args.steps, "rounds": args.rounds, "width": args.width,
              "shares": args.shares, "mps": mps_status}
    try:
        _run(args, mps_control, report)
    except Exception:  # e.g. CUDA refusing MPS clients: still report what happened
        report["error"] = traceback.format_exc()
    finally:
        if mps_control is not None and mps_control.owned:
            mps_control.stop()
            report["mps_stopped"] = not mps_control.alive()
    if "error" in report:
        report["checks"] = {"completed": False}
        print(report["error"], file=sys.stderr)
    else:
        moved = [report["workers"][r].get("moved_steps") for r in "AB"]
        report["in_place"] = args.kind == "cuda" and moved == [0, 0]  # the CPU form writes rows back instead
        report["checks"] = _checks(report)
        _print(report)
    if args.out:
        path = os.path.join(args.out, "check_ipc.json") if os.path.isdir(args.out) else args.out
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
    return 0 if all(report["checks"].values()) else 1


def _checks(report: dict) -> dict[str, bool]:
    a, b = report["workers"]["A"], report["workers"]["B"]
    ok = "error" not in a and "error" not in b
    expected, rounds = 1 + 2 * report["steps"], report["rounds"]
    rows = report["final_rows_min_max"]
    checks = {"processes_ok": ok and report["exit_codes"] == [0, 0, 0],
              "zero_copy": ok and a["zero_copy"] and b["zero_copy"],
              "counters_final": rows[0] == rows[1] == [expected, expected],
              "ordering": ok and a["ordering_passed"] == b["ordering_passed"] == rounds
                          and rows[MESSAGE] == rows[ACK] == [rounds, rounds]}
    if report["kind"] == "cuda":
        checks["in_place"] = report["in_place"]
        checks["no_device_leak"] = report["device_used_after"] - report["device_used_before"] <= LEAK_TOLERANCE
    if ok and a["jax_bytes_after"] is not None:
        checks["no_jax_growth"] = all(w["jax_bytes_after"] - w["jax_bytes_after_warmup"] <= JAX_GROWTH_TOLERANCE
                                      for w in (a, b))
    if "mps_stopped" in report:
        checks["mps_stopped"] = report["mps_stopped"]
    return checks


def _print(report: dict) -> None:
    mib = lambda n: "n/a" if n is None else f"{n / 2**20:.1f} MiB"  # noqa: E731
    print(f"\n### check_ipc: {report['kind']} arena of {mib(report['arena_bytes'])}, MPS {report['mps']}, "
          f"in place: {'yes' if report['in_place'] else 'no'}\n")
    print("| worker | SM % | device | step ms (ptr check) | step ms (async) | moved | ordering | JAX bytes growth |")
    print("|---|---|---|---|---|---|---|---|")
    for role in "AB":
        w = report["workers"][role]
        if "error" in w:
            print(f"| {role} | error | {w['error'].strip().splitlines()[-1]} |||||")
            continue
        growth = None if w["jax_bytes_after"] is None else w["jax_bytes_after"] - w["jax_bytes_after_warmup"]
        print(f"| {role} | {w['sm_percent'] or '-'} | {w['device']} | {w['step_ms_checked']:.4f} | "
              f"{w['step_ms_async']:.4f} | {w['moved_steps']} | {w['ordering_passed']}/{report['rounds']} | "
              f"{growth if growth is not None else 'n/a'} |")
    print(f"\ndevice memory used: before {mib(report['device_used_before'])}, "
          f"after {mib(report['device_used_after'])}; MPS servers: {report.get('mps_servers', 'n/a')}\n")
    print("| check | result |\n|---|---|")
    for name, passed in report["checks"].items():
        print(f"| {name} | {'pass' if passed else 'FAIL'} |")


if __name__ == "__main__":
    sys.exit(main())
