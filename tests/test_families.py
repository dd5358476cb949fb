"""Every supported family through every path, on a tiny random model of each made by transformers:
intake and fingerprint, GGUF in llama.cpp, the fused ONNX graph, PEFT adapters in both engines, and
the numpy trainer's loss and gradients, each against transformers / PEFT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora.converters import load_adapter, save_adapter
from edgelora.converters import gguf_model, onnx_model
from edgelora.runtime.gguf import GGUFEngine
from edgelora.train.model import LORA_KINDS, LoraParams, LoraSpec, loss_and_grads, masked_loss
from edgelora.quality import mean_kl
from tests.families import FAMILY_NAMES, PEFT_TARGETS, build_family
from tests.peft_util import base_logits, make_peft_adapter, peft_logits, peft_loss_and_grads

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
    # the tiny Phi is named for Phi-4-mini, which it models: llama.cpp insists on Phi-3's own special tokens
    # in any model whose name says phi3 (src/llama-vocab.cpp), and the test tokenizer has none of them
    path = build_family(name, tmp / f"tiny-{'phi4mini' if name == 'phi3' else name}", tied=tied, seed=3 if tied else 0)
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


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_optimum_onnx_quantized_keeps_its_slots_and_the_logits(family, quant):
    """optimum's export of the family, quantized by ONNX Runtime's quantizers with the LoRA slots left
    in float: by KL against transformers (measured int8 <= 4e-5, int4 <= 1.7e-3)."""
    from edgelora.runtime.onnx import OnnxEngine

    name, path, base, ids, tmp = family
    graph = onnx_model.export(path, tmp / f"optimum-{quant}", base.config, quant)
    with OnnxEngine(graph, base.config, threads=1, n_ctx=128) as e:
        assert e.slots  # the slots survived quantization
        assert mean_kl(base_logits(path, ids), e.logits(ids)) < QUANT_KL[quant]


def _engine(kind, base, tmp):
    from edgelora.converters import onnx_fused
    from edgelora.runtime.onnx import OnnxEngine

    if kind == "gguf":
        gguf = tmp / "f32.gguf"
        if not gguf.exists():
            gguf_model.write(base, gguf, "F32")
        return GGUFEngine(gguf, n_ctx=128, threads=1, kv_type="f32", fingerprint=base.fingerprint, tokenizer=base.tokenizer)
    graph = tmp / f"{kind}-f32" / "model.onnx"
    if not graph.exists():
        if kind == "onnx":
            onnx_fused.export(base, graph.parent, "f32", max_len=256)
        else:  # optimum's export, with a LoRA slot per module (Phi-3's fused modules: one each)
            onnx_model.export(base.source, graph.parent, base.config, "f32")
    return OnnxEngine(graph, base.config, threads=1, n_ctx=128, tokenizer=base.tokenizer, fingerprint=base.fingerprint)


ENGINES = ["gguf", "onnx", "optimum"]
EXT = {"gguf": ".gguf", "onnx": ".onnx_adapter", "optimum": ".onnx_adapter"}


@pytest.fixture(scope="module")
def second_adapter(family):
    """A second PEFT adapter, lower rank, on a subset of the modules (attention output and down)."""
    name, path, base, ids, tmp = family
    return make_peft_adapter(path, tmp / "peft-b", r=2, alpha=4, seed=8, targets=("o_proj", "down_proj"))


@pytest.mark.parametrize("kind", ENGINES)
def test_peft_adapters_in_each_engine_equal_peft(family, peft_adapter, second_adapter, kind):
    """One adapter, a weighted mix of two (different ranks and modules) and none, swapped on the
    loaded base; then a merge and its undo."""
    name, path, base, ids, tmp = family
    files = {}
    for key, source in (("a", peft_adapter), ("b", second_adapter)):
        adapter = load_adapter(source, base.config)
        adapter.base_fingerprint = base.fingerprint
        files[key] = save_adapter(adapter, tmp / f"{key}-{kind}{EXT[kind]}", "gguf" if kind == "gguf" else "onnx",
                                  base.config)
    assert set(load_adapter(peft_adapter, base.config).target_kinds) == set(LORA_KINDS)
    atol = GGUF_ATOL.get(name, 2e-5) if kind == "gguf" else 5e-5
    peft = {"a": peft_adapter, "b": second_adapter}
    with _engine(kind, base, tmp) as e:
        for key, f in files.items():
            e.load_adapter(key, f)
        e.set_adapters({"a": 1.0})
        np.testing.assert_allclose(e.logits(ids), peft_logits(path, {"a": peft_adapter}, ids), rtol=0, atol=atol)
        mix = {"a": 0.6, "b": 1.5}
        e.set_adapters(mix)
        np.testing.assert_allclose(e.logits(ids), peft_logits(path, peft, ids, weights=mix), rtol=0, atol=atol)
        e.clear_adapters()
        np.testing.assert_allclose(e.logits(ids), base_logits(path, ids), rtol=0, atol=atol)
        e.merge("b", 1.0)  # the adapter folded into the (float) weights, then taken out again
        np.testing.assert_allclose(e.logits(ids), peft_logits(path, {"b": second_adapter}, ids), rtol=0,
                                   atol=max(atol, 1e-4))
        e.unmerge()
        np.testing.assert_allclose(e.logits(ids), base_logits(path, ids), rtol=0, atol=atol)


def test_llama_cpp_decode_steps_with_adapters_equal_peft(family, peft_adapter, second_adapter):
    """One token at a time on 2 threads (n_batch 1), where the patched llama.cpp computes the first
    active adapter inside each projection's own mul_mat and the second in a node of its own: a weighted
    mix of two gives PEFT's logits for each family (the counter shows the mul_mat route ran)."""
    from edgelora.runtime.gguf import lora_in_matmul

    name, path, base, ids, tmp = family
    _engine("gguf", base, tmp).close()  # writes the F32 GGUF once
    peft = {"a": peft_adapter, "b": second_adapter}
    mix = {"a": 0.6, "b": 1.5}
    with GGUFEngine(tmp / "f32.gguf", n_ctx=128, threads=2, kv_type="f32", fingerprint=base.fingerprint,
                    tokenizer=base.tokenizer, n_batch=1) as e:
        for key, source in peft.items():
            adapter = load_adapter(source, base.config)
            adapter.base_fingerprint = base.fingerprint
            e.load_adapter(key, save_adapter(adapter, tmp / f"{key}-steps.gguf", "gguf", base.config))
        e.set_adapters(mix)
        before = lora_in_matmul()
        got = e.logits(ids)
        assert lora_in_matmul() > before
    np.testing.assert_allclose(got, peft_logits(path, peft, ids, weights=mix), rtol=0, atol=GGUF_ATOL.get(name, 2e-5))


@pytest.mark.parametrize("kind", ENGINES)
def test_greedy_decoding_through_the_kv_cache_equals_transformers(family, kind):
    """Token by token through each engine's KV cache, past Gemma 3's window: transformers' greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    name, path, base, ids, tmp = family
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, len(ids):]
    with _engine(kind, base, tmp) as e:
        out = e.generate(list(ids), max_tokens=12)
    n = len(out.tokens)
    assert n >= 1
    assert out.tokens == ref.tolist()[:n]


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
    ref_loss, ref = peft_loss_and_grads(path, peft_adapter, tokens, mask)
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


# int8/int4 of random tiny weights against the float model (measured: int8 KL <= 1e-5, int4 <= 9e-4;
# a wrong op, e.g. a norm without its (1+w), gives KL far above 1e-2)
QUANT_KL = {"int8": 5e-5, "int4": 3e-3}


@pytest.mark.parametrize("quant", ["f32", "int8", "int4"])
def test_fused_onnx_logits_equal_transformers(family, quant):
    """The fused graph (GroupQueryAttention with the family's rotary, window and scale; biases in
    MatMulNBits; q/k norms; GeGLU; sandwich norms) against transformers: exact in f32, by KL when
    quantized."""
    from edgelora.converters import onnx_fused
    from edgelora.runtime.onnx import OnnxEngine

    name, path, base, ids, tmp = family
    graph = onnx_fused.export(base, tmp / f"fused-{quant}", quant, max_len=256)
    ref = base_logits(path, ids)
    with OnnxEngine(graph, base.config, threads=1, n_ctx=128, tokenizer=base.tokenizer, fingerprint=base.fingerprint) as e:
        out = e.logits(ids)
    if quant == "f32":
        np.testing.assert_allclose(out, ref, rtol=0, atol=5e-5)
    else:
        assert mean_kl(ref, out) < QUANT_KL[quant]


@pytest.mark.parametrize("adapter_type", ["f16", "q8"])
def test_fused_q41_graph_keeps_the_adapters_effect_in_narrow_slots(family, peft_adapter, adapter_type):
    """The int4 graph on edgelora's MatMulQ41 (biases, fused q|k|v, q/k norms, GeGLU around it), on
    weights that are exactly Q4_1, with float activations: with f32 slots the adapter's effect on the
    logits is the f32 fused graph's on the same weights (itself equal to transformers + PEFT above)
    up to the int4 graph's 8-bit LM head (3%; measured 0.6-1.9%, the tied Gemma the most);
    with the adapter read in f16 or 8 bits the base logits stay bit for bit and the effect stays close
    (f16: 0.1%; 8 bits: 2%, measured up to 1.4% on these tiny random models, 0.04% on the default
    model)."""
    import dataclasses

    import onnx

    from edgelora import native
    from edgelora.converters import onnx_fused, q41
    from edgelora.runtime.onnx import OnnxEngine

    if native.library(warn=False) is None:
        pytest.skip("the operator library is not built (scripts/env.sh builds it)")
    name, path, base, ids, tmp = family
    weights = {}
    for k in base.weights:  # the projections as exact Q4_1, so that MatMulQ41 holds them as they are
        w = base.weights[k]
        if k.rsplit(".", 1)[-1] in LORA_KINDS and w.ndim == 2 and not w.shape[1] % 32:
            q, d, m = q41.quantize(w)
            w = (q * d[..., None] + m[..., None]).reshape(w.shape).astype(np.float32)
        weights[k] = w
    exact = dataclasses.replace(base, weights=weights, _fingerprint=base.fingerprint)
    adapter = load_adapter(peft_adapter, base.config)
    adapter.base_fingerprint = base.fingerprint
    file = save_adapter(adapter, tmp / "a-q41.onnx_adapter", "onnx", base.config)
    out = {}
    for t in ("float", "f32", adapter_type):
        graph = onnx_fused.export(exact, tmp / f"q41-{t}", "f32" if t == "float" else "int4", max_len=128,
                                  kernel="q41", adapter_type="f32" if t == "float" else t, accuracy_level=0)
        if t in ("f16", "q8"):  # the narrow slots are there (a node whose outputs are not whole tiles takes f16)
            types = {v.dtype for v in onnx_fused.graph_slots(onnx.load(str(graph), load_external_data=False)).values()}
            assert {"f16": np.float16, "q8": np.uint8}[t] in types, types
        with OnnxEngine(graph, base.config, threads=1, n_ctx=128, tokenizer=base.tokenizer, fingerprint=base.fingerprint) as e:
            plain = e.logits(ids)
            e.load_adapter("a", file)
            e.set_adapters(["a"])
            out[t] = plain, e.logits(ids)
    np.testing.assert_array_equal(out[adapter_type][0], out["f32"][0])
    ref, effect, narrow = (out[t][1] - out[t][0] for t in ("float", "f32", adapter_type))
    assert np.linalg.norm(narrow - effect) <= {"f16": 0.001, "q8": 0.02}[adapter_type] * np.linalg.norm(effect)
    assert np.linalg.norm(effect - ref) <= 0.03 * np.linalg.norm(ref)


@pytest.fixture(scope="module")
def family_bundle(family, tmp_path_factory, run_cli_module):
    """`edgelora export` of the family's tiny model for x86-64 with both backends, by the CLI."""
    name, path, base, ids, tmp = family
    out = tmp / "bundle"
    r = run_cli_module("export", "--model", str(path), "--device", "x86-64", "--backend", "both", "--out", str(out),
                       "--force", "-q", "--eval-tokens", "512")
    assert r.returncode == 0, r.stderr
    return out


def test_cli_export_install_train_run(family, family_bundle, peft_adapter, run_cli_module):
    """The default model's commands, unchanged, on each family: install a PEFT adapter, train on the
    device's own data, answer with the trained adapter in both engines."""
    name, *_ = family
    assert edgelora.open_bundle(family_bundle).adapter_precision == "q8_0"  # x86-64's default on its quantized bundle
    r = run_cli_module("adapter", "install", str(family_bundle), str(peft_adapter), "--name", "style")
    assert r.returncode == 0, r.stderr
    assert "targets q,k,v,o,gate,up,down" in r.stdout
    data = str(Path(edgelora.__file__).parent / "data" / "persona_train.jsonl")
    r = run_cli_module("train", str(family_bundle), "--data", data, "--name", "me", "--steps", "3", "--rank", "2")
    assert r.returncode == 0, r.stderr
    for backend in ("gguf", "onnx"):
        r = run_cli_module("run", str(family_bundle), "Hello", "--adapter", "me", "--backend", backend, "--max-tokens", "4")
        assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("backend", ["gguf", "onnx"])
def test_trainer_reads_the_bundles_compact_weights_exactly(family, family_bundle, backend, tmp_path):
    """The trainer's base is the bundle's own quantized weights: its numpy logits equal the runtime's
    own (ONNX Runtime computing in float; llama.cpp's GGUF dequantized by the gguf package)."""
    from edgelora.train.model import forward_logits
    from edgelora.train.weights import for_bundle
    from tests.ort_util import onnxruntime_logits

    name, path, base, ids, tmp = family
    b = edgelora.open_bundle(family_bundle)
    compact, used = for_bundle(b, backend=backend)
    assert used == backend
    ours = forward_logits(compact, None, np.array([ids]), b.config)[0]
    if backend == "onnx":
        ref = onnxruntime_logits(b.path(b.artifact("onnx").main), ids, b.config, tmp_path)
    else:
        full = edgelora.load_base(b.path(b.artifact("gguf").main))
        ref = forward_logits({n: full.weights[n] for n in full.weights}, None, np.array([ids]), b.config)[0]
    np.testing.assert_allclose(ours, ref, atol=2e-6 * np.abs(ref).max(), rtol=0)


@pytest.fixture(scope="session")
def llama_cpp_converter(tmp_path_factory):
    from tests.llamacpp_util import converter

    cache = tmp_path_factory.getbasetemp() / "llama.cpp-src"
    converter(cache)
    return cache


def test_gguf_from_llama_cpps_own_converter_reads_as_the_hf_dir(family, llama_cpp_converter):
    """Intake of the GGUF a user gets from llama.cpp's convert_hf_to_gguf.py: same architecture,
    same weights (fingerprint), same tokenizer as the Hugging Face directory."""
    from tests.llamacpp_util import convert

    name, path, base, ids, tmp = family
    if name == "gemma3" and not base.config.tie_word_embeddings:
        pytest.skip("Gemma 3 ties its embeddings; llama.cpp's converter shortens only the embedding, so an untied "
                    "padded one gives a file llama.cpp itself cannot load")
    theirs = edgelora.load_base(convert(llama_cpp_converter, path, tmp / "llama.cpp.gguf"))
    assert theirs.tokenizer.encode(TEXT) == ids
    if name == "gemma3":  # llama.cpp's Gemma 3 converter drops the embedding's padding rows: the rest is equal
        rows = theirs.config.vocab_size
        assert rows < base.config.vocab_size
        assert theirs.config.identity() == {**base.config.identity(), "vocab_size": rows}
        np.testing.assert_array_equal(theirs.weights["embed"], base.weights["embed"][:rows])
        assert all(np.array_equal(theirs.weights[n], base.weights[n]) for n in base.weights if n != "embed")
        return
    assert theirs.config.identity() == base.config.identity()
    assert theirs.fingerprint == base.fingerprint
    with GGUFEngine(tmp / "llama.cpp.gguf", n_ctx=128, threads=1, kv_type="f32", fingerprint=base.fingerprint) as e:
        np.testing.assert_allclose(e.logits(ids), base_logits(path, ids), rtol=0, atol=GGUF_ATOL.get(name, 2e-5))


def test_npu_bundle_runs_wholly_on_htp(family, isolated_cache, tmp_path):
    """The Snapdragon profile's static QDQ graphs of each family run on the QNN HTP backend with CPU
    fallback disabled (q/k norms, biases, GeGLU, sandwich norms, the sliding-window mask as a second
    input): the HTP's logits follow the QDQ graph on CPU (the simulator rounds its 16-bit activations
    its own way; measured <= 4% of the logits' scale) and the float model (top-1)."""
    pytest.importorskip("onnxruntime_qnn")
    name, path, base, ids, tmp = family
    b = edgelora.export(path, "snapdragon-8-gen-3", tmp_path / "npu", eval_tokens=1024, progress=False, force=True)
    (art,) = b.artifacts
    assert art.quant == "qdq" and art.quality["top1_agreement"] > 0.9
    tok = b.tokenizer()
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": TEXT}]), add_special_tokens=False)
    with b.engine() as htp, b.engine(provider="cpu") as cpu:
        assert htp.provider == "htp"
        got, qdq = htp.logits(chat), cpu.logits(chat)
    ref = base_logits(path, chat)[1:]
    assert np.abs(got - qdq).max() <= 0.08 * np.abs(qdq).max()
    assert (got.argmax(-1) == qdq.argmax(-1)).mean() >= 0.85
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.85
    # an adapter in the graphs' LoRA slots, on every projection: HTP follows the QDQ graph, which follows
    # transformers + PEFT with the adapter (judged in KL against the adapter's effect: tiny random models
    # have flat logits, so top-1 is a weak measure there)
    from edgelora.adapters import random_adapter

    base_ref = ref
    adapter = random_adapter(b.config, rank=8, seed=3, scale=0.03, fingerprint=b.fingerprint, name="x")
    b.store.install(adapter, "x")
    peft_dir = save_adapter(adapter, tmp_path / "peft-x", "peft", b.config)
    with b.engine() as htp, b.engine(provider="cpu") as cpu:
        htp.set_adapters(["x"])
        cpu.set_adapters(["x"])
        got, qdq = htp.logits(chat), cpu.logits(chat)
    ref = peft_logits(path, {"x": peft_dir}, chat)[1:]
    assert np.abs(got - qdq).max() <= 0.08 * np.abs(qdq).max()
    assert (got.argmax(-1) == qdq.argmax(-1)).mean() >= 0.85
    # the QDQ graph's error with the adapter is a fraction of the adapter's own effect (measured 5-16% in
    # KL over the ten families, against ~1e-5 without an adapter; the fixed BOS prefix, whose K/V are
    # the base's, is most of it: 6.5-7.8% in float on Llama 3 and Qwen3; a known limit)
    assert mean_kl(ref, qdq) < mean_kl(ref, base_ref) / 4, (mean_kl(ref, qdq), mean_kl(ref, base_ref))



def test_sliding_window_llama_cpp_would_ignore_is_refused(tmp_path):
    """Mistral's (and Phi-3-mini's) sliding window: llama.cpp's `llama`/`phi3` ignore it, so a GGUF
    of it would answer differently past the window: refused with one line naming family and feature."""
    from edgelora.errors import UnsupportedArchitectureError
    from tests.conftest import build_tiny_llama

    path = build_tiny_llama(tmp_path / "mistral", model_type="mistral")
    cfg = __import__("json").loads((path / "config.json").read_text())
    (path / "config.json").write_text(__import__("json").dumps({**cfg, "sliding_window": 16}))
    base = edgelora.load_base(path)
    with pytest.raises(UnsupportedArchitectureError) as info:
        gguf_model.write(base, tmp_path / "m.gguf", "F32")
    assert "llama (mistral) with a 16-token sliding window: llama.cpp ignores the window" in str(info.value)
    assert "\n" not in str(info.value)
