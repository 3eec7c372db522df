"""Zero-copy safetensors reading: parse the header ourselves and memory-map the tensor data.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor name to
{"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the header), then the raw data.
Reading a tensor returns a numpy view into the mapping, so host memory holds no copy of the weights; bf16 works
through ml_dtypes without torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

NUMPY_DTYPES = {"BF16": np.dtype(ml_dtypes.bfloat16), "F16": np.dtype(np.float16), "F32": np.dtype(np.float32)}

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors spelling, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offsets in the file
    end: int


def numpy_dtype(info: TensorInfo, name: str) -> np.dtype:
    if info.dtype not in NUMPY_DTYPES:
        raise ValueError(f"tensor {name} has unsupported dtype {info.dtype}; supported: {', '.join(NUMPY_DTYPES)}")
    return NUMPY_DTYPES[info.dtype]


class SafetensorsFile:
    """One memory-mapped .safetensors file; `tensors` describes its contents without reading any data."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(0)
            if size < 8:
                raise ValueError(f"{self.path} is not a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", f.read(8))
            if 8 + header_len > size:
                raise ValueError(f"{self.path}: header length {header_len} runs past the end of the file")
            try:
                header = json.loads(f.read(header_len))
            except ValueError as e:
                raise ValueError(f"{self.path}: header is not valid JSON ({e})") from None
            # The mapping stays valid after the file object is closed.
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        data_start = 8 + header_len
        self.tensors: dict[str, TensorInfo] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, end = entry["data_offsets"]
            if not 0 <= begin <= end <= size - data_start:
                raise ValueError(f"{self.path}: tensor {name} has data offsets {entry['data_offsets']} "
                                 "outside the file")
            self.tensors[name] = TensorInfo(entry["dtype"], tuple(entry["shape"]), data_start + begin, data_start + end)

    def read(self, name: str) -> np.ndarray:
        """A read-only view of tensor `name`; it keeps the mapping alive, so drop it before `close()`."""
        info = self.tensors[name]
        dtype = numpy_dtype(info, name)
        count = math.prod(info.shape)
        if info.end - info.start != count * dtype.itemsize:
            raise ValueError(f"{self.path}: tensor {name} has {info.end - info.start} bytes of data, "
                             f"but shape {info.shape} of {info.dtype} needs {count * dtype.itemsize}")
        return np.frombuffer(self._mmap, dtype, count, info.start).reshape(info.shape)

    def close(self) -> None:
        try:
            self._mmap.close()
        except BufferError:
            # On CPU, jax may still hold a zero-copy view of a tensor (e.g. inside a cached conversion); the
            # mapping is then released by the garbage collector when that view goes.
            pass


class CheckpointReader:
    """All safetensors files of a checkpoint seen as one name -> tensor mapping."""

    def __init__(self, files: list[Path]) -> None:
        self._files: list[SafetensorsFile] = []
        self._owner: dict[str, SafetensorsFile] = {}
        try:
            for path in files:
                st = SafetensorsFile(path)
                self._files.append(st)
                for name in st.tensors:
                    if name in self._owner:
                        raise ValueError(f"tensor {name} appears in both {self._owner[name].path} and {path}")
                    self._owner[name] = st
        except BaseException:
            self.close()
            raise
        self.tensors: dict[str, TensorInfo] = {name: st.tensors[name] for name, st in self._owner.items()}

    def read(self, name: str) -> np.ndarray:
        return self._owner[name].read(name)

    def close(self) -> None:
        for st in self._files:
            st.close()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a Hugging Face model directory: the shards its index names, or model.safetensors."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    index = model_dir / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{index} names shard {path}, which does not exist")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")
