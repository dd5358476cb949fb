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
from edgelora.adapters import AdapterError, AdapterMismatchError, LoraAdapter, LoraTensor, fuse_members, split_fused
from edgelora.arch import ModelConfig
from edgelora.errors import CorruptFileError, UnsupportedArchitectureError, UnsupportedFormatError
from edgelora.profiles import ADAPTER_PRECISIONS

from . import gguf_model, keys

KEY_ALPHA = "adapter.lora.alpha"




def _permute(permutes: bool, target: str, B: np.ndarray, heads: tuple[int, int] | None,
             inverse: bool = False) -> np.ndarray:
    """llama.cpp's q/k row permutation of a B (only the `llama` architecture permutes)."""
    kind = target.rsplit(".", 1)[1]
    if kind not in ("q", "k") or not permutes:
        return B
    if heads is None:
        raise AdapterError("undoing llama.cpp's q/k permutation needs the base model's config; "
                           "pass config= (or load the adapter through a bundle)")
    n = heads[0] if kind == "q" else heads[1]
    return naming.rope_unpermute(B, n) if inverse else naming.rope_permute(B, n)


def _pairs(adapter: LoraAdapter, config: ModelConfig) -> tuple[dict[str, tuple[LoraTensor, float]], dict[str, dict]]:
    """GGUF base tensor name -> (LoRA pair, the scale it must compute), with fused tensors
    (Phi-3's attn_qkv) made from their members; and the rank ranges of fused pairs."""
    pairs, ranges, shapes = {}, {}, config.shapes()
    for ext, members in naming.lora_modules(config, naming.GGUF).items():
        if len(members) == 1:
            if members[0] in adapter.tensors:
                pairs[ext] = (adapter.tensors[members[0]], adapter.scale(members[0]))
            continue
        fused = fuse_members(adapter, members, shapes)
        if fused is not None:
            t, r = fused
            pairs[ext] = (t, t.alpha / (math.sqrt(t.rank) if adapter.use_rslora else t.rank))
            if r:
                ranges[ext] = r
    return pairs, ranges


PRECISIONS = ADAPTER_PRECISIONS


def _encode(gguf, x: np.ndarray, precision: str) -> tuple[np.ndarray, object | None]:
    """A LoRA matrix as llama.cpp will read it: F32, F16, or Q8_0 where its rows split into blocks of
    32 (A, whose rows are the input width), else F16 (B, whose rows are the rank)."""
    x = np.ascontiguousarray(x, np.float32)
    if precision == "q8_0" and x.shape[-1] % 32 == 0:
        qt = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(x, qt), qt
    if precision in ("f16", "q8_0"):
        return x.astype(np.float16), None
    return x, None


def write(adapter: LoraAdapter, path: str | Path, config: ModelConfig, precision: str = "f32") -> Path:
    """Writes `adapter` for llama.cpp, its matrices in `precision` (f32, f16, or q8_0: A in Q8_0 and B,
    whose rows are only rank long, in F16)."""
    import gguf

    if precision not in PRECISIONS:
        raise UnsupportedFormatError(f"GGUF LoRA precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    path = Path(path)
    heads = (config.num_heads, config.num_kv_heads)
    pairs, ranges = _pairs(adapter, config)
    ranks = {t.rank for t, _ in pairs.values()}
    alphas = {t.alpha for t, _ in pairs.values()}
    simple = len(alphas) == 1 and len(ranks) == 1 and not adapter.use_rslora and not ranges
    file_alpha = alphas.pop() if simple else float(max(ranks))
    with atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, config.spec.gguf_arch)
        w.add_type("adapter")
        w.add_string("adapter.type", "lora")
        w.add_float32(KEY_ALPHA, file_alpha)
        w.add_name(adapter.name or "adapter")
        w.add_string(keys.FINGERPRINT, adapter.base_fingerprint or "")
        w.add_array(keys.ADAPTER_HEADS, list(heads))
        w.add_bool(keys.ADAPTER_RSLORA, adapter.use_rslora)
        w.add_string(keys.PROVENANCE, json.dumps(adapter.provenance, default=str))
        if not simple:
            w.add_string(keys.ADAPTER_ALPHAS, json.dumps({t: adapter.tensors[t].alpha for t in adapter.targets}))
        if ranges:
            w.add_string(keys.ADAPTER_FUSED_RANKS, json.dumps(ranges))
        for name, (t, scale) in pairs.items():
            # llama.cpp computes scale = file alpha / rank of each pair: fold the rest into B
            B = t.B if simple else t.B * np.float32(scale / (file_alpha / t.rank))
            base = name[: -len(".weight")]
            members = naming.members_of(name, naming.GGUF, config.family)
            for suffix, x in (("lora_a", t.A), ("lora_b", _permute(config.spec.gguf_rope_permute, members[0], B, heads))):
                data, qtype = _encode(gguf, x, precision)
                w.add_tensor(f"{base}.weight.{suffix}", data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read(path: str | Path, config: ModelConfig | None = None) -> LoraAdapter:
    """Reads and fully validates a GGUF LoRA. `config` (the base's) is needed only for files from
    other tools, to undo the q/k permutation or split a fused tensor; edgelora's own files carry
    the head counts."""
    import gguf

    path = Path(path)
    reader = gguf_model.open_reader(path)
    fields = gguf_model.fields_of(reader)
    if fields.get("general.type") != "adapter" or fields.get("adapter.type") != "lora":
        raise UnsupportedFormatError(f"{path}: not a GGUF LoRA adapter (general.type={fields.get('general.type')!r})")
    arch = fields.get("general.architecture")
    family = gguf_model.ARCHES.get(arch)
    if family is None:
        raise UnsupportedArchitectureError(f"{path}: adapter for architecture {arch!r}; edgelora reads adapters for "
                                           f"{', '.join(gguf_model.ARCHES)}")
    if config is not None and config.spec.gguf_arch != arch:
        raise AdapterMismatchError(f"{path}: adapter for a {arch} model, but the base is {config.family}; "
                                   "use an adapter made for this base")
    if KEY_ALPHA not in fields:
        raise CorruptFileError(f"{path}: no {KEY_ALPHA} key")
    file_alpha = float(fields[KEY_ALPHA])
    if keys.ADAPTER_HEADS in fields:
        heads = tuple(int(h) for h in fields[keys.ADAPTER_HEADS])
    elif config is not None:
        heads = (config.num_heads, config.num_kv_heads)
    else:
        heads = None
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for t in reader.tensors:
        if not t.name.endswith((".lora_a", ".lora_b")):
            raise CorruptFileError(f"{path}: unexpected tensor {t.name} in a LoRA adapter")
        base_name, ab = t.name.rsplit(".", 1)
        members = naming.members_of(base_name, naming.GGUF, family.name)
        if members is None or members[0].rsplit(".", 1)[-1] not in naming.LORA_TARGETS:
            raise UnsupportedFormatError(f"{path}: LoRA on {base_name} is not supported")
        shape = tuple(int(s) for s in reversed(t.shape))
        if t.tensor_type == gguf.GGMLQuantizationType.Q8_0:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False).reshape(shape)
        elif t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            data = np.array(t.data, dtype=np.float32).reshape(shape)  # a copy: the file's memory map closes
        else:
            raise UnsupportedFormatError(f"{path}: {t.name} is {t.tensor_type.name}; edgelora reads F32/F16/Q8_0 LoRA tensors")
        pairs.setdefault(base_name, {})[ab] = data
    if not pairs:
        raise CorruptFileError(f"{path}: the adapter has no tensors")
    alphas = json.loads(fields[keys.ADAPTER_ALPHAS]) if keys.ADAPTER_ALPHAS in fields else None
    fused_ranges = json.loads(fields[keys.ADAPTER_FUSED_RANKS]) if keys.ADAPTER_FUSED_RANKS in fields else {}
    rslora = bool(fields.get(keys.ADAPTER_RSLORA, False))
    tensors = {}
    for base_name, ab in pairs.items():
        if set(ab) != {"lora_a", "lora_b"}:
            raise CorruptFileError(f"{path}: {base_name} has {''.join(ab)} without its partner")
        A, B = ab["lora_a"], ab["lora_b"]
        if A.shape[0] != B.shape[1]:
            raise CorruptFileError(f"{path}: {base_name} lora_a {A.shape} and lora_b {B.shape} have different ranks")
        members = naming.members_of(base_name, naming.GGUF, family.name)
        if len(members) > 1:
            if config is None:
                raise AdapterError(f"{path}: {base_name} is a fused tensor ({'+'.join(members)}); splitting its LoRA "
                                   "needs the base model's config (load it through a bundle or pass config=)")
            # the pair computes file_alpha / r; its members get that scale back
            parts = split_fused(LoraTensor(A, B, file_alpha), members, config.shapes(), fused_ranges.get(base_name))
            for m, part in parts.items():
                tensors[m] = _unfold(m, part, alphas, rslora)
            continue
        target = members[0]
        try:
            B = _permute(family.gguf_rope_permute, target, B, heads, inverse=True)
        except AdapterError as e:
            raise AdapterError(f"{path}: {e}") from e
        tensors[target] = _unfold(target, LoraTensor(A, B, file_alpha), alphas, rslora)
    try:
        return LoraAdapter(tensors, base_fingerprint=fields.get(keys.FINGERPRINT) or None, use_rslora=rslora and alphas is not None,
                           name=fields.get("general.name") or path.stem,
                           provenance={"format": "gguf", "source": str(path), **json.loads(fields.get(keys.PROVENANCE) or "{}")})
    except AdapterError as e:
        raise CorruptFileError(f"{path}: {e}") from e


def _unfold(target: str, t: LoraTensor, alphas: dict | None, rslora: bool) -> LoraTensor:
    """A pair as llama.cpp computes it (scale = alpha / rank) -> the adapter's own alpha, with the
    scale folded into B taken back out (edgelora's files record the alphas when they folded)."""
    if alphas is None:
        return t
    r = t.rank
    alpha = float(alphas[target])
    scale = alpha / (math.sqrt(r) if rslora else r)
    return LoraTensor(t.A, t.B / np.float32(scale / (t.alpha / r)), alpha)
