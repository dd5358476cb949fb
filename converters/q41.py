"""Exact Q4_1 weights in the layout of edgelora's ONNX Runtime operator `MatMulQ41`
(native/edgelora_ort.cc): w[n, k] = d * code + m per block of 32 along k, d and m in fp16.

`pack` writes the codes and scales of 8 output columns, block by block, into one uint8 stream of
160-byte tiles [ceil(N/8), K/32, 160], so the operator reads each group of columns front to back:
4 pairs of 32 code bytes (column i's block then column i + 4's, each in llama.cpp's nibble order:
codes 0..15 in the low nibbles, 16..31 in the high), then the 8 columns' d, then their m, in fp16.
`unpack` reads a stream back as a `BlockQuant` (the trainer's compact reader).

The operator's 6-bit tiles (attribute bits=6, the LM head's: `quantize6`, `pack6`, `unpack6`) hold
w[n, k] = d * (code - 32), codes 0..63, in 208 bytes per group of 8 columns and block: the codes' low
nibbles as above, 4 pairs of 16 bytes of their high two bits (pair i's byte e: column i's codes e and
e + 16 at bits 0-1 and 4-5, column i + 4's at bits 2-3 and 6-7), then the 8 columns' d in fp16.
"""

from __future__ import annotations

import numpy as np

from .blocks import BLK, BlockQuant

GROUP, TILE, TILE6 = 8, 160, 208


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


def quantize6(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w [N, K] (K a multiple of 32) -> (codes uint8 [N, K/32, 32] in 0..63, d float32 [N, K/32]):
    w ~ d * (code - 32), d in fp16 with the block's signed extreme at code 0 (as llama.cpp's Q4_0 and
    Q5_0 place theirs)."""
    n, k = w.shape
    b = w.reshape(n, k // BLK, BLK).astype(np.float32)
    top = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)[..., 0]
    d = (top / -32).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(b / np.where(d == 0, 1, d)[..., None]), -32, 31) + 32
    return q.astype(np.uint8), d


def pack6(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(codes [N, nb, 32] in 0..63, d [N, nb]) -> the operator's 6-bit tiles, uint8 [ceil(N/8), nb, 208]."""
    n, nb, _ = q.shape
    ng = -(-n // GROUP)
    full = np.zeros((ng * GROUP, nb, BLK), np.uint8)
    full[:n] = q
    low = pack(full & 15, np.zeros((ng * GROUP, nb), np.float32), np.zeros((ng * GROUP, nb), np.float32))[..., :128]
    h = (full >> 4).reshape(ng, 2, 4, nb, 2, 16)  # (g, column half j, pair i, b, code half t, e)
    plane = (h[:, 0, :, :, 0] | (h[:, 1, :, :, 0] << 2) | (h[:, 0, :, :, 1] << 4) | (h[:, 1, :, :, 1] << 6))
    plane = plane.transpose(0, 2, 1, 3).reshape(ng, nb, 64)  # (g, b, pair i, e)
    scales = np.zeros((ng * GROUP, nb), np.float16)
    scales[:n] = d
    scales = np.ascontiguousarray(scales.reshape(ng, GROUP, nb).transpose(0, 2, 1)).view(np.uint8)
    return np.ascontiguousarray(np.concatenate([low, plane.astype(np.uint8), scales], -1))


def unpack6(tiles: np.ndarray, n: int) -> BlockQuant:
    """The operator's 6-bit tiles for N = n output columns -> the weight as a `BlockQuant` (8-bit codes
    with zero point 32)."""
    ng, nb, _ = tiles.shape
    low = unpack(np.concatenate([tiles[..., :128], np.zeros((ng, nb, 32), np.uint8)], -1), ng * GROUP).q
    codes = np.concatenate([low & 15, low >> 4], -1)  # [N, nb, 32], GGUF's nibble order undone
    plane = tiles[..., 128:192].reshape(ng, nb, 4, 16).transpose(0, 2, 1, 3)  # (g, pair i, b, e)
    for j in range(2):
        for t in range(2):
            part = (plane >> (2 * j + 4 * t)) & 3  # column i + 4j's codes 16t + e
            codes.reshape(ng, 2, 4, nb, 2, 16)[:, j, :, :, t] |= (part << 4).astype(np.uint8)
    d = np.ascontiguousarray(tiles[..., 192:208]).view(np.float16).reshape(ng, nb, GROUP).transpose(0, 2, 1).reshape(-1, nb)
    return BlockQuant((n, nb * BLK), np.ascontiguousarray(codes[:n]), 8, d[:n].astype(np.float32), 32.0)


def unpack(tiles: np.ndarray, n: int) -> BlockQuant:
    """The operator's tiles for N = n output columns -> the weight as a `BlockQuant` (GGUF nibble order)."""
    ng, nb, _ = tiles.shape
    codes = tiles[..., :128].reshape(ng, nb, 4, 2, 16).transpose(0, 3, 2, 1, 4).reshape(ng * GROUP, nb, 16)[:n]

    def columns(a: np.ndarray) -> np.ndarray:  # fp16 bytes (g, b, 8) -> float32 [N, nb]
        return np.ascontiguousarray(a).view(np.float16).reshape(ng, nb, GROUP).transpose(0, 2, 1).reshape(-1, nb)[:n]

    return BlockQuant((n, nb * BLK), np.ascontiguousarray(codes), 4, columns(tiles[..., 128:144]).astype(np.float32),
                      0.0, columns(tiles[..., 144:160]).astype(np.float32), halves=True)
