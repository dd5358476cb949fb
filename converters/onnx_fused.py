"""edgelora's fast CPU decoder graph, built straight from the float weights with numpy and
onnx.helper (no torch, no exporter), with ONNX Runtime's fused kernels:

    embedding (GatherBlockQuantized) -> per layer: (Skip)SimplifiedLayerNormalization -> one qkv
    MatMulNBits -> GroupQueryAttention (rotary inside; past and present can share one buffer)
    -> o MatMulNBits -> SkipSimplifiedLayerNormalization -> one gate_up MatMulNBits -> Split ->
    SiLU(gate) * up -> down MatMulNBits -> ... -> final norm -> LM head (MatMulNBits, sharing the
    embedding's quantized table when tied)

Accuracy-aware weight encoding. A model whose weights are exactly dequantized Q4_1 (like the
default model, which ships as Q4_1) keeps its codes and scales: w = d*q + m per block of 32 is
d*(q - z) + r with z the zero point nearest -m/d and r = m + z*d (|r| <= d/2). One MatMulNBits
computes both terms: its input is x followed by x's block sums, its weight is the codes followed by
extra blocks holding r (4-bit, own scale), so only r's rounding separates it from x @ W.
(Requantizing to a plain int4 grid instead costs +19% perplexity on the default model; r kept as a
separate float MatMul is exact but costs more nodes per token.) Other weights are quantized
round-to-nearest, asymmetric, block 32. A tied embedding that is exactly Q8_0 is kept as Q8_0.

LoRA slots, one per projection (GROUPS: q|k|v, o, gate|up, down): float MatMuls on overridable
initializers with zero-rank defaults, added to the projection's output. Modules sharing an input
share a slot, so an active adapter costs 8 small MatMuls a layer instead of 14; `slot_parameters`
lays an adapter out for them (A's side by side, B's block-diagonal). With edgelora's MatMulQ41
operator the slot is inputs of the projection's own node: the A's side by side, then one B per
member (no block-diagonal zeros to store or read) in tiles of 8 output columns (`tile`: one run
of memory per tile), in float32, float16 or 8 bits (`adapter_type`; `q8_a`, `q8_b`: GGUF's Q8_0
blocks for A, whose dot products reuse the node's int8 activations, and one scale per column for B).
`.onnx_adapter` files keep one slot per module (as optimum graphs and ONNX Runtime's own
multi-LoRA use them); the engine fills the grouped slots from them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from edgelora.base import BaseModel
from edgelora.errors import EdgeloraError, UnsupportedFormatError

from . import keys, q41
from .blocks import BLK, BlockQuant, BlockRows, Stored
from .onnx_model import rank_dim, slot_names

MS = "com.microsoft"
EDGELORA = "edgelora"  # native/edgelora_ort.cc
KERNELS = ("nbits", "q41")
QUANTS = ("f32", "int8", "int4")
# What MatMulQ41 reads an adapter in (other linears: f32); uint8: 8-bit blocks (`q8_a`, `q8_b`).
ADAPTER_TYPES = {"f32": np.float32, "f16": np.float16, "q8": np.uint8}
TILE = 8  # MatMulQ41's output columns per tile (native/edgelora_ort.cc: kGroup)


# Projections of one layer: target modules sharing an input are one MatMulNBits and one LoRA slot.
GROUPS = {"qkv": ("q", "k", "v"), "o": ("o",), "gate_up": ("gate", "up"), "down": ("down",)}


class FusedExportError(EdgeloraError):
    exit_code = 1


def module_slots(config) -> dict[str, list]:
    """Per target module, the slot shapes an adapter's parameters must fit (rank symbolic)."""
    slots, shapes = {}, config.shapes()
    for i in range(config.num_layers):
        for m in (m for members in GROUPS.values() for m in members):
            out, in_ = shapes[f"layers.{i}.{m}"]
            a, b = slot_names(f"layers.{i}.{m}")
            slots[a], slots[b] = [in_, "r"], ["r", out]
    return slots


class SlotType(NamedTuple):
    """How a graph's LoRA slot input holds its tensor."""
    dtype: type = np.float32  # np.uint8: 8 bits (`q8_a`, `q8_b`)
    tiled: bool = False  # a B in MatMulQ41's tiles of 8 output columns: [out / 8, r, 8] (`tile`)

    @classmethod
    def of(cls, name: str, dtype, ndim: int) -> "SlotType":
        """The type of slot input `name` declared with element type `dtype` and `ndim` dims."""
        return cls(np.dtype(dtype).type, name.endswith(".lora_B") and ndim == 3)

    def layout(self, name: str, v: np.ndarray) -> np.ndarray:
        """A float slot parameter (A [in, r] or B [r, out]) as this slot holds it."""
        if self.dtype is np.uint8:
            return q8_b(v) if name.endswith(".lora_B") else q8_a(v)
        return np.ascontiguousarray(tile(v) if self.tiled else v, self.dtype)


def tile(b: np.ndarray) -> np.ndarray:
    """B [r, out] (out a multiple of 8) as MatMulQ41's tiles: [out / 8, r, 8]."""
    r, out = b.shape
    return np.ascontiguousarray(b.reshape(r, out // TILE, TILE).transpose(1, 0, 2))


def _q8(v: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and fp16 scales (max |v| / 127 along `axis`), as GGUF's Q8_0."""
    d = (np.abs(v).max(axis, keepdims=True, initial=0.0) / 127).astype(np.float16)
    d32 = d.astype(np.float32)
    codes = np.rint(np.divide(v, d32, out=np.zeros(v.shape, np.float32), where=d32 > 0))
    return np.clip(codes, -127, 127).astype(np.int8), d


def q8_a(a: np.ndarray) -> np.ndarray:
    """A [in, r] (in a multiple of 32) as MatMulQ41's 8-bit lora_a: uint8 [r, in / 32, 34], per rank
    and block of 32 inputs an fp16 scale, then the 32 int8 codes."""
    k, r = a.shape
    codes, d = _q8(np.asarray(a, np.float32).T.reshape(r, k // BLK, BLK), -1)
    return np.ascontiguousarray(np.concatenate([d.view(np.uint8), codes.view(np.uint8)], -1))


def q8_b(b: np.ndarray) -> np.ndarray:
    """B [r, out] (out a multiple of 8) as MatMulQ41's 8-bit tiles: uint8 [out / 8, r + 2, 8], per
    tile r rows of its 8 columns' int8 codes, then the columns' fp16 scales (over their r codes)."""
    codes, d = _q8(tile(np.asarray(b, np.float32)), 1)  # [out / 8, r, 8], d [out / 8, 1, 8]
    return np.ascontiguousarray(np.concatenate([codes.view(np.uint8), d.view(np.uint8).reshape(-1, 2, TILE)], 1))


def q8_values(v: np.ndarray, name: str) -> np.ndarray:
    """The float values an 8-bit slot parameter holds, as `SlotType.layout` took them ([in, r] or [r, out])."""
    if name.endswith(".lora_B"):
        n8, r2, _ = v.shape
        codes = v[:, :-2].view(np.int8).astype(np.float32)
        d = v[:, -2:].copy().view(np.float16).reshape(n8, 1, TILE).astype(np.float32)
        return (codes * d).transpose(1, 0, 2).reshape(r2 - 2, n8 * TILE)
    r, nb, _ = v.shape
    d = v[..., :2].copy().view(np.float16).astype(np.float32)
    return (v[..., 2:].view(np.int8).astype(np.float32) * d).reshape(r, nb * BLK).T


def slot_parameters(params: dict[str, np.ndarray], config, slots: dict[str, SlotType] | None = None) -> dict[str, np.ndarray]:
    """An adapter's per-module slot parameters (`onnx_adapter.parameters`) laid out in a graph's
    slots (`slots`: `graph_slots`; None: the fused graph's grouped float32 slots). A grouped slot
    holds its members' A^T side by side ([in, sum of ranks]); its B is either the members' (scale *
    B)^T block-diagonal ([sum of ranks, sum of outs]) or, where the graph takes one B per member
    (MatMulQ41), each member's own. A member the adapter lacks has rank 0 there (zero outputs), a
    group it lacks keeps its default; each array comes in its slot's type and layout, and the slots
    of a graph's adapter pack (`Slots.pack`) in one `PACK` array."""
    out, shapes = {}, config.shapes()
    for i in range(config.num_layers):
        for group, members in GROUPS.items():
            names = [slot_names(f"layers.{i}.{m}") for m in members]
            a_group, b_group = slot_names(f"layers.{i}.{group}")
            if not any(a in params for a, _ in names):
                continue
            if slots is not None and a_group not in slots:  # the graph's slots are per module
                out.update({k: params[k] for pair in names for k in pair if k in params})
                continue
            widths = [shapes[f"layers.{i}.{m}"][0] for m in members]
            out[a_group] = np.ascontiguousarray(np.concatenate([params[a] for a, _ in names if a in params], 1))
            if slots is not None and b_group not in slots:  # one B per member
                for (a, b_name), width in zip(names, widths):
                    out[b_name] = params[b_name] if a in params else np.zeros((0, width), np.float32)
                continue
            b = np.zeros((out[a_group].shape[1], sum(widths)), np.float32)
            r0 = c0 = 0
            for (a, b_name), width in zip(names, widths):
                if a in params:
                    r = params[a].shape[1]
                    b[r0:r0 + r, c0:c0 + width] = params[b_name]
                    r0 += r
                c0 += width
            out[b_group] = b
    if slots is not None:
        out = packed_parameters({k: slots.get(k, SlotType()).layout(k, v) for k, v in out.items()}, slots)
    return out


class Slots(dict):
    """A graph's LoRA slots, name -> SlotType; `pack`: the adapter pack's table (per lora_slot, the
    names of its A and B's) when the graph's MatMulQ41 nodes read their slots from one input."""
    pack: list[list[str]] | None = None


def slots_of(inputs: dict[str, tuple[type, int]], meta: dict[str, str]) -> Slots:
    """The slots of a graph with these inputs (name -> (element type, ndim)) and metadata."""
    slots = Slots({n: SlotType.of(n, t, nd) for n, (t, nd) in inputs.items() if n.endswith((".lora_A", ".lora_B"))})
    if meta.get(keys.LORA_PACK):
        from onnx import helper

        packed = json.loads(meta[keys.LORA_PACK])
        slots.update({n: SlotType.of(n, helper.tensor_dtype_to_np_dtype(t), len(dims)) for n, (t, dims) in packed["inputs"].items()})
        slots.pack = packed["table"]
    return slots


def graph_slots(model) -> Slots:
    """A graph's LoRA slots (its `*.lora_A` / `*.lora_B` inputs, and those its adapter pack holds):
    element type and layout."""
    from onnx import helper

    return slots_of({i.name: (helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type), len(i.type.tensor_type.shape.dim))
                     for i in model.graph.input}, {p.key: p.value for p in model.metadata_props})


# -- the adapter pack: every MatMulQ41 node's slot in one input ------------------------------------
#
# A step binds each active slot tensor as an input, and ONNX Runtime spends about half a microsecond
# a step on each bound input: 330 of them at 135M (4 nodes x 2-4 tensors x 30 layers) were ~150 us a
# step, 3% of a decode step. One uint8 input holds them all instead; a node reads its entry
# (attribute lora_slot). The layout is native/edgelora_ort.cc's (unpack_entry).

PACK = "lora_pack"
PACK_MAGIC = 0x314B4341504C45  # "ELPACK1"
PACK_WORDS = 21  # per entry: type, then (offset, ndim, 3 dims) for lora_a and up to 3 lora_b
PACK_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 2, np.dtype(np.uint8): 3}
PACK_ALIGN = 64


def pack_parameters(params: dict[str, np.ndarray], table: list[list[str]]) -> np.ndarray:
    """The slot tensors of `table`'s entries (slot name -> array, in the slots' types and layouts)
    as one adapter pack: uint8 [bytes]. An entry none of whose tensors is in `params` is empty (type
    0: no adapter on that node)."""
    header = np.zeros(2 + PACK_WORDS * len(table), np.int64)
    header[:2] = PACK_MAGIC, len(table)
    at = -(-header.nbytes // PACK_ALIGN) * PACK_ALIGN
    parts: list[tuple[int, np.ndarray]] = []
    for s, names in enumerate(table):
        e = 2 + s * PACK_WORDS
        if names[0] not in params:
            continue
        arrays = [np.ascontiguousarray(params[n]) for n in names]
        types = {PACK_TYPES[a.dtype] for a in arrays}
        if len(types) != 1:
            raise FusedExportError(f"slot {names[0]}: an entry's tensors share one type, got {sorted(a.dtype.name for a in arrays)}")
        header[e] = types.pop()
        header[e + 1:e + 1 + 5 * 4:5] = -1
        for t, a in enumerate(arrays):
            w = e + 1 + 5 * t
            header[w:w + 2 + a.ndim] = [at, a.ndim, *a.shape]
            parts.append((at, a))
            at += -(-a.nbytes // PACK_ALIGN) * PACK_ALIGN
    out = np.zeros(at, np.uint8)
    out[:header.nbytes] = header.view(np.uint8)
    for offset, a in parts:
        out[offset:offset + a.nbytes] = a.reshape(-1).view(np.uint8)
    return out


def packed_parameters(params: dict[str, np.ndarray], slots: dict) -> dict[str, np.ndarray]:
    """Slot parameters as a graph with `slots` takes them: the pack's in one `PACK` input."""
    table = getattr(slots, "pack", None)
    if not table:
        return params
    inside = {n for names in table for n in names}
    return {PACK: pack_parameters(params, table), **{k: v for k, v in params.items() if k not in inside}}


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def _default(dims: list) -> list[int]:
    """A slot's default shape: rank 0 (an 8-bit B keeps its two rows of scales)."""
    return [d if isinstance(d, int) else 2 if d.endswith("+2") else 0 for d in dims]


def pack_slots(model):
    """The graph with its MatMulQ41 nodes' LoRA slots in one adapter pack (in place): each node's
    lora_a becomes the `PACK` input (an empty pack by default: no adapter), its lora_b an empty
    uint8, and it gets attribute lora_slot; the slots' declarations go to the metadata
    (`keys.LORA_PACK`) for `unpack_slots` and the engines."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inputs = {i.name: i for i in model.graph.input}
    table, packed = [], set()
    for node in model.graph.node:
        if node.domain != EDGELORA or node.op_type != "MatMulQ41" or len(node.input) < 4 or node.input[2] not in inputs:
            continue
        x, w, a, b, *rest = node.input
        bias = rest[0] if rest and rest[0] and not rest[0].startswith("const.no_bias") else ""
        names = [a, b, *rest[1:]]
        del node.input[:]
        node.input.extend([x, w, PACK, *([f"{PACK}.none_b", bias] if bias else [])])
        node.attribute.append(helper.make_attribute("lora_slot", len(table)))
        table.append(names)
        packed.update(names)
    if not table:
        return model
    decls = {n: [inputs[n].type.tensor_type.elem_type, _dims(inputs[n])] for n in (n for names in table for n in names)}
    keep_in = [i for i in model.graph.input if i.name not in packed]
    del model.graph.input[:]
    model.graph.input.extend(keep_in + [helper.make_tensor_value_info(PACK, TensorProto.UINT8, ["pack_bytes"])])
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name not in packed and (i.name in used or not i.name.startswith("const.no_"))]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + [numpy_helper.from_array(np.zeros(0, np.uint8), PACK),
                                           numpy_helper.from_array(np.zeros(0, np.uint8), f"{PACK}.none_b")])
    model.metadata_props.append(onnx.StringStringEntryProto(key=keys.LORA_PACK, value=json.dumps({"table": table, "inputs": decls})))
    return model


def unpack_slots(model):
    """The graph with its adapter pack's slots as inputs of their own again (in place): the layout
    `pack_slots` started from, for runtimes without edgelora's operator (`without_q41`)."""
    from onnx import helper, numpy_helper

    meta = {p.key: p.value for p in model.metadata_props}
    if keys.LORA_PACK not in meta:
        return model
    packed = json.loads(meta[keys.LORA_PACK])
    table, decls = packed["table"], packed["inputs"]
    no_bias, needs_none = "const.no_bias.unpacked", False
    for node in model.graph.node:
        slot = next((a.i for a in node.attribute if a.name == "lora_slot"), None)
        if slot is None:
            continue
        x, w, *rest = node.input
        bias = rest[2] if len(rest) > 2 else ""
        a, *bs = table[slot]
        ins = [x, w, a, bs[0], bias or no_bias, *bs[1:]] if len(bs) > 1 else [x, w, a, bs[0], *([bias] if bias else [])]
        needs_none |= no_bias in ins
        del node.input[:]
        node.input.extend(ins)
        keep = [at for at in node.attribute if at.name != "lora_slot"]
        del node.attribute[:]
        node.attribute.extend(keep)
    inits = [i for i in model.graph.initializer if i.name not in (PACK, f"{PACK}.none_b")]
    if needs_none:
        inits.append(numpy_helper.from_array(np.zeros(0, np.float32), no_bias))
    inputs = [i for i in model.graph.input if i.name != PACK]
    for name, (elem, dims) in decls.items():
        inputs.append(helper.make_tensor_value_info(name, elem, dims))
        inits.append(numpy_helper.from_array(np.zeros(_default(dims), helper.tensor_dtype_to_np_dtype(elem)), name))
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    props = [p for p in model.metadata_props if p.key != keys.LORA_PACK]
    del model.metadata_props[:]
    model.metadata_props.extend(props)
    return model


def per_module_f32(slots: dict[str, SlotType]) -> bool:
    """Whether a graph's slots take `onnx_adapter.parameters` as they are (per module, float32)."""
    grouped = tuple(f".{g}." for g, members in GROUPS.items() if len(members) > 1)
    return not any(g in n for g in grouped for n in slots) and all(t == SlotType() for t in slots.values())


# -- weight encodings --------------------------------------------------------------------------

def q41_decompose(w: np.ndarray):
    """w [N, K], exactly a dequantized Q4_1 tensor -> (q uint8 [N, K/32, 32], d, m [N, K/32]) or
    None if it is not exactly representable."""
    n, k = w.shape
    if k % BLK:
        return None
    b = w.reshape(n, k // BLK, BLK)
    m = b.min(-1)
    d = ((b.max(-1).astype(np.float64) - m) / 15).astype(np.float16).astype(np.float32)
    if not np.array_equal(m.astype(np.float16).astype(np.float32), m):
        return None
    q = np.clip(np.rint((b - m[..., None]) / np.where(d > 0, d, 1)[..., None]), 0, 15).astype(np.uint8)
    if not np.array_equal(q.astype(np.float32) * d[..., None] + m[..., None], b):
        return None
    return q, d, m


def q80_decompose(w: np.ndarray):
    """w [N, K], exactly a dequantized Q8_0 tensor -> (q int8 [N, K/32, 32], d [N, K/32]) or None."""
    n, k = w.shape
    if k % BLK:
        return None
    b = w.reshape(n, k // BLK, BLK)
    d = (np.abs(b).max(-1).astype(np.float64) / 127).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(b / np.where(d > 0, d, 1)[..., None]), -127, 127).astype(np.int8)
    if not np.array_equal(q.astype(np.float32) * d[..., None], b):
        return None
    return q, d


def rtn(w: np.ndarray, bits: int):
    """Round-to-nearest asymmetric block-32 quantization of w [N, K] -> (u uint8 [N, K/32, 32],
    scale [N, K/32], zero point uint8 [N, K/32])."""
    n, k = w.shape
    b = w.reshape(n, k // BLK, BLK).astype(np.float32)
    qmax = 2 ** bits - 1
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    s = ((hi - lo) / qmax).astype(np.float32)
    s1 = np.where(s > 0, s, 1)
    zp = np.clip(np.rint(-lo / s1), 0, qmax)
    u = np.clip(np.rint(b / s1[..., None]) + zp[..., None], 0, qmax)
    return u.astype(np.uint8), s, zp.astype(np.uint8)


def pack4(u: np.ndarray) -> np.ndarray:
    """uint8 values 0..15 [..., 32] -> [..., 16], element 2j in the low nibble."""
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def pack_zp4(zp: np.ndarray) -> np.ndarray:
    n, nb = zp.shape
    if nb % 2:
        zp = np.concatenate([zp, np.zeros((n, 1), np.uint8)], 1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1).astype(np.uint8)


# -- graph --------------------------------------------------------------------------------------

class _Graph:
    def __init__(self):
        from onnx import helper

        self.helper = helper
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.names: set[str] = set()
        self.consts: dict = {}

    def init(self, name: str, arr: np.ndarray) -> str:
        from onnx import numpy_helper

        if name in self.names:
            raise FusedExportError(f"duplicate initializer {name}")
        self.names.add(name)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def const(self, arr: np.ndarray, hint: str) -> str:
        arr = np.ascontiguousarray(arr)
        key = (arr.dtype.str, arr.shape, arr.tobytes()) if arr.size < 4096 else (hint,)
        if key not in self.consts:
            self.consts[key] = self.init(f"const.{hint}", arr)
        return self.consts[key]

    def node(self, op: str, inputs: list[str], name: str, n_out: int = 1, domain: str = "", outputs=None, **attrs):
        outs = outputs or [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op, inputs, outs, name=name, domain=domain, **attrs))
        return outs[0] if len(outs) == 1 else outs


def gated_mlp(g: "_Graph", gate_up: str, activation: str, name: str, out: str | None = None) -> str:
    """act(gate) * up of a gate|up output, as ONNX Runtime's own nodes (Split, the activation, Mul)."""
    gate, up = g.node("Split", [gate_up], f"{name}/Split", n_out=2, axis=-1, num_outputs=2)
    if activation == "gelu_tanh":
        act = g.node("Gelu", [gate], f"{name}/Gelu", approximate="tanh")
    else:
        act = g.node("Mul", [gate, g.node("Sigmoid", [gate], f"{name}/Sigmoid")], f"{name}/SiLU")
    return g.node("Mul", [act, up], f"{name}/Mul", **({"outputs": [out]} if out else {}))


class Linears:
    """The linears of a graph being built, in one of its encodings: float MatMul, Q4_1 folded into one
    MatMulNBits, round-to-nearest MatMulNBits, or edgelora's exact Q4_1 operator (kernel "q41": every
    int4 linear, with the LoRA slot inside the same node)."""

    def __init__(self, g: "_Graph", quant: str, accuracy_level: int, kernel: str = "nbits"):
        if kernel not in KERNELS:
            raise FusedExportError(f"the fused graph's int4 kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.g, self.quant, self.acc, self.kernel = g, quant, accuracy_level, kernel
        self._with_sums: dict[str, str] = {}
        self.encodings: dict[str, int] = {}

    def _count(self, encoding: str) -> None:
        self.encodings[encoding] = self.encodings.get(encoding, 0) + 1

    def q41(self, k: int) -> bool:
        """Whether a linear of input width k is a MatMulQ41 node (its LoRA slot then takes one B per
        member and may be float16)."""
        return self.quant == "int4" and self.kernel == "q41" and not k % BLK

    def gates(self, k: int, n: int) -> bool:
        """Whether a gated MLP's gate|up linear (input width k, output n) takes its activation inside
        its MatMulQ41 node (which then outputs act(gate) * up: three nodes fewer a layer)."""
        return self.q41(k) and not n % (2 * TILE)

    def __call__(self, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None,
                 lora: tuple[str, list[str]] | None = None, lora_type=np.float32, activation: str | None = None) -> str:
        """x @ w.T (+ bias) (+ the LoRA slot `lora` = (A, [B] or one B per member) in `lora_type`) in
        the export's encoding; `activation` (where `gates`): act(gate) * up of the two halves."""
        g, (n, k) = self.g, w.shape
        if self.q41(k):
            q, d, m = q41.quantize(w)
            exact = np.array_equal((q * d[..., None] + m[..., None]).reshape(n, k), w)
            self._count("q4_1 exact (MatMulQ41)" if exact else "q4_1 rtn (MatMulQ41)")
            ins = [x, g.init(f"{name}.q41", q41.pack(q, d, m))]
            b_in = [g.init(f"{name}.bias", bias.astype(np.float32))] if bias is not None else []
            a, bs = lora if lora else (g.const(np.zeros((k, 0), np.float32), f"no_lora_a_{k}"),
                                       [g.const(np.zeros((0, n), np.float32), f"no_lora_b_{n}")])
            if len(bs) > 1:  # B's after the bias: ONNX Runtime's lite operators take no "" input, an empty bias is none
                ins += [a, bs[0], *(b_in or [g.const(np.zeros(0, np.float32), "no_bias")]), *bs[1:]]
            elif lora or b_in:
                ins += [a, bs[0], *b_in]
            return g.node("MatMulQ41", ins, f"/{name}/MatMulQ41", domain=EDGELORA, N=n, accuracy_level=self.acc,
                          **({"activation": activation} if activation else {}))
        if activation:
            raise FusedExportError(f"{name}: only a MatMulQ41 node takes the gated activation inside")
        y = self._plain(x, w, name, bias)
        if lora is None:
            return y
        return g.node("Add", [y, self.lora_delta(x, *lora, name, lora_type)], f"/{name}/Add")

    def lora_delta(self, x: str, a: str, bs: list[str], name: str, lora_type=np.float32,
                   tiled: dict[str, int] | None = None) -> str:
        """(x @ A) @ B, or with one B per member, member i's share of x @ A times its B, side by side.
        (A MatMulQ41 graph's slots in the fallback: float16 ones cast to float, the B's in `tiled`
        (name -> width) taken out of their tiles.)"""
        from onnx import TensorProto

        g, tiled = self.g, tiled or {}
        cast = (lambda v, what: g.node("Cast", [v], f"/lora/{name}/Cast_{what}", to=TensorProto.FLOAT)) \
            if lora_type != np.float32 else (lambda v, what: v)
        a, flat = cast(a, "A"), []
        for i, b in enumerate(bs):
            v = cast(b, f"B{i}")
            if b in tiled:  # [out / 8, r, 8] -> [r, out]
                v = g.node("Reshape", [g.node("Transpose", [v], f"/lora/{name}/untile{i}", perm=[1, 0, 2]),
                                       g.const(np.array([0, tiled[b]], np.int64), f"untile_{tiled[b]}")], f"/lora/{name}/B{i}")
            flat.append(v)
        bs = flat
        xa = g.node("MatMul", [x, a], f"/lora/{name}/MatMul_A")
        if len(bs) == 1:
            return g.node("MatMul", [xa, bs[0]], f"/lora/{name}/MatMul_B")
        start, parts = g.const(np.array([0], np.int64), "lora_start"), []
        for i, b in enumerate(bs):  # member i's ranks: the next rows(B_i) columns of xa
            end = g.node("Add", [start, g.node("Shape", [b], f"/lora/{name}/rank{i}", start=0, end=1)], f"/lora/{name}/end{i}")
            xa_i = g.node("Slice", [xa, start, end, g.const(np.array([-1], np.int64), "lora_axis")], f"/lora/{name}/xa{i}")
            parts.append(g.node("MatMul", [xa_i, b], f"/lora/{name}/MatMul_B{i}"))
            start = end
        return g.node("Concat", parts, f"/lora/{name}/Concat", axis=-1)

    def _plain(self, x: str, w: np.ndarray, name: str, bias: np.ndarray | None) -> str:
        g, (n, k) = self.g, w.shape
        extra = ["", g.init(f"{name}.bias", bias.astype(np.float32))] if bias is not None else []
        if self.quant == "f32" or k % BLK:
            self._count("f32")
            y = g.node("MatMul", [x, g.init(f"{name}.weight_T", np.ascontiguousarray(w.T))], f"/{name}/MatMul")
            return g.node("Add", [y, extra[1]], f"/{name}/Add_bias") if extra else y
        exact = q41_decompose(w) if self.quant == "int4" else None
        if exact is not None:
            self._count("q4_1 folded")
            return self.folded_q41(x, *exact, name, extra)
        bits = 4 if self.quant == "int4" else 8
        self._count(f"int{bits} rtn")
        u, s, zp = rtn(w, bits)
        ins = [x, g.init(f"{name}.q{bits}", pack4(u) if bits == 4 else u), g.init(f"{name}.scales", s),
               g.init(f"{name}.zp", pack_zp4(zp) if bits == 4 else zp.reshape(-1))]
        return g.node("MatMulNBits", ins + extra, f"/{name}/MatMulNBits", domain=MS, K=k, N=n, bits=bits,
                      block_size=BLK, accuracy_level=self.acc)

    def _x_with_blocksums(self, x: str, k: int) -> str:
        """[..., K] -> [..., K + K/32 (padded to a block)]: x followed by its block sums."""
        if x not in self._with_sums:
            g, nb = self.g, k // BLK
            e = np.kron(np.eye(nb, nb + -nb % BLK, dtype=np.float32), np.ones((BLK, 1), np.float32))  # [K, nb padded]
            s = g.node("MatMul", [x, g.const(e, f"blocksum_pad_{k}")], f"{x}/blocksum")
            self._with_sums[x] = g.node("Concat", [x, s], f"{x}/with_blocksums", axis=-1)
        return self._with_sums[x]

    def folded_q41(self, x: str, q, d, m, name: str, extra: list[str]) -> str:
        """Q4_1 in one MatMulNBits: the codes with scale d and the zero point nearest -m/d, then extra
        K blocks holding what is left of each block's offset (m + zp*d, within d/2), 4-bit, fed with
        x's block sums."""
        g, (n, nb, _) = self.g, q.shape
        zp_main = np.clip(np.rint(-m / np.where(d > 0, d, 1)), 0, 15)
        off = np.concatenate([m + zp_main * d, np.zeros((n, -nb % BLK), np.float32)], 1)
        u, s, zp = rtn(off, 4)
        codes = np.concatenate([q, u], 1)
        scales = np.concatenate([d, s], 1)
        zps = np.concatenate([zp_main.astype(np.uint8), zp], 1)
        k2 = codes.shape[1] * BLK
        return g.node("MatMulNBits", [self._x_with_blocksums(x, nb * BLK), g.init(f"{name}.q4", pack4(codes)),
                                      g.init(f"{name}.scales", scales), g.init(f"{name}.zp", pack_zp4(zps))] + extra,
                      f"/{name}/MatMulNBits", domain=MS, K=k2, N=n, bits=4, block_size=BLK, accuracy_level=self.acc)


class FusedBuilder:
    def __init__(self, base: BaseModel, quant: str = "int4", accuracy_level: int = 4, max_len: int = 4096,
                 lora: bool = True, kernel: str = "nbits", adapter_type: str = "f32", head_bits: int = 8):
        if quant not in QUANTS:
            raise FusedExportError(f"fused ONNX quantization must be one of {', '.join(QUANTS)}, got {quant!r}")
        if adapter_type not in ADAPTER_TYPES:
            raise FusedExportError(f"the fused graph's adapter type must be one of {', '.join(ADAPTER_TYPES)}, got {adapter_type!r}")
        self.base, self.c, self.quant, self.acc, self.max_len, self.lora = base, base.config, quant, accuracy_level, max_len, lora
        if head_bits not in (6, 8):
            raise FusedExportError(f"the LM head is kept in 6 or 8 bits, got {head_bits}")
        self.adapter_type = ADAPTER_TYPES[adapter_type]
        self.g = _Graph()
        self.linear = Linears(self.g, quant, accuracy_level, kernel)
        self.head_bits = head_bits if self.linear.q41(base.config.hidden_size) else 8  # 6 bits: MatMulQ41's

    def lora_slot(self, slot: str, d_in: int, outs: dict[str, int]) -> tuple[tuple[str, list[str]], type]:
        """The slot of a projection whose members' output widths are `outs`: A [d_in, r] and either
        one block-diagonal B [r, sum of outs] or (MatMulQ41) one B per member, in tiles of 8
        columns ([out / 8, r_m, 8]) where out allows, as overridable initializers of rank 0 by
        default; and their element type. 8-bit slots (MatMulQ41 with every out a multiple of 8, else
        float16): A [r, d_in / 32, 34] (`q8_a`), each B [out / 8, r_m + 2, 8] (`q8_b`)."""
        from onnx import helper

        g = self.g
        a, b = slot_names(slot)
        q41 = self.linear.q41(d_in)
        dtype = self.adapter_type if q41 else np.float32
        if dtype is np.uint8 and any(out % TILE for out in outs.values()):
            dtype = np.float16  # 8-bit B's come in whole tiles
        q8 = dtype is np.uint8
        shapes = {a: [rank_dim(slot), d_in // BLK, 34] if q8 else [d_in, rank_dim(slot)]}
        members = outs if q41 else {slot: sum(outs.values())}
        for m, out in members.items():
            r = rank_dim(m if len(members) > 1 else slot)
            shapes[slot_names(m)[1] if len(members) > 1 else b] = [out // TILE, f"{r}+2", TILE] if q8 else \
                [out // TILE, r, TILE] if q41 and not out % TILE else [r, out]
        for name, shape in shapes.items():  # the defaults: rank 0 (an 8-bit B's two rows of scales)
            g.init(name, np.zeros([d if isinstance(d, int) else 2 if d.endswith("+2") else 0 for d in shape], dtype))
            g.inputs.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape))
        names = list(shapes)
        return (names[0], names[1:]), dtype

    def projection(self, x: str, slot: str, activation: str | None = None) -> str:
        """One projection (a group of target modules sharing the input x: their weights stacked by
        rows) plus, with LoRA, the group's slot delta (`activation`: see Linears.__call__)."""
        layer, group = slot.rsplit(".", 1)
        W = self.base.weights
        w = np.concatenate([W[f"{layer}.{m}"] for m in GROUPS[group]], 0)
        biases = [f"{layer}.{m}_bias" for m in GROUPS[group]]
        bias = np.concatenate([W[b] for b in biases], 0) if biases[0] in W else None
        if not self.lora:
            return self.linear(x, w, slot, bias, activation=activation)
        lora, dtype = self.lora_slot(slot, w.shape[1], {f"{layer}.{m}": W[f"{layer}.{m}"].shape[0] for m in GROUPS[group]})
        return self.linear(x, w, slot, bias, lora, dtype, activation=activation)

    def build(self):
        from onnx import TensorProto

        g, c, W = self.g, self.c, self.base.weights
        mk = g.helper.make_tensor_value_info
        L, kv, hd = c.num_layers, c.num_kv_heads, c.head_dim
        g.inputs += [mk("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                     mk("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"])]
        for kind in ("key", "value"):
            for i in range(L):
                g.inputs.append(mk(f"past_key_values.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kv, "past_sequence_length", hd]))
        g.outputs.append(mk("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", c.vocab_size]))
        for kind in ("key", "value"):
            for i in range(L):
                g.outputs.append(mk(f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", kv, "total_sequence_length", hd]))

        # attention mask -> seqlens_k (int32 [B]: valid length - 1) and total length (int32 scalar)
        s = g.node("ReduceSum", ["attention_mask", g.const(np.array([1], np.int64), "one_1d")], "/mask/ReduceSum", keepdims=0)
        s = g.node("Sub", [s, g.const(np.array(1, np.int64), "one")], "/mask/Sub")
        seqlens_k = g.node("Cast", [s], "/mask/seqlens_k", to=TensorProto.INT32)
        total = g.node("Gather", [g.node("Shape", ["attention_mask"], "/mask/Shape"), g.const(np.array(1, np.int64), "one")],
                       "/mask/Gather", axis=0)
        total_len = g.node("Cast", [total], "/mask/total_len", to=TensorProto.INT32)
        caches = self.rope_caches()
        fam = c.spec

        x = self.embedding(W["embed"])
        if fam.embed_scale:
            x = g.node("Mul", [x, g.const(np.array(np.sqrt(c.hidden_size), np.float32), "embed_scale")], "/embed/scale")
        resid = mlp_out = None
        for i in range(L):
            p = f"layers.{i}"
            if resid is None:
                h = g.node("SimplifiedLayerNormalization", [x, g.init(f"{p}.attn_norm", W[f"{p}.attn_norm"])],
                           f"/{p}/attn_norm", axis=-1, epsilon=c.rms_norm_eps, stash_type=1)
                resid = x
            else:
                h, resid = self.skip_norm(resid, mlp_out, f"{p}.attn_norm")
            qkv = [self.projection(h, f"{p}.qkv"), "", ""]
            if fam.qk_norm:
                qkv = self.qk_norms(qkv[0], p)
            sliding = c.is_sliding(i)
            cos, sin = caches[sliding and c.rope_local_theta is not None]
            attn, _, _ = g.node("GroupQueryAttention", [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                                        seqlens_k, total_len, cos, sin],
                                f"/{p}/attn/GroupQueryAttention", domain=MS,
                                outputs=[f"/{p}/attn/out", f"present.{i}.key", f"present.{i}.value"],
                                num_heads=c.num_heads, kv_num_heads=kv, scale=float(c.attn_scale),
                                do_rotary=1, rotary_interleaved=0,
                                local_window_size=c.sliding_window if sliding else -1)
            o = self.projection(attn, f"{p}.o")
            if fam.sandwich_norms:
                o = self.norm(o, f"{p}.post_attn_norm")
            h2, resid = self.skip_norm(resid, o, f"{p}.mlp_norm")
            if self.linear.gates(c.hidden_size, 2 * c.intermediate_size):
                gated = self.projection(h2, f"{p}.gate_up", activation=fam.activation)
            else:
                gated = gated_mlp(g, self.projection(h2, f"{p}.gate_up"), fam.activation, f"/{p}/mlp")
            mlp_out = self.projection(gated, f"{p}.down")
            if fam.sandwich_norms:
                mlp_out = self.norm(mlp_out, f"{p}.post_mlp_norm")
        hn, _ = self.skip_norm(resid, mlp_out, "norm", keep_sum=False)
        self.lm_head(hn)
        return g

    def rope_caches(self) -> dict[bool, tuple[str, str]]:
        """cos/sin caches over max_len positions (GroupQueryAttention rotates the first 2*cols dims of a
        head, as transformers' partial rotary does); Gemma 3's sliding layers have their own (True)."""
        from edgelora.rope import cos_sin, inv_freq

        c, g = self.c, self.g
        if c.rot_dim % 16 or c.head_dim % 16:
            raise FusedExportError(
                f"ONNX Runtime's GroupQueryAttention needs head and rotary dims that are multiples of 16; this "
                f"{c.family} model has head {c.head_dim}, rotary {c.rot_dim}: export GGUF instead")
        out = {}
        for local in ((False, True) if c.rope_local_theta is not None else (False,)):
            inv, scaling = inv_freq(c, sliding=local)
            cos, sin = cos_sin(np.arange(self.max_len), inv, scaling)
            half = c.rot_dim // 2
            suffix = "_local" if local else ""
            out[local] = (g.init(f"cos_cache{suffix}", np.ascontiguousarray(cos[:, :half])),
                          g.init(f"sin_cache{suffix}", np.ascontiguousarray(sin[:, :half])))
        return out

    def norm(self, x: str, name: str) -> str:
        return self.g.node("SimplifiedLayerNormalization", [x, self.g.init(name, self.base.weights[name])], f"/{name}",
                           axis=-1, epsilon=self.c.rms_norm_eps, stash_type=1)

    def qk_norms(self, qkv: str, p: str) -> list[str]:
        """Qwen3 / Gemma 3: RMSNorm over each head of q and k before the rotary (inside attention):
        q, k and v go to GroupQueryAttention separately."""
        g, c = self.g, self.c
        q, k, v = g.node("Split", [qkv, g.const(np.array([c.q_dim, c.kv_dim, c.kv_dim], np.int64), "qkv_split")],
                         f"/{p}/attn/Split", n_out=3, axis=-1)
        heads = g.const(np.array([0, 0, -1, c.head_dim], np.int64), "to_heads")
        flat = g.const(np.array([0, 0, -1], np.int64), "from_heads")
        out = []
        for x, which in ((q, "q_norm"), (k, "k_norm")):
            x = g.node("Reshape", [x, heads], f"/{p}/attn/{which}/Reshape")
            x = self.norm(x, f"{p}.{which}")
            out.append(g.node("Reshape", [x, flat], f"/{p}/attn/{which}/Reshape_back"))
        return [*out, v]

    def skip_norm(self, resid: str, x: str, name: str, keep_sum: bool = True) -> tuple[str, str | None]:
        """RMSNorm(resid + x) and, if kept, the sum (the next residual); the statistics outputs are
        left unnamed, which keeps ONNX Runtime on its fast path."""
        out = f"/{name}/out"
        total = f"/{name}/sum" if keep_sum else ""
        self.g.node("SkipSimplifiedLayerNormalization", [resid, x, self.g.init(name, self.base.weights[name])], f"/{name}",
                    domain=MS, outputs=[out, "", "", total] if keep_sum else [out], epsilon=self.c.rms_norm_eps)
        return out, total or None

    def embedding(self, emb: np.ndarray) -> str:
        """The embedding lookup; with a tied head, the quantized table is shared with the LM head."""
        g, c = self.g, self.c
        self.head_spec = None
        if self.quant == "f32" or c.hidden_size % BLK:
            g.init("embed", emb)
            return g.node("Gather", ["embed", "input_ids"], "/embed/Gather", axis=0)
        exact = q80_decompose(emb)
        if exact is not None:  # exactly Q8_0: keep it so (implicit zero point 128)
            q, d = exact
            data, scales, zp = (q.astype(np.int16) + 128).astype(np.uint8), d, None
        else:
            data, scales, zp = rtn(emb, 8)
        g.init("embed.q8", data)
        g.init("embed.scales", scales)
        zp_name = g.init("embed.zp", zp) if zp is not None else ""
        flat = g.node("Reshape", ["embed.q8", g.const(np.array([c.vocab_size, data.shape[1] * data.shape[2]], np.int64), "emb_shape")],
                      "/embed/Reshape")
        if c.tie_word_embeddings:
            self.head_spec = ("embed.q8", "embed.scales", zp_name)
        return g.node("GatherBlockQuantized", [flat, "input_ids", "embed.scales"] + ([zp_name] if zp_name else []),
                      "/embed/GatherBlockQuantized", domain=MS, bits=8, block_size=BLK, gather_axis=0, quantize_axis=1)

    def lm_head(self, hn: str) -> None:
        g, c = self.g, self.c
        if self.head_bits == 6:  # MatMulQ41's 6-bit tiles (a tied embedding keeps its own 8-bit table)
            q, d = q41.quantize6(self.base.weights["embed" if c.tie_word_embeddings else "lm_head"])
            self.linear._count("q6 head (MatMulQ41)")
            g.node("MatMulQ41", [hn, g.init("lm_head.q6", q41.pack6(q, d))], "/lm_head/MatMulQ41", domain=EDGELORA,
                   outputs=["logits"], N=c.vocab_size, bits=6, accuracy_level=self.acc)
            return
        if self.head_spec is not None:
            q, s, zp = self.head_spec
            g.node("MatMulNBits", [hn, q, s] + ([zp] if zp else []), "/lm_head/MatMulNBits", domain=MS, outputs=["logits"],
                   K=c.hidden_size, N=c.vocab_size, bits=8, block_size=BLK, accuracy_level=self.acc)
            return
        w = self.base.weights["embed" if c.tie_word_embeddings else "lm_head"]
        if self.quant == "f32" or c.hidden_size % BLK:
            g.node("MatMul", [hn, g.init("lm_head_T", np.ascontiguousarray(w.T))], "/lm_head/MatMul", outputs=["logits"])
            return
        u, s, zp = rtn(w, 8)
        g.node("MatMulNBits", [hn, g.init("lm_head.q8", u), g.init("lm_head.scales", s), g.init("lm_head.zp", zp.reshape(-1))],
               "/lm_head/MatMulNBits", domain=MS, outputs=["logits"], K=c.hidden_size, N=c.vocab_size, bits=8,
               block_size=BLK, accuracy_level=self.acc)


def export(base: BaseModel, out_dir: str | os.PathLike, quant: str = "int4", *, accuracy_level: int = 4,
           max_len: int = 4096, lora: bool = True, kernel: str = "nbits", adapter_type: str = "f32",
           head_bits: int = 8) -> Path:
    """Builds the fused graph into ``out_dir/model.onnx`` (+ ``model.onnx.data``). `kernel` "q41"
    writes every int4 linear as edgelora's exact Q4_1 operator (sessions then need the library:
    edgelora.native), "nbits" as ONNX Runtime's MatMulNBits. `adapter_type` "f16": the MatMulQ41
    nodes' LoRA slots take float16 (half an active adapter's bytes per token), "q8" 8-bit blocks
    (about a quarter); other slots stay f32. `head_bits` 6 (kernel "q41"): the LM head as MatMulQ41's
    6-bit weight (23 MB a token where 8 bits read 30 at 135M; bench/head_precision.py has its cost)."""
    import onnx
    from onnx import helper

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    b = FusedBuilder(base, quant, accuracy_level, max_len, lora, kernel, adapter_type, head_bits)
    g = b.build()
    graph = helper.make_graph(g.nodes, "edgelora-decoder", g.inputs, g.outputs, g.inits)
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)]
    if any(n.domain == EDGELORA for n in g.nodes):
        opsets.append(helper.make_opsetid(EDGELORA, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgelora")
    model.ir_version = 10
    pack_slots(model)
    for k, v in {keys.GRAPH: "fused", keys.QUANT: quant, keys.ACCURACY_LEVEL: accuracy_level,
                 keys.MAX_LEN: max_len, keys.ENCODINGS: b.linear.encodings, keys.FINGERPRINT: base.fingerprint}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=str(v)))
    path = out_dir / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=1024)
    return path


# -- reading ------------------------------------------------------------------------------------

def read_weights(path: str | os.PathLike, config) -> tuple[dict[str, np.ndarray | BlockRows], dict[str, BlockQuant | Stored]]:
    """The graph's weights as it stores them, the reader beside `FusedBuilder`: (dense tensors:
    norms and biases as float32, the embedding and head as float32 or, when quantized, `BlockRows`;
    per-layer linears in their MatMulNBits encoding, each projection split back into its modules)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    meta = {p.key: p.value for p in model.metadata_props}
    if meta.get(keys.GRAPH) != "fused":
        raise UnsupportedFormatError(f"{path}: training reads edgelora's fused ONNX graph or a GGUF file; this graph "
                                     "is an optimum export: export the bundle again (the default ONNX graph is fused)")
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    del model
    c, shapes = config, config.shapes()
    dense: dict[str, np.ndarray] = {}
    packed: dict[str, BlockQuant | Stored] = {}
    for i in range(c.num_layers):
        p = f"layers.{i}"
        for kind in c.spec.layer_tensors:  # norms (the graph keeps the multiplier, as edgelora does)
            if kind.endswith("norm"):
                dense[f"{p}.{kind}"] = inits[f"{p}.{kind}"]
        for group, members in GROUPS.items():
            if f"{p}.{members[0]}_bias" in shapes:  # Qwen2's q/k/v biases: one MatMulNBits bias a group
                widths = np.cumsum([0] + [shapes[f"{p}.{m}"][0] for m in members])
                for m, a, b in zip(members, widths[:-1], widths[1:]):
                    dense[f"{p}.{m}_bias"] = inits[f"{p}.{group}.bias"][a:b]
            if not _has_linear(inits, f"{p}.{group}"):  # bundles from before gate|up was one projection
                for m in members:
                    packed[f"{p}.{m}"] = _onnx_linear(inits, f"{p}.{m}", shapes[f"{p}.{m}"])
                continue
            widths = [shapes[f"{p}.{m}"][0] for m in members]
            stacked = _onnx_linear(inits, f"{p}.{group}", (sum(widths), shapes[f"{p}.{members[0]}"][1]))
            if len(members) == 1:
                packed[f"{p}.{group}"] = stacked
                continue
            start = 0
            for m, width in zip(members, widths):
                packed[f"{p}.{m}"] = stacked.span(start, start + width)
                start += width
    dense["norm"] = inits["norm"]
    vocab, d = c.vocab_size, c.hidden_size
    if "embed" in inits:
        dense["embed"] = inits["embed"]
    else:
        q = inits["embed.q8"].reshape(vocab, d // BLK, BLK)
        s = inits["embed.scales"].reshape(vocab, d // BLK)
        zp = inits["embed.zp"].reshape(vocab, d // BLK) if "embed.zp" in inits else 128.0
        dense["embed"] = BlockRows(BlockQuant((vocab, d), q, 8, s, zp))
    if "lm_head.q6" in inits:  # MatMulQ41's 6-bit head (tied or not: the head the graph computes with)
        dense["lm_head"] = BlockRows(q41.unpack6(inits["lm_head.q6"], vocab))
    elif not c.tie_word_embeddings:
        if "lm_head_T" in inits:
            dense["lm_head"] = np.ascontiguousarray(inits["lm_head_T"].T)
        else:
            dense["lm_head"] = BlockRows(BlockQuant((vocab, d), inits["lm_head.q8"].reshape(vocab, d // BLK, BLK), 8,
                                                    inits["lm_head.scales"].reshape(vocab, d // BLK),
                                                    inits["lm_head.zp"].reshape(vocab, d // BLK)))
    dense = {k: v if isinstance(v, BlockRows) else np.ascontiguousarray(v, np.float32) for k, v in dense.items()}
    return dense, packed


def _has_linear(inits: dict[str, np.ndarray], name: str) -> bool:
    return any(f"{name}.{kind}" in inits for kind in ("weight_T", "q4", "q8", "q41"))


def _onnx_linear(inits: dict[str, np.ndarray], name: str, shape: tuple[int, int]) -> BlockQuant | Stored:
    n, k = shape
    if f"{name}.weight_T" in inits:
        return Stored(np.ascontiguousarray(inits[f"{name}.weight_T"].T))
    if f"{name}.q41" in inits:
        return q41.unpack(inits[f"{name}.q41"], n)
    nb = k // BLK
    for bits in (4, 8):
        q = inits.get(f"{name}.q{bits}")
        if q is None:
            continue
        blocks = q.size // (n * BLK * bits // 8)  # more than nb: Q4_1 with its offsets folded in as extra blocks
        q = q.reshape(n, blocks, BLK * bits // 8)
        scale = inits[f"{name}.scales"].reshape(n, blocks).astype(np.float32)
        if f"{name}.q4_1_offset_T" in inits:  # exact Q4_1 (bundles before the folded encoding)
            return BlockQuant(shape, q, bits, scale, 8.0, np.ascontiguousarray(inits[f"{name}.q4_1_offset_T"].T))
        zp = inits.get(f"{name}.zp")
        if zp is None:
            return BlockQuant(shape, q, bits, scale, float(2 ** (bits - 1)))
        if bits == 4:  # two zero points per byte, rows padded to a whole byte
            zp = zp.reshape(n, -1)
            zp = np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :blocks]
        zp = np.ascontiguousarray(zp.reshape(n, blocks)).astype(np.float32)
        if blocks == nb:
            return BlockQuant(shape, q, bits, scale, zp)
        extra = BlockQuant((n, (blocks - nb) * BLK), q[:, nb:], bits, scale[:, nb:], zp[:, nb:]).expand()
        return BlockQuant(shape, np.ascontiguousarray(q[:, :nb]), bits, np.ascontiguousarray(scale[:, :nb]),
                          np.ascontiguousarray(zp[:, :nb]), np.ascontiguousarray(extra[:, :nb]))
    raise UnsupportedFormatError(f"the fused ONNX graph has no weights for {name}; export the bundle again")


def float_weights(model, config) -> dict[str, tuple[str, int]]:
    """Target -> (initializer holding its transposed float weight, first column) in an f32 fused
    graph (one weight per projection group, its modules side by side): where a merge writes."""
    names, shapes, found = {i.name for i in model.graph.initializer}, config.shapes(), {}
    for i in range(config.num_layers):
        for group, members in GROUPS.items():
            col = 0
            for m in members:
                found[f"layers.{i}.{m}"] = (f"layers.{i}.{group}.weight_T", col)
                col += shapes[f"layers.{i}.{m}"][0]
    return {t: v for t, v in found.items() if v[0] in names}


# -- the fallback for sessions without edgelora's operator library -------------------------------

def uses_q41(model) -> bool:
    return any(o.domain == EDGELORA for o in model.opset_import)


def _q8_slots_as_f16(model, inits: dict) -> dict[str, SlotType]:
    """Redeclares a graph's 8-bit slots (which only MatMulQ41 reads) as float16 ones in the float
    layout (A [in, r], B [out / 8, r, 8]), rank 0 by default; returns the graph's slot types after."""
    from onnx import helper, numpy_helper

    types = graph_slots(model)
    for inp in model.graph.input:
        if inp.name not in types or types[inp.name].dtype is not np.uint8:
            continue
        d = inp.type.tensor_type.shape.dim
        if types[inp.name].tiled:
            shape, default = [d[0].dim_value, d[1].dim_param.removesuffix("+2"), TILE], (d[0].dim_value, 0, TILE)
        else:
            shape, default = [d[1].dim_value * BLK, d[0].dim_param], (d[1].dim_value * BLK, 0)
        inp.CopyFrom(helper.make_tensor_value_info(inp.name, helper.np_dtype_to_tensor_dtype(np.dtype(np.float16)), shape))
        inits[inp.name].CopyFrom(numpy_helper.from_array(np.zeros(default, np.float16), inp.name))
        types[inp.name] = SlotType(np.float16, types[inp.name].tiled)
    return types


def without_q41(model, accuracy_level: int = 4):
    """The same graph with every MatMulQ41 node (exact Q4_1, LoRA inside) as ONNX Runtime's own nodes:
    the Q4_1 folded into one MatMulNBits, the LoRA slot as MatMul, MatMul, Add. `model` holds its
    weights (loaded with external data); it is changed in place and returned."""
    from onnx import helper, numpy_helper

    unpack_slots(model)
    inits = {i.name: i for i in model.graph.initializer}
    types = _q8_slots_as_f16(model, inits)
    widths = {i.name: i.type.tensor_type.shape.dim[0].dim_value * TILE for i in model.graph.input  # of tiled B's
              if i.name in types and types[i.name].tiled}
    g = _Graph()
    g.names = set(inits)
    lin = Linears(g, "int4", accuracy_level)
    dropped, nodes = set(), []
    for node in model.graph.node:
        if node.domain != EDGELORA or node.op_type != "MatMulQ41":
            nodes.append(node)
            continue
        n = next(a.i for a in node.attribute if a.name == "N")
        x, w, *rest = node.input  # lora_a, lora_b, bias, lora_b1, lora_b2: any may be absent or ""
        rest += [""] * (6 - len(rest))
        dropped.add(w)
        if next((a.i for a in node.attribute if a.name == "bits"), 4) == 6:  # the 6-bit head: 8-bit codes, zero point 32
            if any(rest):
                raise FusedExportError(f"{node.name}: a 6-bit MatMulQ41 node here is an LM head, with no other inputs")
            b6 = q41.unpack6(numpy_helper.to_array(inits[w]), n)
            nb = b6.q.shape[1]
            ins = [x, g.init(f"{w}.q8", b6.q), g.init(f"{w}.scales", b6.scale), g.init(f"{w}.zp", np.full(n * nb, 32, np.uint8))]
            nodes.append(helper.make_node("MatMulNBits", ins, list(node.output), name=node.name.replace("MatMulQ41", "MatMulNBits"),
                                          domain=MS, K=nb * BLK, N=n, bits=8, block_size=BLK, accuracy_level=accuracy_level))
            continue
        blocks = q41.unpack(numpy_helper.to_array(inits[w]), n)
        nibbles = blocks.q
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], -1)
        name = node.name.strip("/").split("/")[0]
        g.nodes = []
        bias = rest[2] if rest[2] and (rest[2] not in inits or any(inits[rest[2]].dims)) else ""  # 0 values: none
        y = lin.folded_q41(x, codes, blocks.scale, blocks.offset, name, ["", bias] if bias else [])
        if rest[0] and not rest[0].startswith("const.no_lora"):
            bs = [b for b in (rest[1], *rest[3:5]) if b]
            tiled = {b: widths[b] for b in bs if b in widths}
            y = g.node("Add", [y, lin.lora_delta(x, rest[0], bs, name, types[rest[0]].dtype, tiled)], f"/{name}/Add")
        activation = next((a.s.decode() for a in node.attribute if a.name == "activation"), "")
        if activation:  # a gated MLP's gate|up node: its activation as the nodes the graph had without it
            gated_mlp(g, y, activation, f"/{name.rsplit('.', 1)[0]}/mlp", out=node.output[0])
        nodes += g.nodes
        if not activation:
            nodes.append(helper.make_node("Identity", [y], list(node.output), name=f"/{name}/out"))
    keep = [i for i in model.graph.initializer if i.name not in dropped]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep + g.inits)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    opsets = [o for o in model.opset_import if o.domain != EDGELORA]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model
