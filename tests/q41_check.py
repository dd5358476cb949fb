"""MatMulQ41 (native/edgelora_ort.cc) against a numpy emulation, runnable on its own so the arm64
build can be checked under qemu-aarch64 with the arm64 interpreter:

    python tests/q41_check.py LIBRARY        prints the kernel and the worst error; exit 1 if too large

The emulation quantizes the activations to int8 per block of 32 as the operator does (scale
max|x| / 127, round half to even) and multiplies by the exact Q4_1 weight, in float64."""

from __future__ import annotations

import sys

import numpy as np

SHAPES = [(1, 32, 5), (1, 576, 1536), (3, 96, 13), (7, 64, 8), (2, 2048, 4093), (5, 160, 1538), (6, 64, 48)]
TOLERANCE = 1e-6  # of the output's range


def session(lib: str, k: int, n: int, tiles: np.ndarray, *, lora: bool = False, bias: np.ndarray | None = None,
            threads: int = 2, accuracy_level: int = 4, split: tuple[int, ...] = (), dtype=np.float32, tiled: bool = False,
            activation: str | None = None, bits: int = 4, pack: bool = False):
    """One MatMulQ41 node; with `lora`, inputs a [k, r] and b [r, n] in `dtype`, or with `split` (the
    widths of side-by-side projections) one B per projection: b, b1, b2 [r_i, split[i]]; `tiled`: the
    B's whose width is a multiple of 8 in tiles, [width / 8, r_i, 8] (`tile`). dtype uint8: 8 bits,
    a [r, k / 32, 34] and b's [width / 8, r_i + 2, 8] (onnx_fused.q8_a, q8_b). `activation`: the node
    is a gated MLP's gate|up, its output act(gate) * up [rows, n / 2]. `bits` 6: `tiles` are 6-bit
    (q41.pack6). `pack`: the LoRA tensors come in one adapter pack (input "pack", entry 1 of
    `PACK_TABLE`: onnx_fused.pack_parameters), as the fused graph binds them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])]
    inits = [numpy_helper.from_array(tiles, "w")]
    names = ["x", "w"]
    bs = [f"b{i or ''}" for i in range(len(split))] if split else ["b"]
    if lora:  # a LoRA slot of any rank
        q8 = dtype is np.uint8
        ins += [helper.make_tensor_value_info("a", t, ["r", k // 32, 34] if q8 else [k, "r"])]
        ins += [helper.make_tensor_value_info(b, t, [w // 8, f"r{b}", 8] if (tiled or q8) and not w % 8 else [f"r{b}", w])
                for b, w in zip(bs, split or (n,))]
        names += ["a", bs[0]]
    if bias is not None or split:  # (the B's of a split come after the bias: none is 0 values)
        inits.append(numpy_helper.from_array(bias if bias is not None else np.zeros(0, np.float32), "bias"))
        names.append("bias")
    names += bs[1:] if lora else []
    extra = {}
    if pack:
        ins = [ins[0], helper.make_tensor_value_info("pack", TensorProto.UINT8, ["bytes"])]
        inits.append(numpy_helper.from_array(np.zeros(0, np.uint8), "none"))
        names = ["x", "w", "pack", *(["none", "bias"] if "bias" in names else [])]
        extra["lora_slot"] = 1
    node = helper.make_node("MatMulQ41", names, ["y"], domain="edgelora", N=n, accuracy_level=accuracy_level,
                            **({"activation": activation} if activation else {}), **({"bits": bits} if bits != 4 else {}),
                            **extra)
    graph = helper.make_graph([node], "q41", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("edgelora", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


PACK_TABLE = [["other.A", "other.B"], ["a", "b", "b1", "b2"]]  # entry 0: another node's, left empty


def packed(feeds: dict) -> dict:
    """The LoRA tensors of `feeds` as the adapter pack of a `session(..., pack=True)`."""
    from edgelora.converters import onnx_fused

    lora = {k: v for k, v in feeds.items() if k not in ("x", "bias")}
    return {"x": feeds["x"], "pack": onnx_fused.pack_parameters(lora, [PACK_TABLE[0], [n for n in PACK_TABLE[1] if n in lora]])}


def int8_blocks(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The activations as the operator quantizes them: int8 codes [rows, k / 32, 32] and scales."""
    mm, k = x.shape
    b = x.reshape(mm, k // 32, 32).astype(np.float64)
    s = np.abs(x.reshape(mm, k // 32, 32)).max(-1) / np.float32(127)
    return np.rint(b * np.where(s > 0, 1 / np.where(s > 0, s, 1), 0)[..., None].astype(np.float32)).astype(np.int64), s


def int8_x(x: np.ndarray) -> np.ndarray:
    """The quantized activations back in float64."""
    xq, s = int8_blocks(x)
    return (xq * s[..., None].astype(np.float64)).reshape(x.shape)


def emulate(x: np.ndarray, q: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    xq, s = int8_blocks(x)
    dots = np.einsum("rbk,nbk->rnb", xq, q.astype(np.int64))
    return (dots * (d[None] * s[:, None, :])).sum(-1) + (m[None] * (s * xq.sum(-1))[:, None, :]).sum(-1)


def case(lib: str, rows: int, k: int, n: int, threads=(1, 2)) -> dict[str, float]:
    """Worst errors, relative to the output's range: int8 activations against the emulation, float
    activations (accuracy_level 0) against the float weight, and with a LoRA slot and a bias."""
    from edgelora.converters import onnx_fused, q41

    rng = np.random.default_rng(k * n + rows)
    w = rng.standard_normal((n, k)).astype(np.float32) * 0.05
    q, d, m = q41.quantize(w)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    ref = emulate(x, q, d, m)
    scale = np.abs(ref).max()
    tiles = q41.pack(q, d, m)
    err = {"int8": 0.0}
    for t in threads:
        y = session(lib, k, n, tiles, threads=t).run(None, {"x": x})[0]
        assert y.shape == (rows, n), y.shape
        err["int8"] = max(err["int8"], float(np.abs(y - ref).max() / scale))
    W = (q * d[..., None] + m[..., None]).reshape(n, k).astype(np.float64)
    exact = x.astype(np.float64) @ W.T
    err["int8 vs float"] = float(np.abs(y - exact).max() / np.abs(exact).max())
    y = session(lib, k, n, tiles, accuracy_level=0).run(None, {"x": x})[0]
    err["float"] = float(np.abs(y - exact).max() / np.abs(exact).max())
    err.update(case6(lib, x, w, threads, rng))
    bias = rng.standard_normal(n).astype(np.float32)
    s = session(lib, k, n, tiles, lora=True, bias=bias)
    err["lora"] = 0.0
    for r in (6, 24, 44):  # the SIMD loops take 8 ranks at a time, up to 32 in registers: a rest, one pass, two
        a = rng.standard_normal((k, r)).astype(np.float32)
        bb = rng.standard_normal((r, n)).astype(np.float32) * 0.1
        full = ref + (x.astype(np.float64) @ a) @ bb + bias
        got = s.run(None, {"x": x, "a": a, "b": bb})[0]
        err["lora"] = max(err["lora"], float(np.abs(got - full).max() / np.abs(full).max()))
    zero = {"x": x, "a": np.zeros((k, 0), np.float32), "b": np.zeros((0, n), np.float32)}
    err["rank 0"] = float(np.abs(s.run(None, zero)[0] - (ref + bias)).max() / np.abs(ref + bias).max())
    err["split lora"] = 0.0
    for parts in split_cases(n):  # one B per projection, float32, float16 and 8 bits, member ranks 0 included
        widths, ranks = zip(*parts)
        variants = [(np.float32, True, False, 4), (np.float16, True, False, 4), (np.float16, False, False, 4),
                    (np.float32, True, True, 4), (np.float16, False, True, 4)]
        if not any(w % 8 for w in widths):  # 8-bit B's come in whole tiles; A's dots take the int8 activations
            variants += [(np.uint8, True, True, 4), (np.uint8, False, True, 0)]
        for dtype, with_bias, tiled, level in variants:
            s = session(lib, k, n, tiles, lora=True, bias=bias if with_bias else None, split=widths, dtype=dtype,
                        tiled=tiled, accuracy_level=level)
            a = (rng.standard_normal((k, sum(ranks))) * 0.5).astype(np.float32 if dtype is np.uint8 else dtype)
            feeds, r0 = {"x": x, "a": onnx_fused.q8_a(a) if dtype is np.uint8 else a}, 0
            full = (ref if level else exact) + (bias if with_bias else 0.0)
            xs = x.astype(np.float64) if level == 0 or dtype is not np.uint8 else int8_x(x)
            a = onnx_fused.q8_values(feeds["a"], "a.lora_A") if dtype is np.uint8 else a
            for i, (w, r) in enumerate(parts):
                b = (rng.standard_normal((r, w)) * 0.1).astype(np.float32 if dtype is np.uint8 else dtype)
                name = f"b{i or ''}"
                feeds[name] = onnx_fused.q8_b(b) if dtype is np.uint8 else tile(b) if tiled and not w % 8 else b
                b = onnx_fused.q8_values(feeds[name], "b.lora_B") if dtype is np.uint8 else b
                c0 = sum(widths[:i])
                full[:, c0:c0 + w] += (xs @ a[:, r0:r0 + r].astype(np.float64)) @ b.astype(np.float64)
                r0 += r
            got = s.run(None, feeds)[0]
            err["split lora"] = max(err["split lora"], float(np.abs(got - full).max() / np.abs(full).max()))
            s = session(lib, k, n, tiles, lora=True, bias=bias if with_bias else None, split=widths, dtype=dtype,
                        tiled=tiled, accuracy_level=level, pack=True)
            err["pack"] = max(err.get("pack", 0.0), float(np.abs(s.run(None, packed(feeds))[0] - got).max()))
    if n % 16 == 0:  # a gated MLP's gate|up node: act(gate) * up, with one B for each half
        err["gated"] = 0.0
        half = n // 2
        for act in ACTIVATIONS:
            s = session(lib, k, n, tiles, lora=True, split=(half, half), tiled=True, activation=act)
            a = rng.standard_normal((k, 16)).astype(np.float32) * 0.5
            bg, bu = (rng.standard_normal((8, half)).astype(np.float32) * 0.1 for _ in range(2))
            full = ref + np.concatenate([(x.astype(np.float64) @ a[:, :8]) @ bg, (x.astype(np.float64) @ a[:, 8:]) @ bu], -1)
            want = ACTIVATIONS[act](full[:, :half]) * full[:, half:]
            got = s.run(None, {"x": x, "a": a, "b": tile(bg), "b1": tile(bu)})[0]
            assert got.shape == (rows, half), got.shape
            err["gated"] = max(err["gated"], float(np.abs(got - want).max() / np.abs(want).max()))
    return err


def case6(lib: str, x: np.ndarray, w: np.ndarray, threads, rng) -> dict[str, float]:
    """The 6-bit weight (bits=6, the LM head's): int8 activations against the emulation, float ones
    against the float weight, and with an adapter and a bias (the epilogue Q4_1's kernels share)."""
    from edgelora.converters import q41

    k, n = x.shape[1], w.shape[0]
    q, d = q41.quantize6(w)
    ref = emulate(x, q, d, -32 * d)
    tiles = q41.pack6(q, d)
    err = {"6-bit": 0.0}
    for t in threads:
        y = session(lib, k, n, tiles, threads=t, bits=6).run(None, {"x": x})[0]
        err["6-bit"] = max(err["6-bit"], float(np.abs(y - ref).max() / np.abs(ref).max()))
    exact = x.astype(np.float64) @ ((q.astype(np.float64) - 32) * d[..., None]).reshape(n, k).T
    y = session(lib, k, n, tiles, accuracy_level=0, bits=6).run(None, {"x": x})[0]
    err["6-bit float"] = float(np.abs(y - exact).max() / np.abs(exact).max())
    a, b = rng.standard_normal((k, 8)).astype(np.float32), rng.standard_normal((8, n)).astype(np.float32) * 0.1
    bias = rng.standard_normal(n).astype(np.float32)
    full = ref + (x.astype(np.float64) @ a) @ b + bias
    got = session(lib, k, n, tiles, lora=True, bias=bias, bits=6).run(None, {"x": x, "a": a, "b": b})[0]
    err["6-bit lora"] = float(np.abs(got - full).max() / np.abs(full).max())
    return err


ACTIVATIONS = {"silu": lambda g: g / (1 + np.exp(-g)),  # as transformers' SiLU and GELU(approximate="tanh")
               "gelu_tanh": lambda g: 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g ** 3)))}


def tile(b: np.ndarray) -> np.ndarray:
    """B [r, w] (w a multiple of 8) in MatMulQ41's tiles of 8 columns: [w / 8, r, 8]."""
    r, w = b.shape
    return np.ascontiguousarray(b.reshape(r, w // 8, 8).transpose(1, 0, 2))


def split_cases(n: int) -> list[list[tuple[int, int]]]:
    """(width, rank) per projection for an output of width n: three projections (one of rank 0, and
    widths that cut through a group of 8 columns when n allows), two, and three of whole tiles."""
    a, b = max(1, n // 2 + 3), max(1, n // 4)
    three = [(a, 8), (b, 0), (n - a - b, 12)] if n - a - b > 0 else [(n, 8)]
    cases = [three, [(n - n // 3, 16), (n // 3, 8)] if n >= 3 else [(n, 16)]]
    if n >= 24:
        t = 8 * (n // 24)
        cases.append([(t, 8), (t, 4), (n - 2 * t, 8)])
    return cases


def main(lib: str) -> int:
    worst: dict[str, float] = {}
    for shape in SHAPES:
        for key, v in case(lib, *shape).items():
            worst[key] = max(worst.get(key, 0.0), v)
    from edgelora import native

    print(f"kernel {native.kernel(lib)}: worst " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    bad = {k: v for k, v in worst.items() if k != "int8 vs float" and v > (10 * TOLERANCE if "lora" in k or k == "gated" else TOLERANCE)}
    bad.update({k: v for k, v in worst.items() if k == "pack" and v})  # the same tensors, read from the pack: bit for bit
    bad.update({k: v for k, v in worst.items() if k == "int8 vs float" and v > 0.02})
    if bad:
        print(f"too large: {bad}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
