"""The model families edgelora supports, as data, and `ModelConfig`, one model's shape.

A family's differences from Llama live in one `Family` entry (which tensors a layer has, which
ops it runs, its names in Hugging Face and llama.cpp files); `ModelConfig` is one model of a
family, read from a Hugging Face ``config.json`` or GGUF metadata by the converters. Adding a
family is one entry here, its rows in `edgelora.naming`, and its ops where an engine computes
them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class Family:
    """What one model family computes differently from Llama (each flag is an op or a tensor)."""
    name: str                      # edgelora's name, also the fingerprint's "architecture"
    hf_model_types: tuple[str, ...]
    hf_class: str                  # the transformers class written into config.json
    gguf_arch: str                 # llama.cpp's architecture name
    layer_tensors: tuple[str, ...]  # canonical per-layer suffixes, in fingerprint order
    qkv_bias: bool = False         # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False          # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    norm_offset: float = 0.0       # RMSNorm multiplies by (offset + w) (Gemma: 1)
    activation: str = "silu"       # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    embed_scale: bool = False      # embeddings multiplied by sqrt(hidden) (Gemma)
    sandwich_norms: bool = False   # norms after attention and after the MLP too (Gemma 3)
    gguf_rope_permute: bool = False  # llama.cpp's `llama` arch stores q/k rows permuted
    fused_qkv: bool = False        # HF and GGUF store q|k|v as one matrix (Phi-3)
    fused_gate_up: bool = False    # HF and GGUF store gate|up as one matrix (Phi-3)
    rope_types: tuple[str, ...] = ("default",)


_LLAMA_LAYER = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama", "mistral"), "LlamaForCausalLM", "llama", _LLAMA_LAYER,
           gguf_rope_permute=True, rope_types=("default", "linear", "llama3")),
    Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", "qwen2",
           ("attn_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias", "o", "mlp_norm", "gate", "up", "down"),
           qkv_bias=True, rope_types=("default", "linear")),
    Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", "qwen3",
           ("attn_norm", "q", "k", "v", "q_norm", "k_norm", "o", "mlp_norm", "gate", "up", "down"),
           qk_norm=True, rope_types=("default", "linear")),
    Family("phi3", ("phi3",), "Phi3ForCausalLM", "phi3", _LLAMA_LAYER,
           fused_qkv=True, fused_gate_up=True, rope_types=("default", "longrope")),
    Family("gemma3", ("gemma3_text",), "Gemma3ForCausalLM", "gemma3",
           ("attn_norm", "q", "k", "v", "q_norm", "k_norm", "o", "post_attn_norm", "mlp_norm", "post_mlp_norm",
            "gate", "up", "down"),
           qk_norm=True, norm_offset=1.0, activation="gelu_tanh", embed_scale=True, sandwich_norms=True,
           rope_types=("default", "linear")),
)}
_BY_HF_TYPE = {t: f for f in FAMILIES.values() for t in f.hf_model_types}
SUPPORTED_TEXT = ("edgelora supports Llama (1-3, SmolLM, TinyLlama, Mistral), Qwen2/2.5, Qwen3, "
                  "Phi-3/Phi-4-mini and Gemma 3 (text)")
# Families people ask for that edgelora knows and refuses, with the reason.
_REFUSED = {
    "gemma2": "attention and final-logit soft-capping are not supported",
    "gemma": "Gemma 1 is not supported (Gemma 3 is)",
    "gemma3": "this is the multimodal Gemma 3 checkpoint; export its text model (Gemma3ForCausalLM, "
              "model_type 'gemma3_text')",
    "qwen2_moe": "mixture-of-experts models are not supported",
    "qwen3_moe": "mixture-of-experts models are not supported",
    "mixtral": "mixture-of-experts models are not supported",
    "phimoe": "mixture-of-experts models are not supported",
}


def family_of(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedArchitectureError(f"unknown model family {name!r}: {SUPPORTED_TEXT}") from None


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    return v


def _thaw(v: Any) -> Any:
    if isinstance(v, tuple) and all(isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) for x in v):
        return {k: _thaw(x) for k, x in v}
    if isinstance(v, tuple):
        return [_thaw(x) for x in v]
    return v


def _f32(x: float) -> float:
    """A float as float32 stores it, printed short: what both HF and GGUF keep."""
    return float(f"{x:.7g}")


# Upper bounds of a config's sizes, far above any model a device runs (Gemma 3's 262k vocabulary, 128k
# contexts): a value beyond them is a corrupt config.json, refused before anything is allocated.
_SIZE_LIMITS = {"vocab_size": 1 << 22, "hidden_size": 1 << 16, "intermediate_size": 1 << 20, "num_layers": 1024,
                "num_heads": 1024, "num_kv_heads": 1024, "head_dim": 1024, "max_position_embeddings": 1 << 24}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int = 2048
    sliding_window: int | None = None
    model_type: str = "llama"
    family: str = "llama"
    # RoPE beyond the plain kind: transformers' rope_scaling dict, frozen (see `rope`)
    rope_scaling: tuple | None = None
    rotary_dim: int | None = None            # None: the whole head (Phi-4-mini rotates 3/4 of it)
    original_max_position_embeddings: int | None = None  # LongRoPE's switch point
    sliding_layers: tuple[int, ...] = ()     # layers that attend within `sliding_window` only
    rope_local_theta: float | None = None    # RoPE base of the sliding layers (Gemma 3)
    query_pre_attn_scalar: float | None = None  # attention scale is this**-0.5, not head_dim**-0.5 (Gemma 3)

    def __post_init__(self) -> None:
        for f, limit in _SIZE_LIMITS.items():
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise UnsupportedArchitectureError(f"invalid model config: {f} must be a positive integer, got {v!r}")
            if v > limit:  # a corrupt value, not a model: it would allocate without end
                raise UnsupportedArchitectureError(f"invalid model config: {f} is {v}, beyond any model edgelora runs "
                                                   f"(at most {limit})")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedArchitectureError(
                f"invalid model config: {self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise UnsupportedArchitectureError(f"invalid model config: head_dim {self.head_dim} must be even for RoPE")
        fam = family_of(self.family)
        if self.model_type not in fam.hf_model_types:
            raise UnsupportedArchitectureError(
                f"invalid model config: model type {self.model_type!r} is not of the {self.family} family")
        if self.rotary_dim is not None and (self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim):
            raise UnsupportedArchitectureError(
                f"invalid model config: rotary dim {self.rotary_dim} must be even and within head_dim {self.head_dim}")
        if self.rope_type not in fam.rope_types:
            raise UnsupportedArchitectureError(
                f"unsupported rope scaling {self.rope_type!r} for {self.family}: supported {', '.join(fam.rope_types)}")
        if self.sliding_layers and not self.sliding_window:
            raise UnsupportedArchitectureError("invalid model config: sliding layers without a sliding_window")
        if any(not 0 <= i < self.num_layers for i in self.sliding_layers):
            raise UnsupportedArchitectureError("invalid model config: a sliding layer index is out of range")

    # -- derived ----------------------------------------------------------------------------

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rope(self) -> dict[str, Any]:
        """transformers' rope_scaling dict ({} for plain RoPE)."""
        return _thaw(self.rope_scaling) if self.rope_scaling else {}

    @property
    def rope_type(self) -> str:
        return self.rope.get("rope_type", "default")

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return layer in self.sliding_layers

    def canonical_names(self) -> list[str]:
        """Every weight of the model in canonical order (the order fingerprints hash in)."""
        names = ["embed"]
        for i in range(self.num_layers):
            names += [f"layers.{i}.{s}" for s in self.spec.layer_tensors]
        return names + ["norm"] + ([] if self.tie_word_embeddings else ["lm_head"])

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> shape, in canonical order."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        per_layer = {
            "attn_norm": (d,), "q": (self.q_dim, d), "k": (self.kv_dim, d), "v": (self.kv_dim, d),
            "o": (d, self.q_dim), "mlp_norm": (d,), "gate": (f, d), "up": (f, d), "down": (d, f),
            "q_bias": (self.q_dim,), "k_bias": (self.kv_dim,), "v_bias": (self.kv_dim,),
            "q_norm": (hd,), "k_norm": (hd,), "post_attn_norm": (d,), "post_mlp_norm": (d,),
        }
        out: dict[str, tuple[int, ...]] = {}
        for name in self.canonical_names():
            if name == "embed" or name == "lm_head":
                out[name] = (self.vocab_size, d)
            elif name == "norm":
                out[name] = (d,)
            else:
                out[name] = per_layer[name.rsplit(".", 1)[1]]
        return out

    def linear_shape(self, kind: str) -> tuple[int, int]:
        """(out, in) of a layer's linear `kind` (q, k, v, o, gate, up, down)."""
        return self.shapes()[f"layers.0.{kind}"]  # type: ignore[return-value]

    def num_parameters(self) -> int:
        return sum(math.prod(s) for s in self.shapes().values())

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the model computes: these go into the fingerprint. A plain
        Llama's identity has the keys it had before families existed (its fingerprints hold)."""
        d = {f: getattr(self, f) for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                                           "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings",
                                           "sliding_window")}
        d["rms_norm_eps"] = _f32(self.rms_norm_eps)
        d["rope_theta"] = _f32(float(self.rope_theta))
        d["architecture"] = self.family
        if self.rope_scaling:
            d["rope_scaling"] = self.rope
        for f in ("rotary_dim", "original_max_position_embeddings", "rope_local_theta", "query_pre_attn_scalar"):
            if getattr(self, f) is not None:
                d[f] = getattr(self, f)
        if self.sliding_layers:
            d["sliding_layers"] = list(self.sliding_layers)
        return d

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: Any) -> "ModelConfig":
        if not isinstance(cfg, dict):
            raise UnsupportedArchitectureError(f"config.json must be a JSON object, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str):
            raise UnsupportedArchitectureError(f"config.json has no model_type string (got {model_type!r}); "
                                               "is it a Hugging Face model config?")
        archs = cfg.get("architectures") or []
        archs = archs if isinstance(archs, list) else [archs]
        named = f"{model_type!r}" + (f" ({', '.join(map(str, archs))})" if archs else "")
        if model_type in _REFUSED:
            raise UnsupportedArchitectureError(f"unsupported architecture {named}: {_REFUSED[model_type]}")
        fam = _BY_HF_TYPE.get(model_type)  # type: ignore[arg-type]
        if fam is None:
            raise UnsupportedArchitectureError(f"unsupported architecture {named}: {SUPPORTED_TEXT}")
        try:
            return _HF_READERS.get(fam.name, _read_hf_common)(cfg, fam, named)
        except (KeyError, TypeError, ValueError) as e:
            what = f"lacks {e.args[0]!r}" if isinstance(e, KeyError) else f"has a bad value ({e})"
            raise UnsupportedArchitectureError(f"config.json of {named} {what}: is it a complete {fam.name} config?") from e

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """A config.json that transformers 4.x and 5.x both read the same way (rope_theta at the
        top level: transformers 4 ignores transformers 5's rope_parameters)."""
        fam = self.spec
        cfg: dict[str, Any] = {
            "architectures": ["MistralForCausalLM" if self.model_type == "mistral" else fam.hf_class],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "gelu_pytorch_tanh" if fam.activation == "gelu_tanh" else "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope or None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "torch_dtype": "float32",
        }
        if fam.name == "llama":
            cfg.update(attention_bias=False, mlp_bias=False)
            if self.model_type == "mistral":
                cfg["sliding_window"] = self.sliding_window
        elif fam.name in ("qwen2", "qwen3"):
            cfg.update(use_sliding_window=False, sliding_window=None, attention_bias=False)
        elif fam.name == "phi3":
            cfg.update(partial_rotary_factor=self.rot_dim / self.head_dim, sliding_window=self.sliding_window,
                       original_max_position_embeddings=self.original_max_position_embeddings or self.max_position_embeddings,
                       resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
        elif fam.name == "gemma3":
            cfg.update(hidden_activation="gelu_pytorch_tanh", sliding_window=self.sliding_window,
                       query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim, rope_local_base_freq=self.rope_local_theta,
                       layer_types=["sliding_attention" if self.is_sliding(i) else "full_attention"
                                    for i in range(self.num_layers)],
                       final_logit_softcapping=None, attn_logit_softcapping=None, attention_bias=False)
        cfg.update(extra)
        return cfg

    # -- serialization ------------------------------------------------------------------------

    def summary(self) -> str:
        extras = [s for s in (
            f"rope {self.rope_type}" if self.rope_scaling else "",
            f"rotary {self.rot_dim}/{self.head_dim}" if self.rotary_dim else "",
            f"{len(self.sliding_layers)} sliding-window layers ({self.sliding_window})" if self.sliding_layers else "",
        ) if s]
        return (f"{self.family} ({self.model_type}): {self.num_layers} layers, width {self.hidden_size}, "
                f"{self.num_heads} heads / {self.num_kv_heads} KV heads (head dim {self.head_dim}), "
                f"MLP {self.intermediate_size}, vocab {self.vocab_size}, "
                f"{'tied' if self.tie_word_embeddings else 'untied'} embeddings, rope theta {self.rope_theta:g}"
                + "".join(f", {e}" for e in extras))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = self.rope or None
        d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        d = dict(d)
        d["rope_scaling"] = _freeze(d["rope_scaling"]) if d.get("rope_scaling") else None
        d["sliding_layers"] = tuple(d.get("sliding_layers") or ())
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _as_f32(v: Any) -> Any:
    """Floats as the float32 values GGUF keeps (a rope dict read from either file hashes the same)."""
    if isinstance(v, float):
        return struct.unpack("<f", struct.pack("<f", v))[0]
    if isinstance(v, list):
        return [_as_f32(x) for x in v]
    return v


def rope_scaling_of(cfg: dict[str, Any]) -> tuple | None:
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or None
    if not rope:
        return None
    if not isinstance(rope, dict):
        raise ValueError(f"rope_scaling must be an object, got {rope!r}")
    rope = {k: _as_f32(v) for k, v in rope.items() if k not in ("rope_theta",)}
    kind = rope.pop("type", None)
    rope.setdefault("rope_type", kind or "default")
    if rope["rope_type"] == "default" and len(rope) == 1:
        return None
    return _freeze(rope)


def _common_fields(cfg: dict[str, Any], fam: Family) -> dict[str, Any]:
    heads = int(cfg["num_attention_heads"])
    theta = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        rope_theta=float(theta),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        model_type=cfg["model_type"],
        family=fam.name,
        rope_scaling=rope_scaling_of(cfg),
    )


def _check_act(cfg: dict[str, Any], named: str, want: tuple[str, ...], key: str = "hidden_act") -> None:
    act = cfg.get(key, want[0])
    if act not in want:
        raise UnsupportedArchitectureError(f"unsupported architecture {named} with activation {act!r}: "
                                           f"this family runs {want[0]}")


def _read_hf_common(cfg: dict[str, Any], fam: Family, named: str) -> ModelConfig:
    _check_act(cfg, named, ("silu",))
    if fam.name == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise UnsupportedArchitectureError(f"unsupported architecture {named} with linear biases: "
                                           "Llama-family models without biases are supported (Qwen2 has q/k/v biases)")
    if fam.name in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(f"unsupported architecture {named} with use_sliding_window: "
                                           "sliding-window attention is supported for Gemma 3 only")
    if fam.name == "qwen3" and cfg.get("attention_bias"):
        raise UnsupportedArchitectureError(f"unsupported architecture {named} with attention biases")
    fields = _common_fields(cfg, fam)
    if cfg["model_type"] == "mistral":
        fields["sliding_window"] = cfg.get("sliding_window")
    return ModelConfig(**fields)


def _read_hf_phi3(cfg: dict[str, Any], fam: Family, named: str) -> ModelConfig:
    _check_act(cfg, named, ("silu",))
    fields = _common_fields(cfg, fam)
    partial = float(cfg.get("partial_rotary_factor", 1.0))
    rot = int(fields["head_dim"] * partial)
    fields["rotary_dim"] = rot if rot != fields["head_dim"] else None
    orig = cfg.get("original_max_position_embeddings")
    fields["original_max_position_embeddings"] = int(orig) if orig and fields["rope_scaling"] else None
    window = cfg.get("sliding_window")
    if window is not None and int(window) < fields["max_position_embeddings"]:
        # transformers' Phi-3 masks beyond the window; llama.cpp's phi3 does too (n_swa)
        fields["sliding_window"] = int(window)
        fields["sliding_layers"] = tuple(range(fields["num_layers"]))
    return ModelConfig(**fields)


def _read_hf_gemma3(cfg: dict[str, Any], fam: Family, named: str) -> ModelConfig:
    _check_act(cfg, named, ("gelu_pytorch_tanh",), "hidden_activation")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise UnsupportedArchitectureError(f"unsupported architecture {named} with {key}: soft-capping is not supported")
    fields = _common_fields(cfg, fam)
    fields["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))
    n = fields["num_layers"]
    types = cfg.get("layer_types")
    if types is None:  # transformers < 4.53 wrote the pattern: every `pattern`-th layer is global
        pattern = int(cfg.get("sliding_window_pattern", 6))
        types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    if len(types) != n:
        raise ValueError(f"layer_types has {len(types)} entries for {n} layers")
    window = cfg.get("sliding_window")
    sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    fields["sliding_window"] = int(window) if sliding and window else None
    fields["sliding_layers"] = sliding if fields["sliding_window"] else ()
    fields["rope_local_theta"] = float(cfg.get("rope_local_base_freq", 10000.0))
    fields["query_pre_attn_scalar"] = float(cfg.get("query_pre_attn_scalar", fields["head_dim"]))
    return ModelConfig(**fields)


_HF_READERS = {"phi3": _read_hf_phi3, "gemma3": _read_hf_gemma3}
