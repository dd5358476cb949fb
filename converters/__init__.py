"""Format converters, one module per format, each with its reader and writer side by side, and
the registry that tells formats apart: `read_base` for model files, `load_adapter` / `save_adapter`
for adapters (every format converts to and from the one `LoraAdapter` value).

Installed as ``edgelora.converters``. Converters import the core (errors, arch, naming, base,
adapters) and each other, never the runtimes, the trainer or the cloud (tests/test_layers.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from edgelora.errors import SourceNotFoundError, UnsupportedFormatError

if TYPE_CHECKING:
    from edgelora.adapters import LoraAdapter
    from edgelora.arch import ModelConfig
    from edgelora.base import BaseModel

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# adapter format -> its converter module (each has read(path, config) and write(adapter, path, config))
ADAPTER_FORMATS = {"peft": "peft", "gguf": "gguf_lora", "onnx": "onnx_adapter"}
FORMATS = tuple(ADAPTER_FORMATS)


def _module(name: str):
    import importlib

    return importlib.import_module(f"{__name__}.{name}")


def read_base(path: str | os.PathLike) -> "BaseModel":
    """A base model from a Hugging Face checkpoint directory (safetensors only) or a GGUF file."""
    from . import gguf_model, hf

    path = Path(path)
    if path.is_dir():
        return hf.read(path)
    if path.suffix.lower() == ".gguf" or gguf_model.looks_like_gguf(path):
        return gguf_model.read(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsupportedFormatError(
            f"{path}: pickle checkpoints can run code when loaded and edgelora refuses them; "
            "save the model as safetensors (save_pretrained(..., safe_serialization=True)) and pass its directory")
    raise UnsupportedFormatError(
        f"{path}: not a model edgelora reads; pass a Hugging Face checkpoint directory, a .gguf file or a model name")


def sniff_adapter(path: str | os.PathLike) -> str:
    """The format of an adapter at `path`: 'peft', 'gguf' or 'onnx'."""
    p = Path(path)
    if not p.exists():
        raise SourceNotFoundError(f"no such adapter: {p}")
    if p.is_dir():
        if (p / "adapter_config.json").exists():
            return "peft"
        raise UnsupportedFormatError(f"{p}: a directory without adapter_config.json is not a PEFT adapter")
    with open(p, "rb") as f:
        head = f.read(8)
    if head[:4] == b"GGUF":
        return "gguf"
    if p.suffix == ".onnx_adapter":
        return "onnx"
    if p.suffix in PICKLE_SUFFIXES or head[:1] == b"\x80" or head[:2] == b"PK":
        raise UnsupportedFormatError(f"{p}: pickle adapters can run code when loaded and edgelora refuses them; save it as safetensors")
    raise UnsupportedFormatError(f"{p}: not an adapter edgelora reads (a PEFT dir, a GGUF LoRA or a .onnx_adapter)")


def load_adapter(path: str | os.PathLike, config: "ModelConfig | None" = None) -> "LoraAdapter":
    """Reads an adapter in any supported format (sniffed from the path). `config`, the base's, is
    needed only for GGUF LoRA files made by other tools (to undo llama.cpp's q/k permutation) and
    for adapters on a family's fused modules (to split Phi-3's qkv_proj into q, k and v)."""
    return _module(ADAPTER_FORMATS[sniff_adapter(path)]).read(path, config)


def save_adapter(adapter: "LoraAdapter", path: str | os.PathLike, fmt: str, config: "ModelConfig", *,
                 check: bool = True, precision: str = "f32") -> Path:
    """Writes `adapter` in format `fmt` ('peft', 'gguf' or 'onnx'), after checking it fits `config`
    (`check=False` where the caller has just checked it); GGUF files also in `precision` f16 or q8_0."""
    if fmt not in ADAPTER_FORMATS:
        raise UnsupportedFormatError(f"adapter format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if check:
        adapter.check_fits(config)
    if precision != "f32":
        if fmt != "gguf":
            raise UnsupportedFormatError(f"{fmt} adapters are written in f32; f16 and q8_0 are for GGUF LoRA files")
        return _module(ADAPTER_FORMATS[fmt]).write(adapter, path, config, precision)
    return _module(ADAPTER_FORMATS[fmt]).write(adapter, path, config)
