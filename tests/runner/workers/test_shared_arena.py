"""Shared arena, CPU form (POSIX shared memory): layout, zero-copy JAX views, cross-process visibility, lifetime."""

import gc
import importlib.util
import json
import multiprocessing as mp
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nexus_jax.testing.paths import REPO_ROOT
from runner.workers.shared_arena import ArenaHandle, SharedArena, TensorSpec, export_arrays, import_arrays, plan_layout


def _random_arrays(rng):
    return [rng.standard_normal((3, 5)).astype(np.float32),
            jnp.asarray(rng.standard_normal((7, 2)), jnp.bfloat16),
            rng.integers(-1000, 1000, (11,), dtype=np.int32),
            jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)]


def test_plan_layout_aligned_and_disjoint():
    rng = np.random.default_rng(0)
    dtypes = [np.float32, jnp.bfloat16, np.int32, np.uint8, np.float16]
    items = [(tuple(int(d) for d in rng.integers(0, 9, rng.integers(0, 4))), dtypes[rng.integers(len(dtypes))])
             for _ in range(40)]
    for align in (64, 256, 4096):
        specs, total = plan_layout(items, align)
        assert [s.shape for s in specs] == [s for s, _ in items]
        assert [s.dtype for s in specs] == [jnp.dtype(d).name for _, d in items]
        ends = 0
        for spec in specs:
            assert spec.offset % align == 0 and spec.offset >= ends
            ends = spec.offset + spec.nbytes
        assert total == ends
    with pytest.raises(ValueError, match="power of two"):
        plan_layout(items, 100)
    with pytest.raises(ValueError, match="negative dimension"):
        plan_layout([((2, -1), np.float32)])


def test_export_import_round_trip_zero_copy():
    arrays = _random_arrays(np.random.default_rng(1))
    arena, specs = export_arrays(arrays, "shm")
    try:
        views = import_arrays(arena, specs)
        for source, view, spec in zip(arrays, views, specs):
            assert view.dtype == source.dtype and view.shape == source.shape
            np.testing.assert_array_equal(np.asarray(view), np.asarray(source))
            host = arena.numpy(spec.offset, spec.shape, spec.dtype)
            assert view.unsafe_buffer_pointer() == host.ctypes.data
        # A write through the host view is seen by the JAX view of the same memory: nothing was copied.
        host = arena.numpy(specs[1].offset, specs[1].shape, specs[1].dtype)
        host[0, 0] = 42.0
        assert float(views[1][0, 0]) == 42.0
        del views, host
    finally:
        arena.close()


def test_donated_update_on_cpu_is_not_in_place():
    """Documents the CPU behaviour the module docstring relies on: workers cannot update the arena by donation."""
    arena = SharedArena.create(1024, "shm")
    try:
        view = arena.jax_array(256, (8,), np.float32)
        updated = jax.jit(lambda x: x.at[0].set(5.0), donate_argnums=0)(view)
        assert float(updated[0]) == 5.0 and arena.numpy(256, (8,), np.float32)[0] == 0.0
        del view, updated
    finally:
        arena.close()


def _peer(handle, spec, expected, queue):
    peer = SharedArena.open(handle)
    host = peer.numpy(spec.offset, spec.shape, spec.dtype)
    view = peer.jax_array(spec.offset, spec.shape, spec.dtype)
    seen = bool(np.array_equal(np.asarray(view), expected))
    zero_copy = view.unsafe_buffer_pointer() == host.ctypes.data
    host *= -1
    del view, host
    peer.close()
    queue.put((seen, zero_copy))


def test_child_process_sees_and_writes_owner_data():
    arrays = _random_arrays(np.random.default_rng(2))
    arena, specs = export_arrays(arrays, "shm")
    try:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_peer, args=(arena.handle, specs[2], arrays[2], queue))
        child.start()
        seen, zero_copy = queue.get(timeout=60)
        child.join(60)
        assert child.exitcode == 0 and seen and zero_copy
        np.testing.assert_array_equal(arena.numpy(specs[2].offset, specs[2].shape, specs[2].dtype), -arrays[2])
        np.testing.assert_array_equal(arena.numpy(specs[0].offset, specs[0].shape, specs[0].dtype), arrays[0])
    finally:
        arena.close()


def test_peer_exit_does_not_unlink_owner_segment():
    """A peer in its own interpreter (own resource tracker) opens, closes and exits; the segment must survive."""
    arena = SharedArena.create(4096, "shm")
    try:
        arena.numpy(0, (4,), np.int32)[:] = [1, 2, 3, 4]
        code = ("import sys; from runner.workers.shared_arena import ArenaHandle, SharedArena; "
                "a = SharedArena.open(ArenaHandle('shm', sys.argv[1], 4096)); "
                "assert a.numpy(0, (4,), 'int32').tolist() == [1, 2, 3, 4]; a.numpy(16, (1,), 'int32')[0] = 9; "
                "a.close(); a.close()")
        result = subprocess.run([sys.executable, "-c", code, arena.handle.name], cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert "leaked" not in result.stderr
        again = SharedArena.open(arena.handle)
        assert again.numpy(16, (1,), np.int32)[0] == 9
        again.close()
    finally:
        arena.close()


def test_close_is_idempotent_and_keeps_live_views_valid():
    arena = SharedArena.create(np.int64(1024), "shm")  # sizes computed with numpy are fine
    view = arena.jax_array(0, (4,), np.int32)
    host = arena.numpy(64, (4,), np.int32)
    host[:] = 7
    arena.close()
    arena.close()
    with pytest.raises(FileNotFoundError):
        SharedArena.open(arena.handle)  # the owner unlinked the name
    with pytest.raises(ValueError, match="closed"):
        arena.numpy(0, (4,), np.int32)
    # Views made before close still map the memory; it is released when they are gone.
    assert np.asarray(view).tolist() == [0, 0, 0, 0] and host.tolist() == [7, 7, 7, 7]
    del view, host
    gc.collect()


def test_bad_input():
    with pytest.raises(ValueError, match="positive"):
        SharedArena.create(-1, "shm")
    with pytest.raises(ValueError, match="positive"):
        SharedArena.create(0, "shm")
    with pytest.raises(ValueError, match="positive"):
        SharedArena.create(64.0, "shm")
    with pytest.raises(ValueError, match="unknown arena kind"):
        SharedArena.create(64, "gpu")
    with pytest.raises(ValueError, match="unknown arena kind"):
        ArenaHandle("tmpfs", "x", 64)
    with pytest.raises(ValueError, match="at least one"):
        export_arrays([], "shm")
    arena = SharedArena.create(1024, "shm")
    try:
        for offset, shape in ((1000, (8,)), (-4, (1,)), (0, (257,))):
            with pytest.raises(ValueError, match="outside the arena"):
                arena.jax_array(offset, shape, np.float32)
            with pytest.raises(ValueError, match="outside the arena"):
                arena.numpy(offset, shape, np.float32)
        with pytest.raises(ValueError, match="outside the arena"):
            arena.write(1020, np.zeros(2, np.float32))
        with pytest.raises(ValueError, match="aligned"):
            arena.jax_array(4, (4,), np.float32)  # CPU views need 64-byte alignment to be zero-copy
        with pytest.raises(ValueError, match="DLPack"):
            arena.jax_array(0, (4,), "float8_e4m3fn")
        if not jax.config.jax_enable_x64:
            with pytest.raises(RuntimeError, match="copied"):
                arena.jax_array(0, (4,), np.int64)  # canonicalised to int32: a copy, never a silent one
    finally:
        arena.close()
    with pytest.raises(ValueError, match="host arena"):
        SharedArena(ArenaHandle("cuda", b"\0" * 64, 256), mapping=None).numpy(0, (1,), np.uint8)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="cupy is installed")
def test_cuda_kind_without_cupy_says_so():
    with pytest.raises(RuntimeError, match="needs cupy"):
        SharedArena.create(1024, "cuda")


def test_tensor_spec_is_picklable_with_handle():
    import pickle
    spec, handle = TensorSpec(256, (2, 3), "bfloat16"), ArenaHandle("cuda", bytes(range(64)), 4096, 1)
    assert pickle.loads(pickle.dumps((spec, handle))) == (spec, handle) and spec.nbytes == 12


def test_check_ipc_script_passes_on_cpu(tmp_path):
    """The GPU check script's logic (holder + two workers, ordering handshake) in its CPU form."""
    out = tmp_path / "check.json"
    result = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "benchmarks", "check_ipc.py"), "--kind", "shm",
                             "--steps", "20", "--rounds", "10", "--width", "512", "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["checks"] and all(report["checks"].values()) and not report["in_place"]
    assert report["final_rows_min_max"] == [[41, 41], [41, 41], [10, 10], [10, 10]]
