"""GGUF LoRA adapters, the files llama.cpp loads with ``llama_adapter_lora_init``.

Keys: ``general.architecture`` (the base's, "llama"), ``general.type = "adapter"``,
``adapter.type = "lora"``, ``adapter.lora.alpha`` (f32). Tensors ``<base tensor>.lora_a`` (r x in)
and ``.lora_b`` (out x r); the rows of lora_b for attn_q/attn_k get the RoPE permutation the base's
q/k weights get. llama.cpp scales each pair by alpha / r with one alpha per file, so per-module
alphas and rsLoRA are folded into B, and edgelora's own keys record how to unfold them.
llama.cpp checks only architecture and shapes and crashes on a bad file: `read` validates fully.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edgelora import naming
from edgelora._io import atomic_file
from edgelora.adapters import AdapterError, LoraAdapter, LoraTensor
from edgelora.arch import LlamaConfig
from edgelora.errors import CorruptFileError, UnsupportedArchitectureError, UnsupportedFormatError

from . import gguf_model

KEY_ALPHA = "adapter.lora.alpha"
KEY_FINGERPRINT = "edgelora.base_fingerprint"
KEY_ALPHAS = "edgelora.adapter.alphas"  # JSON {target: alpha}, present when B was folded
KEY_RSLORA = "edgelora.adapter.rslora"
KEY_HEADS = "edgelora.adapter.heads"  # [n_head, n_head_kv]: to undo the q/k permutation without the base
KEY_PROVENANCE = "edgelora.provenance"


def _permute(target: str, B: np.ndarray, heads: tuple[int, int], inverse: bool = False) -> np.ndarray:
    kind = target.rsplit(".", 1)[1]
    if kind not in ("q", "k"):
        return B
    n = heads[0] if kind == "q" else heads[1]
    return naming.rope_unpermute(B, n) if inverse else naming.rope_permute(B, n)


def write(adapter: LoraAdapter, path: str | Path, config: LlamaConfig) -> Path:
    import gguf

    adapter.check_fits(config)
    path = Path(path)
    heads = (config.num_heads, config.num_kv_heads)
    ranks = {t.rank for t in adapter.tensors.values()}
    alphas = {t.alpha for t in adapter.tensors.values()}
    simple = len(alphas) == 1 and len(ranks) == 1 and not adapter.use_rslora
    file_alpha = alphas.pop() if simple else float(adapter.rank)
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, gguf_model.ARCH)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32(KEY_ALPHA, file_alpha)
        w.add_name(adapter.name or "adapter")
        w.add_string(KEY_FINGERPRINT, adapter.base_fingerprint or "")
        w.add_array(KEY_HEADS, list(heads))
        w.add_bool(KEY_RSLORA, adapter.use_rslora)
        w.add_string(KEY_PROVENANCE, json.dumps(adapter.provenance, default=str))
        if not simple:
            w.add_string(KEY_ALPHAS, json.dumps({t: adapter.tensors[t].alpha for t in adapter.targets}))
        for target in adapter.targets:
            t = adapter.tensors[target]
            B = t.B if simple else t.B * np.float32(adapter.scale(target) / (file_alpha / t.rank))
            name = naming.to_gguf(target)
            w.add_tensor(f"{name}.lora_a", np.ascontiguousarray(t.A, np.float32))
            w.add_tensor(f"{name}.lora_b", np.ascontiguousarray(_permute(target, B, heads), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read(path: str | Path, config: LlamaConfig | None = None) -> LoraAdapter:
    """Reads and fully validates a GGUF LoRA. `config` (the base's) is needed only for files from
    other tools, to undo the q/k permutation; edgelora's own files carry the head counts."""
    import gguf

    path = Path(path)
    reader = gguf_model.open_reader(path)
    fields = gguf_model.fields_of(reader)
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise UnsupportedFormatError(f"{path}: not a GGUF LoRA adapter (general.type={fields.get('general.type')!r})")
    if fields.get("general.architecture") != gguf_model.ARCH:
        raise UnsupportedArchitectureError(f"{path}: adapter for architecture {fields.get('general.architecture')!r}; "
                                           "edgelora supports the Llama family")
    if KEY_ALPHA not in fields:
        raise CorruptFileError(f"{path}: no {KEY_ALPHA} key")
    file_alpha = float(fields[KEY_ALPHA])
    if KEY_HEADS in fields:
        heads = tuple(int(h) for h in fields[KEY_HEADS])
    elif config is not None:
        heads = (config.num_heads, config.num_kv_heads)
    else:
        heads = None
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        if not t.name.endswith((".lora_a", ".lora_b")):
            raise CorruptFileError(f"{path}: unexpected tensor {t.name} in a LoRA adapter")
        base_name, ab = t.name.rsplit(".", 1)
        target = naming.from_gguf(base_name)
        if target is None or target.rsplit(".", 1)[-1] not in naming.LORA_TARGETS:
            raise UnsupportedFormatError(f"{path}: LoRA on {base_name} is not supported")
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise UnsupportedFormatError(f"{path}: {t.name} is {t.tensor_type.name}; edgelora reads F32/F16 LoRA tensors")
        data = np.asarray(t.data, dtype=np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
        pairs.setdefault(target, {})[ab] = data.copy()
    if not pairs:
        raise CorruptFileError(f"{path}: the adapter has no tensors")
    alphas = json.loads(fields[KEY_ALPHAS]) if KEY_ALPHAS in fields else None
    rslora = bool(fields.get(KEY_RSLORA, False))
    tensors = {}
    for target, ab in pairs.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise CorruptFileError(f"{path}: {target} has {''.join(ab)} without its partner")
        A, B = ab["lora_a"], ab["lora_b"]
        if A.shape[0] != B.shape[1]:
            raise CorruptFileError(f"{path}: {target} lora_a {A.shape} and lora_b {B.shape} have different ranks")
        if target.rsplit(".", 1)[1] in ("q", "k"):
            if heads is None:
                raise AdapterError(f"{path}: undoing llama.cpp's q/k permutation needs the base model's config; "
                                   "pass config= (or load the adapter through a bundle)")
            B = _permute(target, B, heads, inverse=True)
        r = A.shape[0]
        if alphas is None:
            alpha = file_alpha
        else:
            alpha = float(alphas[target])
            scale = alpha / (math.sqrt(r) if rslora else r)
            B = B / np.float32(scale / (file_alpha / r))
        tensors[target] = LoraTensor(A, B, alpha)
    try:
        return LoraAdapter(tensors, base_fingerprint=fields.get(KEY_FINGERPRINT) or None, use_rslora=rslora and alphas is not None,
                           name=fields.get("general.name") or path.stem,
                           provenance={"format": "gguf", "source": str(path), **json.loads(fields.get(KEY_PROVENANCE) or "{}")})
    except AdapterError as e:
        raise CorruptFileError(f"{path}: {e}") from e
