"""Weights as a format stores them: `BlockQuant`, the block encodings both GGUF (Q8_0, Q4_0, Q4_1)
and ONNX Runtime's MatMulNBits (int4/int8 with zero points, edgelora's exact-Q4_1 offsets) fit,

    w[n, 32 b + j] = (q[n, b, j] - zero[n, b]) * scale[n, b] + offset[n, b]

and `Stored`, a tensor kept as stored (float16, float32) or behind a loader. The format readers
hand these to the trainer, which expands a layer at a time. The arrays may be strided views of a
memory-mapped file (the codes of GGUF's interleaved blocks): they are not copied, and the file's
pages stay clean, so the OS can drop them under memory pressure and read them again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

BLK = 32


@dataclass
class BlockQuant:
    """w = (q - zero) * scale + offset per block of 32 along the input dimension (4-bit q packed
    two per byte: element 2j in the low nibble of byte j, or with `halves` GGUF's order, element j
    in the low nibble and element 16 + j in the high)."""
    shape: tuple[int, int]
    q: np.ndarray  # uint8/int8 (N, nb, 32), or (N, nb, 16) packed nibbles when bits == 4
    bits: int
    scale: np.ndarray  # float32 (N, nb)
    zero: np.ndarray | float = 0.0  # (N, nb) or a constant
    offset: np.ndarray | None = None  # float32 (N, nb)
    halves: bool = False  # 4-bit nibble order (above)

    def expand(self, out: np.ndarray | None = None) -> np.ndarray:
        """The float32 weight, written into `out` (N, K) when given (reused buffers: no page faults)."""
        q = self.q
        if self.bits == 4:
            u = np.empty((*q.shape[:-1], 2 * q.shape[-1]), np.uint8)
            lo, hi = (u[..., :16], u[..., 16:]) if self.halves else (u[..., 0::2], u[..., 1::2])
            np.bitwise_and(q, 0x0F, out=lo)
            np.right_shift(q, 4, out=hi)
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
        return BlockQuant((len(perm), self.shape[1]), take(self.q), self.bits, take(self.scale), take(self.zero),
                          take(self.offset), self.halves)

    def span(self, start: int, end: int) -> "BlockQuant":
        """Rows start:end, as views."""
        cut = lambda a: a[start:end] if isinstance(a, np.ndarray) and a.ndim else a  # noqa: E731
        return BlockQuant((end - start, self.shape[1]), cut(self.q), self.bits, cut(self.scale), cut(self.zero),
                          cut(self.offset), self.halves)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.scale, self.zero, self.offset) if isinstance(a, np.ndarray))


class BlockRows:
    """A (V, C) table kept in blocks and read by rows, float32 to its users: an embedding (rows
    gathered and expanded) or an LM head (expanded `chunk_rows` rows at a time into one reused
    buffer, never whole: at a 128k vocabulary the float32 table would be 1 GB)."""

    dtype = np.dtype(np.float32)
    ndim = 2

    def __init__(self, blocks: BlockQuant, chunk_rows: int | None = None):
        self.blocks, self.shape = blocks, blocks.shape
        self.chunk_rows = chunk_rows or max(1, (1 << 22) // self.shape[1])  # 16 MB a chunk
        self._buf: np.ndarray | None = None

    def __getitem__(self, rows) -> np.ndarray:
        """Integer row ids of any shape -> (*shape, C) float32, a new array."""
        idx = np.asarray(rows)
        return self.blocks.rows(idx.reshape(-1)).expand().reshape(*idx.shape, self.shape[1])

    def chunks(self):
        """(start, end, rows start:end as float32) over the table; each chunk's array is the same
        buffer, overwritten by the next."""
        v = self.shape[0]
        n = min(self.chunk_rows, v)
        if self._buf is None or self._buf.shape[0] != n:
            self._buf = np.empty((n, self.shape[1]), np.float32)
        for s in range(0, v, n):
            e = min(v, s + n)
            yield s, e, self.blocks.span(s, e).expand(self._buf[:e - s])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if copy is False:
            raise ValueError("a table kept in blocks has no float32 array to view: expanding it copies")
        w = self.blocks.expand()
        return w if dtype is None else w.astype(dtype, copy=False)

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes


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

    def span(self, start: int, end: int) -> "Stored":
        """Rows start:end (of a stored array), as a view."""
        return Stored(self.array[start:end])

    @property
    def nbytes(self) -> int:
        return self.array.nbytes if self.array is not None else 0
