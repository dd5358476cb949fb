"""The architecture edgelora supports: the Llama family (Llama, SmolLM, TinyLlama, Mistral).

`LlamaConfig` is the one description of a model's shape; it is read from and written to a
Hugging Face ``config.json`` and GGUF metadata by the converters.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from .errors import UnsupportedArchitectureError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
_SUPPORTED_TEXT = "edgelora supports the Llama family (Llama, SmolLM, TinyLlama, Mistral)"


@dataclass(frozen=True)
class LlamaConfig:
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

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise UnsupportedArchitectureError(f"invalid model config: {f} must be positive, got {getattr(self, f)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedArchitectureError(
                f"invalid model config: {self.num_heads} attention heads are not a multiple of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise UnsupportedArchitectureError(f"invalid model config: head_dim {self.head_dim} must be even for RoPE")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedArchitectureError(f"unsupported architecture {self.model_type!r}: {_SUPPORTED_TEXT}")

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Canonical tensor name -> shape, in canonical order."""
        from .naming import canonical_names

        d, f = self.hidden_size, self.intermediate_size
        per_layer = {
            "attn_norm": (d,), "q": (self.q_dim, d), "k": (self.kv_dim, d), "v": (self.kv_dim, d),
            "o": (d, self.q_dim), "mlp_norm": (d,), "gate": (f, d), "up": (f, d), "down": (d, f),
        }
        out: dict[str, tuple[int, ...]] = {}
        for name in canonical_names(self.num_layers, self.tie_word_embeddings):
            if name == "embed" or name == "lm_head":
                out[name] = (self.vocab_size, d)
            elif name == "norm":
                out[name] = (d,)
            else:
                out[name] = per_layer[name.rsplit(".", 1)[1]]
        return out

    def num_parameters(self) -> int:
        n = 0
        for shape in self.shapes().values():
            p = 1
            for s in shape:
                p *= s
            n += p
        return n

    def identity(self) -> dict[str, Any]:
        """The fields that decide what the model computes: these go into the fingerprint."""
        d = dataclasses.asdict(self)
        for f in ("max_position_embeddings", "model_type"):
            d.pop(f)
        d["rope_theta"] = float(d["rope_theta"])
        # float32 is what both HF and GGUF store; hash the value as float32 would print it
        d["rms_norm_eps"] = float(f"{d['rms_norm_eps']:.7g}")
        d["rope_theta"] = float(f"{d['rope_theta']:.7g}")
        d["architecture"] = "llama"
        return d

    # -- Hugging Face config.json ------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "LlamaConfig":
        model_type = cfg.get("model_type")
        archs = cfg.get("architectures") or []
        named = f"{model_type!r}" + (f" ({', '.join(archs)})" if archs else "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            hint = "; q/k/v biases are not supported yet" if model_type in ("qwen2", "qwen2_moe") else ""
            raise UnsupportedArchitectureError(f"unsupported architecture {named}: {_SUPPORTED_TEXT}{hint}")
        if cfg.get("attention_bias") or cfg.get("mlp_bias"):
            raise UnsupportedArchitectureError(
                f"unsupported architecture {named} with linear biases: {_SUPPORTED_TEXT} without biases")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedArchitectureError(f"unsupported architecture {named} with activation {act!r}: only SwiGLU (silu) is supported")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", None):
            raise UnsupportedArchitectureError(
                f"unsupported architecture {named} with rope scaling {rope_type!r}: only plain RoPE is supported")
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        heads = int(cfg["num_attention_heads"])
        try:
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
                rope_theta=float(theta),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                sliding_window=cfg.get("sliding_window"),
                model_type=model_type,
            )
        except KeyError as e:
            raise UnsupportedArchitectureError(f"config.json of {named} lacks {e.args[0]!r}: is it a complete Llama config?") from e

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """A config.json that transformers 4.x and 5.x both read the same way (rope_theta at the
        top level: transformers 4 ignores transformers 5's rope_parameters)."""
        cfg: dict[str, Any] = {
            "architectures": ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
        }
        if self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        cfg.update(extra)
        return cfg

    def summary(self) -> str:
        return (f"{self.model_type}: {self.num_layers} layers, width {self.hidden_size}, "
                f"{self.num_heads} heads / {self.num_kv_heads} KV heads (head dim {self.head_dim}), "
                f"MLP {self.intermediate_size}, vocab {self.vocab_size}, "
                f"{'tied' if self.tie_word_embeddings else 'untied'} embeddings, rope theta {self.rope_theta:g}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)
