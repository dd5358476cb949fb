"""One table for tensor names: edgelora's canonical names, Hugging Face's and llama.cpp's (GGUF).

A canonical name is short and per layer: ``layers.{i}.q``. Linear weights are kept in Hugging
Face orientation (out x in) and, for q and k, in Hugging Face row order (GGUF permutes those rows
for its RoPE kernel; converters undo and redo that permutation, see `rope_permute`).
"""

from __future__ import annotations

import re

import numpy as np

# canonical suffix -> (Hugging Face name, GGUF name). {i} is the layer index.
# Sources: transformers' modeling_llama.py for HF names; llama.cpp gguf-py constants.py
# (MODEL_TENSOR.ATTN_Q -> "blk.{bid}.attn_q" and friends) for GGUF names.
LAYER_TENSORS: dict[str, tuple[str, str]] = {
    "attn_norm": ("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "q": ("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "k": ("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "v": ("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "o": ("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "mlp_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
    "gate": ("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "up": ("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "down": ("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
}
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}

# The linear modules a LoRA adapter may target, in canonical order.
LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
# The usual PEFT module names of the same targets.
PEFT_MODULES: dict[str, str] = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}

_HF, _GGUF = 0, 1


def canonical_names(num_layers: int, tied: bool) -> list[str]:
    """Every weight of a Llama model in canonical order (the order fingerprints hash in)."""
    names = ["embed"]
    for i in range(num_layers):
        names += [f"layers.{i}.{s}" for s in LAYER_TENSORS]
    names.append("norm")
    if not tied:
        names.append("lm_head")
    return names


def _build(which: int) -> tuple[dict[str, str], list[tuple[re.Pattern[str], str]]]:
    fixed = {name: pair[which] for name, pair in GLOBAL_TENSORS.items()}
    patterns = [
        (re.compile("^" + re.escape(pair[which]).replace(r"\{i\}", r"(\d+)") + "$"), suffix)
        for suffix, pair in LAYER_TENSORS.items()
    ]
    return fixed, patterns


_TABLES = {which: _build(which) for which in (_HF, _GGUF)}


def _to_external(name: str, which: int) -> str:
    fixed, _ = _TABLES[which]
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
    if m and m.group(2) in LAYER_TENSORS:
        return LAYER_TENSORS[m.group(2)][which].format(i=int(m.group(1)))
    raise KeyError(f"not a canonical tensor name: {name!r}")


def _from_external(name: str, which: int) -> str | None:
    fixed, patterns = _TABLES[which]
    for canon, ext in fixed.items():
        if ext == name:
            return canon
    for pattern, suffix in patterns:
        m = pattern.match(name)
        if m:
            return f"layers.{int(m.group(1))}.{suffix}"
    return None


def to_hf(name: str) -> str:
    return _to_external(name, _HF)


def to_gguf(name: str) -> str:
    return _to_external(name, _GGUF)


def from_hf(name: str) -> str | None:
    """Canonical name of a Hugging Face tensor name, or None if the table has no such tensor."""
    return _from_external(name, _HF)


def from_gguf(name: str) -> str | None:
    return _from_external(name, _GGUF)


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face q/k row order -> GGUF row order (llama.cpp's convert_hf_to_gguf permute).

    Within each head HF keeps the rotary pairs as (first half, second half); GGUF interleaves them.
    Works on weights (out x in) and on LoRA B matrices (out x r) alike.
    """
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def rope_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF q/k row order -> Hugging Face row order; the inverse of `rope_permute`."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )
