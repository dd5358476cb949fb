"""One adapter value, three formats: PEFT, GGUF LoRA, .onnx_adapter."""

import json

import numpy as np
import pytest

import edgelora
from edgelora.adapters import AdapterBaseMismatchError, AdapterMismatchError, LoraAdapter, random_adapter
from edgelora.converters import load_adapter, save_adapter
from edgelora.errors import CorruptFileError, UnsupportedFormatError
from tests.peft_util import make_peft_adapter


@pytest.fixture(scope="module")
def base(tiny_llama):
    return edgelora.load_base(tiny_llama)


@pytest.fixture(scope="module")
def peft_dir(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("peft") / "a")


def test_peft_read_matches_peft_state_dict(peft_dir, base):
    from safetensors.numpy import load_file

    adapter = load_adapter(peft_dir)
    state = load_file(str(peft_dir / "adapter_model.safetensors"))
    assert len(adapter.tensors) == 2 * 7 and adapter.rank == 8 and adapter.alpha == 16
    np.testing.assert_array_equal(adapter.tensors["layers.1.k"].A,
                                  state["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight"])
    np.testing.assert_array_equal(adapter.tensors["layers.0.down"].B,
                                  state["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"])
    adapter.check_fits(base.config)


def _assert_same(a: LoraAdapter, b: LoraAdapter, exact: bool = True):
    assert a.targets == b.targets and a.use_rslora == b.use_rslora
    for t in a.targets:
        np.testing.assert_array_equal(a.tensors[t].A, b.tensors[t].A)
        assert a.tensors[t].alpha == b.tensors[t].alpha
        if exact:
            np.testing.assert_array_equal(a.tensors[t].B, b.tensors[t].B)
        else:
            np.testing.assert_allclose(a.tensors[t].B, b.tensors[t].B, rtol=1e-6, atol=0)


@pytest.mark.parametrize("fmt,suffix", [("gguf", "a.gguf"), ("onnx", "a.onnx_adapter"), ("peft", "a")])
def test_round_trip_is_lossless(fmt, suffix, peft_dir, base, tmp_path):
    adapter = load_adapter(peft_dir)
    adapter.base_fingerprint = base.fingerprint
    again = load_adapter(save_adapter(adapter, tmp_path / suffix, fmt, base.config))
    _assert_same(adapter, again)
    assert again.base_fingerprint == base.fingerprint


@pytest.mark.parametrize("fmt,suffix", [("gguf", "a.gguf"), ("onnx", "a.onnx_adapter"), ("peft", "a")])
def test_rslora_and_per_module_ranks_round_trip(fmt, suffix, tiny_llama, base, tmp_path):
    src = make_peft_adapter(tiny_llama, tmp_path / "src", r=4, alpha=12, use_rslora=True,
                            rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 3})
    adapter = load_adapter(src)
    assert adapter.use_rslora and adapter.ranks["layers.0.down"] == 2 and adapter.tensors["layers.1.q"].alpha == 3
    again = load_adapter(save_adapter(adapter, tmp_path / suffix, fmt, base.config))
    _assert_same(adapter, again, exact=(fmt == "peft"))  # GGUF/ONNX fold the scale into B: 1-ulp rounding
    for t in adapter.targets:
        np.testing.assert_allclose(again.delta(t), adapter.delta(t), rtol=1e-5, atol=1e-8)


def test_gguf_lora_is_what_llama_cpp_expects(peft_dir, base, tmp_path):
    """Keys and tensor names llama.cpp reads, and the q/k row permutation of B."""
    from edgelora import naming
    from edgelora.converters import gguf_model

    adapter = load_adapter(peft_dir)
    path = save_adapter(adapter, tmp_path / "a.gguf", "gguf", base.config)
    fields = gguf_model.fields_of(gguf_model.open_reader(path))
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "adapter"
    assert fields["adapter.type"] == "lora" and fields["adapter.lora.alpha"] == 16.0
    tensors = {t.name: t for t in gguf_model.open_reader(path).tensors}
    b_q = np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data).reshape(64, 8)
    np.testing.assert_array_equal(b_q, naming.rope_permute(adapter.tensors["layers.0.q"].B, 4))
    b_v = np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data).reshape(32, 8)
    np.testing.assert_array_equal(b_v, adapter.tensors["layers.0.v"].B)


def test_onnx_adapter_names_match_the_graph_slots(peft_dir, base, tmp_path):
    import onnxruntime as ort

    adapter = load_adapter(peft_dir)
    path = save_adapter(adapter, tmp_path / "a.onnx_adapter", "onnx", base.config)
    params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
    assert params["layers.0.q.lora_A"].shape() == [64, 8] and params["layers.0.q.lora_B"].shape() == [8, 64]
    assert json.loads((tmp_path / "a.onnx_adapter.json").read_text())["alphas"]["layers.0.q"] == 16


@pytest.mark.parametrize("case,error,text", [
    ("dora", UnsupportedFormatError, "DoRA adapters are not supported"),
    ("pickle", UnsupportedFormatError, "adapter_model.bin is a pickle file"),
    ("truncated", CorruptFileError, "truncated safetensors file"),
    ("ia3", UnsupportedFormatError, "PEFT method IA3 is not supported"),
])
def test_peft_refusals(case, error, text, tiny_llama, tmp_path):
    path = make_peft_adapter(tiny_llama, tmp_path / "a", use_dora=(case == "dora"))
    weights = path / "adapter_model.safetensors"
    if case == "pickle":
        weights.rename(path / "adapter_model.bin")
    elif case == "truncated":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif case == "ia3":
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg["peft_type"] = "IA3"
        (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(error, match=text):
        load_adapter(path)


def test_mismatch_lists_every_problem(base):
    other = random_adapter(base.config.__class__(**{**base.config.__dict__, "hidden_size": 32, "num_layers": 3}),
                           rank=2, targets=("q", "v"))
    with pytest.raises(AdapterMismatchError) as info:
        other.check_fits(base.config)
    msg = str(info.value)
    assert "layers.0.q: A is 2x32, the module takes 64 inputs" in msg
    assert "layers.2.q: no such module (the base has 2 layers)" in msg
    assert "(6 problems)" in msg and msg.count("; ") == 5  # every problem listed, in one line


def test_wrong_base_is_refused_naming_both(base):
    a = random_adapter(base.config, fingerprint="sha256:" + "0" * 64, name="other")
    with pytest.raises(AdapterBaseMismatchError, match=f"made for base sha256:0+, but this base is {base.fingerprint}"):
        a.check_fits(base.config, base.fingerprint)


def test_mix_is_a_concatenation(base):
    a = random_adapter(base.config, rank=2, alpha=4, seed=1, name="a")
    b = random_adapter(base.config, rank=3, alpha=3, seed=2, name="b", targets=("q", "v"))
    m = LoraAdapter.mix([(a, 0.7), (b, -0.2)])
    assert m.ranks["layers.0.q"] == 5 and m.ranks["layers.0.up"] == 2
    for t in m.targets:
        want = 0.7 * a.delta(t) + (-0.2 * b.delta(t) if t in b.tensors else 0)
        np.testing.assert_allclose(m.delta(t), want, rtol=1e-5, atol=1e-7)


def test_sniff_refuses_pickle_and_unknown(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(UnsupportedFormatError, match="pickle adapters can run code"):
        load_adapter(tmp_path / "a.bin")
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="not an adapter edgelora reads"):
        load_adapter(tmp_path / "a.txt")


@pytest.mark.parametrize("precision,bound", [("f16", 0.01), ("q8_0", 0.06)])
def test_gguf_lora_in_fewer_bits_keeps_the_adapters_effect_in_llama_cpp(precision, bound, tiny_llama, base, tmp_path):
    """A in Q8_0 (B, rank-long rows, in F16) or both in F16: llama.cpp loads the file, and the
    adapter's effect on its logits stays within 1% of the f32 file's in F16; in Q8_0 llama.cpp also
    rounds the activations to 8 bits for A, which costs ~4% of the effect on this tiny model."""
    from llama_cpp import Llama

    from edgelora._native import quiet_native
    from edgelora.converters import gguf_model

    bundle = edgelora.export(str(tiny_llama), "x86-64", tmp_path / "b", backend="gguf", quant="f32", progress=False)
    model = bundle.root / next(a.main for a in bundle.artifacts if a.backend == "gguf")
    adapter = random_adapter(base.config, rank=8, alpha=16, seed=3, scale=0.3, fingerprint=base.fingerprint)
    paths = {p: save_adapter(adapter, tmp_path / f"a-{p}.gguf", "gguf", base.config, precision=p)
             for p in ("f32", precision)}
    types = {t.name: t.tensor_type.name for t in gguf_model.open_reader(paths[precision]).tensors}
    want_a = "Q8_0" if precision == "q8_0" else "F16"
    assert types["blk.0.attn_q.weight.lora_a"] == want_a and types["blk.0.attn_q.weight.lora_b"] == "F16"
    assert paths[precision].stat().st_size < 0.6 * paths["f32"].stat().st_size
    ids = [1, 17, 42, 99, 7, 250, 31, 5]

    def logits(lora=None):
        with quiet_native():
            llm = Llama(str(model), n_ctx=64, n_threads=1, logits_all=True, verbose=False, lora_path=lora,
                        type_k=0, type_v=0)
        llm.eval(ids)
        out = np.array(llm.scores[: len(ids)], np.float64)
        llm.close()
        return out

    plain = logits()
    effect = logits(str(paths["f32"])) - plain
    assert np.abs(effect).max() > 0.05  # the adapter does something worth keeping
    err = (logits(str(paths[precision])) - plain) - effect
    assert np.linalg.norm(err) / np.linalg.norm(effect) < bound
    again = load_adapter(paths[precision], base.config)
    for t in adapter.targets:
        np.testing.assert_allclose(again.delta(t), adapter.delta(t), atol=0.01 * np.abs(adapter.delta(t)).max())
    with pytest.raises(UnsupportedFormatError, match="precision must be one of"):
        save_adapter(adapter, tmp_path / "x.gguf", "gguf", base.config, precision="q4_0")
    with pytest.raises(UnsupportedFormatError, match="f16 and q8_0 are for GGUF"):
        save_adapter(adapter, tmp_path / "x.onnx_adapter", "onnx", base.config, precision="f16")
