"""safetensors: a reader that memory-maps tensors (including bfloat16, which numpy lacks) and
checks the file's structure first, and a writer that goes through `safetensors.numpy`.

Format: 8-byte little-endian header length N, N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelora._io import atomic_file
from edgelora.errors import CorruptFileError

# safetensors dtype string -> (numpy dtype of the stored bits, bytes per element)
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),  # widened to float32 on load
}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorRef:
    path: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute, in the file
    nbytes: int

    def load(self) -> np.ndarray:
        """The tensor as float32 (bfloat16 and float16 widen exactly)."""
        stored, _ = DTYPES[self.dtype]
        count = int(np.prod(self.shape)) if self.shape else 1
        raw = np.memmap(self.path, dtype=stored, mode="r", offset=self.offset, shape=(count,))
        if self.dtype == "BF16":
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = np.asarray(raw, dtype=np.float32)
        return out.reshape(self.shape)


def read_index(path: str | os.PathLike) -> tuple[dict[str, TensorRef], dict[str, str]]:
    """Validates a .safetensors file and returns its tensors (not loaded) and metadata."""
    path = Path(path)
    size = path.stat().st_size
    what = f"{path}: not a valid safetensors file"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{what} (only {size} bytes): re-download or re-export it")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CorruptFileError(f"{what} (header of {n} bytes in a {size}-byte file): it is truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"{what} (header is not JSON: {e}): re-download or re-export it") from e
    if not isinstance(header, dict):
        raise CorruptFileError(f"{what} (header is not a JSON object): re-download or re-export it")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    refs: dict[str, TensorRef] = {}
    end_max = 0
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{what} (entry {name!r} is malformed): re-download or re-export it") from e
        if dtype not in DTYPES:
            raise CorruptFileError(f"{path}: tensor {name!r} has dtype {dtype}, edgelora reads only {', '.join(DTYPES)}")
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype][1]
        if end - begin != nbytes or begin < 0:
            raise CorruptFileError(f"{what} (tensor {name!r} spans {end - begin} bytes, its shape needs {nbytes})")
        if data_start + end > size:
            raise CorruptFileError(
                f"{path}: truncated safetensors file ({size} bytes, tensor {name!r} ends at {data_start + end}): re-download or re-export it")
        end_max = max(end_max, end)
        refs[name] = TensorRef(path, name, dtype, shape, data_start + begin, nbytes)
    return refs, metadata


def write(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes tensors atomically (temporary name, fsync, rename)."""
    from safetensors.numpy import save_file

    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp), metadata=metadata)
