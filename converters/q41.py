"""Exact Q4_1 weights in the layout of edgelora's ONNX Runtime operator `MatMulQ41`
(native/edgelora_ort.cc): w[n, k] = d * code + m per block of 32 along k, d and m in fp16.

`pack` writes the codes and scales of 8 output columns, block by block, into one uint8 stream of
160-byte tiles [ceil(N/8), K/32, 160], so the operator reads each group of columns front to back:
4 pairs of 32 code bytes (column i's block then column i + 4's, each in llama.cpp's nibble order:
codes 0..15 in the low nibbles, 16..31 in the high), then the 8 columns' d, then their m, in fp16.
`unpack` reads a stream back as a `BlockQuant` (the trainer's compact reader).
"""

from __future__ import annotations

import numpy as np

from .blocks import BLK, BlockQuant

GROUP, TILE = 8, 160


def quantize(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """w [N, K] (K a multiple of 32) -> (codes uint8 [N, K/32, 32], d, m float32 [N, K/32]) in Q4_1
    with fp16 d and m, as llama.cpp quantizes (m the block's minimum, d its range / 15); a weight that
    is already exactly such a Q4_1 tensor comes back unchanged."""
    n, k = w.shape
    b = w.reshape(n, k // BLK, BLK).astype(np.float32)
    m = b.min(-1).astype(np.float16).astype(np.float32)
    d = ((b.max(-1).astype(np.float64) - m) / 15).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((b - m[..., None]) / np.where(d > 0, d, 1)[..., None]), 0, 15).astype(np.uint8)
    return q, d, m


def pack(q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(codes [N, nb, 32], d, m [N, nb]) -> the operator's tiles, uint8 [ceil(N/8), nb, 160] (the last
    group padded with zero columns)."""
    n, nb, _ = q.shape
    ng = -(-n // GROUP)
    nibbles = np.zeros((ng * GROUP, nb, 16), np.uint8)
    nibbles[:n] = q[..., :16] | (q[..., 16:] << 4)
    codes = nibbles.reshape(ng, 2, 4, nb, 16).transpose(0, 3, 2, 1, 4).reshape(ng, nb, 128)  # (g, b, pair i, half h)

    def lanes(a: np.ndarray) -> np.ndarray:  # [N, nb] -> fp16 bytes (g, b, 8 columns)
        full = np.zeros((ng * GROUP, nb), np.float16)
        full[:n] = a
        return np.ascontiguousarray(full.reshape(ng, GROUP, nb).transpose(0, 2, 1)).view(np.uint8)

    return np.ascontiguousarray(np.concatenate([codes, lanes(d), lanes(m)], -1))


def unpack(tiles: np.ndarray, n: int) -> BlockQuant:
    """The operator's tiles for N = n output columns -> the weight as a `BlockQuant` (GGUF nibble order)."""
    ng, nb, _ = tiles.shape
    codes = tiles[..., :128].reshape(ng, nb, 4, 2, 16).transpose(0, 3, 2, 1, 4).reshape(ng * GROUP, nb, 16)[:n]

    def columns(a: np.ndarray) -> np.ndarray:  # fp16 bytes (g, b, 8) -> float32 [N, nb]
        return np.ascontiguousarray(a).view(np.float16).reshape(ng, nb, GROUP).transpose(0, 2, 1).reshape(-1, nb)[:n]

    return BlockQuant((n, nb * BLK), np.ascontiguousarray(codes), 4, columns(tiles[..., 128:144]).astype(np.float32),
                      0.0, columns(tiles[..., 144:160]).astype(np.float32), halves=True)
