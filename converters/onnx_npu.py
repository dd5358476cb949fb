"""The mobile-NPU export (Snapdragon Hexagon through ONNX Runtime's QNN execution provider).

The NPU needs static shapes, so the decoder becomes two graphs over a fixed-size KV buffer of C
slots (slot = position): a prefill graph that takes P new tokens and a decode graph that takes one.

    inputs : input_ids [1,T] int64, position_ids [1,T] int64, attn_mask [1,1,T,C+T] float (additive:
             0 = attend, MASK_VALUE = masked), past_k_i / past_v_i [1,KV,C,D], and with LoRA slots of
             rank R, lora_a_i_m [in,R] and lora_b_i_m [R,out] for every projection m of layer i
    outputs: logits [1,T,V], present_k_i / present_v_i [1,KV,T,D] (the new tokens' K/V only; the
             host writes them into the buffer)

Both are exported from one hand-written torch module over the Hugging Face weights (export time
only: a device never needs torch), written so the graph has no bool masks, no -inf, no shape
arithmetic and RMSNorm as one SimplifiedLayerNormalization node, then quantized to QDQ with ONNX
Runtime's QNN configuration: 16-bit activations, per-channel symmetric int8 weights, calibrated on
sample text. The first position of a Llama sequence carries "massive activations" that would set
every per-tensor 16-bit scale; position 0 therefore always holds one fixed token (BOS) whose K/V
are computed once in float32 at export and stored beside the graphs (``prefix_kv.npz``).

LoRA slots: each projection adds ``((x @ a) @ b) * g``, fed as inputs: a = A^T / |A^T|max and
b = (scale B)^T / |scale B|max, so both fill their fixed 16-bit range [-1, 1] (the HTP computes a
MatMul's dynamic operands to about 8 bits of their range: a small adapter in a wide range would lose
its digits), and the gain g = |A|max * |scale B|max restores the size; zero-padded to the bundle's
rank R, a mix being its adapters' ranks side by side. Adapters swap without touching the graphs. The
gains' ranges, and those of the slots' intermediate tensors, come from calibration with a random and
a trained adapter bound (and the trained one doubled); a gain's range is LORA_HEADROOM times the
largest seen. npu.json records them and the engine refuses an adapter beyond them, naming the module.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgelora.errors import EdgeloraError

from . import keys

# Finite "minus infinity": -inf gives NaN calibration ranges; much below -1e4 makes the 16-bit
# step of (scores + mask) too coarse.
MASK_VALUE = -100.0
GEOMETRY, PREFIX_KV = keys.NPU_GEOMETRY, keys.NPU_PREFIX_KV
LORA_HEADROOM = 2.0  # a gain's range over the largest calibration value


class NpuExportError(EdgeloraError):
    exit_code = 1


@dataclass
class Geometry:
    """npu.json: the static graphs' shapes and what the host must hold for them."""
    n_layers: int
    n_kv: int
    head_dim: int
    prefill_len: int  # P: tokens per prefill call
    ctx: int  # C: KV buffer slots (positions held)
    prefix_tokens: list[int]
    mask_value: float
    window: int | None = None  # sliding-window layers get a second mask hiding keys `window` or more back
    lora_rank: int = 0  # R: the LoRA slots' rank (0: no slots)
    lora_ranges: dict[str, float] | None = None  # slot kind ("a.q", "b.down", "g.up", ...) -> largest |value| its inputs take

    def lora_inputs(self, config) -> dict[str, tuple[str, tuple[int, int]]]:
        """Input name -> (slot kind, shape) for every LoRA input of the graphs."""
        return lora_inputs(config, self.lora_rank) if self.lora_rank else {}


def read_geometry(root: Path) -> tuple[Geometry, list[np.ndarray]]:
    """An NPU graph directory's geometry and the fixed prefix's K/V (float, computed at export)."""
    geom = Geometry(**json.loads((Path(root) / GEOMETRY).read_text()))
    with np.load(Path(root) / PREFIX_KV) as data:
        return geom, [data[f"arr_{i}"] for i in range(len(data.files))]


def lora_inputs(config, rank: int) -> dict[str, tuple[str, tuple[int, int]]]:
    """The LoRA inputs of graphs with slots of `rank`: name -> (slot kind, shape), the normalized A^T and
    (scale B)^T and their gain for each projection of each layer, in input order."""
    from edgelora.adapters import LORA_TARGETS

    shapes = config.shapes()
    out = {}
    for i in range(config.num_layers):
        for m in LORA_TARGETS:
            n_out, n_in = shapes[f"layers.{i}.{m}"]
            out[f"lora_a_{i}_{m}"] = (f"a.{m}", (n_in, rank))
            out[f"lora_b_{i}_{m}"] = (f"b.{m}", (rank, n_out))
            out[f"lora_g_{i}_{m}"] = (f"g.{m}", (1,))
    return out


def lora_feeds(adapter, config, rank: int) -> dict[str, np.ndarray]:
    """The slot inputs for `adapter` (a LoraAdapter; a mix is one too, `LoraAdapter.mix`): A^T and
    (scale B)^T per projection, each scaled to a largest |value| of 1, and their gain; zero-padded to
    `rank`; zeros where it has no module (None: all zero)."""
    from edgelora.adapters import AdapterError

    feeds = {name: np.zeros(shape, np.float32) for name, (_, shape) in lora_inputs(config, rank).items()}
    if adapter is None:
        return feeds
    over = {t: r for t, r in adapter.ranks.items() if r > rank}
    if over:
        target = max(over, key=over.get)
        raise AdapterError(f"adapter {adapter.name or '(unnamed)'} has rank {over[target]} at {target}, over the NPU "
                           f"graphs' LoRA rank {rank}: use an adapter (or a mix) of rank <= {rank}, or export the "
                           f"bundle with a larger lora_rank")
    for target in adapter.targets:
        t = adapter.tensors[target]
        i, m = target.split(".")[1:]
        a, b = t.A.T, (adapter.scale(target) * t.B).T
        na, nb = float(np.abs(a).max()), float(np.abs(b).max())
        if na and nb:
            feeds[f"lora_a_{i}_{m}"][:, :t.rank] = a / na
            feeds[f"lora_b_{i}_{m}"][:t.rank] = b / nb
            feeds[f"lora_g_{i}_{m}"][0] = na * nb
    return feeds


def check_lora_ranges(feeds: dict[str, np.ndarray], geom: Geometry, config, name: str) -> None:
    """Refuses slot inputs beyond the 16-bit ranges the graphs were calibrated for (they would saturate),
    naming the modules."""
    from edgelora.adapters import AdapterError

    problems = []
    for input_name, (kind, _) in lora_inputs(config, geom.lora_rank).items():
        peak, limit = float(np.abs(feeds[input_name]).max()), geom.lora_ranges[kind]
        if peak > limit:
            _, _, i, m = input_name.split("_")
            problems.append(f"layers.{i}.{m}'s gain |A|max*|scale*B|max is {peak:.3g} (range {limit:.3g})")
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise AdapterError(f"adapter {name} is outside the NPU graphs' calibrated LoRA ranges and would saturate: "
                           f"{'; '.join(problems[:3])}{more}; use a CPU bundle for it, or lower its weight")


def _torch_modules():
    try:
        import torch
        from torch import nn
    except ImportError as e:
        raise NpuExportError("the NPU export needs the export extra (torch): pip install 'edgelora[export]'") from e
    return torch, nn


def static_decoder(base, max_positions: int, lora_rank: int = 0):
    """The torch module that is exported (see the module docstring), built from the base's canonical
    weights, so every family's ops come from its `Family` entry: q/k/v biases, q/k head norms,
    sandwich norms, GeGLU, embedding scale, partial rotary and the family's RoPE tables (edgelora.rope),
    the query scale, and a second (sliding-window) mask for the layers that attend within a window.
    With `lora_rank`, every projection has a LoRA slot fed by inputs (`lora_inputs`)."""
    torch, nn = _torch_modules()
    from edgelora.rope import cos_sin, inv_freq

    c = base.config
    fam = c.spec

    class FusedRMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps: float):
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        @staticmethod
        def symbolic(g, x, weight, eps: float):
            return g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)

    def tables(local: bool):
        inv, scaling = inv_freq(c, sliding=local)
        cos, sin = cos_sin(np.arange(max_positions), inv, scaling)
        return torch.from_numpy(cos), torch.from_numpy(sin)

    class StaticDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.n_layers, self.hidden = c.num_layers, c.hidden_size
            self.n_heads, self.n_kv, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
            self.window = c.sliding_window if c.sliding_layers else None
            self.lora = lora_inputs(c, lora_rank) if lora_rank else {}
            for n in base.weights:  # parameters, so the export makes them initializers (the QDQ pass quantizes those)
                self.register_parameter(n.replace(".", "__"), nn.Parameter(
                    torch.from_numpy(np.array(base.weights[n], np.float32)), requires_grad=False))
            locals_ = (False, True) if c.rope_local_theta is not None else (False,)
            for local in locals_:
                cos, sin = tables(local)
                self.register_buffer(f"cos_{int(local)}", cos, persistent=False)  # [positions, rot]
                self.register_buffer(f"sin_{int(local)}", sin, persistent=False)

        def w(self, name):
            return getattr(self, name.replace(".", "__"))

        def rms(self, name, x):
            return FusedRMSNorm.apply(x, self.w(name), float(c.rms_norm_eps))

        def linear(self, x, name, bias=None, slots=None):
            y = torch.matmul(x, self.w(name).t())
            y = y + self.w(bias) if bias else y
            if slots is not None:  # LoRA: ((x a) b) g, with a, b and g graph inputs
                i, m = name.split(".")[1:]
                xab = torch.matmul(torch.matmul(x, slots[f"lora_a_{i}_{m}"]), slots[f"lora_b_{i}_{m}"])
                y = y + xab * slots[f"lora_g_{i}_{m}"]
            return y

        @staticmethod
        def rope(x, cos, sin):
            rot = cos.shape[-1]
            xr = x if rot == x.shape[-1] else x[..., :rot]
            half = rot // 2
            y = xr * cos + torch.cat((-xr[..., half:], xr[..., :half]), dim=-1) * sin
            return y if rot == x.shape[-1] else torch.cat((y, x[..., rot:]), dim=-1)

        def forward(self, input_ids, position_ids, attn_mask, *rest):
            mask_local, rest = (rest[0], rest[1:]) if self.window else (None, rest)
            past, lora = rest[:2 * self.n_layers], rest[2 * self.n_layers:]
            slots = dict(zip(self.lora, lora)) if lora else None  # none for the fixed prefix (float, no adapter)
            b, t = int(input_ids.shape[0]), int(input_ids.shape[1])
            H, KV, D = self.n_heads, self.n_kv, self.head_dim
            rep = H // KV
            ropes = {}
            for local in (False, True):
                if hasattr(self, f"cos_{int(local)}"):
                    ropes[local] = (getattr(self, f"cos_{int(local)}")[position_ids].unsqueeze(1),  # [1,1,t,rot]
                                    getattr(self, f"sin_{int(local)}")[position_ids].unsqueeze(1))
            masks = {False: attn_mask, True: mask_local}
            masks = {k: torch.cat([m] * rep, dim=2) if rep > 1 and m is not None else m for k, m in masks.items()}
            h = torch.nn.functional.embedding(input_ids, self.w("embed"))
            if fam.embed_scale:
                h = h * float(np.float32(np.sqrt(c.hidden_size)))
            presents = []
            for i in range(self.n_layers):
                p = f"layers.{i}"
                sliding = c.is_sliding(i)
                cos, sin = ropes[sliding and c.rope_local_theta is not None]
                x = self.rms(f"{p}.attn_norm", h)
                bias = (lambda m: f"{p}.{m}_bias") if fam.qkv_bias else (lambda m: None)
                q = self.linear(x, f"{p}.q", bias("q"), slots).view(b, t, H, D).transpose(1, 2)
                k = self.linear(x, f"{p}.k", bias("k"), slots).view(b, t, KV, D).transpose(1, 2)
                v = self.linear(x, f"{p}.v", bias("v"), slots).view(b, t, KV, D).transpose(1, 2)
                if fam.qk_norm:
                    q, k = self.rms(f"{p}.q_norm", q), self.rms(f"{p}.k_norm", k)
                q, k = self.rope(q, cos, sin), self.rope(k, cos, sin)
                presents += [k, v]
                if past:
                    k = torch.cat((past[2 * i], k), dim=2)
                    v = torch.cat((past[2 * i + 1], v), dim=2)
                qg = q.reshape(b, KV, rep * t, D)  # the query heads sharing a KV head, stacked: no Expand
                scores = torch.matmul(qg, k.transpose(2, 3)) * float(c.attn_scale) + masks[sliding]
                o = torch.matmul(torch.softmax(scores, dim=-1), v).reshape(b, H, t, D).transpose(1, 2).reshape(b, t, H * D)
                o = self.linear(o, f"{p}.o", slots=slots)
                if fam.sandwich_norms:
                    o = self.rms(f"{p}.post_attn_norm", o)
                h = h + o
                x = self.rms(f"{p}.mlp_norm", h)
                gate, up = self.linear(x, f"{p}.gate", slots=slots), self.linear(x, f"{p}.up", slots=slots)
                act = (torch.nn.functional.gelu(gate, approximate="tanh") if fam.activation == "gelu_tanh"
                       else torch.nn.functional.silu(gate))
                d = self.linear(act * up, f"{p}.down", slots=slots)
                if fam.sandwich_norms:
                    d = self.rms(f"{p}.post_mlp_norm", d)
                h = h + d
            head = self.w("embed" if c.tie_word_embeddings else "lm_head")
            return (torch.matmul(self.rms("norm", h), head.t()), *presents)

    return StaticDecoder().eval()


def io_names(n_layers: int, windowed: bool = False, lora: list[str] = ()) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", "position_ids", "attn_mask"] + (["attn_mask_local"] if windowed else []), ["logits"]
    for i in range(n_layers):
        ins += [f"past_k_{i}", f"past_v_{i}"]
        outs += [f"present_k_{i}", f"present_v_{i}"]
    return ins + list(lora), outs


def export_float(wrapper, out_dir: Path, prefill_len: int, ctx: int) -> dict[str, Path]:
    import onnx

    torch, _ = _torch_modules()
    n, kv, d = wrapper.n_layers, wrapper.n_kv, wrapper.head_dim
    windowed = wrapper.window is not None
    ins, outs = io_names(n, windowed, list(wrapper.lora))
    paths = {}
    for name, t in (("prefill", prefill_len), ("decode", 1)):
        masks = [torch.zeros(1, 1, t, ctx + t)] * (2 if windowed else 1)
        args = (torch.zeros(1, t, dtype=torch.int64), torch.arange(t)[None], *masks,
                *[torch.zeros(1, kv, ctx, d) for _ in range(2 * n)],
                *[torch.zeros(*shape) for _, shape in wrapper.lora.values()])
        path = out_dir / f"{name}_fp32.onnx"
        import warnings

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), input_names=ins, output_names=outs, opset_version=20,
                              dynamo=False, do_constant_folding=True)
        m = onnx.load(str(path))
        for imp in m.opset_import:  # 16-bit Q/DQ needs opset 21; the ops used here only gained types
            if imp.domain in ("", "ai.onnx"):
                imp.version = 21
        onnx.save(_infer_shapes(m), str(path))
        paths[name] = path
    return paths


def _infer_shapes(m):
    """onnx's shape inference in one pass, with each SimplifiedLayerNormalization (a contrib op onnx
    does not know; it keeps its input's shape) standing in as an Identity. Declaring the norms' shapes
    as they became known took a pass per norm: about 11 of the default model's 20-minute NPU export."""
    import onnx

    norms = []
    for i, nd in enumerate(m.graph.node):
        if nd.op_type == "SimplifiedLayerNormalization":
            kept = onnx.NodeProto()
            kept.CopyFrom(nd)
            norms.append((i, kept))
            nd.CopyFrom(onnx.helper.make_node("Identity", [kept.input[0]], [kept.output[0]], name=kept.name))
    m = onnx.shape_inference.infer_shapes(m)
    for i, kept in norms:
        m.graph.node[i].CopyFrom(kept)
    return m


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


def quantize_qdq(fp32_path: Path, out_path: Path, feeds: list[dict], ranges: dict[str, float] | None = None) -> None:
    """uint16 activations; per-output-channel symmetric int8 weights on every constant MatMul (QNN
    maps them to FullyConnected, which accepts exactly that); `ranges`: input name -> the symmetric
    range its 16-bit encoding covers (the LoRA slots', fixed rather than calibrated)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    m = onnx.load(str(fp32_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    overrides = {nd.input[1]: [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": 1}]
                 for nd in m.graph.node if nd.op_type == "MatMul" and nd.input[1] in inits}
    for name, r in (ranges or {}).items():
        overrides[name] = [{"quant_type": QuantType.QUInt16, "rmin": np.float32(-r), "rmax": np.float32(r)}]
    cfg = get_qnn_qdq_config(str(fp32_path), _Feeds(feeds), activation_type=QuantType.QUInt16,
                             weight_type=QuantType.QUInt8, init_overrides=overrides)
    quantize(str(fp32_path), str(out_path), cfg)


def lora_ranges(feeds: dict[str, list[dict]], config, rank: int) -> dict[str, float]:
    """Each slot kind's range: 1 for the normalized A and B; LORA_HEADROOM times the largest gain seen
    in calibration for the gains."""
    peaks: dict[str, float] = {}
    for name, (kind, _) in lora_inputs(config, rank).items():
        if kind.startswith("g."):
            peak = max(float(np.abs(f[name]).max()) for fs in feeds.values() for f in fs)
            peaks[kind] = max(peaks.get(kind, 0.0), LORA_HEADROOM * peak)
        else:
            peaks[kind] = 1.0
    if not all(peaks.values()):
        raise NpuExportError("the NPU calibration bound no adapter, so the LoRA slots have no ranges")
    return peaks


def export(base, out_dir: str | os.PathLike, *, prefill_len: int, ctx: int, prefix_tokens: list[int],
           calibrate: Callable[[Path, dict[str, Path]], dict[str, list[dict]]], lora_rank: int = 0,
           progress: Callable[[int, int], None] | None = None) -> Path:
    """Writes prefill.onnx and decode.onnx (QDQ), prefix_kv.npz and npu.json into `out_dir`, for the
    `BaseModel` `base`. `calibrate(out_dir, float graphs)` returns the feeds each graph sees on sample
    text (the host loop that records them is the runtime's, `runtime.npu.StaticRunner`); with
    `lora_rank`, the graphs have LoRA slots and the feeds must include adapters bound to them."""
    torch, _ = _torch_modules()
    from edgelora._native import quiet_native

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper = static_decoder(base, ctx + prefill_len, lora_rank)
    geom = Geometry(wrapper.n_layers, wrapper.n_kv, wrapper.head_dim, prefill_len, ctx, list(prefix_tokens), MASK_VALUE,
                    wrapper.window, lora_rank)
    k = len(prefix_tokens)
    with torch.no_grad():
        mask = torch.triu(torch.full((k, k), MASK_VALUE), diagonal=1)[None, None]
        masks = [mask] * (2 if wrapper.window else 1)  # the prefix is shorter than any window
        prefix_kv = [o.numpy().copy() for o in wrapper(torch.tensor([prefix_tokens]), torch.arange(k)[None], *masks)[1:]]
    np.savez(out_dir / PREFIX_KV, *prefix_kv)
    (out_dir / GEOMETRY).write_text(json.dumps(geom.__dict__, indent=2))
    step = progress or (lambda done, total: None)
    step(0, 4)  # the float graphs, calibration, and each graph's quantization
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        floats = export_float(wrapper, Path(tmp), prefill_len, ctx)
        step(1, 4)
        feeds = calibrate(out_dir, floats)
        step(2, 4)
        ranges = {}
        if lora_rank:
            geom.lora_ranges = lora_ranges(feeds, base.config, lora_rank)
            ranges = {n: geom.lora_ranges[kind] for n, (kind, _) in wrapper.lora.items()}
        for i, name in enumerate(("prefill", "decode")):
            with quiet_native():
                quantize_qdq(floats[name], out_dir / f"{name}.onnx", feeds[name], ranges)
            step(3 + i, 4)
    (out_dir / GEOMETRY).write_text(json.dumps(geom.__dict__, indent=2))
    return out_dir / "prefill.onnx"
