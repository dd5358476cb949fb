"""The mobile-NPU bundle: static QDQ graphs that run wholly on the QNN HTP backend (simulated on this
CPU by onnxruntime-qnn) with CPU fallback disabled."""

from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora.quality import mean_kl
from edgelora.runtime.engine import EngineError
from edgelora.runtime.npu import qnn_htp_session
from tests.peft_util import base_logits, peft_logits

DATA = Path(edgelora.__file__).parent / "data"

pytest.importorskip("onnxruntime_qnn")


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def npu_bundle(tiny_llama, tmp_path_factory, isolated_cache):
    return edgelora.export(tiny_llama, "snapdragon-8-gen-3", tmp_path_factory.mktemp("npu") / "b", eval_tokens=1024,
                           progress=False)


def test_npu_bundle_runs_wholly_on_htp_and_matches_float(npu_bundle, tiny_llama):
    (art,) = npu_bundle.artifacts
    assert art.quant == "qdq" and {"onnx/qdq/prefill.onnx", "onnx/qdq/decode.onnx"} <= set(art.files)
    assert art.quality["within_budget"] and art.quality["top1_agreement"] > 0.9
    htp = npu_bundle.engine()
    assert htp.provider == "htp"
    assert htp.runner.sess["decode"].get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    tok = npu_bundle.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "The quick brown fox"}]), add_special_tokens=False)
    on_npu = htp.generate(ids, max_tokens=12).tokens
    on_cpu = npu_bundle.engine(provider="cpu").generate(ids, max_tokens=12).tokens
    assert on_npu == on_cpu  # the HTP computes what the QDQ graph says
    # against the float model (transformers), teacher-forced on the same context
    ref = base_logits(tiny_llama, ids)[1:]
    got = htp.logits(ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_graph_with_ops_the_npu_lacks_fails_to_load(tiny_llama, tmp_path):
    """With CPU fallback disabled, a graph the HTP cannot run entirely is refused at load."""
    from edgelora.converters import onnx_fused

    path = onnx_fused.export(edgelora.load_base(tiny_llama), tmp_path / "fused", "f32", max_len=64)
    with pytest.raises(EngineError, match="does not run wholly on the QNN HTP backend"):
        qnn_htp_session(path)


@pytest.fixture(scope="module")
def npu_adapters(npu_bundle, tiny_llama, tmp_path_factory):
    """Two adapters in the NPU bundle's store, and the same as PEFT dirs for the float reference: one
    trained on the shipped pirate chats (not the persona chats the export calibrated with), one random."""
    from edgelora.adapters import random_adapter
    from edgelora.converters import save_adapter
    from edgelora.train import train_adapter

    tmp = tmp_path_factory.mktemp("npu-adapters")
    trained = train_adapter(edgelora.load_base(tiny_llama), DATA / "pirate_train.jsonl", "pirate", install=False,
                            steps=40, lr=3e-3, rank=8, seq_len=1024, val_fraction=0).adapter
    adapters = {"pirate": trained, "noise": random_adapter(npu_bundle.config, rank=4, seed=5, scale=0.03,
                                                            targets=("q", "v", "down"), name="noise")}
    peft = {}
    for name, a in adapters.items():
        a.base_fingerprint = npu_bundle.fingerprint
        npu_bundle.store.install(a, name, replace=True)
        peft[name] = save_adapter(a, tmp / f"peft-{name}", "peft", npu_bundle.config)
    return peft



def test_adapters_in_the_npu_graphs_match_float_plus_adapter(npu_bundle, npu_adapters, tiny_llama):
    """The LoRA slots: one adapter, a swap and a weighted mix, on HTP and on the QDQ graph on CPU, against
    transformers + PEFT; the empty slot is the base."""
    tok = npu_bundle.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What's the capital of France?"}]),
                     add_special_tokens=False)
    htp, cpu = npu_bundle.engine(), npu_bundle.engine(provider="cpu")
    base_ref = base_logits(tiny_llama, ids)[1:]
    for weights in ({"pirate": 1.0}, {"noise": 1.0}, {"pirate": 0.7, "noise": 0.5}, {}):
        for e in (htp, cpu):
            e.set_adapters(weights)
        ref = peft_logits(tiny_llama, {n: npu_adapters[n] for n in weights}, ids, weights)[1:] if weights else base_ref
        on_htp, on_cpu = htp.logits(ids), cpu.logits(ids)
        spread = float(ref.max() - ref.min())
        # the HTP computes what the QDQ graph says (to its fixed-point rounding)
        assert np.abs(on_htp - on_cpu).max() < 0.05 * spread, weights
        # the QDQ graph with the adapter is the float model with the adapter, to quantization error: far
        # closer to it than to the base (the adapter's effect survives the 16-bit slots)
        kl = mean_kl(ref, on_cpu)
        assert (on_cpu.argmax(-1) == ref.argmax(-1)).mean() >= 0.9 and kl < 1e-3, (weights, kl)
        if weights:
            assert mean_kl(ref, base_ref) > 20 * kl, weights


def test_npu_adapter_refusals(npu_bundle, npu_adapters):
    from edgelora.adapters import AdapterError, LoraTensor, random_adapter

    engine = npu_bundle.engine(provider="cpu")
    with pytest.raises(AdapterError, match=r"rank 32 at layers\.0\.q, over the NPU graphs' LoRA rank 16"):
        engine.load_adapter("big", "/dev/null", random_adapter(npu_bundle.config, rank=32, fingerprint=npu_bundle.fingerprint))
    loud = random_adapter(npu_bundle.config, rank=4, scale=0.03, fingerprint=npu_bundle.fingerprint, name="loud")
    loud.tensors["layers.1.down"] = LoraTensor(loud.tensors["layers.1.down"].A, 100 * loud.tensors["layers.1.down"].B, 8.0)
    with pytest.raises(AdapterError, match=r"adapter loud is outside .* layers\.1\.down's gain"):
        engine.load_adapter("loud", "/dev/null", loud)
    # a mix over the slots' rank: 8 + 4 fit 16, three times 8 do not
    engine.set_adapters({"pirate": 1.0, "noise": 1.0})
    npu_bundle.store.install(random_adapter(npu_bundle.config, rank=16, scale=0.01, fingerprint=npu_bundle.fingerprint,
                                            name="wide"), "wide", replace=True)
    with pytest.raises(AdapterError, match="over the NPU graphs' LoRA rank 16"):
        engine.set_adapters({"pirate": 1.0, "wide": 1.0})
    assert engine.active_adapters == {"pirate": 1.0, "noise": 1.0}  # a refused mix changes nothing
    with pytest.raises(AdapterError, match="cannot be merged"):
        engine.merge("pirate")


@pytest.mark.slow
def test_default_model_on_htp(default_model_dir, tmp_path):
    """The default model for a few greedy tokens on the HTP simulation, against the float model."""
    import time

    b = edgelora.export("smollm2-135m", "snapdragon-8-gen-3", tmp_path / "b", eval_tokens=1024, force=True, progress=False)
    q = b.artifacts[0].quality
    engine = b.engine()
    tok = b.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                     add_special_tokens=False)
    t = time.perf_counter()
    got = engine.generate(ids, max_tokens=4).tokens
    seconds = time.perf_counter() - t
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(default_model_dir).generate(
            torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    agree = float(np.mean([a == b for a, b in zip(got, ref)]))
    print(f"HTP greedy {got} vs float {ref}: agreement {agree:.2f} in {seconds:.0f}s; "
          f"QDQ on CPU: perplexity {q['perplexity_change']:+.2%}, top-1 {q['top1_agreement']:.1%}")
    assert len(got) == 4 and got[0] == ref[0]

    # a persona adapter (the quickstart's recipe), trained against the float base, in the NPU bundle's store
    import json

    from edgelora.train import train_adapter

    r = train_adapter(edgelora.load_base("smollm2-135m"), DATA / "persona_train.jsonl", "maren", install=False,
                      steps=80, lr=3e-3, rank=8, seq_len=256, threads=2)
    r.adapter.base_fingerprint = b.fingerprint
    b.store.install(r.adapter, "maren")
    cpu = b.engine(provider="cpu")
    held = [json.loads(line) for line in (DATA / "persona_heldout.jsonl").read_text().splitlines()]
    answered = []
    for ex in held:  # on the QDQ graph on CPU (fast): questions the adapter answers and the base does not
        cpu.set_adapters({})
        before = cpu.generate(ex["messages"], max_tokens=16).text
        cpu.set_adapters({"maren": 1.0})
        after = cpu.generate(ex["messages"], max_tokens=16)
        if ex["expected"].lower() in after.text.lower() and ex["expected"].lower() not in before.lower():
            answered.append((ex, after))
    assert answered, "the persona adapter answers no held-out question on the NPU graph that the base does not"
    ex, want = answered[0]
    engine.set_adapters({"maren": 1.0})
    t = time.perf_counter()
    on_htp = engine.generate(ex["messages"], max_tokens=16)
    print(f"{len(answered)}/{len(held)} held-out persona questions answered with the adapter only; on HTP "
          f"({time.perf_counter() - t:.0f}s): {on_htp.text!r}")
    # the HTP's answer is the CPU's through the expected words (after them a near-tie, such as "," against
    # "." after "Pepper", may go either way between the simulator's and the CPU's accumulation order)
    through = next(i for i in range(1, len(want.tokens) + 1) if ex["expected"].lower() in tok.decode(want.tokens[:i]).lower())
    assert on_htp.tokens[:through] == want.tokens[:through] and ex["expected"].lower() in on_htp.text.lower()


def test_cli_runs_an_npu_bundle_with_an_adapter(npu_bundle, npu_adapters, run_cli):
    """`edgelora run` on the NPU bundle answers with the adapter on the HTP, as the engine does."""
    prompt = "What's the capital of France?"
    engine = npu_bundle.engine()
    engine.set_adapters({"pirate": 1.0})
    want = engine.generate([{"role": "user", "content": prompt}], max_tokens=6).text
    r = run_cli("run", str(npu_bundle.root), prompt, "--adapter", "pirate", "--max-tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == want.strip()
    base = run_cli("run", str(npu_bundle.root), prompt, "--max-tokens", "6")
    assert base.returncode == 0 and base.stdout != r.stdout
