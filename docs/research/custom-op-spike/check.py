import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
import os
LIB = os.environ.get("Q41_LIB", "libq41.so")  # g++ -O2 -std=c++17 -fPIC -shared -I INCLUDE/onnxruntime q41.cc -o libq41.so
rng = np.random.default_rng(0)

def pack(codes):  # (N, K) codes -> (N, K/32, 16) bytes: low nibbles k..k+15, high k+16..k+31
    N, K = codes.shape
    c = codes.reshape(N, K // 32, 32)
    return (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)

def session(op, K, packed, d, m, threads=2):
    node = helper.make_node(op, ["x", "codes", "d", "m"], ["y"], domain="edgelora")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [onnx.numpy_helper.from_array(packed, "codes"), onnx.numpy_helper.from_array(d, "d"),
                           onnx.numpy_helper.from_array(m, "m")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgelora", 1)])
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    so.register_custom_ops_library(LIB)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

def q8(x):  # numpy emulation of the op's activation quantization
    M, K = x.shape
    b = x.reshape(M, K // 32, 32)
    s = np.abs(b).max(-1) / 127
    q = np.rint(np.where(s[..., None] > 0, b / np.where(s > 0, s, 1)[..., None], 0)).astype(np.int64)
    return q, s

def case(M, K, N):
    blocks = K // 32
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    d = rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, (N, blocks)).astype(np.float32)
    W = (codes.reshape(N, blocks, 32) * d[..., None] + m[..., None]).reshape(N, K).astype(np.float64)
    x = rng.standard_normal((M, K)).astype(np.float32)
    ref = x.astype(np.float64) @ W.T
    y32 = session("MatMulQ41", K, pack(codes), d, m).run(None, {"x": x})[0]
    q, s = q8(x)
    emu = (np.einsum("mbk,nbk->mnb", q, codes.reshape(N, blocks, 32).astype(np.int64)) * (d[None] * s[:, None, :])).sum(-1) \
        + (m[None] * (s * q.sum(-1))[:, None, :]).sum(-1)
    scale = np.abs(ref).max()
    print(f"M={M} K={K} N={N}: MatMulQ41 vs float {np.abs(y32 - ref).max() / scale:.1e}")
    for op in ("MatMulQ41I8", "MatMulQ41I8x4"):
        y8 = session(op, K, pack(codes), d, m).run(None, {"x": x})[0]
        print(f"    {op}: vs its emulation {np.abs(y8 - emu).max() / scale:.1e}, vs float {np.abs(y8 - ref).max() / scale:.1e}")


if __name__ == "__main__":
    print("onnxruntime", ort.__version__)
    for M, K, N in ((1, 64, 48), (7, 576, 1536), (3, 1536, 576), (1, 2048, 8192), (5, 96, 7)):
        case(M, K, N)
