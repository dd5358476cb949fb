"""Per-call cost of a float LoRA slot in ONNX Runtime for one decode row (MatMul, MatMul, Add; Gemm; MatMuls alone):
python docs/research/onnx_lora_slot_cost.py K N THREADS."""
import sys, time, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto as TP
K, N, R = int(sys.argv[1]), int(sys.argv[2]), 8
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 1
REP = 40  # chain REP independent deltas in one graph so per-run overhead amortizes
def model(kind):
    nodes, inits = [], []
    ins = [helper.make_tensor_value_info("x", TP.FLOAT, [1, 1, K] if kind != "gemm" else [1, K]),
           helper.make_tensor_value_info("y", TP.FLOAT, [1, 1, N] if kind != "gemm" else [1, N])]
    outs = []
    for i in range(REP):
        a, b = f"A{i}", f"B{i}"
        ins += [helper.make_tensor_value_info(a, TP.FLOAT, [K, R]), helper.make_tensor_value_info(b, TP.FLOAT, [R, N])]
        if kind == "matmul":
            nodes += [helper.make_node("MatMul", ["x", a], [f"xa{i}"]), helper.make_node("MatMul", [f"xa{i}", b], [f"d{i}"]),
                      helper.make_node("Add", ["y", f"d{i}"], [f"o{i}"])]
        elif kind == "gemm":
            nodes += [helper.make_node("Gemm", ["x", a], [f"xa{i}"]), helper.make_node("Gemm", [f"xa{i}", b, "y"], [f"o{i}"])]
        elif kind == "matmul_only":
            nodes += [helper.make_node("MatMul", ["x", a], [f"xa{i}"]), helper.make_node("MatMul", [f"xa{i}", b], [f"o{i}"])]
        outs.append(helper.make_tensor_value_info(f"o{i}", TP.FLOAT, None))
    g = helper.make_graph(nodes, "g", ins, outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
rng = np.random.default_rng(0)
feeds = {}
so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = {}
for kind in ("matmul", "gemm", "matmul_only"):
    m = model(kind)
    sess[kind] = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    f = {"x": rng.standard_normal((1, 1, K) if kind != "gemm" else (1, K), dtype=np.float32),
         "y": rng.standard_normal((1, 1, N) if kind != "gemm" else (1, N), dtype=np.float32)}
    for i in range(REP):
        f[f"A{i}"] = rng.standard_normal((K, R), dtype=np.float32); f[f"B{i}"] = rng.standard_normal((R, N), dtype=np.float32)
    feeds[kind] = f
res = {k: [] for k in sess}
for _ in range(7):
    for k, s in sess.items():
        for _ in range(5): s.run(None, feeds[k])
        t = time.perf_counter(); n = 50
        for _ in range(n): s.run(None, feeds[k])
        res[k].append((time.perf_counter() - t) / n / REP * 1e6)
print(f"K={K} N={N} threads={threads}: us per delta (median of 7):", {k: round(float(np.median(v)), 2) for k, v in res.items()})
