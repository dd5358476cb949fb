"""ONNX Runtime adapters (``.onnx_adapter``, written with `onnxruntime.AdapterFormat`).

Parameter names match the LoRA slots of edgelora's ONNX graphs: ``layers.3.q.lora_A`` (in x r) and
``layers.3.q.lora_B`` (r x out) with the scale folded into B (ONNX Runtime cannot load 0-d
parameters). The format has no room for metadata, so a JSON manifest beside the file
(``<file>.json``) records the base fingerprint, the alphas and the provenance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgelora._io import atomic_file, write_bytes_atomic
from edgelora.adapters import AdapterError, LoraAdapter, LoraTensor
from edgelora.arch import ModelConfig
from edgelora.errors import CorruptFileError, UnsupportedFormatError

from .onnx_model import slot_names

MANIFEST_FORMAT = "edgelora-onnx-adapter"
ADAPTER_VERSION = 1


def manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def parameters(adapter: LoraAdapter) -> dict[str, np.ndarray]:
    """The adapter as ONNX slot parameters (A^T and (scale * B)^T per target)."""
    out = {}
    for target in adapter.targets:
        t = adapter.tensors[target]
        a_name, b_name = slot_names(target)
        out[a_name] = np.ascontiguousarray(t.A.T, np.float32)
        out[b_name] = np.ascontiguousarray((np.float32(adapter.scale(target)) * t.B).T, np.float32)
    return out


def write_parameters(params: dict[str, np.ndarray], path: Path) -> Path:
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    fmt.set_adapter_version(ADAPTER_VERSION)
    fmt.set_model_version(1)
    fmt.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in params.items()})
    with atomic_file(path) as tmp:
        fmt.export_adapter(str(tmp))
    return path


def write(adapter: LoraAdapter, path: str | Path, config: ModelConfig | None = None) -> Path:
    path = Path(path)
    write_parameters(parameters(adapter), path)
    manifest = {
        "format": MANIFEST_FORMAT, "name": adapter.name, "base_fingerprint": adapter.base_fingerprint,
        "use_rslora": adapter.use_rslora, "alphas": {t: adapter.tensors[t].alpha for t in adapter.targets},
        "provenance": adapter.provenance,
    }
    write_bytes_atomic(manifest_path(path), json.dumps(manifest, indent=2, default=str).encode())
    return path


def read(path: str | Path, config: ModelConfig | None = None) -> LoraAdapter:
    import onnxruntime as ort

    path = Path(path)
    try:
        fmt = ort.AdapterFormat.read_adapter(str(path))
        params = {k: np.array(v.numpy(), dtype=np.float32, copy=True) for k, v in fmt.get_parameters().items()}
    except Exception as e:  # onnxruntime raises its own error types on a bad file
        raise CorruptFileError(f"{path}: not a valid .onnx_adapter ({str(e).splitlines()[0]}); re-export it") from e
    mpath = manifest_path(path)
    manifest = {}
    if mpath.exists():
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorruptFileError(f"{mpath}: not valid JSON ({e})") from e
    alphas = manifest.get("alphas")
    rslora = bool(manifest.get("use_rslora", False))
    targets = sorted({k.rsplit(".", 1)[0] for k in params})
    tensors = {}
    for target in targets:
        a_name, b_name = slot_names(target)
        if a_name not in params or b_name not in params:
            raise CorruptFileError(f"{path}: {target} lacks its lora_A or lora_B parameter")
        A, Bs = params[a_name].T, params[b_name].T
        r = A.shape[0]
        if alphas and target in alphas:
            alpha = float(alphas[target])
            B = Bs / np.float32(alpha / (math.sqrt(r) if rslora else r))
        else:  # no manifest: the scale stays folded into B
            alpha, B = float(r), Bs
            rslora = False
        tensors[target] = LoraTensor(np.ascontiguousarray(A), np.ascontiguousarray(B), alpha)
    if not tensors:
        raise UnsupportedFormatError(f"{path}: the adapter has no LoRA parameters")
    try:
        return LoraAdapter(tensors, base_fingerprint=manifest.get("base_fingerprint"), use_rslora=rslora,
                           name=manifest.get("name") or path.stem,
                           provenance={"format": "onnx", "source": str(path), **(manifest.get("provenance") or {})})
    except AdapterError as e:
        raise CorruptFileError(f"{path}: {e}") from e
