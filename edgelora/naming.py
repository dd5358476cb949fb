"""One table for tensor names: edgelora's canonical names, Hugging Face's and llama.cpp's (GGUF).

A canonical name is short and per layer: ``layers.{i}.q``. Linear weights are kept in Hugging
Face orientation (out x in) and, for q and k, in Hugging Face row order (llama.cpp's `llama`
architecture permutes those rows for its RoPE kernel; converters undo and redo that permutation,
see `rope_permute`). Canonical names are the same for every family; what differs is which of them
a family has (`Family.layer_tensors`) and how its files spell them. Where a family's files store
several canonical tensors as one (Phi-3's ``qkv_proj`` and ``gate_up_proj``), `layout` names the
members, stacked by rows in that order.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

from .arch import FAMILIES

if TYPE_CHECKING:
    from .arch import ModelConfig

# canonical suffix -> (Hugging Face name, GGUF name). {i} is the layer index.
# Sources: transformers' modeling_llama.py / modeling_qwen2.py / modeling_qwen3.py for HF names;
# llama.cpp gguf-py constants.py (MODEL_TENSOR.ATTN_Q -> "blk.{bid}.attn_q" and friends) for GGUF names.
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
    # Qwen2's q/k/v biases (llama.cpp LLM_ARCH_QWEN2: attn_q.bias ...)
    "q_bias": ("model.layers.{i}.self_attn.q_proj.bias", "blk.{i}.attn_q.bias"),
    "k_bias": ("model.layers.{i}.self_attn.k_proj.bias", "blk.{i}.attn_k.bias"),
    "v_bias": ("model.layers.{i}.self_attn.v_proj.bias", "blk.{i}.attn_v.bias"),
    # Qwen3's and Gemma 3's per-head q/k norms (MODEL_TENSOR.ATTN_Q_NORM / ATTN_K_NORM)
    "q_norm": ("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    "k_norm": ("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
}
# Where a family spells a canonical tensor its own way. Gemma 3 (modeling_gemma3.py) has four norms
# a layer: its `post_attention_layernorm` follows attention (llama.cpp's post_attention_norm) and
# `pre_feedforward_layernorm` is the MLP's input norm (llama.cpp's ffn_norm).
FAMILY_TENSORS: dict[str, dict[str, tuple[str, str]]] = {
    "gemma3": {
        "post_attn_norm": ("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"),
        "mlp_norm": ("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
        "post_mlp_norm": ("model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"),
    },
}
# Tensors a family's files store fused: (HF name, GGUF name, canonical members stacked by rows).
# Phi-3 (modeling_phi3.py qkv_proj, gate_up_proj; llama.cpp LLM_ARCH_PHI3 attn_qkv, ffn_up).
FUSED_TENSORS: dict[str, dict[str, tuple[str, str, tuple[str, ...]]]] = {
    "phi3": {
        "qkv": ("model.layers.{i}.self_attn.qkv_proj.weight", "blk.{i}.attn_qkv.weight", ("q", "k", "v")),
        "gate_up": ("model.layers.{i}.mlp.gate_up_proj.weight", "blk.{i}.ffn_up.weight", ("gate", "up")),
    },
}
GLOBAL_TENSORS: dict[str, tuple[str, str]] = {
    "embed": ("model.embed_tokens.weight", "token_embd.weight"),
    "norm": ("model.norm.weight", "output_norm.weight"),
    "lm_head": ("lm_head.weight", "output.weight"),
}

# The linear modules a LoRA adapter may target, in canonical order.
LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
# The usual PEFT module names of the same targets (Llama-style families).
PEFT_MODULES: dict[str, str] = {
    "q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj",
    "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
}

HF, GGUF = 0, 1
_FORMATS = {"hf": HF, "gguf": GGUF}


def _layer_table(family: str) -> dict[str, tuple[str, str]]:
    table = {**LAYER_TENSORS, **FAMILY_TENSORS.get(family, {})}
    return {s: table[s] for s in FAMILIES[family].layer_tensors}


def _which(fmt: str | int) -> int:
    return fmt if isinstance(fmt, int) else _FORMATS[fmt]


def layout(config: "ModelConfig", fmt: str | int) -> dict[str, tuple[str, ...]]:
    """External tensor name -> the canonical names it holds (stacked by rows), in the order a
    writer of `fmt` ("hf" or "gguf") writes them: every tensor of the model exactly once."""
    which = _which(fmt)
    table = _layer_table(config.family)
    fused = FUSED_TENSORS.get(config.family, {})
    member_of = {m: key for key, (_, _, members) in fused.items() for m in members}
    out: dict[str, tuple[str, ...]] = {}
    for name in config.canonical_names():
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
        if m is None:
            out[GLOBAL_TENSORS[name][which]] = (name,)
            continue
        i, suffix = int(m.group(1)), m.group(2)
        if suffix in member_of:
            ext = fused[member_of[suffix]][which].format(i=i)
            out.setdefault(ext, tuple(f"layers.{i}.{s}" for s in fused[member_of[suffix]][2]))
        else:
            out[table[suffix][which].format(i=i)] = (name,)
    return out


def external_name(name: str, fmt: str | int, family: str = "llama") -> str:
    """The file name of a canonical tensor; for a fused member, the fused tensor's name."""
    which = _which(fmt)
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name][which]
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name)
    if m:
        i, suffix = int(m.group(1)), m.group(2)
        for hf, gguf, members in FUSED_TENSORS.get(family, {}).values():
            if suffix in members:
                return (hf, gguf)[which].format(i=i)
        table = _layer_table(family)
        if suffix in table:
            return table[suffix][which].format(i=i)
    raise KeyError(f"not a canonical tensor name of a {family} model: {name!r}")


def members_of(external: str, fmt: str | int, family: str = "llama") -> tuple[str, ...] | None:
    """Canonical names an external tensor name holds (one, or a fused group), or None."""
    which = _which(fmt)
    for canon, pair in GLOBAL_TENSORS.items():
        if pair[which] == external:
            return (canon,)
    m = re.search(r"\.(\d+)\.", external)
    if m is None:
        return None
    i = int(m.group(1))
    for hf, gguf, members in FUSED_TENSORS.get(family, {}).values():
        if (hf, gguf)[which].format(i=i) == external:
            return tuple(f"layers.{i}.{s}" for s in members)
    for suffix, pair in _layer_table(family).items():
        if pair[which].format(i=i) == external:
            return (f"layers.{i}.{suffix}",)
    return None


def to_hf(name: str, family: str = "llama") -> str:
    return external_name(name, HF, family)


def to_gguf(name: str, family: str = "llama") -> str:
    return external_name(name, GGUF, family)


def _single(members: tuple[str, ...] | None) -> str | None:
    return members[0] if members and len(members) == 1 else None


def from_hf(name: str, family: str = "llama") -> str | None:
    """Canonical name of a Hugging Face tensor name, or None if the table has no such (single) tensor."""
    return _single(members_of(name, HF, family))


def from_gguf(name: str, family: str = "llama") -> str | None:
    return _single(members_of(name, GGUF, family))


def lora_modules(config: "ModelConfig", fmt: str | int) -> dict[str, tuple[str, ...]]:
    """The external linear modules a LoRA can target (weight names, ``.weight`` kept) -> the
    canonical targets each holds: Phi-3's ``qkv_proj`` is one module holding q, k and v."""
    return {ext: members for ext, members in layout(config, fmt).items()
            if members[0].rsplit(".", 1)[-1] in LORA_TARGETS}


def peft_module_names(family: str) -> dict[str, str]:
    """Canonical target kind -> the PEFT module name that holds it (``qkv_proj`` for Phi-3's q)."""
    out = dict(PEFT_MODULES)
    for hf, _, members in FUSED_TENSORS.get(family, {}).values():
        for m in members:
            out[m] = hf.rsplit(".", 2)[-2]
    return out


def split_rows(w: np.ndarray, members: tuple[str, ...], shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """A fused tensor (rows stacked in member order) -> its members."""
    out, r = {}, 0
    for m in members:
        n = shapes[m][0]
        out[m] = w[r:r + n]
        r += n
    if r != w.shape[0]:
        raise ValueError(f"{r} rows expected for {'+'.join(members)}, got {w.shape[0]}")
    return out


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


def gguf_permutes(config: "ModelConfig", canonical: str) -> int | None:
    """The head count to permute a canonical tensor's rows by in GGUF, or None (only the `llama`
    architecture permutes q and k, and their biases would be permuted too)."""
    if not config.spec.gguf_rope_permute:
        return None
    kind = canonical.rsplit(".", 1)[-1]
    return {"q": config.num_heads, "k": config.num_kv_heads}.get(kind)
