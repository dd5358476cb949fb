"""The mobile-NPU export (Snapdragon Hexagon through ONNX Runtime's QNN execution provider).

The NPU needs static shapes, so the decoder becomes two graphs over a fixed-size KV buffer of C
slots (slot = position): a prefill graph that takes P new tokens and a decode graph that takes one.

    inputs : input_ids [1,T] int64, position_ids [1,T] int64, attn_mask [1,1,T,C+T] float (additive:
             0 = attend, MASK_VALUE = masked), past_k_i / past_v_i [1,KV,C,D]
    outputs: logits [1,T,V], present_k_i / present_v_i [1,KV,T,D] (the new tokens' K/V only; the
             host writes them into the buffer)

Both are exported from one hand-written torch module over the Hugging Face weights (export time
only: a device never needs torch), written so the graph has no bool masks, no -inf, no shape
arithmetic and RMSNorm as one SimplifiedLayerNormalization node, then quantized to QDQ with ONNX
Runtime's QNN configuration: 16-bit activations, per-channel symmetric int8 weights, calibrated on
sample text. The first position of a Llama sequence carries "massive activations" that would set
every per-tensor 16-bit scale; position 0 therefore always holds one fixed token (BOS) whose K/V
are computed once in float32 at export and stored beside the graphs (``prefix_kv.npz``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from edgelora.errors import EdgeloraError

# Finite "minus infinity": -inf gives NaN calibration ranges; much below -1e4 makes the 16-bit
# step of (scores + mask) too coarse.
MASK_VALUE = -100.0
GEOMETRY = "npu.json"
PREFIX_KV = "prefix_kv.npz"


class NpuExportError(EdgeloraError):
    exit_code = 1


def _torch_modules():
    try:
        import torch
        from torch import nn
    except ImportError as e:
        raise NpuExportError("the NPU export needs the export extra (torch): pip install 'edgelora[export]'") from e
    return torch, nn


def static_llama(hf_model, max_positions: int):
    """The torch module that is exported (see the module docstring)."""
    torch, nn = _torch_modules()

    class FusedRMSNorm(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, eps: float):
            return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

        @staticmethod
        def symbolic(g, x, weight, eps: float):
            return g.op("SimplifiedLayerNormalization", x, weight, axis_i=-1, epsilon_f=eps, stash_type_i=1)

    class StaticLlama(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = hf_model.config
            self.model, self.lm_head = hf_model.model, hf_model.lm_head
            self.n_layers, self.hidden = cfg.num_hidden_layers, cfg.hidden_size
            self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            with torch.no_grad():
                cos, sin = self.model.rotary_emb(torch.zeros(1), torch.arange(max_positions)[None])
            self.register_buffer("cos_table", cos[0].contiguous(), persistent=False)  # [positions, D]
            self.register_buffer("sin_table", sin[0].contiguous(), persistent=False)

        def rms(self, norm, x):
            return FusedRMSNorm.apply(x, norm.weight, float(norm.variance_epsilon))

        @staticmethod
        def rope(x, cos, sin):
            half = x.shape[-1] // 2
            return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

        def forward(self, input_ids, position_ids, attn_mask, *past):
            b, t = int(input_ids.shape[0]), int(input_ids.shape[1])
            H, KV, D = self.n_heads, self.n_kv, self.head_dim
            rep = H // KV
            cos = self.cos_table[position_ids].unsqueeze(1)  # [1,1,t,D]
            sin = self.sin_table[position_ids].unsqueeze(1)
            mask = torch.cat([attn_mask] * rep, dim=2) if rep > 1 else attn_mask  # [1,1,rep*t,C+t]
            h = self.model.embed_tokens(input_ids)
            presents = []
            for i, layer in enumerate(self.model.layers):
                att = layer.self_attn
                x = self.rms(layer.input_layernorm, h)
                q = self.rope(att.q_proj(x).view(b, t, H, D).transpose(1, 2), cos, sin)
                k = self.rope(att.k_proj(x).view(b, t, KV, D).transpose(1, 2), cos, sin)
                v = att.v_proj(x).view(b, t, KV, D).transpose(1, 2)
                presents += [k, v]
                if past:
                    k = torch.cat((past[2 * i], k), dim=2)
                    v = torch.cat((past[2 * i + 1], v), dim=2)
                qg = q.reshape(b, KV, rep * t, D)  # the query heads sharing a KV head, stacked: no Expand
                probs = torch.softmax(torch.matmul(qg, k.transpose(2, 3)) * D ** -0.5 + mask, dim=-1)
                o = torch.matmul(probs, v).reshape(b, H, t, D).transpose(1, 2).reshape(b, t, H * D)
                h = h + att.o_proj(o)
                x = self.rms(layer.post_attention_layernorm, h)
                h = h + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
            return (self.lm_head(self.rms(self.model.norm, h)), *presents)

    return StaticLlama().eval()


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    ins, outs = ["input_ids", "position_ids", "attn_mask"], ["logits"]
    for i in range(n_layers):
        ins += [f"past_k_{i}", f"past_v_{i}"]
        outs += [f"present_k_{i}", f"present_v_{i}"]
    return ins, outs


def export_float(wrapper, out_dir: Path, prefill_len: int, ctx: int) -> dict[str, Path]:
    import onnx

    torch, _ = _torch_modules()
    n, kv, d = wrapper.n_layers, wrapper.n_kv, wrapper.head_dim
    ins, outs = io_names(n)
    paths = {}
    for name, t in (("prefill", prefill_len), ("decode", 1)):
        args = (torch.zeros(1, t, dtype=torch.int64), torch.arange(t)[None], torch.zeros(1, 1, t, ctx + t),
                *[torch.zeros(1, kv, ctx, d) for _ in range(2 * n)])
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
        for nd in m.graph.node:  # onnx shape inference does not know this contrib op: declare its output
            if nd.op_type == "SimplifiedLayerNormalization":
                m.graph.value_info.append(onnx.helper.make_tensor_value_info(nd.output[0], onnx.TensorProto.FLOAT,
                                                                             [1, t, wrapper.hidden]))
        onnx.save(onnx.shape_inference.infer_shapes(m), str(path))
        paths[name] = path
    return paths


class _Feeds:
    """onnxruntime.quantization.CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self.feeds, self.i = feeds, 0

    def get_next(self):
        self.i += 1
        return self.feeds[self.i - 1] if self.i <= len(self.feeds) else None

    def rewind(self):
        self.i = 0


def quantize_qdq(fp32_path: Path, out_path: Path, feeds: list[dict]) -> None:
    """uint16 activations; per-output-channel symmetric int8 weights on every constant MatMul (QNN
    maps them to FullyConnected, which accepts exactly that)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    m = onnx.load(str(fp32_path), load_external_data=False)
    inits = {i.name for i in m.graph.initializer}
    overrides = {nd.input[1]: [{"quant_type": QuantType.QInt8, "symmetric": True, "axis": 1}]
                 for nd in m.graph.node if nd.op_type == "MatMul" and nd.input[1] in inits}
    cfg = get_qnn_qdq_config(str(fp32_path), _Feeds(feeds), activation_type=QuantType.QUInt16,
                             weight_type=QuantType.QUInt8, init_overrides=overrides)
    quantize(str(fp32_path), str(out_path), cfg)


def export(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, prefill_len: int, ctx: int,
           calibration: list[list[int]], prefix_tokens: list[int]) -> Path:
    """Writes prefill.onnx and decode.onnx (QDQ), prefix_kv.npz and npu.json into `out_dir`."""
    torch, _ = _torch_modules()
    from transformers import LlamaForCausalLM

    from edgelora._native import quiet_native
    from edgelora.runtime.npu import Geometry, StaticRunner

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with quiet_native():
        hf = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    wrapper = static_llama(hf, ctx + prefill_len)
    geom = Geometry(wrapper.n_layers, wrapper.n_kv, wrapper.head_dim, prefill_len, ctx, list(prefix_tokens), MASK_VALUE)
    k = len(prefix_tokens)
    with torch.no_grad():
        mask = torch.triu(torch.full((k, k), MASK_VALUE), diagonal=1)[None, None]
        prefix_kv = [o.numpy().copy() for o in wrapper(torch.tensor([prefix_tokens]), torch.arange(k)[None], mask)[1:]]
    np.savez(out_dir / PREFIX_KV, *prefix_kv)
    (out_dir / GEOMETRY).write_text(json.dumps(geom.__dict__, indent=2))
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        floats = export_float(wrapper, Path(tmp), prefill_len, ctx)
        runner = StaticRunner.open(out_dir, provider="cpu", graphs=floats)
        feeds = runner.record(calibration, n_decode=4)
        for name in ("prefill", "decode"):
            with quiet_native():
                quantize_qdq(floats[name], out_dir / f"{name}.onnx", feeds[name])
    return out_dir / "prefill.onnx"
