# python docs/research/onnx_int8_slot.py  (issue 12, item 2: why the ONNX LoRA slots stay float32)
"""A LoRA slot as float MatMul against MatMulNBits bits=8, both with the weight an overridable
input (a slot must be swappable), decode shape (one row). Per-call time, 1 thread, median of 2000."""
import time, statistics, numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto as T, numpy_helper as nh

def model(kind, K, N, blk=32):
    x = helper.make_tensor_value_info("x", T.FLOAT, [1, 1, K])
    y = helper.make_tensor_value_info("y", T.FLOAT, [1, 1, N])
    rng = np.random.default_rng(0)
    if kind == "f32":
        w = rng.standard_normal((K, N)).astype(np.float32)
        inits = [nh.from_array(w, "w")]
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        inputs = [x, helper.make_tensor_value_info("w", T.FLOAT, [K, N])]
    else:
        Kp = -(-K // blk) * blk
        nb = Kp // blk
        q = rng.integers(0, 256, (N, nb, blk), dtype=np.uint8)
        s = rng.random((N, nb)).astype(np.float32)
        inits = [nh.from_array(q, "w"), nh.from_array(s.reshape(-1), "s")]
        node = helper.make_node("MatMulNBits", ["x", "w", "s"], ["y"], domain="com.microsoft", K=Kp, N=N, bits=8,
                                block_size=blk, accuracy_level=4 if kind == "int8-al4" else 0)
        inputs = [x, helper.make_tensor_value_info("w", T.UINT8, [N, nb, blk]),
                  helper.make_tensor_value_info("s", T.FLOAT, [N * nb])]
        K = Kp
    g = helper.make_graph([node], "g", inputs if kind.endswith("slot") or True else [x], [y], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    return m.SerializeToString(), K

def time_it(kind, K, N, const):
    b, K = model(kind, K, N)
    if const:  # weights as plain initializers (not inputs): what a non-swappable graph would get
        m = onnx.load_from_string(b); del m.graph.input[1:]; b = m.SerializeToString()
    so = ort.SessionOptions(); so.intra_op_num_threads = 1
    s = ort.InferenceSession(b, so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 1, K)).astype(np.float32)
    for _ in range(200): s.run(None, {"x": x})
    ts = []
    for _ in range(2000):
        t = time.perf_counter(); s.run(None, {"x": x}); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e6

for K, N, what in ((2048, 8, "A of a 1B qkv slot (d_in 2048, rank 8)"), 
                   (8192, 8, "A of a 1B down slot"), (576, 8, "A of a 135M slot")):
    r = {f"{k}{' const' if c else ''}": time_it(k, K, N, c) for k in ("f32", "int8", "int8-al4") for c in (False, True)}
    print(what, " ".join(f"{k}={v:.1f}us" for k, v in r.items()))
