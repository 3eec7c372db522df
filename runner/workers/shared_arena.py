"""One flat buffer shared between processes, with zero-copy JAX views (weights and KV pool for the MPS runner).

Two forms behind one API:
- "cuda": a plain `cudaMalloc` through cupy (`cp.cuda.Memory`, not cupy's pool, so the IPC handle covers exactly
  this allocation), exported with `cudaIpcGetMemHandle`; peers map it with `cudaIpcOpenMemHandle` (which fails
  inside the exporting process itself). Views go cupy -> DLPack -> JAX. Measured on H100 (jax 0.11.2): zero-copy,
  and a jitted update with `donate_argnums` writes in place, so workers update the shared KV pool directly.
- "shm": `multiprocessing.shared_memory` on the host, the CPU form used by tests and CI.

Measured on CPU (jax 0.10.2, numpy 2.4): `jax.dlpack.from_dlpack(numpy_view, copy=False)` is zero-copy only when
the data pointer is 64-byte aligned (JAX raises otherwise; shm segments start page-aligned, so offsets must be
multiples of 64, which `plan_layout`'s default 256 guarantees). `jnp.asarray(numpy_view)` always copies. A donated
update is NOT in place on CPU (it returns a new buffer), so on CPU the arena is shared read-mostly memory: writes
go through `numpy()`/`write()` and show up in existing JAX views (JAX treats such external writes as undefined
behaviour, so write only while no computation reads the region). numpy and cupy cannot export bfloat16 through
DLPack; the arena views bf16 data as uint16 and relabels the DLPack dtype to bfloat16 (same bits, no copy).

Lifetime: every view (numpy, cupy, JAX) holds a reference to the memory, so `close()` drops the arena's own
hold and the memory is unmapped/freed/IPC-closed when the last view is gone; it never leaves a view dangling.
The owner unlinks the shm name at once. Keep the arena open while results of donated updates of its views are in
use (whether XLA carries the view's reference over to a donated result is not documented), and close the owner
of a CUDA arena after its peers are done with it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import numbers
import sys
from multiprocessing import resource_tracker, shared_memory
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("cuda", "shm")
_DL_BFLOAT = 4  # DLDataTypeCode kDLBfloat
_DLPACK_DTYPES = frozenset({"bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                            "float16", "bfloat16", "float32", "float64"})  # what JAX imports through DLPack


@dataclasses.dataclass(frozen=True)
class ArenaHandle:
    """What a peer needs to map the arena; picklable."""
    kind: str
    name: bytes | str
    nbytes: int
    device_id: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown arena kind {self.kind!r}; expected one of {KINDS}")
        if not isinstance(self.nbytes, numbers.Integral) or self.nbytes <= 0:
            raise ValueError(f"arena nbytes must be a positive int, got {self.nbytes!r}")
        if self.device_id < 0:
            raise ValueError(f"device_id must be >= 0, got {self.device_id}")


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize


class _Mapping:
    """Owns the mapped memory; every view references it, and the memory is released when the last one dies."""

    def __init__(self, address: int, nbytes: int, release):
        self.__array_interface__ = {"data": (address, False), "shape": (nbytes,), "typestr": "|u1", "version": 3}
        self.address, self._release = address, release

    def __del__(self):
        self._release()


def _cupy():
    try:
        import cupy
    except ImportError as e:
        raise RuntimeError("arena kind 'cuda' needs cupy (pip install cupy-cuda13x); use kind 'shm' on CPU") from e
    return cupy


def _attach_shm(name: str) -> shared_memory.SharedMemory:
    """Opens an existing segment without registering it with this process's resource tracker, which would
    otherwise unlink the owner's segment when this peer exits (Python < 3.13 registers on attach too)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    register = resource_tracker.register  # not thread-safe: open arenas from one thread at a time
    resource_tracker.register = lambda name, rtype: None
    try:
        return shared_memory.SharedMemory(name=name)
    finally:
        resource_tracker.register = register


class _DLTensor(ctypes.Structure):  # DLPack's DLTensor, with DLDevice and DLDataType flattened
    _fields_ = [("data", ctypes.c_void_p), ("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32),
                ("ndim", ctypes.c_int32), ("code", ctypes.c_uint8), ("bits", ctypes.c_uint8),
                ("lanes", ctypes.c_uint16), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("byte_offset", ctypes.c_uint64)]


# Private prototypes: setting restype on ctypes.pythonapi's shared function objects could clash with other code.
_capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))
_capsule_is_valid = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_IsValid", ctypes.pythonapi))
_VERSIONED_TENSOR_OFFSET = 32  # DLManagedTensorVersioned: version, manager_ctx, deleter, flags, then the DLTensor


class _AsBfloat16:
    """DLPack exporter of a uint16 numpy/cupy array as bfloat16: neither library knows bf16, JAX does."""

    def __init__(self, base):
        self.base = base

    def __dlpack_device__(self):
        return self.base.__dlpack_device__()

    def __dlpack__(self, stream=None, **kwargs):
        capsule = self.base.__dlpack__(stream=stream)
        if _capsule_is_valid(capsule, b"dltensor"):
            tensor = _DLTensor.from_address(_capsule_pointer(capsule, b"dltensor"))
        else:
            address = _capsule_pointer(capsule, b"dltensor_versioned") + _VERSIONED_TENSOR_OFFSET
            tensor = _DLTensor.from_address(address)
        tensor.code = _DL_BFLOAT
        return capsule


def _on_gpu(array: jax.Array) -> bool:
    devices = array.devices()
    if len(devices) != 1:
        raise ValueError(f"write() takes a single-device array, got one on {len(devices)} devices")
    return next(iter(devices)).platform == "gpu"


class SharedArena:
    handle: ArenaHandle

    def __init__(self, handle: ArenaHandle, mapping: _Mapping, cupy_memory=None, owner: bool = False):
        self.handle, self.owner = handle, owner
        self._mapping, self._cupy_memory = mapping, cupy_memory  # None once closed
        self._unlink = None

    @classmethod
    def create(cls, nbytes: int, kind: str) -> "SharedArena":
        """Allocates a zero-filled arena owned by this process."""
        if kind not in KINDS:
            raise ValueError(f"unknown arena kind {kind!r}; expected one of {KINDS}")
        if not isinstance(nbytes, numbers.Integral) or nbytes <= 0:
            raise ValueError(f"arena nbytes must be a positive int, got {nbytes!r}")
        nbytes = int(nbytes)
        if kind == "shm":
            shm = shared_memory.SharedMemory(create=True, size=nbytes)  # ftruncate: already zero
            arena = cls(ArenaHandle("shm", shm.name, nbytes), cls._shm_mapping(shm, nbytes), owner=True)
            arena._unlink = shm.unlink
            return arena
        cp = _cupy()
        device_id = cp.cuda.runtime.getDevice()
        memory = cp.cuda.Memory(nbytes)
        cp.cuda.runtime.memset(memory.ptr, 0, nbytes)
        cp.cuda.runtime.deviceSynchronize()
        name = bytes(cp.cuda.runtime.ipcGetMemHandle(memory.ptr))
        mapping = _Mapping(memory.ptr, nbytes, lambda: None)  # cupy frees when its Memory object dies
        return cls(ArenaHandle("cuda", name, nbytes, device_id), mapping, memory, owner=True)

    @classmethod
    def open(cls, handle: ArenaHandle) -> "SharedArena":
        """Maps an arena created by another process."""
        if handle.kind == "shm":
            shm = _attach_shm(handle.name)
            if shm.size < handle.nbytes:
                shm.close()
                raise ValueError(f"shm segment {handle.name} has {shm.size} bytes, handle says {handle.nbytes}")
            return cls(handle, cls._shm_mapping(shm, handle.nbytes))
        cp = _cupy()
        with cp.cuda.Device(handle.device_id):
            address = cp.cuda.runtime.ipcOpenMemHandle(handle.name)

        def release():
            try:
                with cp.cuda.Device(handle.device_id):
                    cp.cuda.runtime.ipcCloseMemHandle(address)
            except cp.cuda.runtime.CUDARuntimeError:
                pass  # the CUDA context is already gone at interpreter exit; the mapping went with it

        mapping = _Mapping(address, handle.nbytes, release)
        memory = cp.cuda.UnownedMemory(address, handle.nbytes, owner=mapping, device_id=handle.device_id)
        return cls(handle, mapping, memory)

    @staticmethod
    def _shm_mapping(shm: shared_memory.SharedMemory, nbytes: int) -> _Mapping:
        address = np.frombuffer(shm.buf, np.uint8).ctypes.data  # numpy keeps no buffer export on shm.buf
        return _Mapping(address, nbytes, shm.close)

    def _region(self, offset: int, shape: Sequence[int], dtype) -> tuple[np.dtype, tuple[int, ...], int]:
        if self._mapping is None:
            raise ValueError("arena is closed")
        dtype, shape = jnp.dtype(dtype), tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        nbytes = math.prod(shape) * dtype.itemsize
        if offset < 0 or offset + nbytes > self.handle.nbytes:
            raise ValueError(f"view [{offset}, {offset + nbytes}) is outside the arena of {self.handle.nbytes} bytes")
        return dtype, shape, nbytes

    def numpy(self, offset: int, shape: Sequence[int], dtype) -> np.ndarray:
        """Host view of a region (shm only); writes are seen by every process."""
        if self.handle.kind != "shm":
            raise ValueError("numpy() views need a host arena (kind 'shm'); a cuda arena lives on the GPU")
        dtype, shape, nbytes = self._region(offset, shape, dtype)
        return np.asarray(self._mapping)[offset:offset + nbytes].view(dtype).reshape(shape)

    def jax_array(self, offset: int, shape: tuple[int, ...], dtype) -> jax.Array:
        """Zero-copy JAX view of a region; raises if JAX would copy (misaligned offset, unsupported dtype)."""
        dtype, shape, nbytes = self._region(offset, shape, dtype)
        if dtype.name not in _DLPACK_DTYPES:
            raise ValueError(f"dtype {dtype} cannot be shared through DLPack; supported: {sorted(_DLPACK_DTYPES)}")
        if nbytes == 0:
            return jnp.zeros(shape, dtype)  # nothing to share
        storage = np.dtype(np.uint16) if dtype == jnp.bfloat16 else dtype
        if self.handle.kind == "shm":
            view = np.asarray(self._mapping)[offset:offset + nbytes].view(storage).reshape(shape)
        else:
            cp = _cupy()
            view = cp.ndarray(shape, storage, cp.cuda.MemoryPointer(self._cupy_memory, offset))
        array = jax.dlpack.from_dlpack(_AsBfloat16(view) if storage != dtype else view, copy=False)
        if array.unsafe_buffer_pointer() != self._mapping.address + offset:
            hint = " (64-bit dtypes need jax_enable_x64)" if dtype.itemsize == 8 else ""
            raise RuntimeError(f"JAX copied the {dtype} view at offset {offset} instead of aliasing the arena{hint}")
        return array

    def read(self, offset: int, shape: Sequence[int], dtype) -> np.ndarray:
        """Host copy of a region, for either kind (writes other processes completed before are visible)."""
        if self.handle.kind == "shm":
            return self.numpy(offset, shape, dtype).copy()
        dtype, shape, nbytes = self._region(offset, shape, dtype)
        host = np.empty(shape, dtype)
        cp = _cupy()
        cp.cuda.runtime.memcpy(host.ctypes.data, self._mapping.address + offset, nbytes,
                               cp.cuda.runtime.memcpyDefault)
        return host

    def write(self, offset: int, array) -> None:
        """Copies the raw bytes of a host or JAX array into the arena at `offset`; complete on return."""
        if isinstance(array, jax.Array) and self.handle.kind == "cuda" and _on_gpu(array):
            array = array.block_until_ready()
            self._region(offset, (array.nbytes,), np.uint8)
            self._cuda_copy(offset, array.unsafe_buffer_pointer(), array.nbytes)
            return
        host = np.ascontiguousarray(np.asarray(array))
        self._region(offset, (host.nbytes,), np.uint8)
        if self.handle.kind == "shm":
            np.asarray(self._mapping)[offset:offset + host.nbytes] = host.reshape(-1).view(np.uint8)
        else:
            self._cuda_copy(offset, host.ctypes.data, host.nbytes)

    def _cuda_copy(self, offset: int, source: int, nbytes: int) -> None:
        cp = _cupy()
        cp.cuda.runtime.memcpy(self._mapping.address + offset, source, nbytes, cp.cuda.runtime.memcpyDefault)
        cp.cuda.runtime.deviceSynchronize()  # a device-to-device memcpy may return before it is done

    def close(self) -> None:
        """Drops this process's hold; memory goes when the last view does. The owner unlinks an shm name now."""
        if self._unlink is not None:
            self._unlink()
            self._unlink = None
        self._mapping = self._cupy_memory = None


def plan_layout(shapes_dtypes: Sequence[tuple[tuple[int, ...], Any]], align: int = 256
                ) -> tuple[list[TensorSpec], int]:
    """Packs tensors back to back, each offset a multiple of `align` (a power of two, >= 64 for CPU zero-copy)."""
    if align <= 0 or align & (align - 1):
        raise ValueError(f"align must be a positive power of two, got {align}")
    specs, cursor = [], 0
    for shape, dtype in shapes_dtypes:
        shape = tuple(int(d) for d in shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        offset = -(-cursor // align) * align
        spec = TensorSpec(offset, shape, jnp.dtype(dtype).name)
        specs.append(spec)
        cursor = offset + spec.nbytes
    return specs, cursor


def export_arrays(arrays: Sequence[jax.Array | np.ndarray], kind: str) -> tuple[SharedArena, list[TensorSpec]]:
    """Creates an arena holding copies of `arrays`; send `arena.handle` and the specs to the workers."""
    if not arrays:
        raise ValueError("export_arrays needs at least one array")
    specs, total = plan_layout([(a.shape, a.dtype) for a in arrays])
    arena = SharedArena.create(max(total, 1), kind)
    for array, spec in zip(arrays, specs):
        arena.write(spec.offset, array)
    return arena, specs


def import_arrays(arena: SharedArena, specs: Sequence[TensorSpec]) -> list[jax.Array]:
    """Zero-copy JAX views of the tensors `export_arrays` laid out."""
    return [arena.jax_array(spec.offset, spec.shape, spec.dtype) for spec in specs]
