"""One row (decode) of K x N, interleaved so that no session keeps its weights in cache: the spike's
ops (one column a pass, four columns a pass, fp16 d and m, and the prepacked tile streams of 8 and 4
columns, f32 or fp16 d and m) against onnxruntime's MatMulNBits int4 (block 32, accuracy level 4: int8 activations), with
and without zero points; same threads.

    Q41_LIB=libq41.so python vs_nbits.py THREADS K N [ITERATIONS] [OPS]

OPS: comma-separated keys (i8, x4, h, p8, p4, p8h, p4h, zp) to time besides MatMulNBits without zero points;
all by default.
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
from check import LIB, pack, pack_tiles  # noqa: E402

threads, K, N = (int(a) for a in sys.argv[1:4])
iterations = int(sys.argv[4]) if len(sys.argv) > 4 else 30
wanted = sys.argv[5].split(",") if len(sys.argv) > 5 else ["i8", "x4", "h", "p8", "p4", "p8h", "p4h", "zp"]
blocks = K // 32
rng = np.random.default_rng(0)
codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
d = rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float32)
m = rng.uniform(-0.1, 0, (N, blocks)).astype(np.float32)
x = rng.standard_normal((1, K)).astype(np.float32)
dm = np.stack([d.astype(np.float16), m.astype(np.float16)], -1).view(np.uint16).reshape(N, blocks, 2)
A = onnx.numpy_helper.from_array
B = (codes.reshape(N, blocks, 16, 2)[..., 0] | (codes.reshape(N, blocks, 16, 2)[..., 1] << 4)).astype(np.uint8)
z = rng.integers(0, 16, (N, blocks + blocks % 2), dtype=np.uint8)
zp = (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8).reshape(-1)


def session(op, domain, inits, **attrs):
    node = helper.make_node(op, ["x", *(t.name for t in inits)], ["y"], domain=domain, **attrs)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(LIB)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


nbits = dict(K=K, N=N, bits=4, block_size=32, accuracy_level=4)
q41 = [A(pack(codes), "codes"), A(d, "d"), A(m, "m")]
makers = {
    "i8": ("MatMulQ41I8 (one column a pass)", lambda: session("MatMulQ41I8", "edgelora", q41)),
    "x4": ("MatMulQ41I8x4 (four columns a pass)", lambda: session("MatMulQ41I8x4", "edgelora", q41)),
    "h": ("MatMulQ41I8H (fp16 d, m)", lambda: session("MatMulQ41I8H", "edgelora", [A(pack(codes), "codes"), A(dm, "dm")])),
    "p8": ("MatMulQ41I8P8 (tiles, 8 columns)", lambda: session("MatMulQ41I8P8", "edgelora", [A(pack_tiles(codes, d, m, 8), "w")], N=N)),
    "p4": ("MatMulQ41I8P4 (tiles, 4 columns)", lambda: session("MatMulQ41I8P4", "edgelora", [A(pack_tiles(codes, d, m, 4), "w")], N=N)),
    "p8h": ("MatMulQ41I8P8H (tiles, 8 cols, fp16)", lambda: session("MatMulQ41I8P8H", "edgelora", [A(pack_tiles(codes, d, m, 8, True), "w")], N=N)),
    "p4h": ("MatMulQ41I8P4H (tiles, 4 cols, fp16)", lambda: session("MatMulQ41I8P4H", "edgelora", [A(pack_tiles(codes, d, m, 4, True), "w")], N=N)),
    "zp": ("MatMulNBits int4, uint8 zero points", lambda: session("MatMulNBits", "com.microsoft",
                                                                  [A(B, "B"), A(d.reshape(-1), "scales"), A(zp, "zp")], **nbits)),
}
sessions = {"MatMulNBits int4, no zero point": session("MatMulNBits", "com.microsoft", [A(B, "B"), A(d.reshape(-1), "scales")], **nbits)}
for key in wanted:
    name, make = makers[key]
    sessions[name] = make()
times = {k: [] for k in sessions}
for _ in range(iterations):
    for k, s in sessions.items():
        t = time.perf_counter()
        s.run(None, {"x": x})
        times[k].append(time.perf_counter() - t)
base = statistics.median(times["MatMulNBits int4, no zero point"])
best = min(times["MatMulNBits int4, no zero point"])
for k, v in times.items():  # medians; "best" is the ratio of the fastest runs (less sensitive to other jobs)
    t = statistics.median(v)
    print(f"{threads} thr {K}x{N}  {k:38s} {t * 1e3:6.3f} ms  {N * K / 2 / t / 1e9:5.2f} GB/s of codes  {base / t:.2f}x MatMulNBits"
          f"  best {best / min(v):.2f}x")
