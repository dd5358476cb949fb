"""edgelora's MatMulQ41 operator (native/edgelora_ort.cc) against numpy: exact Q4_1 weights, int8
activations per block of 32, the LoRA slot and bias inside; and the fallback without the library."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelora import native
from edgelora.converters import q41
from edgelora.errors import EdgeloraWarning
from tests import q41_check

ROOT = Path(__file__).resolve().parent.parent
LIB = native.library(warn=False)
needs_lib = pytest.mark.skipif(LIB is None and not os.environ.get("EDGELORA_REQUIRE_NATIVE"),
                               reason="the operator library is not built (scripts/env.sh builds it)")


def session(k: int, n: int, tiles: np.ndarray, **kw):
    return q41_check.session(str(LIB), k, n, tiles, **kw)


def assert_within_tolerance(err: dict[str, float]) -> None:
    assert err["int8"] <= q41_check.TOLERANCE and err["float"] <= q41_check.TOLERANCE, err
    assert err["lora"] <= 10 * q41_check.TOLERANCE and err["rank 0"] <= q41_check.TOLERANCE, err
    assert err["split lora"] <= 10 * q41_check.TOLERANCE and err.get("gated", 0.0) <= 10 * q41_check.TOLERANCE, err
    assert err["6-bit"] <= q41_check.TOLERANCE and err["6-bit float"] <= q41_check.TOLERANCE, err
    assert err["6-bit lora"] <= 10 * q41_check.TOLERANCE, err
    assert err["pack"] == 0.0, err  # the adapter pack: the same tensors, bit for bit
    assert err["int8 vs float"] <= 0.02, err  # int8 activations' own error


@needs_lib
@pytest.mark.parametrize("rows,k,n", q41_check.SHAPES)
def test_matmul_q41_matches_numpy(rows, k, n):
    """int8 activations against the emulation (1 and 2 threads), float activations against the float
    weight, and the LoRA slot and bias in the same node (and a zero-rank slot)."""
    assert_within_tolerance(q41_check.case(str(LIB), rows, k, n))


@pytest.fixture(scope="module")
def emulated_avx512(tmp_path_factory) -> Path:
    """The library built as the tests' variant: the AVX-512 VNNI kernel's lanes computed by SIMDe's
    portable code (this machine may have no AVX-512), from the same source as the native build."""
    if LIB is None or platform.machine() != "x86_64":
        pytest.skip("the AVX-512 kernel is built on x86-64, with the operator library")
    out = tmp_path_factory.mktemp("avx512") / native.LIBRARY
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "native.sh"), "--emulated-avx512", str(out)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    if native.kernel(out) != "avx512vnni-emulated":
        pytest.skip("no AVX2 here, which the AVX-512 kernel's build needs for the rest of the operator")
    return out


@needs_lib
@pytest.mark.parametrize("rows,k,n", q41_check.SHAPES)
def test_avx512_vnni_kernel_matches_numpy_under_emulation(emulated_avx512, rows, k, n):
    """The AVX-512 VNNI kernel (native/q41_avx512.cc), its instructions computed by SIMDe, against the
    same numpy emulation and tolerances as the kernel this CPU runs: odd K and N, one row and many,
    with the adapter slots of every precision."""
    assert_within_tolerance(q41_check.case(str(emulated_avx512), rows, k, n))


@needs_lib
def test_tiles_round_trip_and_exact_q41_stays_exact():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((19, 96)).astype(np.float32)
    q, d, m = q41.quantize(w)
    W = (q * d[..., None] + m[..., None]).reshape(w.shape)
    back = q41.unpack(q41.pack(q, d, m), 19)
    assert np.array_equal(back.expand(), W)
    assert all(np.array_equal(a, b) for a, b in zip(q41.quantize(W), (q, d, m)))  # GGUF's Q4_1 comes back as it was


@needs_lib
def test_the_kernels_agree(emulated_avx512):
    """EDGELORA_Q41_KERNEL=portable or avx2 holds the kernel back (it is chosen once per process): the
    portable loops, AVX2 and AVX-512 VNNI (emulated, and native on a VNNI CPU) give the same outputs up to float
    summation order."""
    code = ("import sys, numpy as np; sys.path.insert(0, 'tests'); import q41_check; "
            "from edgelora import native; from edgelora.converters import q41; "
            "rng = np.random.default_rng(3); w = rng.standard_normal((1538, 160)).astype(np.float32); "
            "x = rng.standard_normal((3, 160)).astype(np.float32); q, d, m = q41.quantize(w); "
            "print(native.kernel(sys.argv[2])); "
            "np.save(sys.argv[1], q41_check.session(sys.argv[2], 160, 1538, q41.pack(q, d, m)).run(None, {'x': x})[0])")
    out = {}
    for lib, held in ((LIB, "portable"), (LIB, ""), (emulated_avx512, "avx2"), (emulated_avx512, "")):
        path = f"/tmp/q41_{os.getpid()}_{len(out)}.npy"
        env = {k: v for k, v in os.environ.items() if k != "EDGELORA_Q41_KERNEL"}
        proc = subprocess.run([sys.executable, "-c", code, path, str(lib)], env={**env, "EDGELORA_Q41_KERNEL": held},
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        out[proc.stdout.split()[-1]] = np.load(path)
        os.unlink(path)
    # unheld, the library takes the best kernel this CPU has: avx2, or avx512vnni on a VNNI machine
    assert set(out) - {"avx512vnni"} == {"portable", "avx2", "avx512vnni-emulated"}
    for name in set(out) - {"portable"}:
        np.testing.assert_allclose(out[name], out["portable"], rtol=0, atol=1e-5 * np.abs(out["portable"]).max())


def test_a_bad_library_path_is_one_warning_and_no_library(monkeypatch, tmp_path):
    bad = tmp_path / "libedgelora_ort.so"
    bad.write_bytes(b"not a shared object")
    for path in (bad, tmp_path / "missing.so"):
        monkeypatch.setenv("EDGELORA_ORT_OPS", str(path))
        with pytest.warns(EdgeloraWarning, match="Q4_1 operator library is unavailable") as caught:
            assert native.library() is None
        assert len(caught) == 1 and "\n" not in str(caught[0].message)
    monkeypatch.setenv("EDGELORA_ORT_OPS", "0")
    assert native.library() is None


def test_an_unknown_kernel_hold_is_one_warning(monkeypatch):
    monkeypatch.setenv("EDGELORA_Q41_KERNEL", "avx9")
    with pytest.warns(EdgeloraWarning, match="EDGELORA_Q41_KERNEL=avx9 is not a kernel MatMulQ41 can be held to") as caught:
        native.library()
    assert len([w for w in caught if "EDGELORA_Q41_KERNEL" in str(w.message)]) == 1


@needs_lib
def test_fused_graph_with_the_operator_matches_transformers_peft_and_matmulnbits(tiny_llama_q41, tmp_path):
    """The tiny model (weights exactly Q4_1) as the fused int4 graph with MatMulQ41, in the ONNX engine:
    against transformers and PEFT within the int8-activation tolerance, no further from them than the
    MatMulNBits graph; the trainer's reader gets the Q4_1 weights back exactly; without the library
    the same bundle runs as the MatMulNBits graph (one warning line), bit for bit."""
    import warnings

    import onnx

    import edgelora
    from edgelora.converters import load_adapter, onnx_fused, save_adapter
    from edgelora.runtime.onnx import OnnxEngine
    from tests.peft_util import base_logits, make_peft_adapter, peft_logits

    base = edgelora.load_base(tiny_llama_q41)
    ids = base.tokenizer.encode("The quick brown fox jumps over the lazy dog. A Raspberry Pi has four cores. "
                                "Edge devices run small language models.")
    paths = {k: onnx_fused.export(base, tmp_path / k, "int4", max_len=128, kernel=k) for k in ("q41", "nbits")}
    for t in ("f16", "q8"):
        paths[f"q41-{t}"] = onnx_fused.export(base, tmp_path / f"q41-{t}", "int4", max_len=128, kernel="q41", adapter_type=t)
    for t in ("f32", "f16", "q8"):  # float activations: the adapter's precision alone
        paths[f"float-{t}"] = onnx_fused.export(base, tmp_path / f"float-{t}", "int4", max_len=128, kernel="q41",
                                                adapter_type=t, accuracy_level=0)
    meta = {p.key: p.value for p in onnx.load(str(paths["q41"]), load_external_data=False).metadata_props}
    assert meta["edgelora.encodings"] == "{'q4_1 exact (MatMulQ41)': 8}"  # qkv, o, gate_up, down in 2 layers
    dense, packed = onnx_fused.read_weights(paths["q41"], base.config)
    for name, w in base.weights.items():
        if name in packed:
            np.testing.assert_array_equal(packed[name].expand(), w)

    peft = make_peft_adapter(tiny_llama_q41, tmp_path / "peft", r=8, alpha=16, seed=1,
                             targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    adapter = load_adapter(peft)
    adapter.base_fingerprint = base.fingerprint
    onnx_adapter = save_adapter(adapter, tmp_path / "a.onnx_adapter", "onnx", base.config)
    refs = base_logits(tiny_llama_q41, ids), peft_logits(tiny_llama_q41, {"a": peft}, ids)

    def run(path):
        e = OnnxEngine(path, base.config, threads=2, n_ctx=128, tokenizer=base.tokenizer, fingerprint=base.fingerprint)
        try:
            plain = e.logits(ids)
            e.load_adapter("a", onnx_adapter)
            e.set_adapters(["a"])
            return plain, e.logits(ids)
        finally:
            e.close()

    out = {k: run(p) for k, p in paths.items()}
    # the adapter in float16 (half its bytes per token) and in 8 bits (about a quarter): the same base;
    # with float activations the adapter's effect within 1% of the float adapter's (measured: f16
    # 0.002%, 8 bits 0.04% on the default model with a PEFT-trained adapter). With int8 activations
    # even f16's 0.05% per weight moves the effect by ~0.8% here (the adapter's change re-rounds the
    # activations downstream): 8 bits ~1.6%, llama.cpp's own Q8_0 LoRA ~4% (test_adapter_formats).
    effect, effect_float = (out[k][1] - out[k][0] for k in ("q41", "float-f32"))
    for graph, same_base, ref, bound in (("q41-f16", "q41", effect, 0.01), ("q41-q8", "q41", effect, 0.03),
                                         ("float-f16", "float-f32", effect_float, 0.01),
                                         ("float-q8", "float-f32", effect_float, 0.01)):
        np.testing.assert_array_equal(out[graph][0], out[same_base][0])
        narrow = out[graph][1] - out[graph][0]
        assert np.linalg.norm(narrow - ref) <= bound * np.linalg.norm(ref), graph
    for got, ref, nbits in zip(out["q41"], refs, out["nbits"]):
        err = np.abs(got - ref).max()
        assert err <= 0.01 * np.abs(ref).max(), err
        assert err <= 1.2 * np.abs(nbits - ref).max()
        assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.99

    os.environ["EDGELORA_ORT_OPS"] = str(tmp_path / "missing.so")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fallback = run(paths["q41"])
    finally:
        del os.environ["EDGELORA_ORT_OPS"]
    said = [str(w.message) for w in caught if issubclass(w.category, EdgeloraWarning)]
    assert len(said) == 1 and "MatMulNBits" in said[0], said
    for got, nbits in zip(fallback, out["nbits"]):
        np.testing.assert_array_equal(got, nbits)
    effect_nbits = out["nbits"][1] - out["nbits"][0]
    for t in ("f16", "q8"):  # narrow slots without the library: float16 inputs cast to float in front of the MatMuls
        os.environ["EDGELORA_ORT_OPS"] = "0"
        try:
            plain16, with16 = run(paths[f"q41-{t}"])
        finally:
            del os.environ["EDGELORA_ORT_OPS"]
        np.testing.assert_array_equal(plain16, out["nbits"][0])
        assert np.linalg.norm(with16 - plain16 - effect_nbits) <= 0.01 * np.linalg.norm(effect_nbits), t


@needs_lib
def test_six_bit_head_matches_transformers_and_falls_back_exactly(tiny_llama_q41, tmp_path):
    """head_bits=6: the LM head as one 6-bit MatMulQ41 node. Its logits against transformers with that
    head's values (the embedding untouched), as close as the 8-bit head's graph to its own reference;
    the trainer's reader gets those values back exactly; without the library the node becomes an
    8-bit MatMulNBits holding exactly the same values."""
    import warnings

    import onnx
    import torch
    from onnx import numpy_helper
    from transformers import AutoModelForCausalLM

    import edgelora
    from edgelora.converters import onnx_fused
    from edgelora.runtime.onnx import OnnxEngine
    from tests.peft_util import base_logits

    base = edgelora.load_base(tiny_llama_q41)
    ids = base.tokenizer.encode("The quick brown fox jumps over the lazy dog. A Raspberry Pi has four cores. "
                                "Edge devices run small language models.")
    q, d = q41.quantize6(base.weights["embed"])
    head6 = ((q.astype(np.float32) - 32) * d[..., None]).reshape(base.weights["embed"].shape)
    assert 0 < np.abs(head6 - base.weights["embed"]).max() <= 0.02 * np.abs(base.weights["embed"]).max()
    paths = {bits: onnx_fused.export(base, tmp_path / f"head{bits}", "int4", max_len=128, kernel="q41", head_bits=bits)
             for bits in (6, 8)}
    meta = {p.key: p.value for p in onnx.load(str(paths[6]), load_external_data=False).metadata_props}
    assert "'q6 head (MatMulQ41)': 1" in meta["edgelora.encodings"]
    dense, _ = onnx_fused.read_weights(paths[6], base.config)
    np.testing.assert_array_equal(np.asarray(dense["lm_head"]), head6)

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_q41).eval()
    model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(head6))  # untied: the embedding keeps its values
    with torch.no_grad():
        ref6 = model(torch.tensor([ids])).logits[0].numpy()
    refs = {6: ref6, 8: base_logits(tiny_llama_q41, ids)}

    def run(path):
        e = OnnxEngine(path, base.config, threads=2, n_ctx=128, tokenizer=base.tokenizer, fingerprint=base.fingerprint)
        try:
            return e.logits(ids)
        finally:
            e.close()

    errs = {bits: np.abs(run(paths[bits]) - refs[bits]).max() for bits in (6, 8)}
    assert errs[6] <= 0.01 * np.abs(ref6).max() and errs[6] <= 1.5 * errs[8], errs
    assert (run(paths[6]).argmax(-1) == ref6.argmax(-1)).mean() >= 0.99

    fallback = onnx_fused.without_q41(onnx.load(str(paths[6])))
    inits = {i.name: numpy_helper.to_array(i) for i in fallback.graph.initializer}
    node = next(n for n in fallback.graph.node if n.output[0] == "logits")
    assert node.op_type == "MatMulNBits" and next(a.i for a in node.attribute if a.name == "bits") == 8
    codes, scales, zp = (inits[i] for i in node.input[1:4])
    values = (codes.astype(np.float32) - zp.reshape(codes.shape[:2])[..., None]) * scales.reshape(codes.shape[:2])[..., None]
    np.testing.assert_array_equal(values.reshape(head6.shape), head6)
    os.environ["EDGELORA_ORT_OPS"] = str(tmp_path / "missing.so")
    try:
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            got = run(paths[6])
    finally:
        del os.environ["EDGELORA_ORT_OPS"]
    assert np.abs(got - ref6).max() <= 0.01 * np.abs(ref6).max()


@needs_lib
def test_the_adapter_pack_is_one_input_unpacks_for_the_fallback_and_refuses_a_bad_pack(tiny_llama_q41, tmp_path):
    """A MatMulQ41 graph takes every node's LoRA slot in one input (the adapter pack: one bound tensor
    a step instead of 2 to 4 per node); `unpack_slots` gives the slots back as inputs of their own and
    `pack_slots` packs them again the same; a pack that is not one, or is another graph's, is refused
    by the operator in one line."""
    import copy

    import onnx
    import onnxruntime as ort

    import edgelora
    from edgelora.adapters import random_adapter
    from edgelora.converters import onnx_fused
    from edgelora.converters.onnx_adapter import parameters

    base = edgelora.load_base(tiny_llama_q41)
    c = base.config
    path = onnx_fused.export(base, tmp_path / "q8", "int4", max_len=128, kernel="q41", adapter_type="q8")
    model = onnx.load(str(path), load_external_data=False)
    lora_inputs = [i.name for i in model.graph.input if "lora" in i.name]
    assert lora_inputs == [onnx_fused.PACK]
    slots = onnx_fused.graph_slots(model)
    assert len(slots.pack) == 4 * c.num_layers and slots["layers.0.qkv.lora_A"].dtype is np.uint8
    nodes = [n for n in model.graph.node if n.op_type == "MatMulQ41" and onnx_fused.PACK in n.input]
    assert sorted(next(a.i for a in n.attribute if a.name == "lora_slot") for n in nodes) == list(range(len(slots.pack)))

    unpacked = onnx_fused.unpack_slots(copy.deepcopy(model))
    assert onnx_fused.PACK not in {i.name for i in unpacked.graph.input}
    assert {n for names in slots.pack for n in names} <= {i.name for i in unpacked.graph.input}
    assert onnx_fused.graph_slots(unpacked) == slots and onnx_fused.graph_slots(unpacked).pack is None
    repacked = onnx_fused.pack_slots(unpacked)
    assert [list(n.input) for n in repacked.graph.node] == [list(n.input) for n in model.graph.node]
    assert onnx_fused.graph_slots(repacked).pack == slots.pack

    params = onnx_fused.slot_parameters(parameters(random_adapter(c, rank=8, seed=3)), c, slots)
    assert list(params) == [onnx_fused.PACK] and params[onnx_fused.PACK].dtype == np.uint8
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.register_custom_ops_library(str(LIB))
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([[1, 2, 3]], np.int64), "attention_mask": np.ones((1, 3), np.int64)}
    for i in range(c.num_layers):
        for k in ("key", "value"):
            feed[f"past_key_values.{i}.{k}"] = np.zeros((1, c.num_kv_heads, 0, c.head_dim), np.float32)
    plain, adapted = (s.run(["logits"], {**feed, **extra})[0] for extra in ({}, params))
    assert np.abs(adapted - plain).max() > 1e-4  # the pack reached the nodes
    other = onnx_fused.pack_parameters({"a": np.zeros((c.hidden_size, 8), np.float32),
                                        "b": np.zeros((8, c.hidden_size), np.float32)}, [["a", "b"]])
    for bad, said in ((np.arange(64, dtype=np.uint8), "is not an adapter pack"),
                      (other, "must cover the N outputs and the r ranks"),  # another graph's first entry
                      (onnx_fused.pack_parameters({}, []), "has no entry for this node's lora_slot")):
        with pytest.raises(Exception) as e:
            s.run(["logits"], {**feed, onnx_fused.PACK: bad})
        assert said in str(e.value), str(e.value)
