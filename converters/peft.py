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
from edgelora.adapters import AdapterError, LoraAdapter, LoraTensor, fuse_members, split_fused
from edgelora.arch import FAMILIES, ModelConfig
from edgelora.errors import CorruptFileError, UnsupportedFormatError

from . import keys, safetensors_io

CONFIG, WEIGHTS = keys.PEFT_CONFIG, keys.PEFT_WEIGHTS
PICKLE = ("adapter_model.bin", "adapter_model.pt")
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[\w-]+)?\.weight$")


def _module(target: str, family: str = "llama") -> str:
    """Canonical target -> PEFT module path (``model.layers.0.self_attn.q_proj``; for a member of a
    fused module, the fused module's path)."""
    return naming.to_hf(target, family)[: -len(".weight")]


def _targets_of(module: str, config: ModelConfig | None) -> tuple[str, ...] | None:
    """The canonical targets a PEFT module holds, in the base's family (or any family without a
    config: module names tell families apart)."""
    families = [config.family] if config is not None else list(FAMILIES)
    for fam in families:
        members = naming.members_of(module + ".weight", naming.HF, fam)
        if members and all(m.rsplit(".", 1)[-1] in naming.LORA_TARGETS for m in members):
            return members
    return None


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    # PEFT matches pattern keys against the end of the module name
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(where: Path, cfg: Any) -> None:
    """One line for a config that parses but is not a LoRA config edgelora can follow."""
    if not isinstance(cfg, dict):
        raise CorruptFileError(f"{where}: must be a JSON object, got {type(cfg).__name__}")

    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for key, ok in (("lora_alpha", number), ("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0),
                    ("alpha_pattern", lambda v: v is None or isinstance(v, dict) and all(map(number, v.values()))),
                    ("rank_pattern", lambda v: v is None or isinstance(v, dict)
                     and all(isinstance(x, int) and x > 0 for x in v.values()))):
        if key in cfg and not ok(cfg[key]):
            raise CorruptFileError(f"{where}: {key} is {cfg[key]!r}, not a valid value; fix it or re-save the adapter")


def _provenance(metadata: dict) -> dict:
    for key in (keys.PROVENANCE, *keys.LEGACY_PROVENANCE):
        if key in metadata:
            return json.loads(metadata[key])
    return {}


def read(path: str | Path, config: ModelConfig | None = None) -> LoraAdapter:
    """`config` (the base's) is needed only to split a fused module's LoRA (Phi-3's qkv_proj)."""
    path = Path(path)
    try:
        cfg = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path / CONFIG}: not valid JSON ({e})") from e
    except OSError as e:
        raise CorruptFileError(f"{path / CONFIG}: cannot be read ({e.strerror})") from e
    _check_config(path / CONFIG, cfg)
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
    pairs: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    modules: dict[tuple[str, ...], str] = {}
    for key, ref in refs.items():
        if "lora_magnitude_vector" in key:
            raise UnsupportedFormatError(f"{path}: DoRA weights ({key}) are not supported; train a plain LoRA")
        m = _KEY.match(key)
        if not m:
            raise UnsupportedFormatError(f"{path}: tensor {key} is not a LoRA A/B weight edgelora understands")
        members = _targets_of(m.group("module"), config)
        if members is None:
            raise UnsupportedFormatError(f"{path}: LoRA on {m.group('module')} is not supported "
                                         f"(targets: {', '.join(naming.PEFT_MODULES.values())}, Phi-3's qkv_proj, gate_up_proj)")
        pairs.setdefault(members, {})[m.group("ab")] = ref.load()
        modules[members] = m.group("module")
    try:
        ranges = json.loads(metadata.get(keys.ADAPTER_FUSED_RANKS, "{}"))
        provenance = _provenance(metadata)
        assert isinstance(ranges, dict) and isinstance(provenance, dict)
    except (ValueError, AssertionError):
        raise CorruptFileError(f"{weights}: its metadata is malformed; re-save the adapter") from None
    tensors = {}
    for members, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CorruptFileError(f"{path}: {modules[members]} has lora_{''.join(ab)} without its partner")
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, modules[members], cfg.get("lora_alpha", 8))
        rank = _pattern_value(cfg.get("rank_pattern") or {}, modules[members], cfg.get("r"))
        if rank is not None and ab["A"].ndim == 2 and ab["A"].shape[0] != rank:
            raise CorruptFileError(f"{path}: {CONFIG} gives {modules[members]} rank {rank}, its tensors have rank "
                                   f"{ab['A'].shape[0]}; fix r (or rank_pattern) in {CONFIG}")
        pair = LoraTensor(ab["A"], ab["B"], float(alpha))
        if len(members) == 1:
            tensors[members[0]] = pair
            continue
        if config is None:
            raise AdapterError(f"{path}: {modules[members]} is a fused module ({'+'.join(members)}); splitting its "
                               "LoRA needs the base model's config (load it through a bundle or pass config=)")
        try:
            tensors.update(split_fused(pair, members, config.shapes(), ranges.get(modules[members]),
                                       bool(cfg.get("use_rslora"))))
        except AdapterError as e:
            raise CorruptFileError(f"{path}: {e}") from e
    fingerprint = keys.fingerprint_of(metadata) or keys.fingerprint_of(cfg)
    try:
        return LoraAdapter(tensors, base_fingerprint=fingerprint, use_rslora=bool(cfg.get("use_rslora")),
                           name=path.name, provenance={"format": "peft", "source": str(path), **provenance})
    except AdapterError as e:
        raise CorruptFileError(f"{path}: {e}") from e


def _pairs(adapter: LoraAdapter, config: ModelConfig | None) -> tuple[dict[str, LoraTensor], dict[str, dict]]:
    """PEFT module path -> its LoRA pair (fused modules from their members), and the rank ranges
    of fused modules whose members had their own A."""
    if config is None or not naming.FUSED_TENSORS.get(config.family):
        family = config.family if config is not None else "llama"
        return {_module(t, family): adapter.tensors[t] for t in adapter.targets}, {}
    pairs, ranges, shapes = {}, {}, config.shapes()
    for ext, members in naming.lora_modules(config, naming.HF).items():
        fused = fuse_members(adapter, members, shapes)
        if fused is not None:
            module = ext[: -len(".weight")]
            pairs[module] = fused[0]
            if fused[1]:
                ranges[module] = fused[1]
    return pairs, ranges


def write(adapter: LoraAdapter, path: str | Path, config: ModelConfig | None = None, base_model: str = "") -> Path:
    """Writes what ``PeftModel.from_pretrained`` loads, with the family's module names (`config`,
    the base's; Llama names without it)."""
    path = Path(path)
    pairs, ranges = _pairs(adapter, config)
    ranks = {m: t.rank for m, t in pairs.items()}
    alphas = {m: t.alpha for m, t in pairs.items()}
    r = max(ranks.values(), key=list(ranks.values()).count)  # the commonest rank
    alpha = max(alphas.values(), key=list(alphas.values()).count)
    modules = {m.rsplit(".", 1)[1] for m in pairs}
    layers = {int(m.split(".")[2]) for m in pairs}
    if len(pairs) != len(modules) * len(layers):
        raise UnsupportedFormatError("PEFT needs the same target modules in every adapted layer")
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "use_rslora": adapter.use_rslora, "use_dora": False,
        "target_modules": sorted(modules), "layers_to_transform": sorted(layers),
        "rank_pattern": {m: v for m, v in ranks.items() if v != r},
        "alpha_pattern": {m: v for m, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "modules_to_save": None, "init_lora_weights": True,
        keys.FINGERPRINT: adapter.base_fingerprint,
    }
    tensors = {}
    for m, t in pairs.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = t.A
        tensors[f"base_model.model.{m}.lora_B.weight"] = t.B
    metadata = {"format": "pt", keys.FINGERPRINT: adapter.base_fingerprint or "",
                keys.PROVENANCE: json.dumps(adapter.provenance, default=str)}
    if ranges:
        metadata[keys.ADAPTER_FUSED_RANKS] = json.dumps(ranges)
    with atomic_dir(path, replace=True) as tmp:
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2), encoding="utf-8")
        safetensors_io.write(tmp / WEIGHTS, tensors, metadata)
    return path
