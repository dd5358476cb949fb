"""Weights as a format stores them: `BlockQuant`, the block encodings both GGUF (Q8_0, Q4_0, Q4_1)
and ONNX Runtime's MatMulNBits (int4/int8 with zero points, edgelora's exact-Q4_1 offsets) fit,

    w[n, 32 b + j] = (q[n, b, j] - zero[n, b]) * scale[n, b] + offset[n, b]

and `Stored`, a tensor kept as stored (float16, float32) or behind a loader. The format readers
hand these to the trainer, which expands a layer at a time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

BLK = 32


@dataclass
class BlockQuant:
    """w = (q - zero) * scale + offset per block of 32 along the input dimension (4-bit q packed
    two per byte, element 2j in the low nibble)."""
    shape: tuple[int, int]
    q: np.ndarray  # uint8/int8 (N, nb, 32), or (N, nb, 16) packed nibbles when bits == 4
    bits: int
    scale: np.ndarray  # float32 (N, nb)
    zero: np.ndarray | float = 0.0  # (N, nb) or a constant
    offset: np.ndarray | None = None  # float32 (N, nb)

    def expand(self, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 weight, written into `out` (N, K) when given (reused buffers: no page faults)."""
        q = self.q
        if self.bits == 4:
            u = np.empty((*q.shape[:-1], 2 * q.shape[-1]), np.uint8)
            u[..., 0::2], u[..., 1::2] = q & 0x0F, q >> 4
            q = u
        v = (np.empty(self.shape, np.float32) if out is None else out).reshape(q.shape)
        z = self.zero
        if np.ndim(z) or z:
            np.subtract(q, z[..., None] if np.ndim(z) else np.float32(z), out=v, dtype=np.float32)
            v *= self.scale[..., None]
        else:  # one pass: int8 * float32 -> float32
            np.multiply(q, self.scale[..., None], out=v, dtype=np.float32)
        if self.offset is not None:
            v += self.offset[..., None]
        return v.reshape(self.shape)

    def rows(self, perm: np.ndarray) -> "BlockQuant":
        """These rows (a permutation, or a fused tensor's share) as their own weight."""
        take = lambda a: a[perm] if isinstance(a, np.ndarray) and a.ndim else a  # noqa: E731
        return BlockQuant((len(perm), self.shape[1]), take(self.q), self.bits, take(self.scale), take(self.zero), take(self.offset))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.scale, self.zero, self.offset) if isinstance(a, np.ndarray))


@dataclass
class Stored:
    """A tensor kept as it is stored (float16, float32) or behind a loader (other GGUF types)."""
    array: np.ndarray | None = None
    load: Callable[[], np.ndarray] | None = None

    def expand(self, out: np.ndarray | None = None) -> np.ndarray:
        w = self.array if self.array is not None else self.load()
        if out is None:
            return np.array(w, np.float32)
        np.copyto(out, w)
        return out

    @property
    def nbytes(self) -> int:
        return self.array.nbytes if self.array is not None else 0
