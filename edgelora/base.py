"""`BaseModel` and `load_base`: one view of a Llama-family model, whatever file it came from.

Weights are loaded lazily, one tensor at a time, as float32 in canonical naming and Hugging Face
orientation; the fingerprint hashes the architecture and those float weights in canonical order,
so the same model read from a Hugging Face directory or from an F32 GGUF of it hashes the same.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .arch import ModelConfig
from .errors import SourceNotFoundError, UnsupportedFormatError
from .tokenizer import Tokenizer

Loader = Callable[[], np.ndarray]


class Weights(Mapping):
    """Canonical name -> float32 array, each loaded (and dequantized) when asked for."""

    def __init__(self, loaders: dict[str, Loader], shapes: dict[str, tuple[int, ...]]):
        self._loaders = loaders
        self._shapes = shapes

    def __getitem__(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


@dataclass
class BaseModel:
    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer
    source: str
    source_format: str  # "hf" or "gguf"
    source_dtype: str  # how the source stores its weights: "F32", "BF16", "Q4_1", ... (the commonest)
    name: str = ""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """"sha256:<hex>" over the architecture and the float32 weights in canonical order."""
        if self._fingerprint is None:
            self._fingerprint = compute_fingerprint(self.config, self.weights)
        return self._fingerprint

    @property
    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name or Path(self.source).name,
            "source": self.source,
            "format": self.source_format,
            "stored as": self.source_dtype,
            "parameters": self.num_parameters,
            "architecture": self.config.summary(),
            "context length": self.config.max_position_embeddings,
            "chat template": "yes" if self.tokenizer.chat_template else "no",
            "fingerprint": self.fingerprint,
        }


def compute_fingerprint(config: ModelConfig, weights: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    h.update(b"edgelora-fingerprint-v1\n")
    h.update(json.dumps(config.identity(), sort_keys=True).encode())
    for name, shape in config.shapes().items():
        w = np.ascontiguousarray(weights[name], dtype="<f4")
        if w.shape != shape:
            raise UnsupportedFormatError(f"tensor {name} has shape {w.shape}, the config says {shape}")
        h.update(f"\n{name}:{','.join(map(str, shape))}\n".encode())
        h.update(memoryview(w).cast("B"))
    return "sha256:" + h.hexdigest()


def load_base(source: str | os.PathLike, *, progress: bool = True) -> BaseModel:
    """Reads a base model from a registered name (``smollm2-135m``), a Hugging Face Llama-family
    checkpoint directory (safetensors only) or a ``.gguf`` file."""
    from .models import REGISTRY, ensure_model

    text = os.fspath(source)
    if text in REGISTRY:
        hf_dir = ensure_model(text, progress=progress)
        base = load_base(hf_dir, progress=progress)
        base.name = text
        return base
    path = Path(text).expanduser()
    if not path.exists():
        known = ", ".join(REGISTRY)
        raise SourceNotFoundError(
            f"no such model: {text!r} is neither a file, a directory, nor a known model name ({known})")
    if path.is_dir():
        from .converters import hf

        return hf.read(path)
    from .converters import gguf_model

    if path.suffix.lower() == ".gguf" or gguf_model.looks_like_gguf(path):
        return gguf_model.read(path)
    if path.suffix.lower() in (".bin", ".pt", ".pth", ".pkl", ".ckpt"):
        raise UnsupportedFormatError(
            f"{path}: pickle checkpoints can run code when loaded and edgelora refuses them; "
            "save the model as safetensors (save_pretrained(..., safe_serialization=True)) and pass its directory")
    raise UnsupportedFormatError(
        f"{path}: not a model edgelora reads; pass a Hugging Face checkpoint directory, a .gguf file or a model name")
