"""What limits MatMulQ41I8P8H (and MatMulNBits without zero points) at one shape, 1 thread:
  cold:  a 64 MB buffer is read between runs, so the weights come from DRAM;
  hot:   the same session back to back, so the weights stay in L2/L3;
  rows8: 8 rows in one call, time per row (a group's tiles are reread from L1 for rows 2..8);
  tiny:  K=32, N=8, the fixed cost of one call.
Bytes per second count what each op reads (tiles: 20 B per block and column; MatMulNBits: 16 + 4).

    Q41_LIB=libq41.so python limits.py K N [ROUNDS]
"""
import os
import statistics
import sys
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check import LIB, pack_tiles  # noqa: E402

K, N = int(sys.argv[1]), int(sys.argv[2])
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
A = onnx.numpy_helper.from_array
rng = np.random.default_rng(0)


def build(K, N):
    blocks = K // 32
    codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
    d = rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float32)
    m = rng.uniform(-0.1, 0, (N, blocks)).astype(np.float32)
    B = (codes.reshape(N, blocks, 16, 2)[..., 0] | (codes.reshape(N, blocks, 16, 2)[..., 1] << 4)).astype(np.uint8)

    def session(op, domain, inits, **attrs):
        node = helper.make_node(op, ["x", *(t.name for t in inits)], ["y"], domain=domain, **attrs)
        g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.register_custom_ops_library(LIB)
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    return {"MatMulQ41I8P8H": session("MatMulQ41I8P8H", "edgelora", [A(pack_tiles(codes, d, m, 8, True), "w")], N=N),
            "MatMulNBits": session("MatMulNBits", "com.microsoft", [A(B, "B"), A(d.reshape(-1), "scales")],
                                   K=K, N=N, bits=4, block_size=32, accuracy_level=4)}


big, tiny = build(K, N), build(32, 8)
x1 = rng.standard_normal((1, K)).astype(np.float32)
x8 = rng.standard_normal((8, K)).astype(np.float32)
xt = rng.standard_normal((1, 32)).astype(np.float32)
flush = np.ones(64 << 20, np.uint8)
res = {}
for _ in range(rounds):
    for name in big:
        cold, hot, rows8, t_tiny = [], [], [], []
        for _ in range(20):
            flush.sum(dtype=np.uint64)
            t = time.perf_counter(); big[name].run(None, {"x": x1}); cold.append(time.perf_counter() - t)
        for _ in range(50):
            t = time.perf_counter(); big[name].run(None, {"x": x1}); hot.append(time.perf_counter() - t)
        for _ in range(20):
            t = time.perf_counter(); big[name].run(None, {"x": x8}); rows8.append((time.perf_counter() - t) / 8)
        for _ in range(200):
            t = time.perf_counter(); tiny[name].run(None, {"x": xt}); t_tiny.append(time.perf_counter() - t)
        for k, v in (("cold", cold), ("hot", hot), ("rows8", rows8), ("tiny", t_tiny)):
            res.setdefault((name, k), []).append(statistics.median(v))
nbytes = N * K // 32 * 20
for (name, k), v in res.items():
    lo, hi = min(v) * 1e3, max(v) * 1e3
    gbs = "" if k == "tiny" else f"  {nbytes / max(v) / 1e9:5.1f}–{nbytes / min(v) / 1e9:5.1f} GB/s"
    print(f"{K}x{N} {name:15s} {k:6s} {lo:7.3f}–{hi:7.3f} ms{gbs}")
