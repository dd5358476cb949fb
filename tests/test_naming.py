import numpy as np
import pytest

from edgelora import naming


def test_table_has_no_duplicates():
    for which in (0, 1):
        names = [pair[which] for pair in naming.LAYER_TENSORS.values()] + [p[which] for p in naming.GLOBAL_TENSORS.values()]
        assert len(names) == len(set(names))


def _config(family: str, tied: bool):
    from edgelora.arch import FAMILIES, ModelConfig

    return ModelConfig(vocab_size=32, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                       head_dim=16, rope_theta=1e4, rms_norm_eps=1e-6, tie_word_embeddings=tied, family=family,
                       model_type=FAMILIES[family].hf_model_types[0])


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "gemma3"])
def test_every_family_layout_holds_each_tensor_once_and_round_trips(family, tied):
    cfg = _config(family, tied)
    for fmt in ("hf", "gguf"):
        layout = naming.layout(cfg, fmt)
        held = [m for members in layout.values() for m in members]
        assert sorted(held) == sorted(cfg.canonical_names()) and len(held) == len(set(held))
        for ext, members in layout.items():
            assert naming.members_of(ext, fmt, family) == members
            assert all(naming.external_name(m, fmt, family) == ext for m in members)


def test_fused_and_family_spellings():
    assert naming.layout(_config("phi3", True), "gguf")["blk.1.attn_qkv.weight"] == ("layers.1.q", "layers.1.k", "layers.1.v")
    assert naming.layout(_config("phi3", True), "hf")["model.layers.0.mlp.gate_up_proj.weight"] == ("layers.0.gate", "layers.0.up")
    gemma = naming.layout(_config("gemma3", True), "hf")
    assert gemma["model.layers.0.post_attention_layernorm.weight"] == ("layers.0.post_attn_norm",)
    assert gemma["model.layers.0.pre_feedforward_layernorm.weight"] == ("layers.0.mlp_norm",)
    assert naming.peft_module_names("phi3")["v"] == "qkv_proj"


@pytest.mark.parametrize("canon,hf,gguf", [
    ("layers.0.q", "model.layers.0.self_attn.q_proj.weight", "blk.0.attn_q.weight"),
    ("layers.12.o", "model.layers.12.self_attn.o_proj.weight", "blk.12.attn_output.weight"),
    ("layers.3.mlp_norm", "model.layers.3.post_attention_layernorm.weight", "blk.3.ffn_norm.weight"),
    ("embed", "model.embed_tokens.weight", "token_embd.weight"),
    ("lm_head", "lm_head.weight", "output.weight"),
])
def test_known_names(canon, hf, gguf):
    assert naming.to_hf(canon) == hf and naming.to_gguf(canon) == gguf


def test_unknown_names():
    assert naming.from_hf("model.layers.0.self_attn.q_proj.bias") is None  # a Llama has no biases
    assert naming.from_hf("model.layers.0.self_attn.q_proj.bias", "qwen2") == "layers.0.q_bias"
    assert naming.from_gguf("blk.0.attn_q.bias") is None
    with pytest.raises(KeyError):
        naming.to_hf("layers.0.nope")


def test_rope_permutation_is_llama_cpps():
    # llama.cpp's convert_hf_to_gguf permute, written out independently as index arithmetic:
    # within each head, output row 2*j+p takes HF row p*half + j.
    n_head, head_dim, cols = 3, 8, 5
    w = np.arange(n_head * head_dim * cols, dtype=np.float32).reshape(n_head * head_dim, cols)
    half = head_dim // 2
    expected = np.empty_like(w)
    for h in range(n_head):
        for j in range(half):
            for p in range(2):
                expected[h * head_dim + 2 * j + p] = w[h * head_dim + p * half + j]
    np.testing.assert_array_equal(naming.rope_permute(w, n_head), expected)
    np.testing.assert_array_equal(naming.rope_unpermute(naming.rope_permute(w, n_head), n_head), w)
