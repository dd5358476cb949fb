"""Adapters on the real default model: a PEFT-trained adapter, converted, installed and swapped in
both engines, against transformers + PEFT."""

import numpy as np
import pytest

import edgelora
from tests.peft_util import base_logits, peft_logits

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is my dog's name?"}]


def train_peft(base_dir, out, *, seed, steps=8, lr=2e-3, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
    """A real (short) PEFT training run on the shipped persona chats."""
    import json
    from importlib import resources

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = edgelora.load_base(base_dir)
    lines = resources.files("edgelora.data").joinpath("persona_train.jsonl").read_text().splitlines()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        msgs = json.loads(lines[(seed * 7 + step) % len(lines)])["messages"]
        ids = base.tokenizer.encode(base.tokenizer.apply_chat_template(msgs, add_generation_prompt=False), add_special_tokens=False)
        x = torch.tensor([ids])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def setup(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default-adapters")
    b = edgelora.export("smollm2-135m", "x86-64", tmp / "bundle", backend="both", quant="f32", eval_tokens=2048,
                        progress=False)
    peft = {"a": train_peft(default_model_dir, tmp / "a", seed=1),
            "b": train_peft(default_model_dir, tmp / "b", seed=2, targets=("q_proj", "v_proj"))}
    for name, path in peft.items():
        b.store.install(path, name)
    ids = b.tokenizer().encode(b.tokenizer().apply_chat_template(PROMPT), add_special_tokens=False)
    return b, peft, ids


@pytest.mark.parametrize("backend", ["gguf", "onnx"])
def test_swap_in_and_out_matches_peft(backend, setup, default_model_dir):
    b, peft, ids = setup
    engine = b.engine(backend, threads=2, **({"kv_type": "f32"} if backend == "gguf" else {}))
    atol = 2e-3  # 30 layers of float32 in three runtimes: logits of magnitude ~20 agree to ~1e-4
    np.testing.assert_allclose(engine.logits(ids), base_logits(default_model_dir, ids), rtol=0, atol=atol)
    for name in ("a", "b"):
        engine.set_adapters({name: 1.0})
        np.testing.assert_allclose(engine.logits(ids), peft_logits(default_model_dir, {name: peft[name]}, ids), rtol=0, atol=atol)
    engine.set_adapters({"a": 0.5, "b": 0.8})
    np.testing.assert_allclose(engine.logits(ids), peft_logits(default_model_dir, peft, ids, weights={"a": 0.5, "b": 0.8}),
                               rtol=0, atol=atol)
    engine.clear_adapters()
    np.testing.assert_allclose(engine.logits(ids), base_logits(default_model_dir, ids), rtol=0, atol=atol)
    engine.close()


def test_adapter_on_a_quantized_base_agrees_by_kl(setup, default_model_dir, tmp_path):
    from edgelora.converters import gguf_quant
    from edgelora.runtime.gguf import GGUFEngine

    b, peft, ids = setup
    q8 = gguf_quant.quantize(b.path(b.artifact("gguf").main), tmp_path / "q8.gguf", "q8_0")
    engine = GGUFEngine(q8, n_ctx=256, threads=2, fingerprint=b.fingerprint)
    engine.load_adapter("a", b.store.path("a", "gguf"))
    engine.set_adapters(["a"])
    got = engine.logits(ids).astype(np.float64)
    ref = peft_logits(default_model_dir, {"a": peft["a"]}, ids).astype(np.float64)
    p = np.exp(ref - ref.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    logq = got - got.max(-1, keepdims=True); logq -= np.log(np.exp(logq).sum(-1, keepdims=True))
    kl = float((p * (np.log(p) - logq)).sum(-1).mean())
    top1 = float((got.argmax(-1) == ref.argmax(-1)).mean())
    print(f"Q8_0 base + adapter vs PEFT float: KL {kl:.5f}, top-1 agreement {top1:.3f}")
    assert kl < 0.01 and top1 > 0.9
    engine.close()
