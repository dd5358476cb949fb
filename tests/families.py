"""Tiny random models of every supported family, made by transformers inside the tests.

Each one exercises what its family computes differently: Llama 3's rope scaling (with a short
original context so most frequencies are rescaled), Qwen2's q/k/v biases, Qwen3's q/k norms with a
head dim unlike hidden/heads, Phi-3's fused projections with partial rotary and LongRoPE, Gemma 3's
(1+w) norms, sandwich norms, GeGLU, scaled embeddings and sliding-window layers (the test texts
are longer than the window). Every norm weight is perturbed away from its init, so using w where
(1+w) is meant (or the reverse) shows in the logits.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import build_tokenizer

FAMILY_NAMES = ("llama3", "qwen2", "qwen3", "phi3", "gemma3")
# PEFT target modules of each family: every linear layer
PEFT_TARGETS = {
    "llama3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    "gemma3": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def _config(family: str, vocab: int, tied: bool):
    import transformers as tf

    # the embedding padded past the tokenizer, as Qwen2.5's (151936 rows, 151665 tokens) and Gemma 3's are
    common = dict(vocab_size=vocab + 16, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "llama3":
        return tf.LlamaConfig(rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, **common)
    if family == "qwen2":
        return tf.Qwen2Config(rope_theta=1000000.0, use_sliding_window=False, **common)
    if family == "qwen3":
        return tf.Qwen3Config(rope_theta=1000000.0, head_dim=32, use_sliding_window=False, **common)
    if family == "phi3":
        # Phi-4-mini's partial_rotary_factor 0.75, on a head of 64 (ONNX Runtime's attention rotates
        # multiples of 16 dims) LongRoPE: llama.cpp takes the long factors when its context (padded to 256)
        # exceeds the original context, transformers when the sequence does; below both, the short ones
        rot = 48
        common.update(max_position_embeddings=512, hidden_size=128, num_attention_heads=2, num_key_value_heads=1)
        return tf.Phi3Config(rope_theta=10000.0, partial_rotary_factor=0.75, original_max_position_embeddings=256,
                             rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(rot // 2)],
                                           "long_factor": [2.0 + 0.5 * i for i in range(rot // 2)]},
                             sliding_window=None, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, **common)
    if family == "gemma3":
        # six layers: five sliding, then one global (Gemma 3's own pattern, which llama.cpp's converter assumes)
        common["num_hidden_layers"] = 6
        return tf.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, rope_theta=1000000.0,
                                   rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                   hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                                   attn_logit_softcapping=None, **common)
    raise ValueError(family)


def build_family(family: str, out: Path, *, tied: bool = False, seed: int = 0) -> Path:
    """A small random model of `family` (3 layers; Gemma 3: 6) saved by transformers as safetensors, with a tokenizer."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    if family == "phi3":  # Phi-4-mini's tokenizer is GPT-2 style, and says so (llama.cpp's converter reads it)
        cfg = json.loads((out / "tokenizer_config.json").read_text())
        (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "GPT2Tokenizer"}))
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, vocab, tied))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.to(torch.float32).save_pretrained(out, safe_serialization=True)
    return out
