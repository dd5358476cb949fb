import numpy as np
import pytest

from edgelora import naming


def test_table_has_no_duplicates():
    for which in (0, 1):
        names = [pair[which] for pair in naming.LAYER_TENSORS.values()] + [p[which] for p in naming.GLOBAL_TENSORS.values()]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("tied", [True, False])
def test_round_trips(tied):
    for name in naming.canonical_names(3, tied):
        assert naming.from_hf(naming.to_hf(name)) == name
        assert naming.from_gguf(naming.to_gguf(name)) == name


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
    assert naming.from_hf("model.layers.0.self_attn.q_proj.bias") is None
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
