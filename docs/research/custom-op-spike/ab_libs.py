"""A/B of builds: the same op from differently built libraries (e.g. -DQ41_PREFETCH=0 vs the default),
interleaved with MatMulNBits without zero points in one process; prints each build's ratio to it, and
checks that all builds give bit-identical outputs.

    python ab_libs.py K N THREADS OP /abs/path/libA.so /abs/path/libB.so ...
"""
import sys, statistics, time, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
import os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check import pack_tiles
K, N, threads, op = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
libs = sys.argv[5:]
blocks = K // 32; rng = np.random.default_rng(0)
codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
d = rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float32); m = rng.uniform(-0.1, 0, (N, blocks)).astype(np.float32)
B = (codes.reshape(N, blocks, 16, 2)[..., 0] | (codes.reshape(N, blocks, 16, 2)[..., 1] << 4)).astype(np.uint8)
A = onnx.numpy_helper.from_array
x = rng.standard_normal((1, K)).astype(np.float32)
def session(op, domain, inits, lib, **attrs):
    node = helper.make_node(op, ["x", *(t.name for t in inits)], ["y"], domain=domain, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    if lib: so.register_custom_ops_library(lib)
    return ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]).SerializeToString(), so, providers=["CPUExecutionProvider"])
G = 8 if "P8" in op else 4; half = op.endswith("H")
s = {"nbits": session("MatMulNBits", "com.microsoft", [A(B, "B"), A(d.reshape(-1), "scales")], None, K=K, N=N, bits=4, block_size=32, accuracy_level=4)}
for lib in libs: s[lib] = session(op, "edgelora", [A(pack_tiles(codes, d, m, G, half), "w")], lib, N=N)
ref = s[libs[0]].run(None, {"x": x})[0]
for lib in libs[1:]: assert np.array_equal(ref, s[lib].run(None, {"x": x})[0])
t = {k: [] for k in s}
for _ in range(40):
    for k, v in s.items():
        t0 = time.perf_counter(); v.run(None, {"x": x}); t[k].append(time.perf_counter() - t0)
b = statistics.median(t["nbits"])
print(f"{K}x{N} {threads}thr {op}: " + "  ".join(f"{k.split('/')[-1]} {b / statistics.median(v):.2f}x" for k, v in t.items() if k != "nbits"))
