"""edgelora's MatMulQ41 operator (native/edgelora_ort.cc) against numpy: exact Q4_1 weights, int8
activations per block of 32, the LoRA slot and bias inside; and the fallback without the library."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from edgelora import native
from edgelora.converters import q41
from edgelora.errors import EdgeloraWarning

LIB = native.library(warn=False)
needs_lib = pytest.mark.skipif(LIB is None and not os.environ.get("EDGELORA_REQUIRE_NATIVE"),
                               reason="the operator library is not built (scripts/env.sh builds it)")


def session(k: int, n: int, tiles: np.ndarray, *, rank: int | None = None, bias: np.ndarray | None = None,
            threads: int = 2, lib=LIB, accuracy_level: int = 4):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])]
    inits = [numpy_helper.from_array(tiles, "w")]
    names = ["x", "w"]
    if rank is not None:
        ins += [helper.make_tensor_value_info("a", TensorProto.FLOAT, [k, "r"]),
                helper.make_tensor_value_info("b", TensorProto.FLOAT, ["r", n])]
        names += ["a", "b"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        names.append("bias")
    node = helper.make_node("MatMulQ41", names, ["y"], domain="edgelora", N=n, accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "q41", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edgelora", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def emulate(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """numpy: x quantized to int8 per block of 32 (scale max|x| / 127, round half to even), times the
    Q4_1 weight, with the block sums times m, in float64."""
    mm, k = x.shape
    b = x.reshape(mm, k // 32, 32).astype(np.float64)
    s = np.abs(x.reshape(mm, k // 32, 32)).max(-1) / np.float32(127)
    xq = np.rint(b * np.where(s > 0, 1 / np.where(s > 0, s, 1), 0)[..., None].astype(np.float32)).astype(np.int64)
    dots = np.einsum("rbk,nbk->rnb", xq, q.astype(np.int64))
    return (dots * (d[None] * s[:, None, :])).sum(-1) + (m[None] * (s * xq.sum(-1))[:, None, :]).sum(-1)


@needs_lib
@pytest.mark.parametrize("rows,k,n", [(1, 32, 5), (1, 576, 1536), (3, 96, 13), (7, 64, 8), (2, 2048, 4093), (5, 160, 1538)])
def test_matmul_q41_matches_numpy(rows, k, n):
    rng = np.random.default_rng(k * n + rows)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    q, d, m = q41.quantize(w)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    ref = emulate(x, q, d, m)
    scale = np.abs(ref).max()
    tiles = q41.pack(q, d, m)
    for threads in (1, 2):
        y = session(k, n, tiles, threads=threads).run(None, {"x": x})[0]
        assert y.shape == (rows, n)
        assert np.abs(y - ref).max() <= 1e-6 * scale
    # against the float weight: within int8 activations' error; with accuracy_level 0 (float activations), exact
    W = (q * d[..., None] + m[..., None]).reshape(n, k).astype(np.float64)
    assert np.abs(y - x @ W.T).max() <= 0.02 * np.abs(x @ W.T).max()
    y = session(k, n, tiles, accuracy_level=0).run(None, {"x": x})[0]
    assert np.abs(y - x @ W.T).max() <= 1e-6 * np.abs(x @ W.T).max()
    # the LoRA slot and the bias in the same node, and a zero-rank slot
    r = 6
    a = rng.standard_normal((k, r)).astype(np.float32)
    bb = rng.standard_normal((r, n)).astype(np.float32) * 0.1
    bias = rng.standard_normal(n).astype(np.float32)
    s = session(k, n, tiles, rank=r, bias=bias)
    y = s.run(None, {"x": x, "a": a, "b": bb})[0]
    full = ref + (x.astype(np.float64) @ a) @ bb + bias
    assert np.abs(y - full).max() <= 1e-5 * np.abs(full).max()
    y0 = s.run(None, {"x": x, "a": np.zeros((k, 0), np.float32), "b": np.zeros((0, n), np.float32)})[0]
    assert np.abs(y0 - (ref + bias)).max() <= 1e-6 * scale + 1e-6 * np.abs(bias).max()


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
def test_portable_kernel_agrees_with_avx2():
    """EDGELORA_Q41_PORTABLE=1 forces the portable loops (the kernel is chosen once per process)."""
    code = ("import sys, numpy as np; sys.path.insert(0, 'tests'); import test_q41 as t; "
            "from edgelora import native; from edgelora.converters import q41; "
            "rng = np.random.default_rng(3); w = rng.standard_normal((1538, 160)).astype(np.float32); "
            "x = rng.standard_normal((3, 160)).astype(np.float32); q, d, m = q41.quantize(w); "
            "print(native.kernel(t.LIB)); np.save(sys.argv[1], t.session(160, 1538, q41.pack(q, d, m)).run(None, {'x': x})[0])")
    out = {}
    for portable in ("", "1"):
        path = f"/tmp/q41_{os.getpid()}_{portable or 0}.npy"
        env = {**os.environ, "EDGELORA_Q41_PORTABLE": portable} if portable else \
            {k: v for k, v in os.environ.items() if k != "EDGELORA_Q41_PORTABLE"}
        proc = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.dirname(__file__)))
        assert proc.returncode == 0, proc.stderr
        out[proc.stdout.split()[-1]] = np.load(path)
        os.unlink(path)
    assert set(out) == {"portable", "avx2"} or set(out) == {"portable"}
    if "avx2" in out:
        np.testing.assert_allclose(out["avx2"], out["portable"], rtol=0, atol=1e-5 * np.abs(out["portable"]).max())


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
