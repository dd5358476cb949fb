import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
import os
LIB = os.environ.get("Q41_LIB", "libq41.so")  # g++ -O2 -std=c++17 -fPIC -shared -I INCLUDE/onnxruntime q41.cc -o libq41.so
rng = np.random.default_rng(0)

def pack(codes):  # (N, K) codes -> (N, K/32, 16) bytes: low nibbles k..k+15, high k+16..k+31
    N, K = codes.shape
    c = codes.reshape(N, K // 32, 32)
    return (c[..., :16] | (c[..., 16:] << 4)).astype(np.uint8)

def pack_tiles(codes, d, m, G, half=False):
    """The exporter's layout for MatMulQ41I8P8 (G=8) / MatMulQ41I8P4 (G=4): uint8 [ceil(N/G), tiles, 192].
    Columns padded to whole groups (zero codes, d, m); for G=4 blocks padded to an even count. A tile is
    4 pairs of 32 code bytes, then 8 f32 d, then 8 f32 m (fp16 if half: 160 bytes); see q41.cc for the
    pair and lane order."""
    N, K = codes.shape
    blocks = K // 32
    Np, bp = -(-N // G) * G, blocks + (blocks % 2 if G == 4 else 0)
    c = np.zeros((Np, bp, 16), np.uint8); c[:N, :blocks] = pack(codes)
    ft = np.float16 if half else np.float32
    dd = np.zeros((Np, bp), ft); dd[:N, :blocks] = d
    mm = np.zeros((Np, bp), ft); mm[:N, :blocks] = m
    ng = Np // G
    if G == 8:  # tile = one block; pair i = [col i | col i+4]; lanes = cols 0..7
        ct = c.reshape(ng, 2, 4, bp, 16).transpose(0, 3, 2, 1, 4)          # (g, b, i, h, 16)
        lanes = lambda a: a.reshape(ng, 8, bp).transpose(0, 2, 1)          # (g, b, col)
    else:  # tile = blocks 2t, 2t+1; pair 2j+i = [col i | col i+2] of block 2t+j; lane h*4+j*2+i
        ct = c.reshape(ng, 2, 2, bp // 2, 2, 16).transpose(0, 3, 4, 2, 1, 5)  # (g, t, j, i, h, 16)
        lanes = lambda a: a.reshape(ng, 2, 2, bp // 2, 2).transpose(0, 3, 1, 4, 2)  # (g, t, h, j, i)
    tiles = ct.shape[1]
    f = lambda a: np.ascontiguousarray(lanes(a)).reshape(ng, tiles, 8).view(np.uint8)  # 32 or 16 bytes
    return np.ascontiguousarray(np.concatenate([ct.reshape(ng, tiles, 128), f(dd), f(mm)], -1))

def session_tiles(op, K, N, blob, threads=2):
    node = helper.make_node(op, ["x", "w"], ["y"], domain="edgelora", N=N)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [onnx.numpy_helper.from_array(blob, "w")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgelora", 1)])
    so = ort.SessionOptions(); so.intra_op_num_threads = threads
    so.register_custom_ops_library(LIB)
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

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
    # d and m as GGUF's Q4_1 stores them: fp16 values (exact in f32 too), so the fp16 tiles are exact
    d = rng.uniform(0.001, 0.02, (N, blocks)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.1, 0.0, (N, blocks)).astype(np.float16).astype(np.float32)
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
    worst = 0.0
    for G, half in ((8, False), (4, False), (8, True), (4, True)):
        op = f"MatMulQ41I8P{G}" + "H" * half
        for threads in (1, 2):
            y8 = session_tiles(op, K, N, pack_tiles(codes, d, m, G, half), threads).run(None, {"x": x})[0]
            assert y8.shape == (M, N), y8.shape
            err = np.abs(y8 - emu).max() / scale
            worst = max(worst, err)
        print(f"    {op}: vs its emulation {err:.1e}, vs float {np.abs(y8 - ref).max() / scale:.1e}")
    return worst


if __name__ == "__main__":
    print("onnxruntime", ort.__version__)
    worst = 0.0
    for M, K, N in ((1, 64, 48), (7, 576, 1536), (3, 1536, 576), (1, 2048, 8192), (5, 96, 7),
                    (1, 576, 1536), (1, 1536, 576), (4, 2048, 8192), (2, 64, 8192), (1, 2048, 48),
                    (3, 576, 1538), (1, 1536, 4093), (2, 96, 13), (1, 32, 5)):
        worst = max(worst, case(M, K, N))
    print(f"worst MatMulQ41I8P8/P4/P8H/P4H vs emulation, 1 and 2 threads: {worst:.1e} of the output range")
    assert worst < 1e-6
