"""Hugging Face checkpoint directories: config.json, *.safetensors, tokenizer files.

Reads Llama-family checkpoints (safetensors only: pickle weights are refused) into a `BaseModel`
and writes a `BaseModel` as a plain float32 checkpoint that transformers loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgelora import naming
from edgelora._io import atomic_dir
from edgelora.arch import ModelConfig
from edgelora.base import BaseModel, Weights
from edgelora.errors import CorruptFileError, UnsupportedArchitectureError, UnsupportedFormatError
from edgelora.tokenizer import Tokenizer

from . import keys, safetensors_io

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
IGNORED_TENSORS = ("rotary_emb.inv_freq",)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: not valid JSON ({e}): fix or re-download it") from e


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index).get("weight_map", {})
        files = sorted({path / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CorruptFileError(f"{path}: the safetensors index names missing shards {missing}: re-download the checkpoint")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for pat in PICKLE_PATTERNS for p in path.glob(pat))
    if pickles:
        raise UnsupportedFormatError(
            f"{path}: weights are pickle files ({', '.join(pickles)}), which can run code when loaded and edgelora "
            "refuses them; re-save the model as safetensors (save_pretrained(..., safe_serialization=True))")
    raise UnsupportedFormatError(f"{path}: no *.safetensors weights found; is this a Hugging Face checkpoint directory?")


def read_tokenizer(path: Path) -> Tokenizer:
    tj = path / "tokenizer.json"
    if not tj.exists():
        extra = " (only a SentencePiece tokenizer.model is there)" if (path / "tokenizer.model").exists() else ""
        raise UnsupportedFormatError(
            f"{path}: no tokenizer.json{extra}; save the tokenizer with a fast tokenizer (AutoTokenizer.save_pretrained)")
    cfg_path = path / "tokenizer_config.json"
    tok_cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    template_file = path / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.exists() else None
    if template is None and (path / "chat_template.json").exists():
        template = _read_json(path / "chat_template.json").get("chat_template")
    try:
        return Tokenizer.from_hf_files(tj.read_text(encoding="utf-8"), tok_cfg, template)
    except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
        raise CorruptFileError(f"{tj}: tokenizers cannot read it ({e}): re-download or re-save the tokenizer") from e


def read(path: str | Path) -> BaseModel:
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.exists():
        raise UnsupportedFormatError(f"{path}: no config.json; pass a Hugging Face checkpoint directory or a .gguf file")
    config = ModelConfig.from_hf(_read_json(cfg_path))

    refs: dict[str, safetensors_io.TensorRef] = {}
    for f in _weight_files(path):
        refs.update(safetensors_io.read_index(f)[0])

    expected = config.shapes()
    files = naming.layout(config, "hf")
    if config.tie_word_embeddings:
        files.setdefault(naming.GLOBAL_TENSORS["lm_head"][naming.HF], ())  # a tied head saved anyway: ignored
    loaders: dict[str, Callable[[], np.ndarray]] = {}
    unexpected: list[str] = []
    dtypes: dict[str, int] = {}
    for hf_name, ref in refs.items():
        if hf_name.endswith(IGNORED_TENSORS):
            continue
        members = files.get(hf_name)
        if members is None:
            unexpected.append(hf_name)
            continue
        want = (sum(expected[m][0] for m in members), *expected[members[0]][1:]) if members else ref.shape
        if tuple(ref.shape) != want:
            raise CorruptFileError(f"{path}: tensor {hf_name} has shape {list(ref.shape)} but config.json implies {list(want)}")
        if len(members) == 1:
            loaders[members[0]] = _offset(ref.load, config) if _is_norm(members[0]) else ref.load
        for m in members if len(members) > 1 else ():
            loaders[m] = _row_slice(ref.load, members, m, expected)
        dtypes[ref.dtype] = dtypes.get(ref.dtype, 0) + 1
    if unexpected:
        bias = [n for n in unexpected if n.endswith(".bias")]
        what = f"with biases ({bias[0]})" if bias else f"with tensors a {config.family} model does not have"
        raise UnsupportedArchitectureError(
            f"unsupported architecture {config.model_type!r} {what}: {', '.join(sorted(unexpected)[:5])}"
            f"{' ...' if len(unexpected) > 5 else ''}")
    missing = [n for n in expected if n not in loaders]
    if missing:
        raise CorruptFileError(f"{path}: missing tensors {', '.join(naming.to_hf(n, config.family) for n in missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}: the checkpoint is incomplete")
    ordered = {n: loaders[n] for n in expected}
    return BaseModel(
        config=config, weights=Weights(ordered, expected), tokenizer=read_tokenizer(path),
        source=str(path), source_format="hf", source_dtype=max(dtypes, key=dtypes.get), name=path.name,
    )


def _is_norm(canonical: str) -> bool:
    return canonical.endswith("norm")


def _offset(load: Callable[[], np.ndarray], config: ModelConfig, sign: int = 1) -> Callable[[], np.ndarray]:
    """Gemma's norms multiply by (1 + w): edgelora keeps the multiplier itself (as llama.cpp does),
    computed in float32 as transformers computes it."""
    off = config.spec.norm_offset
    if not off:
        return load
    return lambda: np.asarray(load(), np.float32) + np.float32(sign * off)


def _row_slice(load: Callable[[], np.ndarray], members: tuple[str, ...], member: str,
               shapes: dict[str, tuple[int, ...]]) -> Callable[[], np.ndarray]:
    """A loader of one member of a fused tensor (Phi-3's qkv_proj, gate_up_proj)."""
    return lambda: np.ascontiguousarray(naming.split_rows(load(), members, shapes)[member])


def write_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    (out / "tokenizer.json").write_text(tokenizer.to_json(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer.hf_tokenizer_config(), indent=2), encoding="utf-8")
    special = {k: v for k, v in (("bos_token", tokenizer.bos_token), ("eos_token", tokenizer.eos_token),
                                 ("pad_token", tokenizer.pad_token), ("unk_token", tokenizer.unk_token)) if v}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    if tokenizer.chat_template:
        (out / "chat_template.jinja").write_text(tokenizer.chat_template, encoding="utf-8")


def write(base: BaseModel, out: str | Path, *, replace: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Writes `base` as a float32 Hugging Face checkpoint directory, atomically."""
    out = Path(out)
    config = base.config
    tok = base.tokenizer
    with atomic_dir(out, replace=replace) as tmp:
        extra = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                 keys.FINGERPRINT: base.fingerprint}
        (tmp / "config.json").write_text(json.dumps(config.to_hf(**extra), indent=2), encoding="utf-8")
        gen = {k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id)) if v is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")
        tensors = {}
        files = naming.layout(config, "hf")
        for i, (hf_name, members) in enumerate(files.items()):
            parts = [_offset(lambda m=m: base.weights[m], config, -1)() if _is_norm(m) else base.weights[m]
                     for m in members]
            tensors[hf_name] = parts[0] if len(parts) == 1 else np.concatenate(parts, 0)
            if progress:
                progress(i + 1, len(files))
        safetensors_io.write(tmp / "model.safetensors", tensors, metadata={"format": "pt"})
        write_tokenizer(tok, tmp)
    return out
