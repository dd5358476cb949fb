"""PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors``.

Reads plain LoRA and rsLoRA (including per-module ranks and alphas); refuses pickle files, DoRA and
other PEFT methods with a clear error. Writes what ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgelora import naming
from edgelora._io import atomic_dir
from edgelora.adapters import AdapterError, LoraAdapter, LoraTensor, target_order
from edgelora.errors import CorruptFileError, UnsupportedFormatError

from . import safetensors_io

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE = ("adapter_model.bin", "adapter_model.pt")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")
FINGERPRINT_KEY = "edgelora_base_fingerprint"


def _module(target: str) -> str:
    """Canonical target -> PEFT module path (``model.layers.0.self_attn.q_proj``)."""
    return naming.to_hf(target)[: -len(".weight")]


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys against the end of the module name
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read(path: str | Path) -> LoraAdapter:
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path / CONFIG}: not valid JSON ({e})") from e
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise UnsupportedFormatError(f"{path}: PEFT method {kind} is not supported; edgelora reads LoRA adapters only")
    if cfg.get("use_dora"):
        raise UnsupportedFormatError(f"{path}: DoRA adapters are not supported (their magnitude vector rescales the "
                                     "base weights, which is not a low-rank delta); train a plain LoRA")
    if cfg.get("bias", "none") != "none":
        raise UnsupportedFormatError(f"{path}: LoRA with trained biases (bias={cfg['bias']!r}) is not supported")
    if cfg.get("modules_to_save"):
        raise UnsupportedFormatError(f"{path}: modules_to_save ({cfg['modules_to_save']}) are full weights, not a LoRA delta; not supported")
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedFormatError(f"{path}: fan_in_fan_out adapters (GPT-2 Conv1D layout) are not supported")
    weights = path / WEIGHTS
    if not weights.exists():
        pickles = [p for p in PICKLE if (path / p).exists()]
        if pickles:
            raise UnsupportedFormatError(f"{path}: {pickles[0]} is a pickle file, which can run code when loaded; "
                                         "edgelora refuses it: re-save the adapter with safe_serialization=True")
        raise CorruptFileError(f"{path}: no {WEIGHTS}")
    refs, metadata = safetensors_io.read_index(weights)
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, ref in refs.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedFormatError(f"{path}: DoRA weights ({key}) are not supported; train a plain LoRA")
        m = _KEY.match(key)
        if not m:
            raise UnsupportedFormatError(f"{path}: tensor {key} is not a LoRA A/B weight edgelora understands")
        target = naming.from_hf(m.group("module") + ".weight")
        if target is None or target.rsplit(".", 1)[-1] not in naming.LORA_TARGETS:
            raise UnsupportedFormatError(f"{path}: LoRA on {m.group('module')} is not supported "
                                         f"(targets: {', '.join(naming.PEFT_MODULES.values())})")
        pairs.setdefault(target, {})[m.group("ab")] = ref.load()
    tensors = {}
    for target, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CorruptFileError(f"{path}: {target} has lora_{''.join(ab)} without its partner")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, _module(target), cfg.get("lora_alpha", 8))
        tensors[target] = LoraTensor(ab["A"], ab["B"], float(alpha))
    fingerprint = metadata.get(FINGERPRINT_KEY) or cfg.get(FINGERPRINT_KEY)
    try:
        return LoraAdapter(tensors, base_fingerprint=fingerprint, use_rslora=bool(cfg.get("use_rslora")),
                           name=path.name, provenance={"format": "peft", "source": str(path),
                                                       **json.loads(metadata.get("edgelora_provenance", "{}"))})
    except AdapterError as e:
        raise CorruptFileError(f"{path}: {e}") from e


def write(adapter: LoraAdapter, path: str | Path, base_model: str = "") -> Path:
    path = Path(path)
    ranks = adapter.ranks
    alphas = {t: adapter.tensors[t].alpha for t in adapter.targets}
    r = max(ranks.values(), key=list(ranks.values()).count)  # the commonest rank
    alpha = max(alphas.values(), key=list(alphas.values()).count)
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "use_rslora": adapter.use_rslora, "use_dora": False,
        "target_modules": sorted({naming.PEFT_MODULES[k] for k in adapter.target_kinds}),
        "layers_to_transform": sorted({int(t.split(".")[1]) for t in adapter.targets}),
        "rank_pattern": {_module(t): v for t, v in ranks.items() if v != r},
        "alpha_pattern": {_module(t): v for t, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True,
        FINGERPRINT_KEY: adapter.base_fingerprint,
    }
    kinds = {t.rsplit(".", 1)[1] for t in adapter.targets}
    layers = {int(t.split(".")[1]) for t in adapter.targets}
    if len(adapter.targets) != len(kinds) * len(layers):
        raise UnsupportedFormatError("PEFT needs the same target modules in every adapted layer")
    tensors = {}
    for t in sorted(adapter.targets, key=target_order):
        tensors[f"base_model.model.{_module(t)}.lora_A.weight"] = adapter.tensors[t].A
        tensors[f"base_model.model.{_module(t)}.lora_B.weight"] = adapter.tensors[t].B
    metadata = {"format": "pt", FINGERPRINT_KEY: adapter.base_fingerprint or "",
                "edgelora_provenance": json.dumps(adapter.provenance, default=str)}
    with atomic_dir(path, replace=True) as tmp:
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        safetensors_io.write(tmp / WEIGHTS, tensors, metadata)
    return path
