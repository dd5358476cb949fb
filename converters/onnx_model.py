"""ONNX decoders: export with optimum (``text-generation-with-past``), give every target linear a
LoRA slot ONNX Runtime's multi-LoRA can fill, and quantize the base with the slots left in float.

A LoRA slot on a linear ``y = x @ W`` adds ``y += (x @ A) @ B`` where A [d_in, r] and B [r, d_out]
are overridable initializers (an initializer and a graph input of the same name) whose defaults
have rank 0, so with no adapter active the output is bit-identical to the graph without slots.
Each module has its own symbolic rank dimension; the scale alpha/r is folded into B.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from edgelora import naming
from edgelora.arch import ModelConfig
from edgelora.errors import EdgeloraError

# optimum's node names for the linear modules: /model/layers.{i}/self_attn/q_proj/MatMul
_LINEAR_NODE = re.compile(r"^/model/layers\.(\d+)/(?:self_attn|mlp)/(\w+_proj)/MatMul$")
QUANTS = ("f32", "int8", "int4")


class OnnxExportError(EdgeloraError):
    exit_code = 1


def slot_names(target: str) -> tuple[str, str]:
    """The graph input names of one module's LoRA slot, e.g. ``layers.0.q.lora_A``."""
    return f"{target}.lora_A", f"{target}.lora_B"


def rank_dim(target: str) -> str:
    return "r_" + target.replace(".", "_")


def export_optimum(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, opset: int = 18) -> Path:
    """Runs optimum's exporter on a Hugging Face checkpoint dir; returns the path of model.onnx."""
    try:
        from optimum.exporters.onnx import main_export
    except ImportError as e:
        raise OnnxExportError("ONNX export needs the export extra: pip install 'edgelora[export]'") from e
    from edgelora._native import quiet_native

    out_dir = Path(out_dir)
    import warnings

    with warnings.catch_warnings(), quiet_native():
        warnings.simplefilter("ignore")
        main_export(str(hf_dir), output=str(out_dir), task="text-generation-with-past", opset=opset,
                    do_validation=False, no_post_process=True, device="cpu")
    path = out_dir / "model.onnx"
    if not path.exists():  # pragma: no cover
        raise OnnxExportError(f"optimum wrote no model.onnx into {out_dir}")
    return path


def _slot_of(members: tuple[str, ...]) -> str:
    """A module's slot name: its canonical target, or for a fused module (Phi-3's qkv_proj) the
    group name the fused graph uses too (``layers.3.qkv``), so the engine fills both alike."""
    if len(members) == 1:
        return members[0]
    from .onnx_fused import GROUPS

    layer = members[0].rsplit(".", 1)[0]
    kinds = tuple(m.rsplit(".", 1)[1] for m in members)
    return f"{layer}.{next(g for g, group in GROUPS.items() if group == kinds)}"


def linear_nodes(model, config: ModelConfig) -> dict[str, tuple[object, tuple[str, ...]]]:
    """Slot name (``layers.3.q``, ``layers.3.qkv``) -> (the MatMul node of that linear module, the
    canonical targets it computes)."""
    modules = {}
    for ext, members in naming.lora_modules(config, naming.HF).items():
        layer = int(members[0].split(".")[1])
        modules[layer, ext.rsplit(".", 2)[-2]] = members
    out = {}
    for node in model.graph.node:
        m = _LINEAR_NODE.match(node.name)
        if node.op_type == "MatMul" and m and (int(m.group(1)), m.group(2)) in modules:
            members = modules[int(m.group(1)), m.group(2)]
            out[_slot_of(members)] = (node, members)
    return out


def float_weights(model, config: ModelConfig) -> dict[str, tuple[str, int]]:
    """Target -> (initializer holding its transposed float weight, first column) in an optimum graph
    (a fused module's members side by side): where a merge writes."""
    shapes, found = config.shapes(), {}
    for node, members in linear_nodes(model, config).values():
        col = 0
        for m in members:
            found[m] = (node.input[1], col)
            col += shapes[m][0]
    return found


def add_lora_slots(model, config: ModelConfig):
    """Adds a zero-rank LoRA slot to every linear module, in place; returns the model."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = linear_nodes(model, config)
    expected = {_slot_of(members) for members in naming.lora_modules(config, naming.HF).values()}
    missing = sorted(expected - set(nodes))
    if missing:
        raise OnnxExportError(f"the exported graph has no MatMul for {', '.join(missing[:4])}: unexpected exporter output")
    shapes = config.shapes()
    graph = model.graph
    new_nodes = []
    index = {id(n): i for i, n in enumerate(graph.node)}
    insert_after: dict[int, list] = {}
    for target, (node, members) in nodes.items():
        d_out, d_in = sum(shapes[m][0] for m in members), shapes[members[0]][1]
        a_name, b_name = slot_names(target)
        r = rank_dim(target)
        graph.initializer.extend([numpy_helper.from_array(np.zeros((d_in, 0), np.float32), a_name),
                                  numpy_helper.from_array(np.zeros((0, d_out), np.float32), b_name)])
        graph.input.extend([helper.make_tensor_value_info(a_name, TensorProto.FLOAT, [d_in, r]),
                            helper.make_tensor_value_info(b_name, TensorProto.FLOAT, [r, d_out])])
        x, y = node.input[0], node.output[0]
        base_out = f"{y}/base"
        node.output[0] = base_out
        xa, delta = f"/lora/{target}/xA", f"/lora/{target}/delta"
        insert_after.setdefault(index[id(node)], []).extend([
            helper.make_node("MatMul", [x, a_name], [xa], name=f"/lora/{target}/MatMul_A"),
            helper.make_node("MatMul", [xa, b_name], [delta], name=f"/lora/{target}/MatMul_B"),
            helper.make_node("Add", [base_out, delta], [y], name=f"/lora/{target}/Add"),
        ])
    for i, node in enumerate(graph.node):
        new_nodes.append(node)
        new_nodes.extend(insert_after.get(i, []))
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


def lora_node_names(model) -> list[str]:
    return [n.name for n in model.graph.node if n.name.startswith("/lora/")]


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str, *, block_size: int = 32) -> Path:
    """int8: dynamic quantization of MatMul weights; int4: MatMulNBits (block 32). LoRA nodes stay float."""
    import onnx

    if quant not in ("int8", "int4"):
        raise OnnxExportError(f"ONNX quantization must be int8 or int4, got {quant!r}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    exclude = lora_node_names(model)
    if quant == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # uint8 weights: with int8 ones, MLAS's u8s8 kernel on x86 CPUs without VNNI (AVX2 only, e.g. this
        # AMD EPYC) saturates its 16-bit pair sums; measured on a tiny Llama 3: KL 2.7e-4 (s8) against 4.9e-6 (u8)
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8, per_channel=True,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=exclude,
                         extra_options={"MatMulConstBOnly": True})
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(model, block_size=block_size, is_symmetric=False, nodes_to_exclude=exclude)
        q.process()
        onnx.save(q.model.model, str(dst))
    return dst


def export(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, config: ModelConfig, quant: str = "f32",
           *, progress: Callable[[int, int], None] | None = None) -> Path:
    """optimum export -> LoRA slots -> optional quantization; writes ``out_dir/model.onnx``."""
    import onnx

    if quant not in QUANTS:
        raise OnnxExportError(f"ONNX quantization must be one of {', '.join(QUANTS)}, got {quant!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = 3 if quant != "f32" else 2
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = export_optimum(hf_dir, Path(tmp) / "raw")
        if progress:
            progress(1, steps)
        model = add_lora_slots(onnx.load(str(raw)), config)
        slotted = Path(tmp) / "slotted.onnx"
        onnx.save(model, str(slotted))
        if progress:
            progress(2, steps)
        final = out_dir / "model.onnx"
        if quant == "f32":
            shutil.move(slotted, final)
        else:
            quantize(slotted, final, quant)
            if progress:
                progress(3, steps)
    return final
