"""Rotary position embeddings of every supported family, in numpy, as transformers computes them.

`inv_freq` gives the rotary inverse frequencies and the attention scaling (LongRoPE multiplies cos
and sin by it) of one layer; `cos_sin` the tables for a range of positions. The trainer, the
fused ONNX graph's caches and the NPU graphs all take their RoPE from here. Each step is rounded
as torch rounds it in float32 (transformers' modeling_rope_utils.py, 4.57): the powers correctly
rounded to float32 then a float32 reciprocal, the products in float32.

Which RoPE a layer uses: Gemma 3's sliding-window layers use `rope_local_theta` with no scaling,
its global layers `rope_theta` with the config's scaling; every other family has one RoPE.
Phi-3's LongRoPE switches from the short to the long factors when a sequence is longer than
`original_max_position_embeddings` (`seq_len`).
"""

from __future__ import annotations

import math

import numpy as np

from .arch import ModelConfig


def _default(theta: float, dim: int) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)           # (dim/2,)
    return np.float32(1.0) / (theta ** exponent.astype(np.float64)).astype(np.float32)             # (dim/2,)


def _llama3(inv: np.ndarray, rope: dict) -> np.ndarray:
    f32 = np.float32
    factor, low, high = f32(rope["factor"]), f32(rope["low_freq_factor"]), f32(rope["high_freq_factor"])
    old = f32(rope["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = f32(2 * math.pi) / inv
    scaled = np.where(wavelen > low_wavelen, inv / factor, inv).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def inv_freq(config: ModelConfig, *, sliding: bool = False, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """(inverse frequencies (rot_dim/2,) float32, attention scaling) of a layer's RoPE."""
    dim = config.rot_dim
    if sliding and config.rope_local_theta is not None:
        return _default(config.rope_local_theta, dim), 1.0
    rope, kind = config.rope, config.rope_type
    if kind == "default":
        return _default(config.rope_theta, dim), 1.0
    if kind == "linear":
        return (_default(config.rope_theta, dim) / np.float32(rope["factor"])).astype(np.float32), 1.0
    if kind == "llama3":
        return _llama3(_default(config.rope_theta, dim), rope), 1.0
    if kind == "longrope":
        orig = config.original_max_position_embeddings or config.max_position_embeddings
        factor = config.max_position_embeddings / orig
        scaling = rope.get("attention_factor")
        if scaling is None:
            scaling = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = np.asarray(rope["long_factor"] if seq_len is not None and seq_len > orig else rope["short_factor"],
                         np.float32)
        exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
        base_pow = (config.rope_theta ** exponent.astype(np.float64)).astype(np.float32)
        return (np.float32(1.0) / (ext * base_pow)).astype(np.float32), float(scaling)
    raise ValueError(f"unknown rope type {kind!r}")


def cos_sin(positions: np.ndarray, inv: np.ndarray, scaling: float = 1.0, dtype=np.float32):
    """(T,) positions -> cos, sin (T, rot_dim), the frequency halves side by side (HF layout)."""
    freqs = np.asarray(positions, np.float32)[:, None] * inv[None, :]                              # (T,rot/2) float32
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)                                # (T,rot)
    cos, sin = np.cos(emb).astype(np.float32), np.sin(emb).astype(np.float32)
    if scaling != 1.0:
        cos, sin = cos * np.float32(scaling), sin * np.float32(scaling)
    return cos.astype(dtype), sin.astype(dtype)


def layer_tables(config: ModelConfig, T: int, dtype=np.float32) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, (cos, sin) for positions 0..T-1 (layers with the same RoPE share the arrays)."""
    cache: dict[bool, tuple[np.ndarray, np.ndarray]] = {}
    out = []
    for i in range(config.num_layers):
        sliding = config.is_sliding(i) and config.rope_local_theta is not None
        if sliding not in cache:
            inv, scaling = inv_freq(config, sliding=sliding, seq_len=T)
            cache[sliding] = cos_sin(np.arange(T), inv, scaling, dtype)
        out.append(cache[sliding])
    return out
