"""Every supported family through every path, on a tiny random model of each made by transformers:
intake and fingerprint, GGUF in llama.cpp, the fused ONNX graph, PEFT adapters in both engines, and
the numpy trainer's loss and gradients, each against transformers / PEFT."""

from __future__ import annotations

import numpy as np
import pytest

import edgelora
from edgelora.adapters import load_adapter, save_adapter
from edgelora.converters import gguf_model
from edgelora.runtime.gguf import GGUFEngine
from edgelora.train.model import LORA_KINDS, LoraParams, LoraSpec, loss_and_grads, masked_loss
from tests.families import FAMILY_NAMES, PEFT_TARGETS, build_family
from tests.peft_util import base_logits, make_peft_adapter, peft_logits

# longer than Gemma 3's sliding window (8) in the tiny models
TEXT = "The quick brown fox jumps over the lazy dog. Edge devices run small language models."
FAMILY = {"llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3", "gemma3": "gemma3"}
# llama.cpp against transformers, F32 weights and KV cache. ggml's GELU reads an fp16 table, so
# Gemma's GeGLU is a little further off than the others.
GGUF_ATOL = {"gemma3": 1e-3}


@pytest.fixture(scope="module", params=[(f, tied) for f in FAMILY_NAMES for tied in (False, True)],
                ids=lambda p: f"{p[0]}{'-tied' if p[1] else ''}")
def family(request, tmp_path_factory):
    name, tied = request.param
    tmp = tmp_path_factory.mktemp(f"{name}{'-tied' if tied else ''}")
    path = build_family(name, tmp / f"tiny-{name}", tied=tied, seed=3 if tied else 0)
    base = edgelora.load_base(path)
    ids = base.tokenizer.encode(TEXT)
    assert len(ids) > 8
    return name, path, base, ids, tmp


def test_intake_and_gguf_round_trip_keep_the_fingerprint(family):
    name, path, base, ids, tmp = family
    assert base.config.family == FAMILY[name]
    gguf = gguf_model.write(base, tmp / "rt.gguf", "F32")
    again = edgelora.load_base(gguf)
    assert again.config.identity() == base.config.identity()
    assert again.fingerprint == base.fingerprint


def test_fingerprint_holds_the_math(family):
    """Every field that changes what the model computes is in its identity."""
    name, path, base, *_ = family
    identity = base.config.identity()
    assert identity["architecture"] == FAMILY[name]
    expect = {"llama3": ["rope_scaling"], "phi3": ["rope_scaling", "rotary_dim", "original_max_position_embeddings"],
              "gemma3": ["rope_scaling", "sliding_layers", "sliding_window", "rope_local_theta", "query_pre_attn_scalar"]}
    for key in expect.get(name, []):
        assert identity.get(key) is not None, key


def test_llama_cpp_logits_equal_transformers(family):
    name, path, base, ids, tmp = family
    gguf = gguf_model.write(base, tmp / "f32.gguf", "F32")
    with GGUFEngine(gguf, n_ctx=128, threads=1, kv_type="f32", fingerprint=base.fingerprint) as e:
        np.testing.assert_allclose(e.logits(ids), base_logits(path, ids), rtol=0, atol=GGUF_ATOL.get(name, 2e-5))


@pytest.fixture(scope="module")
def peft_adapter(family):
    name, path, base, ids, tmp = family
    return make_peft_adapter(path, tmp / "peft", r=4, alpha=8, seed=7, targets=PEFT_TARGETS[name])


def test_peft_adapter_in_llama_cpp_equals_peft(family, peft_adapter):
    name, path, base, ids, tmp = family
    adapter = load_adapter(peft_adapter, base.config)
    assert set(adapter.target_kinds) == set(LORA_KINDS)
    gguf = gguf_model.write(base, tmp / "f32.gguf", "F32")
    lora = save_adapter(adapter, tmp / "a.gguf", "gguf", base.config)
    with GGUFEngine(gguf, n_ctx=128, threads=1, kv_type="f32", fingerprint=base.fingerprint) as e:
        e.load_adapter("a", lora)
        e.set_adapters({"a": 1.0})
        ref = peft_logits(path, {"a": peft_adapter}, ids)
        np.testing.assert_allclose(e.logits(ids), ref, rtol=0, atol=GGUF_ATOL.get(name, 2e-5))


def test_peft_round_trip_keeps_the_familys_modules(family, peft_adapter):
    """Read with the family's module names (Phi-3's qkv_proj is one A for q, k and v), written back
    as PEFT and as GGUF LoRA, read again: the same adapter."""
    name, path, base, ids, tmp = family
    adapter = load_adapter(peft_adapter, base.config)
    out = save_adapter(adapter, tmp / "peft-again", "peft", base.config)
    written = {k for k in __import__("safetensors.numpy", fromlist=["x"]).load_file(str(out / "adapter_model.safetensors"))}
    original = {k for k in __import__("safetensors.numpy", fromlist=["x"]).load_file(str(peft_adapter / "adapter_model.safetensors"))}
    assert written == original
    for fmt, suffix in (("peft", ""), ("gguf", ".gguf"), ("onnx", ".onnx_adapter")):
        again = load_adapter(save_adapter(adapter, tmp / f"rt-{fmt}{suffix}", fmt, base.config), base.config)
        assert set(again.tensors) == set(adapter.tensors)
        for t in adapter.targets:
            np.testing.assert_allclose(again.delta(t), adapter.delta(t), rtol=1e-6, atol=1e-7, err_msg=f"{fmt} {t}")


def _peft_grads(path, peft_dir, tokens, mask):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path), peft_dir, is_trainable=True)
    ids = torch.from_numpy(tokens)
    labels = torch.where(torch.from_numpy(mask), ids, torch.full_like(ids, -100))
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return float(loss.detach()), {n: p.grad.numpy() for n, p in model.named_parameters() if "lora_" in n}


def test_trainer_loss_and_gradients_equal_peft(family, peft_adapter):
    """The numpy forward and backward of every op the family adds, against PEFT + torch autograd.
    A fused module's PEFT gradients are the sums (A) and stacks (B) of its members'."""
    name, path, base, ids, tmp = family
    adapter = load_adapter(peft_adapter, base.config)
    lora = LoraParams(base.config, LoraSpec(adapter.rank, adapter.alpha, LORA_KINDS))
    for t, lt in adapter.tensors.items():
        lora.views[f"{t}.A"][...] = lt.A
        lora.views[f"{t}.B"][...] = lt.B
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, base.config.vocab_size, size=(2, 20))  # longer than the sliding window
    mask = rng.random((2, 20)) < 0.6
    weights = {n: base.weights[n] for n in base.weights}
    loss, grad = loss_and_grads(weights, lora, tokens, mask, base.config)
    ref_loss, ref = _peft_grads(path, peft_adapter, tokens, mask)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert masked_loss(weights, lora, tokens, mask, base.config) == pytest.approx(loss, rel=1e-6)
    ours = lora.views_of(grad)
    modules = {m: members for m, members in edgelora.naming.lora_modules(base.config, "hf").items()}
    checked = 0
    for module, members in modules.items():
        key = f"base_model.model.{module[:-len('.weight')]}.lora_"
        gA = sum(ours[f"{m}.A"] for m in members)
        gB = np.concatenate([ours[f"{m}.B"] for m in members], 0)
        for mine, theirs in ((gA, ref[key + "A.default.weight"]), (gB, ref[key + "B.default.weight"])):
            np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max(), err_msg=module)
            checked += 1
    assert checked == len(ref)


def test_other_familys_adapter_is_refused(family, tmp_path_factory):
    name, path, base, ids, tmp = family
    other = "qwen2" if name != "qwen2" else "llama3"
    odir = build_family(other, tmp_path_factory.mktemp("other") / f"tiny-{other}")
    obase = edgelora.load_base(odir)
    adapter = edgelora.adapters.random_adapter(obase.config, rank=2, fingerprint=obase.fingerprint)
    with pytest.raises(edgelora.adapters.AdapterBaseMismatchError, match="was made for base"):
        adapter.check_fits(base.config, base.fingerprint)
