"""The numpy trainer: loss and LoRA gradients against PEFT + torch autograd and finite differences;
the loop's determinism, kill-and-resume, data errors, and the adapter it installs."""

import json
import signal

import numpy as np
import pytest

import edgelora
from edgelora.train import TrainConfig, train_adapter
from edgelora.train.data import DataError
from edgelora.train.model import LoraParams, LoraSpec, loss_and_grads, masked_loss
from tests.conftest import train_killed_at
from tests.ort_util import onnxruntime_logits
from tests.peft_util import make_peft_adapter, peft_loss_and_grads

KINDS = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
              "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


pytestmark = pytest.mark.usefixtures("isolated_cache")


def _lora_from_adapter(adapter, config, dtype=np.float32):
    lora = LoraParams(config, LoraSpec(adapter.rank, adapter.alpha, KINDS))
    for t, lt in adapter.tensors.items():
        lora.views[f"{t}.A"][...] = lt.A
        lora.views[f"{t}.B"][...] = lt.B
    return lora.astype(dtype) if dtype != np.float32 else lora


def _torch_reference(base_dir, peft_dir, tokens, mask):
    """PEFT's loss and LoRA gradients, by canonical view name (layers.{i}.{kind}.A/B)."""
    loss, by_param = peft_loss_and_grads(base_dir, peft_dir, tokens, mask)
    grads = {}
    for n, g in by_param.items():
        i = int(n.split(".layers.")[1].split(".")[0])
        kind = next(k for k, m in PEFT_NAMES.items() if f".{m}.lora_" in n)
        grads[f"layers.{i}.{kind}.{'A' if '.lora_A.' in n else 'B'}"] = g
    return loss, grads


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied"])
def test_loss_and_gradients_equal_peft(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    base = edgelora.load_base(path)
    peft_dir = make_peft_adapter(path, tmp_path / "peft", r=4, alpha=8)
    lora = _lora_from_adapter(edgelora.load_adapter(peft_dir), base.config)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, base.config.vocab_size, size=(2, 16))
    mask = rng.random((2, 16)) < 0.6
    weights = {n: base.weights[n] for n in base.weights}
    loss, grad = loss_and_grads(weights, lora, tokens, mask, base.config)
    ref_loss, ref = _torch_reference(path, peft_dir, tokens, mask)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert masked_loss(weights, lora, tokens, mask, base.config, vocab_rows=7) == pytest.approx(loss, rel=1e-6)
    views = lora.views_of(grad)
    assert set(views) == set(ref)
    for name, g in views.items():
        np.testing.assert_allclose(g, ref[name], rtol=1e-4, atol=1e-5 * np.abs(ref[name]).max(), err_msg=name)


def test_gradients_equal_finite_differences(tiny_llama):
    base = edgelora.load_base(tiny_llama)
    weights = {n: base.weights[n].astype(np.float64) for n in base.weights}
    rng = np.random.default_rng(1)
    lora = LoraParams(base.config, LoraSpec(2, 4.0, KINDS), dtype=np.float64)
    lora.flat[:] = rng.standard_normal(lora.size) * 0.05
    tokens = rng.integers(0, base.config.vocab_size, size=(1, 12))
    mask = np.ones((1, 12), bool)
    _, grad = loss_and_grads(weights, lora, tokens, mask, base.config)
    eps = 1e-6
    for j in rng.choice(lora.size, 8, replace=False):
        old = lora.flat[j]
        lora.flat[j] = old + eps
        up, _ = loss_and_grads(weights, lora, tokens, mask, base.config)
        lora.flat[j] = old - eps
        down, _ = loss_and_grads(weights, lora, tokens, mask, base.config)
        lora.flat[j] = old
        assert abs((up - down) / (2 * eps) - grad[j]) <= 1e-6 + 1e-5 * abs(grad[j])


@pytest.mark.slow
def test_default_model_loss_and_gradients_equal_peft(default_model_dir, tmp_path):
    """The whole default model (30 layers, tied head): loss and every LoRA gradient against PEFT+torch
    in float32, as trained. (Not tighter in float64: transformers computes RMSNorm and RoPE in
    float32 even in a float64 model, which leaves ~1e-5 relative differences in the logits.)"""
    base = edgelora.load_base(default_model_dir)
    peft_dir = make_peft_adapter(default_model_dir, tmp_path / "peft", r=4, alpha=8, seed=5)
    adapter = edgelora.load_adapter(peft_dir)
    ids = base.tokenizer.encode("The quick brown fox jumps over the lazy dog. Small language models run on phones and "
                                "Raspberry Pis, and adapters personalize them where the data lives.")
    tokens = np.array([ids], np.int64)
    mask = np.ones_like(tokens, bool)
    mask[0, : len(ids) // 3] = False
    lora = _lora_from_adapter(adapter, base.config)
    weights = {n: base.weights[n] for n in base.weights}
    loss, grad = loss_and_grads(weights, lora, tokens, mask, base.config)
    ref_loss, ref = _torch_reference(default_model_dir, peft_dir, tokens, mask)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    views = lora.views_of(grad)
    assert set(views) == set(ref) and len(views) == 30 * 7 * 2
    worst = max(np.linalg.norm(g - ref[n]) / np.linalg.norm(ref[n]) for n, g in views.items())
    print(f"loss {loss:.6f} vs PEFT {ref_loss:.6f}; worst relative gradient error (L2) over {len(views)} tensors {worst:.2e}")
    assert worst < 1e-3, worst


# -- the base as the device holds it -----------------------------------------------------------

@pytest.mark.parametrize("quant", ["q8_0", "q4_0", "f16", "q4_k_m"])
def test_compact_gguf_weights_equal_the_gguf_packages_dequantization(quant, tiny_llama, tmp_path):
    from edgelora.converters import gguf_model
    from edgelora.train.weights import BlockQuant, BlockRows, for_bundle

    b = edgelora.export(tiny_llama, "x86-64", tmp_path / "b", backend="gguf", quant=quant, force=True, progress=False)
    compact, backend = for_bundle(b)
    ref = gguf_model.read(b.path(b.artifact("gguf").main)).weights  # gguf.quants.dequantize, q/k unpermuted
    assert backend == "gguf" and set(compact) == set(ref)
    for name in ref:
        np.testing.assert_array_equal(compact[name], ref[name], err_msg=name)
    if quant in ("q8_0", "q4_0"):  # kept in blocks: about 1 (Q8_0) or 0.56 (Q4_0) bytes a weight
        assert all(isinstance(p, BlockQuant) for p in compact.packed.values())
        float_bytes = 4 * sum(np.prod(ref.shape(n)) for n in compact.packed)
        assert sum(p.nbytes for p in compact.packed.values()) < (0.3 if quant == "q8_0" else 0.16) * float_bytes
        # the codes are the mapped file's own pages, not copies (rope-permuted q/k rows excepted)
        unpermuted = [p for n, p in compact.packed.items() if n.rsplit(".", 1)[1] not in ("q", "k")]
        assert unpermuted and all(_mapped(p.q) for p in unpermuted)
        assert isinstance(compact.dense["embed"], BlockRows) and _mapped(compact.dense["embed"].blocks.q)
    assert len(compact._cache) <= compact.keep_layers


def _mapped(a) -> bool:
    while a is not None and not isinstance(a, np.memmap):
        a = a.base
    return a is not None


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied"])
def test_a_head_kept_in_blocks_gives_the_expanded_heads_loss_and_gradients(fixture, request, tmp_path):
    """The embedding and LM head stay in their Q8_0 blocks, the head multiplied a few vocabulary
    rows at a time (several chunks here): the same loss and gradients as the expanded weights."""
    from edgelora.train.weights import BlockRows, for_bundle

    b = edgelora.export(request.getfixturevalue(fixture), "x86-64", tmp_path / "b", backend="gguf", quant="q8_0",
                        force=True, progress=False)
    compact, _ = for_bundle(b)
    tables = [n for n in ("embed", "lm_head") if isinstance(compact.dense.get(n), BlockRows)]
    assert tables == (["embed"] if b.config.tie_word_embeddings else ["embed", "lm_head"])
    for n in tables:
        compact.dense[n].chunk_rows = 37  # not a divisor of the vocabulary: a short last chunk
    expanded = compact.expanded()
    assert all(isinstance(v, np.ndarray) for v in expanded.values())
    rng = np.random.default_rng(0)
    lora = LoraParams(b.config, LoraSpec(4, 8.0)).init_random(rng)
    for arr in lora.views.values():
        arr[...] = rng.normal(0, 0.02, arr.shape)  # B nonzero too: every gradient path is live
    tokens = rng.integers(0, b.config.vocab_size, (2, 24))
    mask = np.ones_like(tokens, bool)
    loss, grad = loss_and_grads(compact, lora, tokens, mask, b.config, vocab_rows=16)
    ref_loss, ref_grad = loss_and_grads(expanded, lora, tokens, mask, b.config, vocab_rows=16)
    assert abs(loss - ref_loss) <= 1e-6 * abs(ref_loss)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * np.abs(ref_grad).max())


@pytest.mark.parametrize("quant", ["int4", "int8", "f32"])
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_llama_tied", "tiny_llama_q41"])
def test_compact_onnx_weights_reproduce_onnxruntime_logits(quant, fixture, request, tmp_path):
    from edgelora.train.model import forward_logits
    from edgelora.train.weights import for_bundle

    b = edgelora.export(request.getfixturevalue(fixture), "x86-64", tmp_path / "b", backend="onnx", quant=quant,
                        force=True, progress=False)
    compact, backend = for_bundle(b)
    assert backend == "onnx"
    ids = b.tokenizer().encode("The quick brown fox jumps over the lazy dog. Edge devices run small models.")
    ours = forward_logits(compact, None, np.array([ids]), b.config)[0]
    ref = onnxruntime_logits(b.path(b.artifact("onnx").main), ids, b.config, tmp_path)
    np.testing.assert_allclose(ours, ref, atol=2e-6 * np.abs(ref).max(), rtol=0)


def _chats(path, n=12):
    lines = []
    for i in range(n):
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"What is my dog called? ({i})"},
                                              {"role": "assistant", "content": "Your dog is Pepper, a border collie."}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def gguf_bundle(tiny_llama, tmp_path_factory, isolated_cache):
    return edgelora.export(tiny_llama, "x86-64", tmp_path_factory.mktemp("train") / "b", backend="both", quant="f32",
                           eval_tokens=512, progress=False)


def test_training_lowers_loss_and_installs_an_adapter_both_engines_use(gguf_bundle, tmp_path):
    data = _chats(tmp_path / "d.jsonl")
    r = train_adapter(gguf_bundle, data, "pepper", steps=150, lr=2e-2, rank=8, seq_len=128, eval_every=50, seed=3)
    assert np.mean(r.losses[-5:]) < np.mean(r.losses[:5]) - 1.0
    assert r.val_losses and r.val_losses[-1][1] < r.val_losses[0][1]
    assert "pepper" in gguf_bundle.store.names()
    tok = gguf_bundle.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is my dog called?"}]), add_special_tokens=False)
    for backend in ("gguf", "onnx"):
        e = gguf_bundle.engine(backend, threads=1)
        before = e.generate(ids, max_tokens=6).tokens
        e.set_adapters({"pepper": 1.0})
        after = e.generate(ids, max_tokens=6).tokens
        assert after != before
        e.close()


def test_memory_cap_decides_how_much_is_expanded_and_never_the_result(tiny_llama, tmp_path):
    from edgelora.train import base_weights, plan_memory
    from edgelora.train.weights import BlockRows

    b = edgelora.export(tiny_llama, "x86-64", tmp_path / "b", backend="gguf", quant="q8_0", force=True, progress=False)
    config, w, _ = base_weights(b)
    assert plan_memory(w, TrainConfig(memory_mb=1.0), config) == (2, False)  # tight: two layers expanded at a time
    assert plan_memory(w, TrainConfig(memory_mb=4096.0), config) == (config.num_layers, True)
    assert plan_memory(w, TrainConfig(memory_mb=4096.0, expanded_layers=1), config) == (1, False)
    # the embedding stays in its blocks unless every layer and the float table fit
    assert isinstance(base_weights(b, TrainConfig(memory_mb=1.0))[1].dense["embed"], BlockRows)
    assert isinstance(base_weights(b, TrainConfig(memory_mb=4096.0))[1].dense["embed"], np.ndarray)
    assert isinstance(base_weights(b, TrainConfig(memory_mb=4096.0, expanded_layers=1))[1].dense["embed"], BlockRows)
    data = _chats(tmp_path / "d.jsonl")
    # the tiny model has two layers: one expanded at a time is the compact path
    tight = train_adapter(b, data, "tight", steps=8, lr=1e-2, rank=4, seq_len=128, seed=2, expanded_layers=1, install=False)
    roomy = train_adapter(b, data, "roomy", steps=8, lr=1e-2, rank=4, seq_len=128, seed=2, memory_mb=4096.0, install=False)
    assert tight.losses == roomy.losses
    for t in tight.adapter.tensors:
        np.testing.assert_array_equal(tight.adapter.tensors[t].B, roomy.adapter.tensors[t].B)


def test_training_against_an_onnx_int4_bundle(tiny_llama, tmp_path):
    b = edgelora.export(tiny_llama, "x86-64", tmp_path / "b", backend="onnx", quant="int4", force=True, progress=False)
    r = train_adapter(b, _chats(tmp_path / "d.jsonl"), "pepper", steps=60, lr=2e-2, rank=4, seq_len=128, seed=1)
    assert np.mean(r.losses[-5:]) < np.mean(r.losses[:5]) - 0.5
    e = b.engine("onnx", threads=1)
    tok = b.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is my dog called?"}]), add_special_tokens=False)
    before = e.generate(ids, max_tokens=6).tokens
    e.set_adapters({"pepper": 1.0})
    assert e.generate(ids, max_tokens=6).tokens != before
    e.close()


def test_same_seed_same_adapter_and_kill_resume(gguf_bundle, tmp_path):
    data = _chats(tmp_path / "d.jsonl")
    kw = dict(steps=12, lr=3e-3, rank=2, seq_len=128, checkpoint_every=3, seed=5)
    a = train_adapter(gguf_bundle, data, "a", install=False, **kw).adapter
    b = train_adapter(gguf_bundle, data, "b", install=False, **kw).adapter
    for t in a.targets:
        np.testing.assert_array_equal(a.tensors[t].B, b.tensors[t].B)
    ckpt = tmp_path / "ckpt"
    proc = train_killed_at(gguf_bundle.root, data, "c", ckpt, 7, **kw)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    resumed = train_adapter(gguf_bundle, data, "c", install=False, checkpoint_dir=ckpt, resume=True, **kw)
    for t in a.targets:
        np.testing.assert_array_equal(resumed.adapter.tensors[t].A, a.tensors[t].A)
        np.testing.assert_array_equal(resumed.adapter.tensors[t].B, a.tensors[t].B)


@pytest.mark.parametrize("content,text", [
    ("", "no training examples (the file is empty)"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', ":1: no assistant turn"),
    ('{"messages": []}\nnot json\n', ":1: \"messages\" must be a non-empty list"),
    ('{"prompt": "a", "completion": "b"}\n{oops\n', ":2: invalid JSON"),
    (json.dumps({"prompt": "x " * 300, "completion": "y"}) + "\n", ":1: 601 tokens, longer than the sequence length 64"),
])
def test_bad_data_names_the_line(content, text, gguf_bundle, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as info:
        train_adapter(gguf_bundle, path, "x", steps=1, seq_len=64, install=False)
    assert text in str(info.value)


def test_cli_train_installs_and_reports_bad_data(gguf_bundle, tmp_path, run_cli):
    data = _chats(tmp_path / "d.jsonl")
    r = run_cli("train", str(gguf_bundle.root), "--data", str(data), "--name", "from-cli", "--steps", "5",
                "--seq-len", "128", "--rank", "2", "--backend", "onnx", "--expanded-layers", "1", "-q")
    assert r.returncode == 0, r.stderr
    assert "installed from-cli" in r.stdout and "from-cli" in gguf_bundle.store.names()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n{not json\n")
    r = run_cli("train", str(gguf_bundle.root), "--data", str(bad), "--name", "bad", "--steps", "2", "-q")
    assert r.returncode == 2 and f"{bad}:2: invalid JSON" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_training_restores_the_callers_thread_limits(tiny_llama, tmp_path):
    """The run limits BLAS threads to its config's count and gives the process its own back."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def threads():
        return sorted(p["num_threads"] for p in threadpool_info())

    with threadpool_limits(2):
        before = threads()
        train_adapter(edgelora.load_base(tiny_llama), _chats(tmp_path / "c.jsonl"), "t", steps=2, threads=1, seq_len=128)
        assert threads() == before


def test_training_refuses_an_installed_or_bad_name_before_any_work(gguf_bundle, tmp_path, run_cli):
    """An installed adapter is never replaced silently, and a name the store would refuse (a path out
    of the bundle, an empty one) is refused before training writes a checkpoint anywhere."""
    from edgelora.adapters import random_adapter
    from edgelora.store import StoreError

    data = _chats(tmp_path / "d.jsonl")
    store = gguf_bundle.store
    store.install(random_adapter(gguf_bundle.config, rank=2, fingerprint=gguf_bundle.fingerprint), "taken", replace=True)
    before = store.manifest("taken")
    with pytest.raises(StoreError, match="'taken' is already installed"):
        train_adapter(gguf_bundle, data, "taken", steps=1, seq_len=128, checkpoint_dir=tmp_path / "ck")
    assert store.manifest("taken") == before and not (tmp_path / "ck").exists()
    r = run_cli("train", str(gguf_bundle.root), "--data", str(data), "--name", "taken", "--steps", "1", "-q")
    assert r.returncode == 2 and "already installed" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert store.manifest("taken") == before
    train_adapter(gguf_bundle, data, "taken", steps=1, seq_len=128, replace=True)
    assert store.manifest("taken")["provenance"]["method"] == "edgelora.train"
    for bad in ("../../x", "a/b", ""):
        with pytest.raises(StoreError, match="is not allowed"):
            train_adapter(gguf_bundle, data, bad, steps=1, seq_len=128, checkpoint_dir=tmp_path / "ck2")
        assert not (tmp_path / "ck2").exists()
