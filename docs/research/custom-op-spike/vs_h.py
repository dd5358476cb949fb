import numpy as np, onnx, onnxruntime as ort, time, statistics, sys
from onnx import helper, TensorProto
rng = np.random.default_rng(0)
LIB = __import__("os").environ.get("Q41_LIB", "libq41h.so")  # from q41h.cc: q41.cc plus MatMulQ41I8H (d and m in fp16)
threads = int(sys.argv[1]); K, N = int(sys.argv[2]), int(sys.argv[3]); blocks = K // 32
codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
d = rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float16); m = rng.uniform(-0.1, 0, (N, blocks)).astype(np.float16)
c = codes.reshape(N, blocks, 32); packed = (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)
dm = np.stack([d, m], -1).view(np.uint16).reshape(N, blocks, 2)
x = rng.standard_normal((1, K)).astype(np.float32)
def sess(nodes, inits, opsets):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.register_custom_ops_library(LIB)
    return ort.InferenceSession(helper.make_model(g, opset_imports=opsets).SerializeToString(), so, providers=["CPUExecutionProvider"])
ops = [helper.make_opsetid("", 17), helper.make_opsetid("edgelora", 1), helper.make_opsetid("com.microsoft", 1)]
ours = sess([helper.make_node("MatMulQ41I8H", ["x", "codes", "dm"], ["y"], domain="edgelora")],
            [onnx.numpy_helper.from_array(packed, "codes"), onnx.numpy_helper.from_array(dm, "dm")], ops)
B = (codes.reshape(N, blocks, 16, 2)[..., 0] | (codes.reshape(N, blocks, 16, 2)[..., 1] << 4)).astype(np.uint8)
nb = sess([helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=32, accuracy_level=4)],
          [onnx.numpy_helper.from_array(B, "B"), onnx.numpy_helper.from_array(d.astype(np.float32).reshape(-1), "scales")], ops)
W = (c * d.astype(np.float64)[..., None] + m.astype(np.float64)[..., None]).reshape(N, K)
ref = x.astype(np.float64) @ W.T
y = ours.run(None, {"x": x})[0]
print(f"fp16 d,m: vs float {np.abs(y - ref).max() / np.abs(ref).max():.1e}")
times = {"ours fp16 d,m": [], "MatMulNBits": []}
for _ in range(40):
    for k, s in (("ours fp16 d,m", ours), ("MatMulNBits", nb)):
        t = time.perf_counter(); s.run(None, {"x": x}); times[k].append(time.perf_counter() - t)
b = statistics.median(times["MatMulNBits"])
for k, v in times.items():
    t = statistics.median(v); print(f"{threads} thr {K}x{N} {k:14s} {t*1e3:.3f} ms  {b/t:.2f}x MatMulNBits")
