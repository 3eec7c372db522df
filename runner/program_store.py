"""The model's step programs kept on disk as executables, so that a restarted engine runs them without tracing.

JAX's persistent compilation cache skips XLA's compilation but not the work before it: its key is the lowered
module, so a warm restart still traces the model through every unrolled layer and lowers it, once per step shape.
For a 32-layer model that is most of a warm restart's first request (4.5 of 5.3 s on the CI machine,
benchmarks/RESULTS.md). This store is keyed by what determines a program before it is traced (the code that
traces it, the JAX and XLA versions, the device, the model, the step's shapes) and holds the compiled executable
(jax.experimental.serialize_executable), so a hit costs one file read and a load.

A stale entry cannot be picked: any change to the code under runner/ or pallas_kernels/, to JAX, jaxlib, XLA_FLAGS
or the device changes every key. An entry that fails to load is compiled again and rewritten.

Loading is not free either (0.65 s for the 8B shape's two forward programs on an H100), so a runner starts loading
its model's most recently used entries on background threads as soon as it knows its model, and its first steps
take them from there.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import hashlib
import logging
import os
import pickle
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import jax
from jax._src import config as jax_config
from jax.experimental import serialize_executable

log = logging.getLogger(__name__)

_SOURCES = ("runner", "pallas_kernels")  # the packages whose code shapes a traced program
_JAX_OPTIONS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_numpy_rank_promotion")

# Programs this process compiled or loaded through a store: each is a stall when it happens mid-serving.
programs_made = 0
_count_lock = threading.Lock()  # warm-up makes programs on several threads
# On XLA:CPU a stored program is compiled with JAX's cache off: an executable that went through that cache
# serializes without its kernels, and a later process that loads it fails to run it ("Function ... not found").
# Nowhere else: JAX reads the switch once per process, when its cache is first used, so around a process's first
# compilation it turned the cache off for the whole process (every program not in the store then compiled at every
# start); GPU executables serialize whole either way.
_cache_switch = getattr(jax_config, "enable_compilation_cache", None)  # thread-local, as warm-up's threads need


def source_digest(root: Path) -> str:
    """A digest of the Python sources under root/runner and root/pallas_kernels: the code that traces the programs."""
    digest = hashlib.sha256()
    for package in _SOURCES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """A digest of the sources that trace the step programs and of the JAX, XLA and device they compile for."""
    digest = hashlib.sha256(source_digest(Path(__file__).resolve().parent.parent).encode())
    import jaxlib
    device = jax.devices()[0]
    facts = [jax.__version__, jaxlib.__version__, device.platform, device.device_kind,
             getattr(device.client, "platform_version", ""), os.environ.get("XLA_FLAGS", "")]
    facts += [f"{name}={getattr(jax.config, name, None)}" for name in _JAX_OPTIONS]
    digest.update("\0".join(map(str, facts)).encode())
    return digest.hexdigest()


def signature(args: Any) -> tuple:
    """What a compiled program fixes of its arguments: their tree (static fields included) and each leaf's shape
    and dtype. Hashable, and its str is stable across processes."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((x.shape, x.dtype) for x in leaves)


def _jax_cache_dir() -> str | None:
    return jax.config.jax_compilation_cache_dir


def beside_compilation_cache() -> ProgramStore | None:
    """The store in this process's JAX compilation cache directory (its nexus-programs/), None without one: an
    engine and its worker processes, which get the cache through their environment, share it that way.

    GPUs only. XLA:CPU splits a large module's code generation into parts, and its serialized executable lacks
    all but one: a later process loads it and fails to run it ("Function bitcast_gather_fusion.5 not found", the
    multi-process CPU tests; they pass with XLA_FLAGS=--xla_cpu_parallel_codegen_split_count=1). A GPU
    executable is serialized whole, as JAX's own cache relies on."""
    directory = _jax_cache_dir()
    if not directory or jax.devices()[0].platform != "gpu":
        return None
    return ProgramStore(os.path.join(directory, "nexus-programs"))


class ProgramStore:
    """Serialized executables under `directory`, one file per (program, model, step shape), at most `max_bytes` of
    them: every change to the code makes new keys, so without a bound the entries of past versions would pile up
    (an 8B warm-up stores dozens of programs); a write past the bound removes the least recently used entries."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int = 16 << 30):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str, model: str, shapes: str) -> Path:
        """The entry of program `name` for `model` at `shapes`. Its name leads with a digest of the code and the
        model alone, so that the entries of one model are found without knowing their shapes (`recent`)."""
        digest = hashlib.sha256(f"{code_fingerprint()}\0{name}\0{model}\0{shapes}".encode()).hexdigest()[:32]
        return self.directory / f"{name}-{self._owner(model)}-{digest}.xla"

    @staticmethod
    def _owner(model: str) -> str:
        return hashlib.sha256(f"{code_fingerprint()}\0{model}".encode()).hexdigest()[:16]

    def recent(self, model: str, limit: int) -> list[Path]:
        """Up to `limit` entries of `model`, the most recently used first (using one refreshes its time)."""
        found = []
        for path in self.directory.glob(f"*-{self._owner(model)}-*.xla"):
            try:
                found.append((path.stat().st_mtime, path))
            except FileNotFoundError:  # replaced meanwhile by another process
                continue
        return [path for _, path in sorted(found, reverse=True)[:limit]]

    def load(self, path: Path, device: jax.Device | None = None) -> jax.stages.Compiled:
        """The executable stored at `path` (raises when it is missing or does not load)."""
        payload, in_tree, out_tree = pickle.loads(path.read_bytes())
        return serialize_executable.deserialize_and_load(
            payload, in_tree, out_tree, execution_devices=None if device is None else [device])

    def executable(self, name: str, model: str, shapes: str, lower: Callable[[], jax.stages.Lowered],
                   device: jax.Device | None = None, loading: concurrent.futures.Future | None = None
                   ) -> jax.stages.Compiled:
        """The program `name` of `model` at `shapes`: loaded from the store (or taken from `loading`, a load of its
        entry already under way), else lowered, compiled and stored. `device` is where it runs (None: JAX's
        default device)."""
        global programs_made
        with _count_lock:
            programs_made += 1
        path = self.path(name, model, shapes)
        if loading is not None or path.is_file():
            try:
                compiled = loading.result() if loading is not None else self.load(path, device)
                with contextlib.suppress(OSError):
                    os.utime(path)  # used now: `recent` offers it first
                return compiled
            except Exception as e:  # a torn or foreign file: compiled again below, and replaced
                log.warning("program store: %s did not load (%s: %s); compiling it again", path.name,
                            type(e).__name__, e)
        if (device or jax.devices()[0]).platform != "cpu":
            compiled = lower().compile()
        elif _cache_switch is None:  # a JAX without the switch: served, not stored (see _cache_switch)
            return lower().compile()
        else:
            with _cache_switch(False):
                compiled = lower().compile()
        try:
            self._write(path, pickle.dumps(serialize_executable.serialize(compiled)))
        except Exception as e:  # a full disk or an executable the backend cannot serialize: served uncached
            log.warning("program store: %s not stored (%s: %s)", path.name, type(e).__name__, e)
        return compiled

    def _write(self, path: Path, data: bytes) -> None:
        # Written aside and renamed: a process reading the store never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        self._prune(keep=path)

    def _prune(self, keep: Path) -> None:
        """Removes the least recently used entries until the store holds at most max_bytes (`keep` stays). An entry
        removed while another process loads it is compiled again there (a failed load's path)."""
        entries = []
        for path in self.directory.glob("*.xla"):
            with contextlib.suppress(FileNotFoundError):
                st = path.stat()
                entries.append((st.st_mtime, path, st.st_size))
        total = sum(size for _, _, size in entries)
        for _, path, size in sorted(entries):
            if total <= self.max_bytes:
                break
            if path != keep:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                total -= size


# Programs a runner starts loading at its start: a first request needs four (its prefill's and its decode's forward
# and sampler); a few more cover the next steps' shapes.
PREFETCH = 8


class ModelPrograms:
    """Calls a runner's step programs (runner.programs.forward, decode_steps, sample_step): straight through jit
    without a store; with one, through the executable it holds for the call's shapes, looked up once per shape in
    this process. The sampler is stored too: a warm restart that loaded the forward programs still spent 1.5 s
    compiling its two samplers on an H100 (RESULTS.md, "front-cold"), and lowering them only to find JAX's cache
    key is tracing the store skips. The runner's model and weights are fixed, so they are in `model_key`, not in
    the per-call lookup (flattening 200+ weight arrays per step would be host time the GPU waits on)."""

    # Each program's static arguments (its jit's) and how many of its leading arguments are the runner's model
    # (ModelDef, weights).
    PROGRAMS = {"forward": ((0,), 2), "decode_steps": ((0, 5), 2), "sample_step": ((2,), 0)}

    def __init__(self, store: ProgramStore | None, model_key: str, device: jax.Device | None,
                 prefetch: int = PREFETCH):
        """With a store, starts loading the model's `prefetch` most recently used programs on background threads
        (a load releases the GIL), so that a restart's first steps find them loaded or loading while it builds
        the rest of the engine, not one after the other on its critical path."""
        self.store, self.model_key, self.device = store, model_key, device
        self._loaded: dict[tuple, jax.stages.Compiled] = {}
        self._loading: dict[str, concurrent.futures.Future] = {}
        if store is not None and prefetch > 0:
            recent = store.recent(model_key, prefetch)
            if recent:
                pool = concurrent.futures.ThreadPoolExecutor(min(len(recent), 4), "program-prefetch")
                self._loading = {path.name: pool.submit(store.load, path, device) for path in recent}
                pool.shutdown(wait=False)

    def __call__(self, fn: Any, *args: Any) -> Any:
        if self.store is None:
            return fn(*args)
        compiled, dynamic = self._lookup(fn, args)
        return compiled(*dynamic)

    def executable(self, fn: Any, *args: Any) -> jax.stages.Compiled:
        """The compiled program a call with these arguments runs (warm-up compiles through this)."""
        if self.store is None:
            return fn.lower(*args).compile()
        return self._lookup(fn, args)[0]

    def _lookup(self, fn: Any, args: tuple) -> tuple[jax.stages.Compiled, tuple]:
        static, model = self.PROGRAMS[fn.__name__]
        dynamic = tuple(a for i, a in enumerate(args) if i not in static)
        key = (fn.__name__, tuple(args[i] for i in static if i >= model),
               signature(tuple(a for i, a in enumerate(args) if i >= model and i not in static)))
        compiled = self._loaded.get(key)
        if compiled is None:
            shapes = f"{key[1]}|{key[2]}"
            loading = self._loading.pop(self.store.path(fn.__name__, self.model_key, shapes).name, None)
            compiled = self._loaded[key] = self.store.executable(
                fn.__name__, self.model_key, shapes, lambda: fn.lower(*args), self.device, loading)
        return compiled, dynamic
