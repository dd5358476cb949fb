"""One row (decode) of K x N: the spike's MatMulQ41I8 against onnxruntime's MatMulNBits int4 (block 32,
accuracy level 4: int8 activations), with and without zero points; same threads; median of runs."""
import numpy as np, onnx, onnxruntime as ort, time, statistics, sys
from onnx import helper, TensorProto
sys.path.insert(0, __import__("os").path.dirname(__import__("os").path.abspath(__file__)))
from check import pack, session
rng = np.random.default_rng(0)
threads = int(sys.argv[1]) if len(sys.argv) > 1 else 1
K, N = int(sys.argv[2]) if len(sys.argv) > 2 else 2048, int(sys.argv[3]) if len(sys.argv) > 3 else 8192
blocks = K // 32
codes = rng.integers(0, 16, (N, K), dtype=np.uint8)
d = rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float32); m = rng.uniform(-0.1, 0, (N, blocks)).astype(np.float32)
x = rng.standard_normal((1, K)).astype(np.float32)
ours = session("MatMulQ41I8", K, pack(codes), d, m, threads)

def nbits(zp: bool):
    B = (codes.reshape(N, blocks, 16, 2)[..., 0] | (codes.reshape(N, blocks, 16, 2)[..., 1] << 4)).astype(np.uint8)
    inits = [onnx.numpy_helper.from_array(B, "B"), onnx.numpy_helper.from_array(d.reshape(-1), "scales")]
    ins = ["x", "B", "scales"]
    if zp:
        z = rng.integers(0, 16, (N, blocks), dtype=np.uint8)
        zpad = np.concatenate([z, np.zeros((N, blocks % 2), np.uint8)], 1) if blocks % 2 else z
        inits.append(onnx.numpy_helper.from_array((zpad[:, 0::2] | (zpad[:, 1::2] << 4)).astype(np.uint8).reshape(-1), "zp"))
        ins.append("zp")
    node = helper.make_node("MatMulNBits", ins, ["y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=32, accuracy_level=4)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

sessions = {"edgelora MatMulQ41I8 (exact Q4_1)": ours, "MatMulNBits int4, no zero point": nbits(False),
            "MatMulNBits int4, uint8 zero points": nbits(True)}
times = {k: [] for k in sessions}
for _ in range(30):
    for k, s in sessions.items():
        t = time.perf_counter(); s.run(None, {"x": x}); times[k].append(time.perf_counter() - t)
base = statistics.median(times["MatMulNBits int4, no zero point"])
for k, v in times.items():
    t = statistics.median(v)
    print(f"{threads} thr {K}x{N}  {k:38s} {t*1e3:6.3f} ms  {N*K/2/t/1e9:5.2f} GB/s of codes  {base/t:.2f}x MatMulNBits")
