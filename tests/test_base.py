"""Base-model intake: Hugging Face dirs and GGUF files give one model and one fingerprint."""

import json

import numpy as np
import pytest

import edgelora
from edgelora import naming
from edgelora.converters import gguf_model, hf
from tests.conftest import build_tiny_llama


def test_load_hf_dir(tiny_llama):
    base = edgelora.load_base(tiny_llama)
    c = base.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (2, 64, 4, 2, 16)
    assert not c.tie_word_embeddings and "lm_head" in base.weights
    assert base.fingerprint.startswith("sha256:") and len(base.fingerprint) == 71
    assert base.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert base.tokenizer.eos_token_id == base.tokenizer.backend.token_to_id("<|im_end|>")


def test_weights_match_transformers_state_dict(tiny_llama):
    from safetensors.numpy import load_file

    state = load_file(str(tiny_llama / "model.safetensors"))
    base = edgelora.load_base(tiny_llama)
    for name in base.weights:
        np.testing.assert_array_equal(base.weights[name], state[naming.to_hf(name)])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied"])
def test_fingerprint_equal_for_hf_dir_and_f32_gguf(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    base = edgelora.load_base(path)
    out = gguf_model.write(base, tmp_path / "model-f32.gguf", dtype="F32")
    again = edgelora.load_base(out)
    assert again.source_format == "gguf"
    assert again.config.identity() == base.config.identity()
    assert again.fingerprint == base.fingerprint
    for name in base.weights:
        np.testing.assert_array_equal(again.weights[name], base.weights[name])


def test_fingerprint_changes_with_weights_and_f16(tiny_llama, tmp_path):
    base = edgelora.load_base(tiny_llama)
    f16 = edgelora.load_base(gguf_model.write(base, tmp_path / "m.gguf", dtype="F16"))
    assert f16.fingerprint != base.fingerprint  # F16 rounds the weights: another model
    other = edgelora.load_base(build_tiny_llama(tmp_path / "other", seed=7))
    assert other.fingerprint != base.fingerprint


def test_bf16_checkpoint_same_fingerprint_as_its_f32_widening(tmp_path):
    bf16 = edgelora.load_base(build_tiny_llama(tmp_path / "bf16", dtype="bfloat16"))
    assert bf16.source_dtype == "BF16"
    f32 = edgelora.load_base(hf.write(bf16, tmp_path / "f32"))
    assert f32.source_dtype == "F32"
    assert f32.fingerprint == bf16.fingerprint


def test_hf_write_round_trip(tiny_llama, tmp_path):
    base = edgelora.load_base(tiny_llama)
    out = hf.write(base, tmp_path / "copy")
    again = edgelora.load_base(out)
    assert again.fingerprint == base.fingerprint
    assert json.loads((out / "config.json").read_text())["rope_theta"] == 10000.0
    assert again.tokenizer.chat_template == base.tokenizer.chat_template


def test_mistral_layout_loads(tmp_path):
    base = edgelora.load_base(build_tiny_llama(tmp_path / "mistral", model_type="mistral"))
    assert base.config.model_type == "mistral"


def test_gguf_tokenizer_matches_hf_tokenizer(tiny_llama, tmp_path):
    base = edgelora.load_base(tiny_llama)
    again = edgelora.load_base(gguf_model.write(base, tmp_path / "m.gguf"))
    for text in ["The quick brown fox, 2024!", "  spaces\nnewlines\tand tabs", "<|im_start|>user\nhi<|im_end|>"]:
        assert again.tokenizer.encode(text) == base.tokenizer.encode(text)
    assert again.tokenizer.chat_template == base.tokenizer.chat_template
    assert again.tokenizer.eos_token == "<|im_end|>"


def test_float_checkpoint_logits_match_transformers(tiny_llama, tmp_path):
    """edgelora's HF writer output (via an F32 GGUF and back) runs in transformers with the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    base = edgelora.load_base(tiny_llama)
    via_gguf = edgelora.load_base(gguf_model.write(base, tmp_path / "m.gguf"))
    out = hf.write(via_gguf, tmp_path / "hf")
    ids = torch.tensor([base.tokenizer.encode("The quick brown fox jumps over the lazy dog.")])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_f32_gguf_runs_in_llama_cpp_with_transformers_logits(tiny_llama, tmp_path):
    """llama.cpp loads the GGUF edgelora writes and computes transformers' logits."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    base = edgelora.load_base(tiny_llama)
    path = gguf_model.write(base, tmp_path / "m.gguf", dtype="F32")
    ids = base.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    # F32 KV cache: llama.cpp keeps K and V in F16 by default, which is not the float model
    llm = Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
    assert llm.tokenize(b"The quick brown fox jumps over the lazy dog.", add_bos=False, special=True) == ids
    llm.eval(ids)
    ours = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
